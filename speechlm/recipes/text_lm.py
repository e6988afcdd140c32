"""Recipe `task: text_lm`: a small Llama-style instruction LLM trained from scratch on the
embedded English-Spanish corpus: the embedded zoo's text LLM, which BLSP extends to speech.

    task: text_lm
    tokenizer: {vocab_size: 4096}
    model: {config: {hidden_size: 256, num_hidden_layers: 4, ...}}   # LlamaConfig fields
    data:
      mixture: {text: 1.0, repeat: 2.0, translate_es: 2.0, continue: 1.0, ...}
      num_examples: 20000
      max_seq_len: 160
    train: {max_steps: 600, lr: 3.0e-3, ...}
    eval: {split: test, max_items: 100}

`run(config)`:
1. trains a SentencePiece tokenizer (byte fallback, Llama-2 settings, a <pad>
   piece) on the training verses, English and Spanish (cached by settings);
2. builds the instruction examples of `speechlm.data.instructions` in the BLSP
   format (`###[Human]:{instruction} {input}\\n\\n\\n###[Assistant]:{response}</s>`,
   loss on the response and EOS only) plus plain text, never from the books the
   embedded speech corpus holds out for dev and test;
3. trains a LlamaForCausalLM from its config with the shared Trainer, batches
   bucketed by length under a padded-token budget; evaluates dev loss per task;
4. saves `output_dir/final/` as a normal HF directory (config, safetensors,
   tokenizer files with a chat template that renders the BLSP format,
   generation_config with eos/pad, and `speechlm.json` naming the tasks and
   their instructions);
5. reloads it and scores the held-out verses of the embedded speech corpus's
   `eval.split` per task with greedy generation (KV cache, batched): WER/exact
   match for repeat, BLEU/chrF for translation, accuracy for the QA tasks,
   perplexity (and generated-continuation stats) for continue; writes
   `results.json` and `{split}_hyps.jsonl` and prints a table.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.switch_sampler import EpochListSampler
from ..errors import ConfigError
from ..models.sparse_lowrank import SparseLowRankConfig, check_not_sharded
from ..training.salt import SALTConfig
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
METADATA_FILE = "speechlm.json"
TOKENIZER_DIR = "tokenizer"
# train.sharding=fsdp works: the whole model is gathered on rank 0 after training, and
# `speechlm convert fsdp` turns a sharded checkpoint into final/'s files (gathered_files)
SHARDING_SUPPORTED = True

DEFAULT_MIXTURE = {"text": 1.0, "continue": 1.0, "repeat": 2.0, "repeat_es": 0.5,
                   "translate_es": 2.0, "translate_en": 0.5, "last_word": 0.5,
                   "mentions_god": 0.5}


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096                # pieces, including <unk> <s> </s> <pad> and 256 bytes
    every: int = 1                        # train on every N-th training verse (both languages)

    def __post_init__(self):
        if self.vocab_size < 300:
            raise ConfigError(f"tokenizer.vocab_size must be >= 300 (260 are special and byte "
                              f"pieces), got {self.vocab_size}")
        if self.every < 1:
            raise ConfigError("tokenizer.every must be >= 1")


@dataclass
class ModelConfig:
    # LlamaConfig fields; vocab_size and the special-token ids come from the tokenizer.
    config: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        rms_norm_eps=1e-5))
    # Attention kernel while training (not saved: the checkpoint loads with transformers'
    # default). On CPU, eager attention trains these small models faster than SDPA, whose
    # CPU backward is slow at short lengths.
    attn_implementation: Literal["eager", "sdpa"] = "eager"
    # SLTrain (sparse plus low-rank) or SPDF (sparse masks) on the attention/MLP projections
    # while training (speechlm.models.sparse_lowrank); final/ is always the plain dense model
    sparse_lowrank: SparseLowRankConfig | None = None


@dataclass
class WarmupConfig:
    """An optional first phase on its own task mixture, e.g. short copying examples: a small
    model from scratch learns to copy (an induction circuit) only after a long plateau, which
    a copy-only phase of short sequences gets through several times faster than the full mix."""

    mixture: dict[str, float] = field(default_factory=dict)  # empty: no warm-up phase
    steps: int = 0                        # optimizer updates spent on it
    num_examples: int = 20000
    max_input_words: int | None = 16

    def __post_init__(self):
        if self.steps < 0 or self.num_examples < 1:
            raise ConfigError("data.warmup.steps must be >= 0 and num_examples >= 1")
        if bool(self.mixture) != bool(self.steps):
            raise ConfigError("data.warmup.mixture and data.warmup.steps go together: give both "
                              "(or neither, for no warm-up phase)")
        check_task_mixture(self.mixture, "data.warmup.mixture", allow_empty=True)


def check_task_mixture(mixture: dict[str, float], where: str, *, allow_empty: bool = False) -> None:
    from ..data.instructions import PLAIN_TEXT, TASKS

    unknown = [k for k in mixture if k != PLAIN_TEXT and k not in TASKS]
    if unknown:
        raise ConfigError(f"{where}: unknown task(s) {', '.join(unknown)}; known: "
                          f"{PLAIN_TEXT}, {', '.join(TASKS)}")
    if not mixture and allow_empty:
        return
    if not mixture or any(w < 0 for w in mixture.values()) or sum(mixture.values()) <= 0:
        raise ConfigError(f"{where}: give each task a weight >= 0, at least one > 0")


@dataclass
class DataConfig:
    mixture: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIXTURE))
    num_examples: int = 20000             # examples per epoch, split by the mixture weights
    max_seq_len: int = 160                # longer examples are dropped (and counted)
    max_input_words: int | None = 40      # longer verses are not used as task inputs
    plain_text_words: int = 64            # words per plain-text passage
    paraphrase_prob: float = 0.3          # non-canonical instruction wordings
    max_batch_tokens: int = 4096          # padded tokens per batch (per process)
    max_batch_size: int | None = None
    num_buckets: int = 10
    warmup: WarmupConfig = field(default_factory=WarmupConfig)

    def __post_init__(self):
        if self.num_examples < 1 or self.max_seq_len < 8 or self.max_batch_tokens < 8:
            raise ConfigError("data.num_examples, max_seq_len and max_batch_tokens must be "
                              "positive (max_seq_len and max_batch_tokens >= 8)")
        if self.max_batch_tokens < self.max_seq_len:
            raise ConfigError(f"data.max_batch_tokens ({self.max_batch_tokens}) must be >= "
                              f"data.max_seq_len ({self.max_seq_len}): the longest example "
                              "must fit in a batch")
        if not 0 <= self.paraphrase_prob <= 1:
            raise ConfigError("data.paraphrase_prob must be in [0, 1]")
        check_task_mixture(self.mixture, "data.mixture")


@dataclass
class EvalConfig:
    split: str = "test"                   # held-out verses scored at the end (dev or test)
    dev_split: str = "dev"                # teacher-forced dev loss during training
    max_items: int = 100                  # per task, final scoring
    dev_items: int = 32                   # per task, dev loss
    batch_size: int = 32                  # generation batch
    tasks: list[str] | None = None        # None: every task of the mixture
    paraphrases: bool = True              # also score the second wording (BLSP's "audio" one)
    examples: int = 2                     # hypotheses printed per task

    def __post_init__(self):
        for name in ("split", "dev_split"):
            if getattr(self, name) not in ("dev", "test"):
                raise ConfigError(f"eval.{name} must be 'dev' or 'test', got "
                                  f"{getattr(self, name)!r}")


@dataclass
class Config:
    task: str = "text_lm"
    # torch CPU threads (None: torch's default, one per core). On a CPU that other jobs
    # share, 1 thread is often faster than 2 (the threads wait for each other).
    threads: int | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=3e-3, warmup_steps=50, weight_decay=0.1, betas=(0.9, 0.95), save_every=None))
    eval: EvalConfig = field(default_factory=EvalConfig)
    # SALT (arXiv 2410.18779): KD from a smaller teacher for the first salt.kd_steps updates,
    # then plain CE; optional selection of the KD phase's data (speechlm.training.salt)
    salt: SALTConfig | None = None

    def __post_init__(self):
        if isinstance(self.salt, dict):
            self.salt = SALTConfig(**self.salt)
        check_not_sharded(self.model.sparse_lowrank, self.train.sharding,
                          "model.sparse_lowrank")
        if self.salt is None:
            return
        if self.salt.kd_steps >= self.train.max_steps:
            raise ConfigError(f"salt.kd_steps={self.salt.kd_steps} >= train.max_steps="
                              f"{self.train.max_steps}: the run would never switch to plain CE; "
                              "lower salt.kd_steps (the paper distills the first ~15-20% of "
                              "training)")
        if self.train.sharding == "fsdp":
            raise ConfigError("salt is not supported with train.sharding=fsdp (the teacher's "
                              "forward beside a sharded student is untested); use "
                              "train.sharding=none, or salt: null")


# -- the parts --------------------------------------------------------------------------------


def tokenizer_lines(verses, every: int = 1) -> list[str]:
    """Training text of the tokenizer: both sides of the training verses, plus the prompt
    markers and instructions (so they take few pieces)."""
    from ..data.instructions import ASSISTANT, HUMAN, TASKS

    chosen = list(verses)[::every]
    lines = [v.en for v in chosen] + [v.es for v in chosen]
    markers = [HUMAN + w for task in TASKS.values() for w in task.instructions] + [ASSISTANT]
    return lines + markers * 50


def train_tokenizer(verses, cfg: TokenizerConfig) -> Path:
    """The cached SentencePiece model file for these verses and settings."""
    from ..paths import cache_dir
    from ..text.tokenizer_train import train_sentencepiece

    roots = [cache_dir() / "tokenizers", Path(tempfile.gettempdir()) / "speechlm-tokenizers"]
    return train_sentencepiece(tokenizer_lines(verses, cfg.every), cfg.vocab_size, roots=roots,
                               name="text-lm", pad_id=3, pad_piece="<pad>")


def load_tokenizer(model_file: Path, out_dir: Path):
    """Save the HF tokenizer (BLSP chat template, <pad>) into out_dir and load it back."""
    from transformers import AutoTokenizer

    from ..data.instructions import CHAT_TEMPLATE
    from ..text.tokenizer_train import save_sentencepiece_tokenizer

    save_sentencepiece_tokenizer(model_file, out_dir, chat_template=CHAT_TEMPLATE,
                                 pad_token="<pad>", model_max_length=2048)
    return AutoTokenizer.from_pretrained(out_dir)


def build_model(cfg: ModelConfig, tokenizer):
    """A LlamaForCausalLM from `cfg.config`, sized to the tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    fixed = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    clash = sorted(set(cfg.config) & set(fixed))
    if clash:
        raise ConfigError(f"model.config: {', '.join(clash)} come(s) from the tokenizer; remove "
                          "them from the recipe")
    try:
        config = LlamaConfig(**{**cfg.config, **fixed})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config: {e}") from None
    unknown = [k for k in cfg.config if not hasattr(LlamaConfig(), k)]
    if unknown:
        raise ConfigError(f"model.config: LlamaConfig has no field(s) {', '.join(unknown)}")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(cfg.attn_implementation)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    return model


def encode_for_training(tokenizer, examples, max_seq_len: int) -> tuple[list[dict], dict]:
    """Encoded items (input_ids, labels, task) no longer than max_seq_len, and counts."""
    from collections import Counter

    from ..data.instructions import encode_examples

    items, kept, dropped = [], Counter(), Counter()
    tokens, label_tokens = Counter(), Counter()
    for example, enc in zip(examples, encode_examples(tokenizer, examples), strict=True):
        if len(enc) > max_seq_len:
            dropped[example.task] += 1
            continue
        kept[example.task] += 1
        tokens[example.task] += len(enc)
        label_tokens[example.task] += sum(1 for x in enc.labels if x != -100)
        items.append({"input_ids": enc.input_ids, "labels": enc.labels, "task": example.task})
    summary = {task: {"examples": kept[task], "tokens": tokens[task],
                      "label_tokens": label_tokens[task], "dropped_too_long": dropped[task]}
               for task in sorted(set(kept) | set(dropped))}
    return items, summary


class PhasedBatchSampler(EpochListSampler):
    """`warmup_batches` batches from `warmup` (cycling its epochs), then `main`'s epoch 0;
    later epochs are `main`'s alone. Dataset indices of `main` are shifted by `offset` (the
    warm-up items come first in the dataset). Resumable like the samplers it wraps: the
    batches of an epoch are a function of (seeds, epoch), so resuming skips those consumed."""

    def __init__(self, warmup, main, *, warmup_batches: int, offset: int):
        self.warmup, self.main = warmup, main
        self.warmup_batches, self.offset = int(warmup_batches), int(offset)
        self.rank, self.world_size = main.rank, main.world_size
        self.epoch = 0
        self._resume_at = self._position = 0

    def _epoch_batches(self) -> list[list[int]]:
        batches: list[list[int]] = []
        if self.epoch == 0 and self.warmup_batches:
            warm_epoch = 0
            while len(batches) < self.warmup_batches:
                self.warmup.set_epoch(warm_epoch)
                got = [list(b) for b in self.warmup]
                if not got:
                    raise ValueError("the warm-up sampler yields no batches")
                batches += got
                warm_epoch += 1
            batches = batches[: self.warmup_batches]
        self.main.set_epoch(self.epoch)
        return batches + [[i + self.offset for i in b] for b in self.main]

    def __len__(self) -> int:
        return (self.warmup_batches if self.epoch == 0 else 0) + len(self.main)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        return {**self.position_state(num_consumed), "warmup_batches": self.warmup_batches,
                "offset": self.offset,
                "warmup": self.warmup.state_dict(), "main": self.main.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "warmup_batches", "offset"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state does not match this sampler (differs in: {key})")
        for key in ("warmup", "main"):  # same data, seed and budget (positions aside)
            theirs = {k: v for k, v in state[key].items() if k not in ("epoch", "position")}
            ours = {k: v for k, v in mine[key].items() if k not in ("epoch", "position")}
            if theirs != ours:
                raise ValueError(f"sampler state does not match this sampler (differs in: "
                                 f"{key} data)")
        self.load_position(state)


def generate_responses(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                       batch_size: int = 32) -> list[str]:
    """Greedy responses to `prompts` (batched, left-padded, KV cache), in input order."""
    from ..inference.text_generation import greedy_generate
    from ..models.prompts import pick_pad_id

    if not prompts:
        return []
    eos = tokenizer.eos_token_id
    new = greedy_generate(model, tokenizer(prompts).input_ids, pad_id=pick_pad_id(tokenizer),
                          stop_ids=[] if eos is None else [eos], max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def response_nll(model, tokenizer, examples, *, batch_size: int = 32) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of the examples' responses + EOS."""
    from ..data.instructions import encode_examples

    items = [{"input_ids": e.input_ids, "labels": e.labels}
             for e in encode_examples(tokenizer, examples)]
    return items_nll(model, tokenizer.pad_token_id, items, batch_size=batch_size)


def items_nll(model, pad_id: int, items: list[dict], *, batch_size: int = 32
              ) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of the learned tokens of encoded items
    ({input_ids, labels}, -100 where nothing is learned)."""
    import torch

    from ..training.objectives.causal_lm import CausalLMCollator, token_losses

    collate = CausalLMCollator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = collate(items[start: start + batch_size])
            losses, _, _ = token_losses(model, batch["input_ids"].to(device),
                                        batch["attention_mask"].to(device),
                                        batch["labels"].to(device))
            total += float(losses.sum())
            count += losses.numel()
    return total, count


def dev_loss_fn(tokenizer, dev_examples: dict, batch_size: int = 32):
    """evaluate(model) for the Trainer: teacher-forced loss per task on dev verses."""

    def evaluate(model) -> dict[str, float]:
        metrics, total, count = {}, 0.0, 0
        for task, examples in dev_examples.items():
            nll, n = response_nll(model, tokenizer, examples, batch_size=batch_size)
            metrics[f"loss_{task}"] = nll / max(n, 1)
            total, count = total + nll, count + n
        metrics["loss"] = total / max(count, 1)
        return metrics

    return evaluate


def save_final(model, tokenizer, model_file: Path, out_dir: Path, metadata: dict) -> Path:
    """Write the HF directory: model + generation config, tokenizer (+ tokenizer.model),
    speechlm.json."""
    from ..jsonl import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    with atomic_write(out_dir / METADATA_FILE) as f:
        json.dump(metadata, f, indent=2, ensure_ascii=False)
    return out_dir


def gathered_files(out_dir: Path, run_config: dict, run_dir: Path) -> None:
    """Beside the weights gathered from a sharded checkpoint (`speechlm convert fsdp`), what
    save_final writes: the run's tokenizer (+ tokenizer.model) and speechlm.json."""
    from transformers import AutoTokenizer

    from ..config import config_from_dict
    from ..data.instructions import heldout_books
    from ..jsonl import atomic_write

    tokenizer_dir = Path(run_dir) / TOKENIZER_DIR
    if not (tokenizer_dir / "tokenizer.model").is_file():
        raise ConfigError(f"{tokenizer_dir}: the run's tokenizer is missing (the text_lm run "
                          "writes it there when it starts); gather from the run directory "
                          "that wrote the checkpoint")
    cfg = config_from_dict(Config, run_config, source=f"{run_dir} checkpoint config")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    (out_dir / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    with atomic_write(out_dir / METADATA_FILE) as f:
        json.dump(model_metadata(cfg, sorted(heldout_books())), f, indent=2, ensure_ascii=False)


def model_metadata(config: Config, heldout: list[str]) -> dict:
    """What speechlm.json records: the prompt format and the tasks the model knows."""
    from ..data.instructions import PLAIN_TEXT, TASKS

    tasks = [t for t in config.data.mixture if t != PLAIN_TEXT and config.data.mixture[t] > 0]
    return {
        "kind": "text_lm",
        "template": "blsp",
        "prompt": "###[Human]:{instruction} {input}\n\n\n###[Assistant]:",
        "tasks": {name: {"instructions": list(TASKS[name].instructions),
                         "lang": TASKS[name].lang, "target_lang": TASKS[name].target_lang}
                  for name in tasks},
        "heldout_books": heldout,
    }


# -- evaluation -------------------------------------------------------------------------------


def evaluate_tasks(model, tokenizer, tasks: list[str], split: str, *, max_items: int = 100,
                   batch_size: int = 32, paraphrases: bool = True, hyps_path: Path | None = None,
                   show: int = 2, say=print) -> dict:
    """Score `tasks` on the held-out verses of `split`; returns {"tasks": ..., "perplexity": ...}."""
    from ..data.instructions import TASKS, Example, eval_contexts, eval_examples, with_wording
    from ..jsonl import write_jsonl

    model.eval()
    contexts = {lang: eval_contexts(split, lang) for lang in ("en", "es")}
    scores: dict[str, dict] = {}
    rows: list[dict] = []
    for name in tasks:
        task = TASKS[name]
        examples = eval_examples(task, contexts[task.lang], limit=max_items)
        variants = [(name, examples)]
        if paraphrases and len(task.instructions) > 1:
            variants.append((f"{name}@{1}", with_wording(examples, 1)))
        for label, batch in variants:
            hyps = generate_responses(model, tokenizer, [e.prompt for e in batch],
                                      max_new_tokens=task.max_new_tokens, batch_size=batch_size)
            refs = [e.response for e in batch]
            result = task.score(refs, hyps, [e.input for e in batch])
            result["n"] = len(batch)
            scores[label] = result
            for e, hyp in zip(batch, hyps, strict=True):
                rows.append({"task": label, "ref_id": e.ref, "instruction": e.instruction,
                             "input": e.input, "reference": e.response, "hypothesis": hyp})
            for e, hyp in list(zip(batch, hyps, strict=True))[:show]:
                say(f"  [{label}] {e.input[:70]}\n      ref: {e.response[:90]}\n"
                    f"      hyp: {hyp[:90]}")
        if name == "continue":
            nll, n = response_nll(model, tokenizer, examples, batch_size=batch_size)
            scores[name]["perplexity"] = math.exp(nll / max(n, 1))
    # Language-model perplexity of the held-out verses themselves, per language.
    perplexity = {}
    for lang in ("en", "es"):
        plain = [Example(task="text", instruction="", input="", response=c.verse.text(lang),
                         lang=lang, target_lang=lang, ref=c.verse.ref)
                 for c in contexts[lang][:max_items]]
        nll, n = response_nll(model, tokenizer, plain, batch_size=batch_size)
        perplexity[f"text_{lang}"] = math.exp(nll / max(n, 1))
    if hyps_path is not None:
        write_jsonl(hyps_path, rows)
    return {"split": split, "tasks": scores, "perplexity": perplexity}


HEADLINE = {"wer": ("wer", "exact"), "bleu": ("bleu", "chrf"), "accuracy": ("accuracy", "chance"),
            "perplexity": ("perplexity", "mean_words")}


def format_table(results: dict) -> str:
    """A small text table of the held-out scores."""
    from ..data.instructions import TASKS

    lines = [f"held-out verses ({results['split']} books of the embedded speech corpus)",
             f"  {'task':<20}{'metric':<28}{'n':>5}"]
    for label, scores in results["tasks"].items():
        task = TASKS[label.split("@")[0]]
        a, b = HEADLINE[task.metric]
        shown = f"{a} {scores.get(a, float('nan')):.3g}  {b} {scores.get(b, float('nan')):.3g}"
        lines.append(f"  {label:<20}{shown:<28}{scores['n']:>5}")
    ppl = "  ".join(f"{k} {v:.3g}" for k, v in results["perplexity"].items())
    lines.append(f"  perplexity: {ppl}")
    return "\n".join(lines)


# -- SALT (salt:) -----------------------------------------------------------------------------


def salt_setup(cfg: Config, tokenizer, dataset, num_warm: int, sampler, recipe_sampler, out,
               is_main: bool, say):
    """(sampler, SALTDistiller) for `salt`: the teacher, and with salt.selection the
    sampler whose KD phase draws from the selected sequences (speechlm.recipes.text_lm_salt)."""
    from ..training import distributed
    from ..training.salt import SALTDistiller
    from . import text_lm_salt

    salt = cfg.salt
    teacher = text_lm_salt.load_teacher(salt, tokenizer, cfg.model.attn_implementation,
                                        progress=cfg.train.progress)
    teacher.to(distributed.resolve_device(cfg.train.device))  # scores the data there too
    say(f"SALT: KD from {salt.teacher} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M "
        f"parameters) for the first {salt.kd_steps} updates (weight {salt.kd_weight}, "
        f"temperature {salt.temperature}), then plain CE")
    if salt.selection is not None:
        items = dataset.items
        # the KD phase draws from the warm-up items first, from the main ones if it outlasts them
        pools = {"warm-up": range(0, num_warm)} if num_warm else {}
        if salt.kd_steps > cfg.data.warmup.steps:
            pools["main"] = range(num_warm, len(items))
        keep = text_lm_salt.selection(salt, teacher, items, pools, tokenizer.pad_token_id, out,
                                      max_batch_tokens=cfg.data.max_batch_tokens,
                                      is_main=is_main, say=say)
        lengths = dataset.lengths()

        def build(flags):
            return recipe_sampler([n for n, k in zip(lengths[:num_warm], flags[:num_warm],
                                                     strict=True) if k],
                                  [n for n, k in zip(lengths[num_warm:], flags[num_warm:],
                                                     strict=True) if k])

        sampler = text_lm_salt.kd_phase_sampler(
            sampler, build, keep, kd_batches=salt.kd_steps * cfg.train.grad_accum)
    return sampler, SALTDistiller(teacher, salt)


# -- the runner -------------------------------------------------------------------------------


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.instructions import (
        TASKS,
        build_examples,
        eval_contexts,
        eval_examples,
        heldout_books,
        split_training_verses,
    )
    from ..data.sampler import DurationBucketSampler
    from ..data.switch_sampler import SwitchBatchSampler
    from ..jsonl import atomic_write
    from ..training import distributed
    from ..training.objectives.causal_lm import CausalLMCollator, CausalLMObjective, TokenDataset
    from ..training.trainer import Trainer, seed_everything
    from . import start_run

    cfg = config
    dist, out, say = start_run(cfg.train, cfg.threads)

    started = time.perf_counter()
    # 1. tokenizer
    train_verses, heldout = split_training_verses()
    model_file = train_tokenizer(train_verses, cfg.tokenizer)
    tokenizer_dir = out / TOKENIZER_DIR
    if dist.is_main:
        load_tokenizer(model_file, tokenizer_dir)
    distributed.barrier()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    say(f"tokenizer: {len(tokenizer)} pieces; {len(train_verses)} training verses, "
        f"{len(heldout)} held out ({len(heldout_books())} books)")

    # 2. data
    examples = build_examples(cfg.data.mixture, train_verses, cfg.data.num_examples,
                              seed=cfg.train.seed, paraphrase_prob=cfg.data.paraphrase_prob,
                              max_input_words=cfg.data.max_input_words,
                              plain_text_words=cfg.data.plain_text_words)
    items, summary = encode_for_training(tokenizer, examples, cfg.data.max_seq_len)
    if not items:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} drops every example; "
                          "raise it")
    warm = cfg.data.warmup
    warm_items: list[dict] = []
    if warm.steps:
        warm_examples = build_examples(warm.mixture, train_verses, warm.num_examples,
                                       seed=cfg.train.seed + 1,
                                       paraphrase_prob=cfg.data.paraphrase_prob,
                                       max_input_words=warm.max_input_words,
                                       plain_text_words=cfg.data.plain_text_words)
        warm_items, warm_summary = encode_for_training(tokenizer, warm_examples,
                                                       cfg.data.max_seq_len)
        say(f"warm-up phase ({warm.steps} updates): " + ", ".join(
            f"{t} {s['examples']}" for t, s in warm_summary.items()))
    dataset = TokenDataset(warm_items + items)
    eval_tasks = cfg.eval.tasks or [t for t in cfg.data.mixture
                                    if t in TASKS and cfg.data.mixture[t] > 0]
    unknown = [t for t in eval_tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: unknown task(s) {', '.join(unknown)}")
    dev_contexts = {lang: eval_contexts(cfg.eval.dev_split, lang) for lang in ("en", "es")}
    dev_examples = {t: eval_examples(TASKS[t], dev_contexts[TASKS[t].lang],
                                     limit=cfg.eval.dev_items) for t in eval_tasks}
    say("training examples: " + ", ".join(f"{t} {s['examples']}" for t, s in summary.items())
        + f"; {sum(s['tokens'] for s in summary.values())} tokens per epoch")

    # 3. model and training
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    say(f"model: LlamaForCausalLM, {params / 1e6:.2f}M parameters")
    sparse = cfg.model.sparse_lowrank
    def bucket_sampler(lengths, seed):
        return DurationBucketSampler(lengths, max_batch_duration=cfg.data.max_batch_tokens,
                                     max_batch_size=cfg.data.max_batch_size,
                                     num_buckets=cfg.data.num_buckets, shuffle=True, seed=seed,
                                     rank=dist.rank, world_size=dist.world_size)

    def recipe_sampler(warm_lengths, main_lengths):
        sampler = bucket_sampler(main_lengths, cfg.train.seed)
        if warm_lengths:
            sampler = PhasedBatchSampler(bucket_sampler(warm_lengths, cfg.train.seed + 1),
                                         sampler, warmup_batches=warm.steps * cfg.train.grad_accum,
                                         offset=len(warm_lengths))
        return sampler

    lengths = dataset.lengths()
    sampler = recipe_sampler(lengths[: len(warm_items)], lengths[len(warm_items):])
    distiller = None
    if cfg.salt is not None:
        sampler, distiller = salt_setup(cfg, tokenizer, dataset, len(warm_items), sampler,
                                        recipe_sampler, out, dist.is_main, say)
    objective = CausalLMObjective(model, evaluate_fn=dev_loss_fn(tokenizer, dev_examples,
                                                                 cfg.eval.batch_size),
                                  salt=distiller)
    step_hooks, report = [], {}
    if sparse is not None:
        from ..models.sparse_lowrank import prepare_for_training

        step_hooks, report = prepare_for_training(model, sparse, say)
    trainer = Trainer(cfg.train, objective, dataset, sampler,
                      collate_fn=CausalLMCollator(tokenizer.pad_token_id), run_config=cfg,
                      identity_keys=("model", "tokenizer"),
                      step_hooks=step_hooks)
    objective.attach(trainer)
    fit_start = time.perf_counter()
    steps_before = trainer.step
    result = trainer.fit()
    train_seconds = time.perf_counter() - fit_start
    # under train.sharding=fsdp a plain model with the gathered weights, on rank 0
    model = trainer.unsharded_model(lambda: build_model(cfg.model, tokenizer))
    if model is not None and sparse is not None:
        from ..models.sparse_lowrank import to_plain_dense

        to_plain_dense(model)  # SLTrain merged into dense weights, SPDF masks dropped
    main_sampler = sampler.then if isinstance(sampler, SwitchBatchSampler) else sampler
    main_sampler = main_sampler.main if isinstance(main_sampler, PhasedBatchSampler) \
        else main_sampler
    mean_batch_tokens = sum(lengths[len(warm_items):]) / max(len(main_sampler), 1)

    # 4. save and 5. score the saved model
    final_dir = out / FINAL_DIR
    results: dict[str, Any] = {}
    if dist.is_main:
        model.eval()
        model.set_attn_implementation("sdpa")  # what from_pretrained gives, for the probe
        probe = [e.prompt for t in eval_tasks for e in dev_examples[t][:2]]
        before = generate_responses(model, tokenizer, probe, max_new_tokens=24)
        save_final(model, tokenizer, model_file, final_dir,
                   model_metadata(cfg, sorted(heldout_books())))
        reloaded = AutoModelForCausalLM.from_pretrained(final_dir)
        reloaded.to(next(model.parameters()).device)
        final_tokenizer = AutoTokenizer.from_pretrained(final_dir)
        after = generate_responses(reloaded, final_tokenizer, probe, max_new_tokens=24)
        if after != before:
            logger.warning("the model reloaded from %s generates differently from the trained "
                           "one (%d of %d probes differ)", final_dir,
                           sum(a != b for a, b in zip(after, before, strict=True)), len(probe))
        torch.set_grad_enabled(False)
        try:
            say(f"scoring {cfg.eval.split} verses:")
            scores = evaluate_tasks(reloaded, final_tokenizer, eval_tasks, cfg.eval.split,
                                    max_items=cfg.eval.max_items, batch_size=cfg.eval.batch_size,
                                    paraphrases=cfg.eval.paraphrases,
                                    hyps_path=out / f"{cfg.eval.split}_hyps.jsonl",
                                    show=cfg.eval.examples, say=say)
        finally:
            torch.set_grad_enabled(True)
        steps_run = result.step - steps_before
        results = {
            **scores,
            "train": {"steps": result.step, "final_train_loss": result.train_metrics.get("loss"),
                      "dev": result.eval_metrics, "train_seconds": train_seconds,
                      "approx_tokens_per_second": (steps_run * cfg.train.grad_accum
                                                   * mean_batch_tokens / max(train_seconds, 1e-9)),
                      "wall_seconds": time.perf_counter() - started},
            "data": summary,
            "model": {"parameters": params, "vocab_size": len(tokenizer),
                      "config": dict(cfg.model.config),
                      **({"sparse_lowrank": report} if sparse is not None else {})},
            "final_dir": str(final_dir),
            "reload_identical": after == before,
        }
        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
        say(format_table(results))
        say(f"trained {result.step} steps in {train_seconds:.0f} s; model saved to {final_dir}")
    distributed.barrier()
    return results
