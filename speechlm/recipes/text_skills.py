"""Recipe `task: text_skills`: teach a pretrained instruct LLM the verse tasks, text only.

    task: text_skills
    model: {init: models:smollm2-135m-instruct, template: chat,
            lora: {r: 16, alpha: 32, target_modules: [q_proj, v_proj]}}
    data: {mixture: {repeat: 1.0, last_word: 1.0, mentions_god: 1.0}, num_examples: 6000}
    train: {max_steps: 400, lr: 1.0e-3, precision: bf16, ...}
    eval: {split: test, max_items: 100}

BLSP's claim is that what an LLM does with text it then does with speech the
adapter has aligned. A small LLM may not yet do the tasks a transfer table
asks (SmolLM2-135M repeats a verse at 30-37% WER and answers "last word" or
"does it mention God?" wrongly), and a table whose text bound is weak shows
no transfer. This recipe teaches those tasks from text alone, with LoRA, in
the LLM's own prompt format: the same `template` (and system prompt) the
SpeechLM will use, with the verse where the speech will go, so the text
cascade of the transfer table reads exactly what training showed.

`run(config)`:
1. scores the base LLM on the held-out verses (`eval.split`, the books the
   embedded speech corpus holds out) for every task of the mixture;
2. builds the training examples from the training books only (the same
   builders as the zoo's text LLM, `speechlm.data.instructions`), response and
   end-of-turn learned;
3. trains LoRA (peft) with the shared Trainer, batches bucketed by length;
4. merges LoRA into the weights and saves `output_dir/final` as a plain
   transformers directory (tokenizer and chat template included), plus the
   LoRA weights alone in `output_dir/final/lora/` (a few MB);
5. scores the saved model again; results.json holds both tables.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models.lora import LoraSettings
from ..training.trainer import TrainConfig

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
METADATA_FILE = "speechlm.json"
# what a shipped zoo build carries (speechlm.zoo): the LoRA weights (a few MB), merged into
# the base model again on install (finish_shipped_install)
SHIPPED_FILES = ("final/lora/adapter_model.safetensors", "final/lora/adapter_config.json",
                 "final/speechlm.json")


@dataclass
class ModelConfig:
    init: str = "models:smollm2-135m-instruct"  # any name the resolver takes
    template: str = "chat"                      # the SpeechLM's prompt format ("chat", "blsp")
    system_prompt: str | None = None            # chat: as the SpeechLM will use it
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(
        r=16, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"]))


@dataclass
class DataConfig:
    mixture: dict[str, float] = field(default_factory=lambda: {
        "repeat": 1.0, "last_word": 1.0, "mentions_god": 1.0})
    num_examples: int = 6000                    # examples per epoch, split by the mixture
    # the base LLM's own greedy continuations of this many training verses (BLSP's stage-1
    # prompt), learned beside the tasks: without them the LoRA turns "continue" into
    # "repeat", and BLSP's continuations would be the transcripts themselves
    replay_continuations: int = 0
    # PCP (arXiv 2305.01711): a corpus `speechlm build prompt-corpus` wrote from domain text,
    # in the same templates, learned beside the tasks (the first N examples; null: all)
    prompt_corpus: str | None = None
    prompt_corpus_examples: int | None = None
    max_input_words: int | None = 40            # longer verses are not used as inputs
    paraphrase_prob: float = 0.3                # non-canonical instruction wordings
    max_seq_len: int = 192
    max_batch_tokens: int = 2048                # padded tokens per batch
    num_buckets: int = 10

    def __post_init__(self):
        from .text_lm import check_task_mixture

        if self.replay_continuations < 0:
            raise ConfigError("data.replay_continuations must be >= 0")
        if self.prompt_corpus_examples is not None and self.prompt_corpus_examples < 1:
            raise ConfigError("data.prompt_corpus_examples must be >= 1 or null (all)")
        if "text" in self.mixture:
            raise ConfigError("data.mixture: plain text has no prompt to learn from here; "
                              "give instruction tasks only")
        check_task_mixture(self.mixture, "data.mixture")
        if self.max_batch_tokens < self.max_seq_len:
            raise ConfigError(f"data.max_batch_tokens ({self.max_batch_tokens}) must be >= "
                              f"data.max_seq_len ({self.max_seq_len})")


@dataclass
class EvalConfig:
    split: str = "test"
    dev_split: str = "dev"
    max_items: int = 100                        # per task, before and after
    dev_items: int = 32                         # per task, teacher-forced dev loss
    batch_size: int = 32

    def __post_init__(self):
        for name in ("split", "dev_split"):
            if getattr(self, name) not in ("dev", "test"):
                raise ConfigError(f"eval.{name} must be 'dev' or 'test'")


@dataclass
class Config:
    task: str = "text_skills"
    threads: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=20, weight_decay=0.0, precision="bf16", save_every=None))
    eval: EvalConfig = field(default_factory=EvalConfig)


def encode_examples(tokenizer, template, examples, max_seq_len: int) -> tuple[list[dict], int]:
    """Training items (input_ids, labels, task) in the template's format, and how many
    were dropped for length."""
    items, dropped = [], 0
    for e in examples:
        enc = template.encode(tokenizer, e.instruction, transcript=e.input, response=e.response)
        prompt = enc.prompt_ids()
        ids = prompt + enc.response
        if len(ids) > max_seq_len:
            dropped += 1
            continue
        items.append({"input_ids": ids, "labels": [-100] * len(prompt) + enc.response,
                      "task": e.task})
    return items, dropped


def score_tasks(model, tokenizer, template, tasks, split: str, *, max_items: int,
                batch_size: int) -> tuple[dict, list[dict]]:
    """({task: scores}, hypotheses) of greedy answers on the held-out verses of `split`."""
    import torch

    from ..data.instructions import TASKS, eval_contexts, eval_examples
    from ..inference.text_generation import greedy_generate, stop_ids_of
    from ..models.prompts import pick_pad_id

    contexts = {lang: eval_contexts(split, lang) for lang in ("en", "es")}
    scores, rows = {}, []
    stops = stop_ids_of(model, template.stop_token_ids(tokenizer))
    model.eval()
    with torch.no_grad():
        for name in tasks:
            task = TASKS[name]
            examples = eval_examples(task, contexts[task.lang], limit=max_items)
            prompts = [template.encode(tokenizer, e.instruction, transcript=e.input).prompt_ids()
                       for e in examples]
            new = greedy_generate(model, prompts, pad_id=pick_pad_id(tokenizer), stop_ids=stops,
                                  max_new_tokens=task.max_new_tokens, batch_size=batch_size)
            hyps = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            result = task.score([e.response for e in examples], hyps,
                                [e.input for e in examples])
            scores[name] = {**result, "n": len(examples)}
            rows += [{"task": name, "ref_id": e.ref, "input": e.input, "reference": e.response,
                      "hypothesis": h} for e, h in zip(examples, hyps, strict=True)]
    return scores, rows


def continue_examples(model, tokenizer, template, verses, *, batch_size: int = 64,
                      max_new_tokens: int = 64) -> list:
    """Examples of the `continue` task whose responses are `model`'s own greedy
    continuations of `verses` (BLSP's stage-1 prompt, in `template`)."""
    import torch

    from ..data.instructions import CONTINUE_INSTRUCTION, Example
    from ..inference.text_generation import greedy_generate, stop_ids_of
    from ..models.prompts import pick_pad_id

    prompts = [template.encode(tokenizer, CONTINUE_INSTRUCTION, transcript=v.en).prompt_ids()
               for v in verses]
    with torch.no_grad():
        new = greedy_generate(model, prompts, pad_id=pick_pad_id(tokenizer),
                              stop_ids=stop_ids_of(model, template.stop_token_ids(tokenizer)),
                              max_new_tokens=max_new_tokens, batch_size=batch_size)
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return [Example(task="continue", instruction=CONTINUE_INSTRUCTION, input=v.en, response=t,
                    ref=v.ref) for v, t in zip(verses, texts, strict=True)]


def continuation_drift(before: list, after: list) -> dict:
    """How the LLM's continuations of the same verses changed: chrF of the new ones against
    the old, and how often each merely repeats its verse."""
    from ..data.instructions import _answer_key
    from ..eval.metrics import chrf

    def copies(examples) -> float:
        return sum(_answer_key(e.response) == _answer_key(e.input) for e in examples) / max(
            len(examples), 1)

    return {"chrf_vs_before": chrf([e.response for e in before], [e.response for e in after]),
            "copies_input_before": copies(before), "copies_input_after": copies(after),
            "n": len(before)}


def format_scores(before: dict, after: dict | None = None) -> str:
    from ..data.instructions import TASKS
    from .text_lm import HEADLINE

    def cell(name: str, scores: dict) -> str:
        a, b = HEADLINE[TASKS[name].metric]
        return f"{a} {scores[a]:.3g}  {b} {scores[b]:.3g}"

    rows = [(name, cell(name, scores), cell(name, after[name]) if after else "")
            for name, scores in before.items()]
    width = max(len("before"), *(max(len(b), len(a)) for _, b, a in rows)) + 3
    lines = [f"  {'task':<16}{'before':>{width}}" + (f"{'after':>{width}}" if after else "")]
    lines += [f"  {name:<16}{b:>{width}}" + (f"{a:>{width}}" if after else "")
              for name, b, a in rows]
    return "\n".join(lines)


def merge_into_base(config: Config, lora_dir: Path, out_dir: Path) -> None:
    """The base LLM with the LoRA weights of `lora_dir` merged, saved (with its tokenizer)
    into `out_dir`: what `run` saves, rebuilt from the LoRA alone."""
    from peft import PeftModel

    from ..models.lora import merge_llm_lora
    from ..models.speech_lm import load_llm

    llm, tokenizer = load_llm(config.model.init)
    merged = merge_llm_lora(PeftModel.from_pretrained(llm, lora_dir))
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def finish_shipped_install(config: Config, final_dir: Path) -> None:
    merge_into_base(config, final_dir / "lora", final_dir)


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    import torch

    from ..data.instructions import TASKS as INSTRUCTION_TASKS
    from ..data.instructions import (
        build_examples,
        eval_contexts,
        eval_examples,
        split_training_verses,
    )
    from ..data.sampler import DurationBucketSampler
    from ..jsonl import atomic_directory, atomic_write, write_jsonl
    from ..models.lora import apply_llm_lora, merge_llm_lora
    from ..models.prompts import ChatTemplate, get_template, pick_pad_id
    from ..models.speech_lm import load_llm
    from ..pretrained.resolve import resolve_model_dir
    from ..training.objectives.causal_lm import CausalLMCollator, CausalLMObjective, TokenDataset
    from ..training.trainer import Trainer, seed_everything
    from . import start_run
    from .text_lm import items_nll

    cfg = config
    dist, out, say = start_run(cfg.train, cfg.threads)
    started = time.perf_counter()
    pcp = []  # read first: a bad file fails before the base LLM is scored
    if cfg.data.prompt_corpus:
        from ..pipelines.prompt_corpus import read_prompt_corpus

        pcp = read_prompt_corpus(cfg.data.prompt_corpus, cfg.data.prompt_corpus_examples)
        say(f"{len(pcp)} prompt-corpus examples from {cfg.data.prompt_corpus}")
    base_dir = resolve_model_dir(cfg.model.init, what="model.init", say=say)
    llm, tokenizer = load_llm(base_dir)
    template = get_template(cfg.model.template,
                            **({"system_prompt": cfg.model.system_prompt}
                               if cfg.model.template == "chat" else {}))
    if isinstance(template, ChatTemplate):
        ChatTemplate.check(tokenizer, str(base_dir))
    tasks = [t for t, w in cfg.data.mixture.items() if w > 0]

    say(f"scoring the base LLM {base_dir} on the {cfg.eval.split} verses:")
    before, _ = score_tasks(llm, tokenizer, template, tasks, cfg.eval.split,
                            max_items=cfg.eval.max_items, batch_size=cfg.eval.batch_size)
    say(format_scores(before))
    held_out = [c.verse for c in eval_contexts(cfg.eval.split, "en")][: cfg.eval.max_items]
    continued_before = continue_examples(llm, tokenizer, template, held_out)

    train_verses, _ = split_training_verses()
    replay = []
    if cfg.data.replay_continuations:
        chosen = random.Random(cfg.train.seed).sample(
            train_verses, min(cfg.data.replay_continuations, len(train_verses)))
        replay = [e for e in continue_examples(llm, tokenizer, template, chosen) if e.response]
        say(f"{len(replay)} of the base LLM's own continuations of training verses to replay")
    examples = build_examples(cfg.data.mixture, train_verses, cfg.data.num_examples,
                              seed=cfg.train.seed, paraphrase_prob=cfg.data.paraphrase_prob,
                              max_input_words=cfg.data.max_input_words)
    examples = examples + replay + pcp
    random.Random(f"{cfg.train.seed}-replay").shuffle(examples)
    items, dropped = encode_examples(tokenizer, template, examples, cfg.data.max_seq_len)
    if not items:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} drops every example; "
                          "raise it")
    say(f"{len(items)} training examples from the training books ({dropped} over "
        f"data.max_seq_len dropped)")
    dev_contexts = {lang: eval_contexts(cfg.eval.dev_split, lang) for lang in ("en", "es")}
    dev_items = {}
    for name in tasks:
        task = INSTRUCTION_TASKS[name]
        chosen = eval_examples(task, dev_contexts[task.lang], limit=cfg.eval.dev_items)
        dev_items[name], _ = encode_examples(tokenizer, template, chosen, cfg.data.max_seq_len)

    def evaluate(model) -> dict[str, float]:
        metrics, total, count = {}, 0.0, 0
        for name, task_items in dev_items.items():
            nll, n = items_nll(model, pick_pad_id(tokenizer), task_items,
                               batch_size=cfg.eval.batch_size)
            metrics[f"loss_{name}"] = nll / max(n, 1)
            total, count = total + nll, count + n
        metrics["loss"] = total / max(count, 1)
        return metrics

    seed_everything(cfg.train.seed)
    model = apply_llm_lora(llm, cfg.model.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"LoRA {cfg.model.lora.target_modules}: {trainable / 1e6:.2f}M trainable parameters")
    dataset = TokenDataset(items)
    sampler = DurationBucketSampler(dataset.lengths(), max_batch_duration=cfg.data.max_batch_tokens,
                                    num_buckets=cfg.data.num_buckets, shuffle=True,
                                    seed=cfg.train.seed, rank=dist.rank,
                                    world_size=dist.world_size)
    objective = CausalLMObjective(model, evaluate_fn=evaluate)
    trainer = Trainer(cfg.train, objective, dataset, sampler,
                      collate_fn=CausalLMCollator(pick_pad_id(tokenizer)), run_config=cfg,
                      identity_keys=("model", "data"))
    fit_start = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - fit_start

    results: dict = {}
    final = out / FINAL_DIR
    if dist.is_main:
        metadata = {"kind": "text_skills", "base": str(cfg.model.init),
                    "template": cfg.model.template, "system_prompt": cfg.model.system_prompt,
                    "tasks": {t: list(INSTRUCTION_TASKS[t].instructions) for t in tasks}}
        if final.exists():  # a rerun (or a retrain over an installed shipped build)
            shutil.rmtree(final)
        with atomic_directory(final) as tmp:
            model.save_pretrained(tmp / "lora")  # the LoRA weights alone (peft format)
            merged = merge_llm_lora(model)
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        reloaded, reloaded_tokenizer = load_llm(final)
        torch.set_grad_enabled(False)
        try:
            after, rows = score_tasks(reloaded, reloaded_tokenizer, template, tasks,
                                      cfg.eval.split, max_items=cfg.eval.max_items,
                                      batch_size=cfg.eval.batch_size)
            continued_after = continue_examples(reloaded, reloaded_tokenizer, template,
                                                held_out)
        finally:
            torch.set_grad_enabled(True)
        drift = continuation_drift(continued_before, continued_after)
        write_jsonl(out / f"{cfg.eval.split}_hyps.jsonl", rows + [
            {"task": "continue", "ref_id": b.ref, "input": b.input, "reference": b.response,
             "hypothesis": a.response} for b, a in zip(continued_before, continued_after,
                                                       strict=True)])
        say(f"held-out {cfg.eval.split} verses, before and after {result.step} updates "
            f"({train_seconds:.0f} s):\n" + format_scores(before, after)
            + f"\n  continuations (BLSP's prompt): chrF {drift['chrf_vs_before']:.1f} against "
              f"the base LLM's; repeating the verse {100 * drift['copies_input_before']:.0f}% "
              f"-> {100 * drift['copies_input_after']:.0f}%")
        results = {"before": before, "after": after, "continue": drift, "split": cfg.eval.split,
                   "train": {"steps": result.step, "train_seconds": train_seconds,
                             "final_train_loss": result.train_metrics.get("loss"),
                             "dev": result.eval_metrics,
                             "wall_seconds": time.perf_counter() - started},
                   "examples": len(items), "replayed_continuations": len(replay),
                   "final_dir": str(final)}
        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=2)
        say(f"saved {final} (merged LLM; LoRA alone in {final / 'lora'})")
    return results

