"""Whisper's own ASR loss (teacher-forced cross-entropy on the transcript) and greedy-decoding
evaluation, on audio or on cached encoder frames.

    records, report = prepare_whisper_records("train.jsonl", tokenizer, prompt, name="train")
    objective = WhisperASRObjective(model, tokenizer, prompt, dev=dev_dataset, lang="es")
    trainer = Trainer(train_cfg, objective, dataset, sampler,
                      collate_fn=WhisperASRCollator(prompt.eot))

A record gets `decoder_ids` and `labels` (speechlm.models.whisper_lora.AsrPrompt.sequence) and
`text_norm` (the transcript normalised for scoring). Training records are skipped and counted
(data_report.json) when their transcript is empty, their audio shorter than `min_duration`
or longer than Whisper's 30 s window (`max_duration`), or the prompt plus transcript is longer
than the decoder's 448-position window; with `strict` such a transcript is refused with its
file and line instead. Dev/test records are all kept (a transcript the decoder cannot hold
is still scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ...data.collate import AudioCollator, SkippedItem
from ...errors import ManifestError
from ...text.normalize import normalize_transcript
from .ctc import CTCDataReport, say

EMPTY = "empty transcript"
TOO_LONG = "transcript longer than the decoder window"


def prepare_whisper_records(source, tokenizer, prompt, *, lang: str | None = None,
                            min_duration: float | None = None, max_duration: float | None = 30.0,
                            training: bool = True, strict: bool = False,
                            name: str = "train") -> tuple[list[dict], CTCDataReport]:
    """Records of manifest `source` (a path, or a list of records) with `decoder_ids`,
    `labels` and `text_norm`, and the report of what was skipped (see the module doc)."""
    from ...data.manifest import iter_manifest_lines

    if isinstance(source, (str, Path)):
        lines, where = list(iter_manifest_lines(source)), str(source)
    else:
        lines, where = list(enumerate(source, start=1)), "<records>"
    report = CTCDataReport(name=name, source=where, total=len(lines))
    kept: list[dict] = []
    for lineno, rec in lines:
        rid, text = str(rec.get("id")), rec.get("text")
        text = text.strip() if isinstance(text, str) else ""
        norm = normalize_transcript(text, lang or rec.get("lang")) if text else ""
        ids = prompt.text_ids(tokenizer, text) if text else []
        inputs, labels = prompt.sequence(ids)
        duration = rec.get("duration")
        if training:
            if not norm:
                report.skip(EMPTY, f"{where}:{lineno} {rid}")
                continue
            if not report.keeps_duration(duration, f"{where}:{lineno} {rid}", f"{where}:{lineno}",
                                         rid, min_duration, max_duration):
                continue
            if len(inputs) > prompt.max_positions:
                detail = (f"{where}:{lineno}: text: {rid!r} takes {len(inputs)} decoder "
                          f"positions with the prompt, more than Whisper's "
                          f"{prompt.max_positions}")
                if strict:
                    raise ManifestError(f"{detail}; split the utterance into shorter pieces "
                                        "(`speechlm build segment`), or set data.strict=false "
                                        "to skip such utterances")
                report.skip(TOO_LONG, detail.split(": text: ", 1)[0] + f" {rid} "
                            f"({len(inputs)} > {prompt.max_positions})")
                continue
        report.kept += 1
        report.kept_hours += float(duration or 0.0) / 3600
        kept.append({**rec, "decoder_ids": inputs, "labels": labels, "text_norm": norm})
    if training and not kept:
        raise report.nothing_usable("the transcripts (text field) and "
                                    "data.min_duration/max_duration")
    return kept, report


class WhisperASRCollator:
    """AudioCollator (or, for cached encoder frames, `collate_encoder_batch`) plus
    `decoder_input_ids` [B, U] (padded with `pad_id`) and `labels` [B, U] (padded with -100)."""

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)
        self.audio = AudioCollator()

    def __call__(self, items: Sequence[dict | SkippedItem]) -> dict:
        if any(isinstance(item, dict) and "encoder_hidden" in item for item in items):
            from ...pipelines.encoder_cache import collate_encoder_batch

            batch = collate_encoder_batch(items)
        else:
            batch = self.audio(items)
        inputs, labels = batch.pop("decoder_ids", []), batch.pop("labels", [])
        longest = max((len(x) for x in inputs), default=0)
        ids = torch.full((len(inputs), longest), self.pad_id, dtype=torch.long)
        targets = torch.full((len(inputs), longest), -100, dtype=torch.long)
        for row, (x, y) in enumerate(zip(inputs, labels, strict=True)):
            ids[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            targets[row, : len(y)] = torch.as_tensor(y, dtype=torch.long)
        batch["decoder_input_ids"], batch["labels"] = ids, targets
        return batch


def _batch_size(batch: dict) -> int:
    tensor = batch["encoder_hidden"] if "encoder_hidden" in batch else batch["audio"]
    return int(tensor.shape[0])


class WhisperASRObjective:
    """Teacher-forced cross-entropy (token mean over the batch's text and EOT labels) and dev
    CER/WER of greedy transcripts.

    cached_layer: what batches of cached frames hold (speechlm.models.whisper_lora.
    cache_layer: None = the encoder's output, k = layer k's output, the layers above run
    here). lang: normalisation language of the scores. max_new_tokens: decoding cap.
    """

    def __init__(self, model, tokenizer, prompt, *, dev=None, lang: str | None = None,
                 cached_layer: int | None = None, eval_batch_size: int = 16,
                 max_eval_items: int | None = None, max_new_tokens: int = 200,
                 examples: int = 3, examples_path=None):
        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.dev, self.lang = dev, lang
        self.cached_layer = cached_layer
        self.eval_batch_size = int(eval_batch_size)
        self.max_eval_items = max_eval_items
        self.max_new_tokens = int(max_new_tokens)
        self.examples = examples
        self.examples_path = Path(examples_path) if examples_path else None
        self.collate = WhisperASRCollator(prompt.eot)
        self.trainer = None

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def encoder_states(self, model, batch) -> torch.Tensor:
        from ...models.whisper_lora import states_from_audio, states_from_cache

        if "encoder_hidden" in batch:
            return states_from_cache(model, batch["encoder_hidden"], self.cached_layer)
        return states_from_audio(model, batch["audio"], batch["audio_lengths"])

    def _token_loss(self, model, states, batch, reduction: str = "mean") -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                       decoder_input_ids=batch["decoder_input_ids"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=-100, reduction=reduction)

    def loss(self, batch):
        if _batch_size(batch) == 0:
            return None  # every item of the batch was skipped
        states = self.encoder_states(self.model, batch)
        loss = self._token_loss(self.model, states, batch)
        return loss, {"tokens": float((batch["labels"] >= 0).sum()),
                      "skipped_items": float(len(batch.get("skipped", ())))}

    # -- evaluation -----------------------------------------------------------------------

    def generate(self, model, states: torch.Tensor) -> list[str]:
        """Greedy transcripts of encoder states [B, 1500, D] (Whisper's prompt, no timestamps)."""
        from ...models.whisper_lora import greedy_decode

        ids = greedy_decode(model, states, self.prompt, self.max_new_tokens)
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(
            ids, skip_special_tokens=True)]

    def transcribe(self, model, dataset, *, max_items: int | None = None
                   ) -> tuple[list[dict], float, int]:
        """({id, ref (normalised), text (as decoded)} rows in dataset order, the teacher-forced
        loss per label token, items that could not be loaded). Call in eval mode under
        no_grad."""
        indices = list(range(len(dataset)))
        if max_items is not None and len(indices) > max_items:
            step = len(indices) / max_items
            indices = [indices[int(i * step)] for i in range(max_items)]
        records = dataset.records
        order = sorted(indices, key=lambda i: (float(records[i].get("duration") or 0.0), i))
        device = next(model.parameters()).device
        rows, skipped, loss_sum, label_sum = [], 0, 0.0, 0
        for start in range(0, len(order), self.eval_batch_size):
            batch = self.collate([dataset[i] for i in order[start : start + self.eval_batch_size]])
            skipped += len(batch["skipped"])
            if _batch_size(batch) == 0:
                continue
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items()}
            states = self.encoder_states(model, batch)
            loss_sum += float(self._token_loss(model, states, batch, reduction="sum"))
            label_sum += int((batch["labels"] >= 0).sum())
            texts = self.generate(model, states)
            for rid, ref, text in zip(batch["ids"], batch["text_norm"], texts, strict=True):
                rows.append({"id": rid, "ref": ref, "text": text})
        position = {str(r["id"]): n for n, r in enumerate(records)}
        rows.sort(key=lambda r: position.get(str(r["id"]), 0))
        return rows, loss_sum / max(label_sum, 1), skipped

    def score(self, rows: list[dict]) -> dict[str, float]:
        from ...eval.metrics import cer, wer

        refs = [r["ref"] for r in rows]
        hyps = [normalize_transcript(r["text"], self.lang) if self.lang else r["text"]
                for r in rows]
        empty = sum(1 for h in hyps if not h) / len(hyps) if hyps else 0.0
        return {"wer": wer(refs, hyps), "cer": cer(refs, hyps), "empty_frac": empty}

    def evaluate(self, model) -> dict[str, float]:
        """Dev CER/WER of greedy transcripts and the teacher-forced dev loss (examples printed
        and logged)."""
        from ...training import distributed

        if self.dev is None:
            return {}
        rows, loss, _ = self.transcribe(model, self.dev, max_items=self.max_eval_items)
        metrics = {"loss": loss, **self.score(rows)}
        if distributed.is_main_process():
            self._show_examples(rows)
        return metrics

    def _show_examples(self, rows: list[dict]) -> None:
        shown = rows[: self.examples]
        if not shown:
            return
        step = None if self.trainer is None else int(self.trainer.step)
        say("\n".join([f"dev examples (step {step}):"] + [
            f"  ref: {r['ref']}\n  hyp: {r['text']}" for r in shown]))
        if self.examples_path is not None:
            from ...jsonl import JsonlAppender

            with JsonlAppender(self.examples_path) as out:
                for row in shown:
                    out.write({"step": step, **row})
