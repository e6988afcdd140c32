"""Recipe `task: interleaved`: GLM-4-Voice-style pre-training of an LLM on synthetic interleaved
speech-unit / text data, mixed with plain text (and, optionally, real speech-text pairs).

    task: interleaved
    model: {llm_path: zoo:llm_en_es}
    data:
      interleaved: auto            # or a `speechlm build interleave` directory
      build: {corpus: embedded:en, t2u: zoo:t2u_en, speech_share: 0.3, span_words: [4, 24]}
      mixture: {interleaved: 1.0, text: 0.5, asr: 0.0}
      speech_tokenizer: zoo:speech_tokenizer_en
    train: {max_steps: 600, lr: 1.0e-3, ...}

`run(config)`:
1. loads the LLM and adds the speech units of the text-to-token model's tokenizer
   (`<|begin_of_audio|>`, `<|audio_i|>`, `<|end_of_audio|>`; speechlm.models.unit_vocab);
2. data, as packed `data.seq_len` sequences, one source per batch, drawn with the mixture
   weights: `interleaved`, the shards of `speechlm build interleave` (text spans replaced by
   the T2U's units; built into the cache from `data.build` when `auto`); `text`, the same
   corpus with no speech; `asr`, real speech as units followed by its transcript (GLM-4-Voice
   pre-trains on such pairs too; off by default, so what the table shows is what synthetic
   interleaving alone does). `data.asr_more_speech: N` adds N more training-book verses
   spoken by the training voices (synthesized and tokenized into the cache once);
   `data.asr_learn_units: false` makes the pairs' units context only, so their whole
   gradient teaches reading the units; `instruct`, the LLM's own instruction tasks
   (`data.instruct_tasks`) as text, replayed so that it keeps following instructions;
3. evaluates the extended LLM before training, trains with the shared Trainer (exact resume)
   and evaluates again: next-token loss on held-out text, on synthetic interleaved data made
   from held-out text, and on held-out real speech (units from the speech tokenizer, then
   the transcript); and prompted decoding of real speech units into text, in the ASR layout
   (units, then the text) and with the LLM's own "repeat" instruction around the units;
   spoken QA: the LLM's "last word" question about the units (the same question about the
   transcript as text is its upper bound);
4. saves `output_dir/final/` (the extended LLM + tokenizer + unit_vocab.json) and
   `results.json`; prints the before/after table.

`model.template` is the held-out prompts' format ("chat" for an instruct LLM such as
SmolLM2). `train.sharding: fsdp` (torchrun) shards the LLM for paper-size runs: evaluations
during training are then the held-out losses only, and rank 0 gathers the weights for the
final table and final/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
# train.sharding=fsdp works (GLM-4-Voice trains the whole LLM): the weights are gathered on
# rank 0 after training, which evaluates and saves final/
SHARDING_SUPPORTED = True
TOKENIZER_DIR = "tokenizer"  # the run's extended tokenizer + unit_vocab.json (for convert fsdp)
SOURCES = ("interleaved", "text", "asr", "instruct")


@dataclass
class ModelConfig:
    llm_path: str = "zoo:llm_en_es"       # local HF dir, hub id in the local cache, or zoo:NAME
    # the prompt format of the held-out instruction tasks ("repeat", "last word" around the
    # units): "blsp" (###[Human]: ... ###[Assistant]:, the zoo LLM's) or "chat" (the
    # tokenizer's own chat template, for an instruct LLM such as SmolLM2)
    template: str = "blsp"

    def __post_init__(self):
        from ..models.prompts import TEMPLATES

        if self.template not in TEMPLATES:
            raise ConfigError(f"model.template: unknown template {self.template!r}; use "
                              f"{' or '.join(TEMPLATES.names())}")


@dataclass
class BuildConfig:
    """How `data.interleaved: auto` builds the synthetic interleaved shards."""

    corpus: str = "embedded:en"           # text file, JSONL with `text`, embedded:en / es
    t2u: str = "zoo:t2u_en"               # text-to-token model: directory or zoo:NAME
    t2u_method: str | None = None         # ar | maskgit | null (the model's default)
    t2u_steps: int | None = None          # MaskGIT iterations (null: the model's default)
    speech_share: float = 0.3
    span_words: tuple[int, int] = (4, 24)
    docs_per_shard: int = 2000


@dataclass
class DataConfig:
    interleaved: str = "auto"
    build: BuildConfig = field(default_factory=BuildConfig)
    seq_len: int = 256
    mixture: dict[str, float] = field(default_factory=lambda: {"interleaved": 1.0, "text": 0.5})
    speech_tokenizer: str = "zoo:speech_tokenizer_en"  # makes the units of `asr` and of eval
    asr_units: str = "auto"               # units JSONL (build tokenize); auto: embedded:en/train
    # plus this many more training-book verses spoken by the training voices (up to 30077;
    # synthesized and tokenized into the cache once): more real pairs than the corpus has
    asr_more_speech: int = 0
    # learn the units of the real pairs too (GLM-4-Voice's plain LM loss); false: they are
    # context only and the pairs teach reading them alone
    asr_learn_units: bool = True
    # the `instruct` source: the LLM's own instruction tasks (speechlm.data.instructions.TASKS
    # -> weight) on training-book verses, as text. Replaying them keeps the LLM following
    # instructions, which plain pre-training makes it forget
    instruct_tasks: dict[str, float] = field(default_factory=dict)
    instruct_examples: int = 20000
    batch_size: int = 16                  # sequences per batch (per process)
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.mixture) - set(SOURCES))
        if unknown:
            raise ConfigError(f"data.mixture: unknown source(s) {unknown}; use "
                              f"{', '.join(SOURCES)}")
        if not any(w > 0 for w in self.mixture.values()) or \
                any(w < 0 for w in self.mixture.values()):
            raise ConfigError(f"data.mixture: weights must be >= 0, one of them > 0, got "
                              f"{self.mixture}")
        from .text_lm import check_task_mixture

        check_task_mixture(self.instruct_tasks, "data.instruct_tasks", allow_empty=True)
        if self.mixture.get("instruct", 0) > 0 and not self.instruct_tasks:
            raise ConfigError("data.mixture.instruct > 0 needs data.instruct_tasks, the tasks to "
                              "replay and their weights, e.g. {repeat: 1.0, last_word: 1.0}")
        if self.instruct_examples < 1:
            raise ConfigError(f"data.instruct_examples must be >= 1, got "
                              f"{self.instruct_examples}")
        if self.asr_more_speech < 0:
            raise ConfigError(f"data.asr_more_speech must be >= 0, got {self.asr_more_speech}")
        if self.seq_len < 16 or self.batch_size < 1:
            raise ConfigError(f"data.seq_len must be >= 16 and data.batch_size >= 1, got "
                              f"{self.seq_len} and {self.batch_size}")


@dataclass
class EvalConfig:
    units: str = "auto"                   # held-out real speech units; auto: embedded:en/dev
    items: int = 100                      # held-out utterances (loss and decoding)
    max_new_tokens: int = 48
    batch_size: int = 32
    examples: int = 3


@dataclass
class Config:
    task: str = "interleaved"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- data ---------------------------------------------------------------------------------------


def _cached_interleave(build: BuildConfig, t2u, t2u_dir: str, tokenizer, seq_len: int,
                       speech_share: float, seed: int, progress: bool, say) -> Path:
    """Interleaved (or, with speech_share 0, text-only) shards of build.corpus in the cache,
    keyed by everything that decides their bytes; built (or resumed) when missing."""
    from ..paths import cache_dir
    from ..pipelines.interleave import InterleaveSettings, build_interleave, tokenizer_fingerprint

    settings = InterleaveSettings(speech_share=speech_share, span_words=tuple(build.span_words),
                                  seq_len=seq_len, docs_per_shard=build.docs_per_shard,
                                  seed=seed)
    key = [build.corpus, asdict(settings), t2u.tokenizer_identity, t2u_dir, build.t2u_method,
           tokenizer_fingerprint(tokenizer)]
    if build.t2u_steps is not None:  # keeps the keys of caches built before the option
        key.append(build.t2u_steps)
    key = json.dumps(key, sort_keys=True)
    kind = "text" if speech_share == 0 else "interleaved"
    name = f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    out = cache_dir() / "interleaved" / name
    if not (out / "interleave.json").is_file() or \
            not json.loads((out / "interleave.json").read_text()).get("finished"):
        say(f"building {kind} sequences of {build.corpus} into {out}")
        summary = build_interleave(build.corpus, out, t2u=t2u, tokenizer=tokenizer,
                                   settings=settings, t2u_method=build.t2u_method,
                                   t2u_steps=build.t2u_steps, progress=progress)
        say(summary.summary())
    return out


def _check_interleave_dir(path: Path, vocab, tokenizer) -> None:
    """A user-given interleave directory must use this LLM tokenizer and these unit ids."""
    from ..models.unit_vocab import UnitVocab
    from ..pipelines.interleave import tokenizer_fingerprint

    meta = json.loads((path / "interleave.json").read_text(encoding="utf-8"))["settings"]
    if UnitVocab.load(path) != vocab:
        raise ConfigError(f"{path}: its unit ids ({path / 'unit_vocab.json'}) are not this "
                          f"LLM's ({asdict(vocab)}); build it with this LLM and T2U")
    if meta.get("llm_tokenizer") != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{path}: built with another LLM tokenizer; rebuild it with "
                          "`speechlm build interleave --llm` this recipe's model.llm_path")


def speech_text_pairs(records, vocab, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Real speech and its transcript, (<|begin_of_audio|> units <|end_of_audio|>, text EOS)."""
    from ..models.prompts import encode_continuing

    eos = int(tokenizer.eos_token_id)
    return [(vocab.units_to_ids(r["units"]), encode_continuing(tokenizer, " " + r["text"]) + [eos])
            for r in records if r.get("units") and str(r.get("text", "")).strip()]


def _instruct_items(data: DataConfig, tokenizer, seed: int, say):
    """The LLM's instruction tasks on training-book verses, prompts masked (as it learned them)."""
    from ..data.instructions import build_examples, split_training_verses
    from ..training.objectives.causal_lm import TokenDataset
    from .text_lm import encode_for_training

    verses, _ = split_training_verses()
    # inputs of at most 40 words, as the zoo LLM learned its tasks
    examples = build_examples(data.instruct_tasks, verses, data.instruct_examples, seed=seed,
                              max_input_words=40)
    items, summary = encode_for_training(tokenizer, examples, data.seq_len)
    say("instruction replay: " + ", ".join(f"{t} {s['examples']}" for t, s in summary.items()))
    return TokenDataset([{"input_ids": it["input_ids"], "labels": it["labels"]} for it in items])


def _more_speech_units(data: DataConfig, progress: bool, say) -> Path:
    """Units of data.asr_more_speech more training-book verses, spoken into the cache."""
    from ..pipelines.embedded_corpus import build_more_training_speech
    from ..pipelines.tokenize import cached_units

    say(f"speaking {data.asr_more_speech} more training-book verses (cached once)")
    try:
        manifest = build_more_training_speech("en", data.asr_more_speech, progress=progress)
    except ValueError as exc:
        raise ConfigError(f"data.asr_more_speech: {exc}; ask for fewer") from exc
    return cached_units(data.speech_tokenizer, manifest, progress=progress, say=say)


def _sampler(sources: dict, weights: dict, batch_size: int, seed: int, dist):
    """(dataset, batch sampler): each batch from one source, drawn with p ∝ weight."""
    from ..data.mixture import TemperatureMixtureSampler
    from ..data.sampler import RandomBatchSampler

    samplers = {name: RandomBatchSampler([1.0] * len(data), max_batch_size=batch_size,
                                         max_batch_duration=float(batch_size), seed=seed + i,
                                         rank=dist.rank, world_size=dist.world_size)
                for i, (name, data) in enumerate(sources.items())}
    if len(sources) == 1:
        name = next(iter(sources))
        return sources[name], samplers[name]
    mixture = TemperatureMixtureSampler(samplers, alpha=1.0, seed=seed,
                                        sizes={name: weights[name] for name in sources})
    return mixture.concat_datasets(sources), mixture


# -- evaluation -----------------------------------------------------------------------------------


class HeldOut:
    """Held-out evaluation sets and the metrics computed on them (before and after training)."""

    def __init__(self, cfg: Config, vocab, tokenizer, records: list[dict], text_rows,
                 interleaved_rows):
        from ..data.instructions import TASKS
        from ..models.prompts import get_template, pick_pad_id

        self.cfg, self.vocab, self.tokenizer = cfg, vocab, tokenizer
        self.records = records
        self.text_rows, self.interleaved_rows = text_rows, interleaved_rows
        self.pad_id = pick_pad_id(tokenizer)
        self.asr_pairs = speech_text_pairs(records, vocab, tokenizer)
        # the LLM's own instructions, with the units where the text would be: "repeat" (ASR)
        # and "last_word" (spoken QA; with the transcript as text, its upper bound)
        template = get_template(cfg.model.template)
        self.stop_ids = template.stop_token_ids(tokenizer)

        def prompts(task: str, as_text: bool = False) -> list[list[int]]:
            instruction = TASKS[task].instructions[0]
            return [template.encode(tokenizer, instruction, transcript=r["text"] if as_text
                                    else self._unit_string(r["units"])).prompt_ids()
                    for r in records]

        self.repeat_prompts = prompts("repeat")
        self.qa_prompts = {"last_word": prompts("last_word"),
                           "last_word_text": prompts("last_word", as_text=True)}
        self.asr_prompts = [vocab.units_to_ids(r["units"]) for r in records]

    def _unit_string(self, units) -> str:
        return self.tokenizer.decode(self.vocab.units_to_ids(units))

    def _loss(self, model, items) -> float:
        """Mean next-token loss over the learned tokens of (input_ids, labels) items."""
        import torch

        from ..training.objectives.causal_lm import CausalLMCollator, token_losses

        collate = CausalLMCollator(self.pad_id)
        total, count = 0.0, 0
        device = next(model.parameters()).device
        for start in range(0, len(items), self.cfg.eval.batch_size):
            batch = collate(items[start: start + self.cfg.eval.batch_size])
            with torch.no_grad():
                losses, _, _ = token_losses(model, batch["input_ids"].to(device),
                                            batch["attention_mask"].to(device),
                                            batch["labels"].to(device))
            total += float(losses.sum())
            count += losses.numel()
        return total / max(count, 1)

    def _decode(self, model, prompts, max_new_tokens: int | None = None) -> list[str]:
        from ..inference.text_generation import greedy_generate, stop_ids_of

        out = greedy_generate(model, prompts, pad_id=self.pad_id,
                              stop_ids=stop_ids_of(model, self.stop_ids),
                              max_new_tokens=max_new_tokens or self.cfg.eval.max_new_tokens,
                              batch_size=self.cfg.eval.batch_size)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]

    def evaluate(self, model, decode: bool = True) -> dict[str, float]:
        """The losses, and unless `decode` is False the decoding metrics (greedy answers)."""
        from ..data.instructions import TASKS, last_word
        from ..eval.metrics import cer, wer
        from ..text.normalize import normalize_transcript

        mode = model.training
        model.eval()
        try:
            metrics = {"text_loss": self._loss(model, _items(self.text_rows))}
            if len(self.interleaved_rows):
                metrics["interleaved_loss"] = self._loss(model, _items(self.interleaved_rows))
            # real speech: the transcript's loss given the units (units themselves not scored)
            items = [{"input_ids": units + text, "labels": [-100] * len(units) + text}
                     for units, text in self.asr_pairs]
            metrics["speech_text_loss"] = self._loss(model, items)
            # what the real speech units are worth to the transcript after them
            metrics["units_gain"] = metrics["text_loss"] - metrics["speech_text_loss"]
            # `loss` (train.best_metric's default): what the pre-training optimises, on held-out
            # text
            metrics["loss"] = metrics.get("interleaved_loss", metrics["text_loss"])
            if not decode:
                return metrics
            refs = [normalize_transcript(r["text"], r.get("lang") or "en") for r in self.records]
            # the control: each utterance's reference against the next utterance's units. A
            # model that reads the units scores clearly worse on it than with the right ones;
            # one that writes generic text scores the same
            wrong = self.asr_prompts[1:] + self.asr_prompts[:1]
            for name, prompts in (("asr", self.asr_prompts), ("repeat", self.repeat_prompts),
                                  ("asr_wrong_units", wrong)):
                hyps = [normalize_transcript(h, "en") for h in self._decode(model, prompts)]
                metrics[f"{name}_wer"] = wer(refs, hyps)
                metrics[f"{name}_cer"] = cer(refs, hyps)
                if name == "asr":
                    self.last_examples = list(zip(refs, hyps, strict=True))[: self.cfg.eval.examples]
            # what reading the right units is worth to ASR decoding, in CER points
            metrics["asr_units_gain"] = metrics["asr_wrong_units_cer"] - metrics["asr_cer"]
            # spoken QA from the units, scored as the text task is (exact last word)
            task = TASKS["last_word"]
            answers = [last_word(r["text"]) for r in self.records]
            for name, prompts in self.qa_prompts.items():
                hyps = self._decode(model, prompts, task.max_new_tokens)
                metrics[f"{name}_acc"] = task.score(answers, hyps)["accuracy"]
        finally:
            model.train(mode)
        return metrics


# -- the runner ---------------------------------------------------------------------------------


def run(config: Config) -> dict:
    """Run interleaved pre-training per `config` (see the module doc); returns the results."""
    import time

    from ..data.packed import PackedSequences, pack_documents
    from ..models.ctc import write_model_dir
    from ..models.speech_lm import load_llm
    from ..models.text_to_token import load_text_to_token
    from ..models.unit_vocab import add_unit_tokens
    from ..pipelines.interleave import iter_interleaved_shards
    from ..pipelines.tokenize import cached_units, read_units
    from ..pretrained.resolve import resolve_model_dir
    from ..training import distributed
    from ..training.objectives.causal_lm import CausalLMCollator, CausalLMObjective
    from ..training.trainer import Trainer, seed_everything
    from . import start_run

    cfg = config
    data = cfg.data
    dist, out, say = start_run(cfg.train)
    progress = dist.is_main and cfg.train.progress
    weights = {name: float(data.mixture.get(name, 0.0)) for name in SOURCES}

    # 1. models (rank 0 first, so a zoo member is trained once)
    def resolve():
        return (str(resolve_model_dir(cfg.model.llm_path, progress=progress, say=say)),
                str(resolve_model_dir(data.build.t2u, expect=None, progress=progress, say=say)))

    llm_dir, t2u_dir = distributed.main_first(resolve)
    seed_everything(cfg.train.seed)
    llm, tokenizer = load_llm(llm_dir)
    t2u = load_text_to_token(t2u_dir)
    vocab = add_unit_tokens(llm, tokenizer, t2u.num_codes,
                            tokenizer_identity=t2u.tokenizer_identity, seed=cfg.train.seed)
    say(f"LLM {llm_dir}: {vocab.num_codes} speech units added (ids {vocab.unit_base}.."
        f"{vocab.unit_base + vocab.num_codes - 1}, speech tokenizer {vocab.tokenizer_identity})")
    if dist.is_main:
        _save_tokenizer(tokenizer, vocab, out / TOKENIZER_DIR)

    # 2. data
    def build_data():
        paths: dict[str, Any] = {}
        if weights["interleaved"] > 0:
            if data.interleaved == "auto":
                paths["interleaved"] = _cached_interleave(
                    data.build, t2u, t2u_dir, tokenizer, data.seq_len, data.build.speech_share,
                    data.seed, progress, say)
            else:
                paths["interleaved"] = Path(data.interleaved)
                _check_interleave_dir(paths["interleaved"], vocab, tokenizer)
        if weights["text"] > 0:
            paths["text"] = _cached_interleave(data.build, t2u, t2u_dir, tokenizer,
                                               data.seq_len, 0.0, data.seed, progress, say)
        if weights["asr"] > 0:
            paths["asr"] = [cached_units(data.speech_tokenizer, "embedded:en/train",
                                         progress=progress, say=say)
                            if data.asr_units == "auto" else Path(data.asr_units)]
            if data.asr_more_speech:
                paths["asr"].append(_more_speech_units(data, progress, say))
        units = cfg.eval.units
        paths["eval_units"] = (cached_units(data.speech_tokenizer, "embedded:en/dev",
                                            progress=progress, say=say)
                               if units == "auto" else Path(units))
        return paths

    paths = distributed.main_first(build_data)
    sources, asr_pairs = {}, 0
    for name in ("interleaved", "text"):
        if name in paths:
            sources[name] = PackedSequences(iter_interleaved_shards(paths[name]))
    if "asr" in paths:
        records = [r for path in paths["asr"]
                   for r in read_units(path, tokenizer=vocab.tokenizer_identity)]
        pairs = speech_text_pairs(records, vocab, tokenizer)
        asr_pairs = len(pairs)
        docs = [units + text for units, text in pairs]
        learned = [[data.asr_learn_units] * len(units) + [True] * len(text)
                   for units, text in pairs]
        rows, labels = pack_documents(docs, data.seq_len, learned=learned)
        sources["asr"] = PackedSequences([rows], labels=[labels])
    if weights["instruct"] > 0:
        sources["instruct"] = _instruct_items(data, tokenizer, cfg.train.seed, say)
    for name, source in sources.items():
        if len(source) == 0:
            raise ConfigError(f"data source '{name}' has no full sequence of {data.seq_len} "
                              "tokens; give more data or a smaller data.seq_len")
    dataset, sampler = _sampler(sources, weights, data.batch_size, cfg.train.seed, dist)
    say("data: " + ", ".join(f"{name} {len(s)} sequences of {data.seq_len} (weight "
                             f"{weights[name]:g})" for name, s in sources.items()))

    # held-out: real speech units of unseen voices and books, their texts, and the T2U's
    # interleaving of those texts (the held-out books never enter the training corpus)
    eval_records = read_units(paths["eval_units"], tokenizer=vocab.tokenizer_identity)
    eval_records = eval_records[: cfg.eval.items]
    eos = int(tokenizer.eos_token_id)
    from ..models.prompts import encode_continuing

    text_rows = [encode_continuing(tokenizer, " " + r["text"]) + [eos] for r in eval_records]
    # built by rank 0 first (one writer per directory); the others read what it wrote
    interleaved_rows = distributed.main_first(
        lambda: _heldout_interleaved(eval_records, t2u, tokenizer, cfg, out, progress))
    held_out = HeldOut(cfg, vocab, tokenizer, eval_records, text_rows, interleaved_rows)

    # 3. before, training, after
    before = held_out.evaluate(llm)
    say("before interleaved pre-training: " + _fmt(before))
    sharded = cfg.train.sharding == "fsdp"
    # a sharded model's evaluations during training are its losses: every rank runs them in
    # step, which greedy decoding (answers of different lengths) would not guarantee
    objective = CausalLMObjective(llm, evaluate_fn=(
        (lambda model: held_out.evaluate(model, decode=False)) if sharded
        else held_out.evaluate))
    trainer = Trainer(cfg.train, objective, dataset, sampler,
                      collate_fn=CausalLMCollator(held_out.pad_id), run_config=cfg)
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start

    def extended_llm():  # a plain model for the weights gathered from the shards
        model, _ = load_llm(llm_dir)
        add_unit_tokens(model, tokenizer, t2u.num_codes,
                        tokenizer_identity=t2u.tokenizer_identity, seed=cfg.train.seed)
        return model

    llm = trainer.unsharded_model(extended_llm)  # None on the other ranks
    after = held_out.evaluate(llm) if llm is not None else {}

    # 4. save, results
    final = out / FINAL_DIR
    results: dict[str, Any] = {
        "step": result.step, "final_dir": str(final), "llm": str(llm_dir), "t2u": str(t2u_dir),
        "unit_vocab": asdict(vocab), "data": {n: len(s) for n, s in sources.items()},
        "asr_pairs": asr_pairs,
        "mixture": weights, "train_seconds": seconds, "train": result.train_metrics,
        "held_out_items": len(eval_records), "before": before, "after": after,
        "examples": [{"ref": r, "hyp": h} for r, h in getattr(held_out, "last_examples", [])]}
    if dist.is_main:
        def extras(tmp: Path) -> None:
            tokenizer.save_pretrained(tmp)
            vocab.save(tmp)
            source_meta = Path(llm_dir) / "speechlm.json"
            if source_meta.is_file():  # the LLM's own metadata (its tasks) travels with it
                (tmp / "llm_speechlm.json").write_text(source_meta.read_text())

        write_model_dir(final, llm, {"kind": "interleaved_llm", "step": result.step,
                                     "unit_vocab": asdict(vocab)}, extras)
        from ..jsonl import atomic_write

        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=1, default=str)
        say(results_table(results))
    distributed.barrier()
    return results


def _save_tokenizer(tokenizer, vocab, directory: Path) -> None:
    """The extended tokenizer and its unit ids, written whole (tmp, then rename)."""
    import shutil

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    vocab.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def gathered_files(out_dir: Path, run_config: dict, run_dir: Path) -> None:
    """Beside the weights gathered from a sharded checkpoint (`speechlm convert fsdp`): the
    run's extended tokenizer and unit_vocab.json, as final/ has them."""
    import shutil

    source = Path(run_dir) / TOKENIZER_DIR
    if not (source / "unit_vocab.json").is_file():
        raise ConfigError(f"{source}: the run's extended tokenizer is missing (the interleaved "
                          "run writes it there when it starts); gather from the run directory "
                          "that wrote the checkpoint")
    for path in source.iterdir():
        shutil.copy2(path, Path(out_dir) / path.name)


def _heldout_interleaved(records, t2u, tokenizer, cfg: Config, out: Path, progress: bool):
    """Packed synthetic interleaved sequences of the held-out texts (as training makes them)."""
    from ..pipelines.interleave import (
        InterleaveSettings,
        build_interleave,
        iter_interleaved_shards,
    )

    if not records:
        return []
    root = out / "heldout_interleaved"
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "texts.txt"
    corpus.write_text("".join(r["text"].replace("\n", " ") + "\n" for r in records),
                      encoding="utf-8")
    b = cfg.data.build
    # shorter rows than training: few held-out texts still give enough of them
    settings = InterleaveSettings(speech_share=max(b.speech_share, 0.3),
                                  span_words=tuple(b.span_words), seq_len=64,
                                  docs_per_shard=len(records) + 1, seed=cfg.data.seed + 1)
    build_interleave(str(corpus), root / "shards", t2u=t2u, tokenizer=tokenizer,
                     settings=settings, t2u_method=b.t2u_method, t2u_steps=b.t2u_steps,
                     progress=False)
    return [row for block in iter_interleaved_shards(root / "shards") for row in block]


def _items(rows) -> list[dict]:
    """Causal-LM items learning every token of each row."""
    return [{"input_ids": [int(t) for t in r], "labels": [int(t) for t in r]} for r in rows]


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def results_table(results: dict) -> str:
    before, after = results["before"], results["after"]
    rows = [("loss: held-out verses as plain text", "text_loss", "{:.3f}"),
            ("loss: the same verses after their real speech units", "speech_text_loss", "{:.3f}"),
            ("  units' worth (plain - after units), nats/token", "units_gain", "{:+.3f}"),
            ("loss: held-out verses interleaved with T2U units", "interleaved_loss", "{:.3f}"),
            ("units -> text, ASR layout: WER", "asr_wer", "{:.1%}"),
            ("units -> text, ASR layout: CER", "asr_cer", "{:.1%}"),
            ("  the same with the next utterance's units: CER", "asr_wrong_units_cer", "{:.1%}"),
            ("  right units' worth (wrong - right CER)", "asr_units_gain", "{:+.1%}"),
            ("units -> text, 'repeat' instruction: WER", "repeat_wer", "{:.1%}"),
            ("units -> text, 'repeat' instruction: CER", "repeat_cer", "{:.1%}"),
            ("spoken QA, last word of the units: accuracy", "last_word_acc", "{:.1%}"),
            ("  the same with the transcript as text (bound)", "last_word_text_acc", "{:.1%}")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'held-out (' + str(results['held_out_items']) + ' utterances)':<{width}}  "
             f"{'before':>8}  {'after':>8}"]
    for label, key, fmt in rows:
        if key in before:
            lines.append(f"{label:<{width}}  {fmt.format(before[key]):>8}  "
                         f"{fmt.format(after[key]):>8}")
    for ex in results.get("examples", []):
        lines.append(f"  ref: {ex['ref']}\n  hyp: {ex['hyp']}")
    lines.append(f"model: {results['final_dir']} (step {results['step']}; mixture "
                 f"{results['mixture']})")
    return "\n".join(lines)
