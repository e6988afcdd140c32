"""Recipe `task: text_to_token`: the text-to-token (T2U) model of GLM-4-Voice-style synthetic
interleaved data, trained on the units a speech tokenizer produced from ASR data.

    task: text_to_token
    model: {decoder: maskgit, d_model: 256, encoder_layers: 4, decoder_layers: 4}
    data:
      train: runs/units/train.jsonl          # `speechlm build tokenize` output (one or a list)
      dev: null                              # or a units file; null: dev_items held out of train
      dev_items: 200
      max_batch_tokens: 8192                 # padded characters + units per batch
    train: {max_steps: 20000, lr: 1.0e-3, ...}
    eval: {max_items: 200, steps: 16}

A units file holds one utterance a line: `{"id", "text", "units": [int, ...],
"tokenizer": "<identity>", "num_codes": int, ...}`.

`run(config)`:
1. reads the units files, checking every line (text and units present, units
   integers in [0, num_codes), one tokenizer identity and num_codes for all
   files: anything else is a ManifestError naming file:line and what to do);
   records with empty text, no units or more than `data.max_units` are skipped
   and counted; the dev utterances are `data.dev`, or `data.dev_items` taken
   out of the training files by a hash of their ids (the same on every run);
2. builds the character vocabulary from the training text; dev characters it
   lacks map to <unk> and are counted and reported;
3. trains with the shared Trainer (checkpoints, exact resume, DDP); every
   evaluation reports dev loss, teacher-forced unit accuracy (AR), masked-slot
   accuracy (MaskGIT) and the length head's error;
4. saves `output_dir/final/` (`load_text_to_token` reads it), reloads it and
   scores generation on the dev utterances: unit error rate (edit distance /
   reference units) per decoder beside the baseline of repeating the most
   frequent training unit at the reference length, the length error, and the
   decoding speed; writes `results.json` and `dev_hyps.jsonl`; prints a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError, ManifestError
from ..models.sparse_lowrank import (
    SparseLowRankConfig,
    check_not_sharded,
    prepare_for_training,
    to_plain_dense,
)
from ..models.text_to_token import TextToTokenConfig
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
# what sparse_lowrank changes unless told: the attention and feed-forward projections of
# every block (the output heads, duration predictor and unit offset stay dense)
T2U_TARGETS = ["query", "key_value", "out", r"\.ff\.[02]$"]
RESULTS_FILE = "results.json"
HYPS_FILE = "dev_hyps.jsonl"
TWO_TOKENIZERS = "the units come from two tokenizers; tokenize everything with one"


@dataclass
class DataConfig:
    train: list[str] | str | None = None  # units JSONL file(s) from `speechlm build tokenize`
    # or, with train null: the units of `manifest` by this speech tokenizer (a directory or
    # zoo:NAME), tokenized into the cache on first use
    tokenizer: str | None = None
    manifest: str = "embedded:en/train"
    dev: list[str] | str | None = None    # held-out units file(s); None: dev_items from train
    dev_items: int = 200                  # held out of train (by id hash) when dev is None
    max_units: int | None = 1000          # longer utterances are skipped (80 s at 12.5 Hz)
    max_batch_tokens: int = 8192          # padded characters + units per batch (per process)
    max_batch_size: int | None = None
    num_buckets: int = 10

    def __post_init__(self):
        if self.dev_items < 0:
            raise ConfigError("data.dev_items must be >= 0")
        if self.max_units is not None and self.max_units < 1:
            raise ConfigError("data.max_units must be >= 1 or null")
        if self.max_batch_tokens < 8 or self.num_buckets < 1:
            raise ConfigError("data.max_batch_tokens must be >= 8 and data.num_buckets >= 1")

    def train_files(self) -> list[str]:
        return _as_list(self.train)

    def dev_files(self) -> list[str]:
        return _as_list(self.dev)


def _as_list(value: list[str] | str | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


@dataclass
class EvalConfig:
    max_items: int | None = 200           # dev utterances scored by generation at the end
    steps: int | None = None              # MaskGIT iterations; None: model.maskgit_steps
    batch_size: int = 64                  # generation batch
    examples: int = 2                     # dev hypotheses printed

    def __post_init__(self):
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError("eval.max_items must be >= 1 or null (all)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("eval.steps must be >= 1 or null")
        if self.batch_size < 1:
            raise ConfigError("eval.batch_size must be >= 1")


@dataclass
class Config:
    task: str = "text_to_token"
    threads: int | None = None            # torch CPU threads (None: torch's default)
    model: TextToTokenConfig = field(default_factory=TextToTokenConfig)
    # SLTrain / SPDF on the model's linear layers while training (default targets: every
    # attention and feed-forward projection, T2U_TARGETS); final/ is the plain dense model
    sparse_lowrank: SparseLowRankConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=100, weight_decay=0.01, save_every=500))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_not_sharded(self.sparse_lowrank, self.train.sharding, "sparse_lowrank")


# -- units files ------------------------------------------------------------------------------


@dataclass
class Utterance:
    id: str
    text: str
    units: list[int]


@dataclass
class UnitsReport:
    """What was read and what was skipped (with a few example ids per reason)."""

    files: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    num_codes: int | None = None
    first: str = ""                       # file:line the identity was taken from
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, item_id: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(item_id)

    def to_dict(self) -> dict:
        return {"files": self.files, "tokenizer": self.tokenizer, "num_codes": self.num_codes,
                "kept": self.kept, "skipped": dict(self.skipped), "skipped_examples":
                self.examples}

    def summary(self, name: str) -> str:
        line = f"{name}: {self.kept} utterances from {len(self.files)} file(s)"
        if self.skipped:
            line += "; skipped " + ", ".join(f"{n} {reason.replace('_', ' ')}"
                                             for reason, n in sorted(self.skipped.items()))
        return line


def read_units(paths: Sequence, report: UnitsReport, *, max_units: int | None = None
               ) -> list[Utterance]:
    """Utterances of units JSONL files, every line checked (ManifestError "file:line: ...").

    `report` carries the tokenizer identity and num_codes across calls, so train and
    dev files must agree too.
    """
    from ..jsonl import iter_jsonl

    out: list[Utterance] = []
    for path in paths:
        report.files.append(str(path))
        for line, rec in iter_jsonl(path):
            where = f"{path}:{line}"
            text, units = _check_record(rec, where, report)
            item_id = str(rec.get("id", where))
            if not text.strip():
                report.skip("empty_text", item_id)
            elif not units:
                report.skip("no_units", item_id)
            elif max_units is not None and len(units) > max_units:
                report.skip("over_max_units", item_id)
            else:
                report.kept += 1
                out.append(Utterance(item_id, text, units))
    return out


def _check_record(rec: dict, where: str, report: UnitsReport) -> tuple[str, list[int]]:
    fix = "each line needs text, units, tokenizer and num_codes (`speechlm build tokenize` " \
          "writes them)"
    for key in ("text", "units", "tokenizer", "num_codes"):
        if key not in rec:
            raise ManifestError(f"{where}: no '{key}' field; {fix}")
    text, units, tokenizer, num_codes = rec["text"], rec["units"], rec["tokenizer"], \
        rec["num_codes"]
    if not isinstance(text, str):
        raise ManifestError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ManifestError(f"{where}: 'tokenizer' must be the tokenizer's identity string, got "
                            f"{tokenizer!r}; {fix}")
    if type(num_codes) is not int or num_codes < 1:
        raise ManifestError(f"{where}: 'num_codes' must be a positive integer, got "
                            f"{num_codes!r}; {fix}")
    if report.tokenizer is None:
        report.tokenizer, report.num_codes, report.first = tokenizer, num_codes, where
    elif tokenizer != report.tokenizer:
        raise ManifestError(f"{where}: tokenizer {tokenizer!r} differs from {report.tokenizer!r} "
                            f"({report.first}): {TWO_TOKENIZERS}")
    elif num_codes != report.num_codes:
        raise ManifestError(f"{where}: num_codes {num_codes} differs from {report.num_codes} "
                            f"({report.first}): {TWO_TOKENIZERS}")
    if not isinstance(units, list):
        raise ManifestError(f"{where}: 'units' must be a list of integers, got "
                            f"{type(units).__name__}; re-run `speechlm build tokenize` for this "
                            "file")
    for i, unit in enumerate(units):
        if type(unit) is not int or not 0 <= unit < num_codes:
            raise ManifestError(f"{where}: units[{i}] = {unit!r} is not an integer in [0, "
                                f"{num_codes}) (num_codes of this tokenizer); the line is "
                                "damaged or from another tokenizer: re-run `speechlm build "
                                "tokenize` for this file")
    return text, units


def hold_out(utterances: list[Utterance], count: int) -> tuple[list[Utterance], list[Utterance]]:
    """(train, dev): the `count` utterances whose id hashes lowest, at most a tenth of them;
    the same split whatever the file order."""
    count = min(count, len(utterances) // 10)
    if count == 0:
        return utterances, []
    order = sorted(range(len(utterances)),
                   key=lambda i: hashlib.sha1(utterances[i].id.encode("utf-8")).hexdigest())
    dev = set(order[:count])
    return ([u for i, u in enumerate(utterances) if i not in dev],
            [u for i, u in enumerate(utterances) if i in dev])


# -- scoring ----------------------------------------------------------------------------------


def unit_error_rate(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> float:
    """Corpus unit error rate: summed edit distances / summed reference lengths."""
    from ..eval.metrics import edit_distance

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / max(total, 1)


def baseline_uer(train_units: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> float:
    """UER of repeating the most frequent training unit at each reference's length."""
    counts = Counter(u for units in train_units for u in units)
    top = counts.most_common(1)[0][0] if counts else 0
    return unit_error_rate(refs, [[top] * len(r) for r in refs])


def score_generation(model, texts: list[str], refs: list[list[int]], *, steps: int | None,
                     batch_size: int) -> tuple[dict, dict[str, list[list[int]]]]:
    """({decoder: metrics}, {decoder: hypotheses}) for each decoder of `model`."""
    scores, hyps = {}, {}
    for method in model.decoders:
        start = time.perf_counter()
        out = model.generate(texts, method=method, steps=steps, batch_size=batch_size)
        seconds = time.perf_counter() - start
        scores[method] = {"uer": unit_error_rate(refs, out), "seconds": seconds,
                          "units_per_second": sum(len(h) for h in out) / max(seconds, 1e-9)}
        if method == "maskgit":
            scores[method]["steps"] = steps or model.config.maskgit_steps
        hyps[method] = out
    return scores, hyps


def round_trip(tokenizer_spec: str, texts: list[str], units: dict[str, list[list[int]]]
               ) -> dict[str, dict[str, float]]:
    """CER / WER of the text the speech tokenizer's ASR head reads back from each set of unit
    sequences (the references, and each decoder's): do the generated units say the text?
    Unit error rate cannot tell: the same words spoken by two voices give different units."""
    from ..eval.metrics import cer, wer
    from ..models.speech_tokenizer import load_speech_tokenizer, read_tokenizer_info
    from ..pretrained.resolve import resolve_model_dir
    from ..text.normalize import normalize_transcript

    directory = resolve_model_dir(tokenizer_spec, expect=None, progress=False)
    tokenizer = load_speech_tokenizer(directory)
    lang = read_tokenizer_info(directory).get("normalize_lang") or "en"  # as it was trained
    refs = [normalize_transcript(t, lang) for t in texts]
    out = {}
    for name, seqs in units.items():
        hyps = tokenizer.transcribe_units(seqs)
        out[name] = {"cer": cer(refs, hyps), "wer": wer(refs, hyps)}
    return out


def length_errors(model, texts: list[str], refs: list[list[int]], batch_size: int) -> dict:
    """The length head on `texts`: mean absolute error (units, rounded as MaskGIT uses it),
    mean relative error and the fraction exactly right."""
    predicted = [max(1, round(x)) for x in model.predict_lengths(texts, batch_size=batch_size)]
    errors = [abs(p - len(r)) for p, r in zip(predicted, refs, strict=True)]
    n = max(len(errors), 1)
    return {"mae": sum(errors) / n,
            "relative": sum(e / len(r) for e, r in zip(errors, refs, strict=True)) / n,
            "exact": sum(e == 0 for e in errors) / n}


# -- training ---------------------------------------------------------------------------------


class TextToTokenObjective:
    """The Trainer's objective: the model's loss; dev loss and accuracies as evaluation."""

    def __init__(self, model, dev_batches: list[dict]):
        self.model = model
        self.dev_batches = dev_batches

    def loss(self, batch):
        return self.model.loss(batch)

    def evaluate(self, model) -> dict[str, float]:
        import torch

        if not self.dev_batches:
            return {}
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(0)  # the same masks at every evaluation
        sums: dict[str, list[float]] = {}
        for batch in self.dev_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            for key, (total, count) in model.losses(batch, generator).items():
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(total)
                acc[1] += float(count)
        means = {key: total / max(count, 1) for key, (total, count) in sums.items()}
        loss = model.config.length_loss_weight * means["length_loss"] + sum(
            means[f"{name}_nll"] for name in model.decoders)
        return {"loss": loss, **{k: v for k, v in means.items() if k != "length_loss"}}


def encode_items(model_vocab, utterances: list[Utterance]) -> tuple[list[dict], Counter, int]:
    """(items with text_ids and units, unseen characters counted, utterances with any)."""
    import numpy as np

    items, unseen, affected = [], Counter(), 0
    for u in utterances:
        ids, unknown = model_vocab.encode(u.text)
        unseen.update(unknown)
        affected += bool(unknown)
        items.append({"text_ids": np.asarray(ids, dtype=np.int32),
                      "units": np.asarray(u.units, dtype=np.int32)})
    return items, unseen, affected


def fixed_batches(items: list[dict], max_tokens: int) -> list[dict]:
    """Collated evaluation batches, items sorted by length, each under `max_tokens` padded."""
    from ..models.text_to_token import collate_pairs

    order = sorted(items, key=_cost)
    batches, current, longest = [], [], 0
    for item in order:
        longest_next = max(longest, _cost(item))
        if current and (len(current) + 1) * longest_next > max_tokens:
            batches.append(collate_pairs(current))
            current, longest_next = [], _cost(item)
        current.append(item)
        longest = longest_next
    if current:
        batches.append(collate_pairs(current))
    return batches


def _cost(item: dict) -> int:
    return len(item["text_ids"]) + len(item["units"]) + 1


class PairDataset:
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# -- the runner -------------------------------------------------------------------------------


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    from ..data.sampler import DurationBucketSampler
    from ..jsonl import atomic_write, write_jsonl
    from ..models.text_to_token import (
        TextToToken,
        build_vocab,
        collate_pairs,
        load_text_to_token,
        save_text_to_token,
    )
    from ..training import distributed
    from ..training.trainer import Trainer, seed_everything
    from . import start_run

    cfg = config
    train_files = cfg.data.train_files()
    if not train_files and not cfg.data.tokenizer:
        raise ConfigError("data.train: give the units JSONL file(s) written by `speechlm build "
                          "tokenize`, e.g. data.train=runs/units/train.jsonl (or data.tokenizer "
                          "and data.manifest to tokenize a manifest here)")
    dist, out, say = start_run(cfg.train, cfg.threads)
    started = time.perf_counter()

    # 1. units
    if not train_files:
        from ..pipelines.tokenize import cached_units

        train_files = [str(distributed.main_first(lambda: cached_units(
            cfg.data.tokenizer, cfg.data.manifest, progress=dist.is_main and cfg.train.progress,
            say=say)))]
    report = UnitsReport()
    train_utts = read_units(train_files, report, max_units=cfg.data.max_units)
    dev_report = UnitsReport(tokenizer=report.tokenizer, num_codes=report.num_codes,
                             first=report.first)
    if cfg.data.dev_files():
        dev_utts = read_units(cfg.data.dev_files(), dev_report)
    else:
        train_utts, dev_utts = hold_out(train_utts, cfg.data.dev_items)
    if not train_utts:
        raise ConfigError(f"data.train: no usable utterance in {', '.join(report.files)} "
                          f"(skipped: {dict(report.skipped) or 'none'})")
    say(report.summary("train") + f" (tokenizer {report.tokenizer}, {report.num_codes} codes)")
    if cfg.data.dev_files():
        say(dev_report.summary("dev"))

    # 2. vocabulary and items
    vocab = build_vocab(u.text for u in train_utts)
    items, _, _ = encode_items(vocab, train_utts)
    dev_items, unseen, unseen_utts = encode_items(vocab, dev_utts)
    per_char = max(len(u.units) / max(len(vocab.encode(u.text)[0]), 1) for u in train_utts)
    say(f"{len(items)} train / {len(dev_items)} dev utterances; {len(vocab)} character tokens")
    if unseen:
        say(f"dev: {sum(unseen.values())} character(s) in {unseen_utts} utterance(s) never "
            f"seen in training, mapped to <unk>: " + ", ".join(
                f"{c!r} ({n})" for c, n in unseen.most_common(12)))

    # 3. model and training
    seed_everything(cfg.train.seed)
    model = TextToToken(cfg.model, vocab, num_codes=report.num_codes,
                        tokenizer_identity=report.tokenizer,
                        max_units_per_char=round(1.5 * per_char, 3))
    params = sum(p.numel() for p in model.parameters())
    say(f"model: text-to-token, decoder {cfg.model.decoder}, {params / 1e6:.2f}M parameters")
    step_hooks, sparse_report = ([], None) if cfg.sparse_lowrank is None else prepare_for_training(
        model, cfg.sparse_lowrank, say, default_targets=T2U_TARGETS)
    sampler = DurationBucketSampler([_cost(item) for item in items],
                                    max_batch_duration=cfg.data.max_batch_tokens,
                                    max_batch_size=cfg.data.max_batch_size,
                                    num_buckets=cfg.data.num_buckets, seed=cfg.train.seed,
                                    rank=dist.rank, world_size=dist.world_size)
    objective = TextToTokenObjective(model, fixed_batches(dev_items, cfg.data.max_batch_tokens))
    trainer = Trainer(cfg.train, objective, PairDataset(items), sampler, collate_fn=collate_pairs,
                      run_config=cfg, identity_keys=("model",), step_hooks=step_hooks)
    fit_start = time.perf_counter()
    result = trainer.fit()
    train_seconds = time.perf_counter() - fit_start
    to_plain_dense(model)  # nn.Linear layers again: what save/load and decoding expect

    # 4. save, reload, score
    final_dir = out / FINAL_DIR
    results: dict[str, Any] = {}
    if dist.is_main:
        model.eval()
        scored = dev_utts[:cfg.eval.max_items] if cfg.eval.max_items else dev_utts
        texts, refs = [u.text for u in scored], [u.units for u in scored]
        probe = texts[:8]
        before = {m: model.generate(probe, method=m, steps=cfg.eval.steps) for m in model.decoders}
        save_text_to_token(model, final_dir, metadata={
            "recipe": "text_to_token", "step": result.step, "units": report.to_dict()})
        reloaded = load_text_to_token(final_dir, device=model.device)
        after = {m: reloaded.generate(probe, method=m, steps=cfg.eval.steps)
                 for m in model.decoders}
        if after != before:
            logger.warning("the model reloaded from %s generates differently from the trained one",
                           final_dir)
        scores, hyps, lengths = {}, {}, {}
        if texts:
            scores, hyps = score_generation(reloaded, texts, refs, steps=cfg.eval.steps,
                                            batch_size=cfg.eval.batch_size)
            lengths = length_errors(reloaded, texts, refs, cfg.eval.batch_size)
            if cfg.data.tokenizer:
                scores["round_trip"] = round_trip(cfg.data.tokenizer, texts,
                                                  {"reference": refs, **hyps})
        else:
            logger.warning("no dev utterances: generation is not scored (set data.dev or "
                           "data.dev_items)")
        write_jsonl(out / HYPS_FILE, (
            {"id": u.id, "text": u.text, "reference": u.units,
             **{m: hyps[m][i] for m in hyps}} for i, u in enumerate(scored)))
        results = {
            "tokenizer": report.tokenizer,
            "num_codes": report.num_codes,
            "decoder": cfg.model.decoder,
            **({"sparse_lowrank": sparse_report} if sparse_report else {}),
            "dev": {"utterances": len(dev_utts), "scored": len(scored),
                    "baseline_uer": baseline_uer([u.units for u in train_utts], refs)
                    if refs else None,
                    **scores, "length": lengths, "teacher_forced": result.eval_metrics},
            "data": {"train": report.to_dict(), "dev": dev_report.to_dict()
                     if cfg.data.dev_files() else {"held_out_of_train": len(dev_utts)},
                     "train_utterances": len(items), "vocab_size": len(vocab),
                     "dev_unseen_chars": dict(unseen.most_common()),
                     "dev_utterances_with_unseen_chars": unseen_utts},
            "train": {"steps": result.step, "final_train_loss": result.train_metrics.get("loss"),
                      "train_seconds": train_seconds,
                      "wall_seconds": time.perf_counter() - started},
            "model": {"parameters": params, "config": asdict(cfg.model)},
            "final_dir": str(final_dir),
            "reload_identical": after == before,
        }
        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=2, ensure_ascii=False)
        for i, u in enumerate(scored[:cfg.eval.examples]):
            say(f"  {u.text[:60]!r}\n      ref: {u.units[:16]}"
                + "".join(f"\n      {m}: {hyps[m][i][:16]}" for m in hyps))
        say(format_table(results))
        say(f"trained {result.step} steps in {train_seconds:.0f} s; model saved to {final_dir}")
    distributed.barrier()
    return results


def format_table(results: dict) -> str:
    """A short text table of the final dev scores."""
    dev = results["dev"]
    if not dev["scored"]:
        return "dev: no utterances scored"
    lines = [f"dev ({dev['scored']} utterances; tokenizer {results['tokenizer']}, "
             f"{results['num_codes']} codes)",
             f"  {'decoder':<10}{'UER':>8}{'units/s':>10}",
             f"  {'baseline':<10}{dev['baseline_uer']:>8.3f}{'':>10}  most frequent unit x "
             "reference length"]
    for name in ("ar", "maskgit"):
        if name in dev:
            note = f"  {dev[name]['steps']} steps" if name == "maskgit" else "  greedy"
            lines.append(f"  {name:<10}{dev[name]['uer']:>8.3f}"
                         f"{dev[name]['units_per_second']:>10.0f}{note}")
    if dev.get("length"):
        length = dev["length"]
        lines.append(f"  length head: MAE {length['mae']:.2f} units ({100 * length['relative']:.1f}"
                     f"%), exact {100 * length['exact']:.0f}%")
    if dev.get("round_trip"):
        lines.append("  round trip, text -> units -> the speech tokenizer's ASR head -> text:")
        for name, score in dev["round_trip"].items():
            label = "reference units (from audio)" if name == "reference" else f"{name} units"
            lines.append(f"    {label:<30} CER {100 * score['cer']:5.1f}%  WER "
                         f"{100 * score['wer']:5.1f}%")
    return "\n".join(lines)
