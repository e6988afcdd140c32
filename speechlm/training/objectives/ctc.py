"""Character CTC fine-tuning: the data preparation, the loss and the dev evaluation.

Data (`prepare_ctc_records`): every transcript is normalised
(`speechlm.text.normalize_transcript`) and encoded with the vocabulary
before training starts, so problems are counted and reported up front
instead of surfacing as NaNs mid-run. A training utterance is skipped, and
counted by reason, when

- its transcript is empty (after normalisation: "..." is empty too);
- its audio is shorter than `min_duration` or longer than `max_duration`;
- its audio is too short for its transcript: CTC needs at least one output
  frame per character plus one blank between repeated characters, and the
  model emits one frame per 320 samples (50 per second for wav2vec2);
- it has characters outside the vocabulary, only with `unknown="skip"`. The
  default, `unknown="unk"`, maps them to `<unk>` and keeps the utterance
  (in low-resource training every utterance counts; the vocabulary is built
  from the training transcripts, so this only happens with
  `vocab_min_count > 1` or a vocabulary taken from a checkpoint).

Dev/test utterances are never dropped for their text: they are scored as
they are (a character the vocabulary lacks is simply an error).

Loss: CTC with the blank at id 0 and `zero_infinity=True` (an infeasible
item gives zero loss and gradient instead of inf). Reduction "token_mean"
(default) divides the summed loss by the number of target characters in the
batch, as fairseq does for wav2vec2 fine-tuning: the gradient scale does not
depend on the batch size or utterance lengths, so the learning rate carries
over between batch budgets. "mean" is transformers' (per-utterance loss /
its length, averaged over utterances); "sum" scales with the batch.

Input: waveforms normalised to zero mean / unit variance per utterance
(as Wav2Vec2FeatureExtractor does); an attention mask is passed only to
models with a layer-norm conv stack (group-norm models such as wav2vec2-base
and HuBERT were trained without one and must not get it).

Evaluation: greedy decoding of the dev set, WER/CER on normalised text, a
few example hypotheses, and the blank-collapse guard: when, after the first
part of training, more than `collapse_threshold` of the dev hypotheses are
empty, or nothing is recognised (WER >= 0.99 with CER >= 0.9), a loud warning
names the usual causes and what to change, and `blank_collapse` is 1 in the
metrics.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data.collate import AudioCollator, SkippedItem
from ...errors import ManifestError, SpeechLMError
from ...models.ctc import (
    CharVocab,
    label_frames_needed,
    normalizes_waveform,
    uses_attention_mask,
)
from ...text.normalize import normalize_transcript
from ..tailr import TaiLrConfig, ctc_label_probability, tailr_weights

logger = logging.getLogger(__name__)

REDUCTIONS = ("token_mean", "mean", "sum")

# Skip reasons (also the keys of CTCDataReport.skipped).
EMPTY = "empty transcript"
UNKNOWN = "characters not in the vocabulary"
TOO_SHORT_FOR_TEXT = "audio too short for its transcript"
BELOW_MIN = "shorter than min_duration"
ABOVE_MAX = "longer than max_duration"


def say(message: str) -> None:
    """Print to stderr without breaking a progress bar."""
    try:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(message, file=sys.stderr)


# -- data --------------------------------------------------------------------------------


@dataclass
class CTCDataReport:
    """What `prepare_ctc_records` kept and skipped, with examples per reason."""

    name: str
    source: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    unknown_chars: Counter = field(default_factory=Counter)
    utterances_with_unk: int = 0
    kept_hours: float = 0.0
    sample_rates: dict = field(default_factory=dict)  # Hz -> utterances (see count_sample_rates)
    subset: dict | None = None            # what data.train[].max_hours kept

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(example)

    def keeps_duration(self, duration, example: str, where: str, rid,
                       min_duration: float | None, max_duration: float | None) -> bool:
        """Whether a training record's duration is within bounds (the skip counted when not);
        a record without one is an error: training batches are sized by duration."""
        if duration is None:
            raise ManifestError(
                f"{where}: record {rid!r} has no duration; training batches are sized by "
                "duration: run `speechlm data stats --fill-durations MANIFEST` first")
        if min_duration is not None and duration < min_duration:
            self.skip(BELOW_MIN, f"{example} ({duration:.2f} s < {min_duration:g} s)")
            return False
        if max_duration is not None and duration > max_duration:
            self.skip(ABOVE_MAX, f"{example} ({duration:.2f} s > {max_duration:g} s)")
            return False
        return True

    def nothing_usable(self, check: str) -> SpeechLMError:
        """The error for a training manifest of which nothing was kept: each reason with its
        count and an example, then what to check (`check`)."""
        reasons = "; ".join(f"{n} {r} (e.g. {self.examples[r][0]})"
                            for r, n in self.skipped.most_common()) or "the manifest is empty"
        return SpeechLMError(f"{self.source}: no usable training utterance: {reasons}. Check "
                             f"{check}")

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "total": self.total,
                "kept": self.kept, "kept_hours": round(self.kept_hours, 4),
                "skipped": dict(self.skipped.most_common()), "examples": self.examples,
                "unknown_chars": dict(self.unknown_chars.most_common()),
                "utterances_with_unk": self.utterances_with_unk,
                "sample_rates": self.sample_rates, **({"subset": self.subset} if self.subset
                                                      else {})}

    def summary(self) -> str:
        text = f"{self.name}: {self.kept} of {self.total} utterances ({self.kept_hours:.2f} h)"
        if self.skipped:
            parts = [f"{n} {reason} (e.g. {self.examples[reason][0]})"
                     for reason, n in self.skipped.most_common()]
            text += "; skipped " + "; ".join(parts)
        if self.unknown_chars:
            chars = ", ".join(f"'{c}' x{n}" for c, n in self.unknown_chars.most_common(10))
            text += (f"; characters not in the vocabulary: {chars}"
                     + (f" (mapped to <unk> in {self.utterances_with_unk} utterances)"
                        if self.utterances_with_unk else ""))
        if self.subset:
            text += (f"; a fixed random {self.subset['hours']:.2f} h subset (max_hours "
                     f"{self.subset['max_hours']:g}) of {self.subset['from_utterances']}")
        rates = {k: n for k, n in self.sample_rates.items() if k != "target"}
        if len(rates) > 1 or (rates and next(iter(rates)) != str(self.sample_rates["target"])):
            shown = ", ".join(f"{n} at {rate} Hz" if rate != "unreadable" else
                              f"{n} unreadable (skipped when loaded)"
                              for rate, n in rates.items())
            text += (f"; sample rates {shown}: resampled to {self.sample_rates['target']} Hz "
                     "when loaded")
        return text


def count_sample_rates(records: Sequence[dict], target: int) -> dict:
    """{"target": target, "<rate>": utterances, ...} from the audio files' headers (most
    common first; "unreadable": headers that could not be read, skipped when loaded). A
    manifest that mixes rates is fine (audio is resampled to `target` when loaded); the
    report says so rather than letting it pass unseen."""
    from ...audio.io import audio_info
    from ...data.manifest import AUDIO_PATH_KEY
    from ...errors import AudioError

    rates: Counter = Counter()
    seen: dict[str, str] = {}
    for record in records:
        path = record.get(AUDIO_PATH_KEY) or record.get("audio")
        if path not in seen:
            try:
                seen[path] = str(audio_info(path).sample_rate)
            except (AudioError, OSError, RuntimeError):
                seen[path] = "unreadable"
        rates[seen[path]] += 1
    return {"target": target, **dict(rates.most_common())}


def prepare_ctc_records(source, vocab: CharVocab, *, lang: str | None = None,
                        frames_for_duration: Callable[[float], int] | None = None,
                        unknown: str = "unk", min_duration: float | None = None,
                        max_duration: float | None = None, training: bool = True,
                        name: str = "train") -> tuple[list[dict], CTCDataReport]:
    """Records of manifest `source` (path, or list of records) with `labels` (token ids)
    and `text_norm` added, and the report of what was skipped (see the module doc).

    lang: normalisation language (default: each record's `lang`).
    frames_for_duration: output frames of the model for a duration in seconds.
    training=False keeps every record (dev/test), only encoding it.
    """
    from ...data.manifest import read_manifest

    if unknown not in ("unk", "skip"):
        raise ValueError("unknown must be 'unk' or 'skip'")
    if isinstance(source, (str, Path)):
        records, where = read_manifest(source), str(source)
    else:
        records, where = list(source), "<records>"
    report = CTCDataReport(name=name, source=where, total=len(records))
    kept: list[dict] = []
    for rec in records:
        rid = str(rec.get("id"))
        text = rec.get("text")
        norm = normalize_transcript(text, lang or rec.get("lang")) if isinstance(text, str) else ""
        ids, missing = vocab.encode(norm)
        if missing:
            report.unknown_chars.update(missing)
        duration = rec.get("duration")
        if training:
            if not norm:
                report.skip(EMPTY, f"{rid} (text {text!r})")
                continue
            if missing and unknown == "skip":
                report.skip(UNKNOWN, f"{rid} ({''.join(sorted(set(missing)))})")
                continue
            if not report.keeps_duration(duration, str(rid), where, rid, min_duration,
                                         max_duration):
                continue
            if frames_for_duration is not None:
                frames, needed = frames_for_duration(duration), label_frames_needed(ids)
                if frames < needed:
                    report.skip(TOO_SHORT_FOR_TEXT, f"{rid} ({duration:.2f} s gives {frames} "
                                                    f"frames, its {len(ids)} labels need {needed})")
                    continue
        if missing:
            report.utterances_with_unk += 1
        report.kept += 1
        report.kept_hours += float(duration or 0.0) / 3600
        kept.append({**rec, "labels": ids, "text_norm": norm})
    if training and not kept:
        raise report.nothing_usable("the transcripts (text field), data.lang, "
                                    "data.min_duration/max_duration")
    return kept, report


class CTCCollator:
    """AudioCollator plus `labels` [B, U] (padded with -100) and `label_lengths` [B].

    Items with cached encoder frames (`CachedEncoderDataset`) are collated with
    `collate_encoder_batch` instead (`encoder_hidden`, `encoder_lengths`; no audio)."""

    def __init__(self, *, pad_to_multiple_of: int | None = None):
        self.audio = AudioCollator(pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, items: Sequence[dict | SkippedItem]) -> dict:
        if any(isinstance(item, dict) and "encoder_hidden" in item for item in items):
            from ...pipelines.encoder_cache import collate_encoder_batch

            batch = collate_encoder_batch(items)
        else:
            batch = self.audio(items)
        labels = batch.pop("labels", [])
        longest = max((len(x) for x in labels), default=0)
        padded = torch.full((len(labels), longest), -100, dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        batch["labels"] = padded
        batch["label_lengths"] = torch.tensor([len(x) for x in labels], dtype=torch.long)
        return batch


# -- the objective ---------------------------------------------------------------------------

COLLAPSE_ADVICE = """\
Classic causes of blank-only CTC output, and what to change:
  - learning rate: too high (the loss jumps, then settles on the all-blank plateau) -> lower
    train.lr 3-10x; too low (it never leaves the plateau) -> raise it or train longer
  - encoder not frozen at the start: the random output layer's gradients wreck a pretrained
    encoder -> set model.freeze_encoder_steps (e.g. 5-10% of train.max_steps); frozen for too
    long -> lower it
  - vocabulary mismatch: transcripts normalised differently from the vocabulary (data.lang),
    or dev characters the vocabulary lacks{unseen} -> check vocab_report.json
  - masking too aggressive (mask_time_prob / mask_feature_prob, long spans on short
    utterances) -> lower model.mask_time_prob / model.mask_feature_prob
  - too few updates: CTC first learns to emit only blanks and leaves that plateau later
    (thousands of updates for a pretrained model on little data) -> raise train.max_steps"""


def is_blank_collapse(hyps: Sequence[str], wer_value: float, cer_value: float = 1.0, *,
                      threshold: float = 0.9) -> bool:
    """True when more than `threshold` of the hypotheses are empty, or when nothing is
    recognised: WER >= 0.99 with CER >= 0.9. (A model trained from scratch passes through
    WER ~1 with CER ~0.5 on its way: that is progress, not collapse.)"""
    if not hyps:
        return False
    empty = sum(1 for h in hyps if not h.strip()) / len(hyps)
    return empty > threshold or (wer_value >= 0.99 and cer_value >= 0.9)


@dataclass
class EvalResult:
    """Greedy transcripts of a split and their scores."""

    rows: list[dict]  # {id, ref, hyp}
    wer: float
    cer: float
    loss: float
    empty_frac: float
    skipped: int = 0

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "wer": self.wer, "cer": self.cer,
                "empty_frac": self.empty_frac}


class CTCObjective:
    """CTC loss on collated batches and greedy-decoding evaluation on `dev`.

    dev: an AudioDataset of records prepared with `prepare_ctc_records(training=False)`.
    guard_from_step: evaluations before this update never report blank collapse (CTC emits
    only blanks early in every run). Call `attach(trainer)` so the guard knows the step.
    tailr: weight each training utterance's loss by TaiLr's w of its length-normalised CTC
    probability (speechlm.training.tailr; for training on pseudo-labels); the metrics then
    carry tailr_loss_plain (unweighted) and tailr_weight_mean / tailr_weight_min. Dev loss and
    scores are never weighted.
    """

    def __init__(self, model, vocab: CharVocab, *, dev=None, reduction: str = "token_mean",
                 sample_rate: int = 16000, eval_batch_duration: float = 200.0,
                 max_eval_items: int | None = None, examples: int = 3,
                 collapse_threshold: float = 0.9, guard_from_step: int = 0,
                 unseen_dev_chars: Sequence[str] = (), examples_path=None,
                 tailr: TaiLrConfig | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.model = model
        self.vocab = vocab
        self.dev = dev
        self.reduction = reduction
        self.sample_rate = sample_rate
        self.eval_batch_duration = eval_batch_duration
        self.max_eval_items = max_eval_items
        self.examples = examples
        self.collapse_threshold = collapse_threshold
        self.guard_from_step = guard_from_step
        self.unseen_dev_chars = list(unseen_dev_chars)
        self.examples_path = Path(examples_path) if examples_path else None
        self.tailr = tailr  # TaiLr weights on the training loss (speechlm.training.tailr)
        # Batches of cached encoder frames hold this hidden state of the encoder (set by the
        # recipe when it trains on an encoder cache; see WhisperEncoderForCTC).
        self.cached_layer: int | None = None
        self.trainer = None
        self.collapse_warnings = 0
        self.skip_report = None  # a SkipReport that counts unreadable training audio, if set
        # The recipe scores the final model itself (and warns then); it turns this off so a
        # collapse at the last update is not announced twice.
        self.warn_at_last_step = True
        from ...inference.ctc import GreedyCTCDecoder

        self.decoder = GreedyCTCDecoder(vocab.tokens)

    def attach(self, trainer) -> None:
        """Let evaluation know the update count (for the blank-collapse guard)."""
        self.trainer = trainer

    @property
    def step(self) -> int | None:
        return None if self.trainer is None else int(self.trainer.step)

    # -- forward and loss ---------------------------------------------------------------

    def _forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [B, T, V] float32, valid frames [B])."""
        from ...audio.features import normalize_waveform

        if "encoder_hidden" in batch:  # cached frames of the frozen bottom of the encoder
            frames = batch["encoder_lengths"]
            logits = model.logits_from_hidden(batch["encoder_hidden"], frames,
                                              self.cached_layer)
            return F.log_softmax(logits.float(), dim=-1), frames
        audio, lengths = batch["audio"], batch["audio_lengths"]
        inputs = normalize_waveform(audio, lengths) if normalizes_waveform(model) else audio
        mask = batch.get("attention_mask") if uses_attention_mask(model) else None
        logits = model(inputs, attention_mask=mask).logits
        frames = model._get_feat_extract_output_lengths(lengths).clamp(max=logits.shape[1])
        return F.log_softmax(logits.float(), dim=-1), frames

    def ctc_loss(self, log_probs: torch.Tensor, frames: torch.Tensor, labels: torch.Tensor,
                 label_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reduced loss, per-utterance losses) under `self.reduction`."""
        targets = labels[labels >= 0]
        per_item = F.ctc_loss(log_probs.transpose(0, 1), targets, frames, label_lengths,
                              blank=self.vocab.blank_id, reduction="none", zero_infinity=True)
        return self.reduce(per_item, label_lengths), per_item

    def reduce(self, per_item: torch.Tensor, label_lengths: torch.Tensor) -> torch.Tensor:
        """The batch loss of per-utterance losses under `self.reduction`."""
        if self.reduction == "token_mean":
            return per_item.sum() / label_lengths.sum().clamp_min(1)
        if self.reduction == "mean":
            return (per_item / label_lengths.clamp_min(1)).mean()
        return per_item.sum()

    def sample_ctc_losses(self, per_item: torch.Tensor,
                          label_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-utterance loss per label, coef) with sum(coef * losses) the loss under
        `self.reduction` (coef None: their mean), for `train.sample_weighting`."""
        lengths = label_lengths.clamp_min(1).to(per_item.dtype)
        losses = per_item / lengths
        if self.reduction == "token_mean":
            return losses, lengths / lengths.sum()
        if self.reduction == "mean":
            return losses, None
        return losses, lengths

    def loss(self, batch):
        out = self._batch_losses(batch)
        if out is None:
            return None
        loss, _, _, metrics = out
        return loss, metrics

    def sample_losses(self, batch):
        """Per-utterance losses (loss per label) for train.sample_weighting; with uniform
        weights they reduce to `loss(batch)` under the same `reduction`."""
        from ..sample_weighting import SampleLosses

        out = self._batch_losses(batch)
        if out is None:
            return None
        _, per_item, label_lengths, metrics = out
        losses, coef = self.sample_ctc_losses(per_item, label_lengths)
        return SampleLosses(losses, metrics, coef)

    def _batch_losses(self, batch):
        """(reduced loss, per-utterance losses, label lengths, metrics), or None if empty."""
        if self.skip_report is not None and batch.get("skipped"):
            self.skip_report.add(batch)
        if _batch_size(batch) == 0:
            return None  # every item of the batch was skipped
        log_probs, frames = self._forward(self.model, batch)
        labels, label_lengths = batch["labels"], batch["label_lengths"]
        loss, per_item = self.ctc_loss(log_probs, frames, labels, label_lengths)
        needed = torch.tensor([label_frames_needed(row[row >= 0].tolist()) for row in labels.cpu()],
                              device=frames.device)
        infeasible = (frames < needed).float().mean()
        metrics = {"infeasible_frac": infeasible,
                   "skipped_items": float(len(batch.get("skipped", ())))}
        if self.tailr is not None:
            weights = tailr_weights(ctc_label_probability(per_item, label_lengths),
                                    self.tailr.gamma, self.tailr.w_min)
            metrics.update(tailr_loss_plain=loss.detach(), tailr_weight_mean=weights.mean(),
                           tailr_weight_min=weights.min())
            per_item = per_item * weights
            loss = self.reduce(per_item, label_lengths)
        return loss, per_item, label_lengths, metrics

    # -- evaluation -------------------------------------------------------------------------

    def transcribe(self, model, dataset, *, max_items: int | None = None,
                   shard: bool = True) -> tuple[list[dict], float, int]:
        """Greedy transcripts of `dataset` ({id, ref, hyp} rows in dataset order), the
        token-mean dev loss, and how many items could not be loaded. Shards the items across
        DDP ranks and gathers the rows on every rank. Call under no_grad in eval mode."""
        from ...training import distributed

        indices = list(range(len(dataset)))
        if max_items is not None and len(indices) > max_items:
            step = len(indices) / max_items
            indices = [indices[int(i * step)] for i in range(max_items)]
        records = dataset.records
        if shard and distributed.is_distributed():
            indices = indices[distributed.rank():: distributed.world_size()]
        order = sorted(indices, key=lambda i: (float(records[i].get("duration") or 0.0), i))
        batches, batch = [], []
        for i in order:
            duration = float(records[i].get("duration") or 0.0)
            if batch and (len(batch) + 1) * max(duration, 1e-3) > self.eval_batch_duration:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        device = next(model.parameters()).device
        collate = CTCCollator()
        rows, loss_sum, label_sum, skipped = [], 0.0, 0, 0
        for batch_indices in batches:
            items = [dataset[i] for i in batch_indices]
            data = collate(items)
            skipped += len(data["skipped"])
            if _batch_size(data) == 0:
                continue
            tensors = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                       for k, v in data.items()}
            log_probs, frames = self._forward(model, tensors)
            hyps = self.decoder.decode(log_probs, frames)
            lengths = tensors["label_lengths"]
            usable = lengths > 0
            if bool(usable.any()):
                _, per_item = self.ctc_loss(log_probs[usable], frames[usable],
                                            tensors["labels"][usable], lengths[usable])
                loss_sum += float(per_item.sum())
                label_sum += int(lengths[usable].sum())
            for rid, ref, hyp in zip(data["ids"], data["text_norm"], hyps, strict=True):
                rows.append({"id": rid, "ref": ref, "hyp": hyp})
        if shard and distributed.is_distributed():
            gathered = distributed.all_gather_object((rows, loss_sum, label_sum, skipped))
            rows = [r for part in gathered for r in part[0]]
            loss_sum = sum(part[1] for part in gathered)
            label_sum = sum(part[2] for part in gathered)
            skipped = sum(part[3] for part in gathered)
        position = {str(records[i]["id"]): n for n, i in enumerate(range(len(records)))}
        rows.sort(key=lambda r: position.get(str(r["id"]), 0))
        return rows, loss_sum / max(label_sum, 1), skipped

    def score(self, model, dataset, *, max_items: int | None = None) -> EvalResult:
        """Transcribe `dataset` and compute WER/CER (normalised refs vs hyps)."""
        from ...eval.metrics import cer, wer

        rows, loss, skipped = self.transcribe(model, dataset, max_items=max_items)
        refs, hyps = [r["ref"] for r in rows], [r["hyp"] for r in rows]
        empty = sum(1 for h in hyps if not h) / len(hyps) if hyps else 0.0
        return EvalResult(rows=rows, wer=wer(refs, hyps), cer=cer(refs, hyps), loss=loss,
                          empty_frac=empty, skipped=skipped)

    def evaluate(self, model) -> dict[str, float]:
        """Dev WER/CER/loss with greedy decoding, examples, and the blank-collapse guard."""
        from ...training import distributed

        if self.dev is None:
            return {}
        result = self.score(model, self.dev, max_items=self.max_eval_items)
        metrics = result.metrics()
        armed = self.step is None or self.step >= self.guard_from_step
        collapsed = armed and is_blank_collapse([r["hyp"] for r in result.rows], result.wer,
                                                result.cer, threshold=self.collapse_threshold)
        metrics["blank_collapse"] = float(collapsed)
        if distributed.is_main_process():
            self._show_examples(result.rows)
            last = (self.trainer is not None
                    and self.step == getattr(self.trainer.config, "max_steps", None))
            if collapsed and (self.warn_at_last_step or not last):
                self.collapse_warnings += 1
                say(collapse_warning(result, step=self.step,
                                     unseen_chars=self.unseen_dev_chars))
        return metrics

    def _show_examples(self, rows: list[dict]) -> None:
        shown = rows[: self.examples]
        if not shown:
            return
        where = f"step {self.step}" if self.step is not None else "eval"
        lines = [f"dev examples ({where}):"]
        for row in shown:
            lines.append(f"  ref: {row['ref']}\n  hyp: {row['hyp']}")
        say("\n".join(lines))
        if self.examples_path is not None:
            from ...jsonl import JsonlAppender

            with JsonlAppender(self.examples_path) as out:
                for row in shown:
                    out.write({"step": self.step, **row})


def _batch_size(batch: dict) -> int:
    """Usable items in a collated batch (audio or cached encoder frames)."""
    tensor = batch["encoder_hidden"] if "encoder_hidden" in batch else batch["audio"]
    return int(tensor.shape[0])


def collapse_warning(result: EvalResult, *, step: int | None,
                     unseen_chars: Sequence[str] = ()) -> str:
    """The loud blank-collapse message (see COLLAPSE_ADVICE)."""
    unseen = f" (here: {', '.join(repr(c) for c in unseen_chars[:12])})" if unseen_chars else ""
    where = f" at step {step}" if step is not None else ""
    if result.empty_frac > 0.5:
        what = (f"{result.empty_frac:.0%} of the dev hypotheses are empty, WER {result.wer:.2f}, "
                f"CER {result.cer:.2f}: the model outputs (almost) only CTC blanks")
    else:
        what = (f"dev WER {result.wer:.2f}, CER {result.cer:.2f}: (almost) no word is "
                "recognised (CTC stuck at WER 1.0)")
    bar = "!" * 78
    return f"{bar}\nBLANK COLLAPSE{where}: {what}.\n{COLLAPSE_ADVICE.format(unseen=unseen)}\n{bar}"
