"""Pseudo-labelling unlabelled audio with a trained CTC model (the self-training teacher).

Each utterance gets the teacher's transcript and a confidence: the mean
posterior of the frames where the best path emits a character (blank frames
say little about how sure the model is of the words). Utterances below
`min_confidence`, or with an empty transcript, are dropped and counted.

Every decision is appended to `<out>.progress.jsonl` as it is made, so a
killed job resumes without redoing or losing utterances; the filtered
manifest is written atomically at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


def ctc_confidence(log_probs: torch.Tensor, blank_id: int) -> float:
    """Mean best-path posterior over the non-blank frames of one utterance [T, V]."""
    best = log_probs.max(dim=-1)
    emitted = best.indices != blank_id
    if not bool(emitted.any()):
        return 0.0
    return float(best.values[emitted].exp().mean())


@dataclass
class PseudoLabelReport:
    total: int = 0
    kept: int = 0
    low_confidence: int = 0
    empty: int = 0
    unreadable: int = 0
    already_done: int = 0
    kept_audio_h: float = 0.0
    wall_s: float = 0.0
    reference_cer: float | None = None  # of the kept labels, where the input had text
    min_confidence: float = 0.0
    by_reason: dict = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"pseudo-labelled {self.total} utterance(s): kept {self.kept} "
                f"({self.kept_audio_h:.2f} h), dropped {self.low_confidence} below confidence "
                f"{self.min_confidence}, {self.empty} empty, {self.unreadable} unreadable")
        if self.reference_cer is not None:
            text += f"; CER of kept labels vs the manifest's own text {100 * self.reference_cer:.1f}%"
        return text


def pseudo_label_manifest(teacher_dir, manifest, out_manifest, *, min_confidence: float = 0.0,
                          device: str = "auto", batch_duration: float = 160.0,
                          beam: dict | None = None, progress: bool = True) -> PseudoLabelReport:
    """Transcribe `manifest` with the CTC model in `teacher_dir`; write the kept items to
    `out_manifest` with `text` = the teacher's transcript and `confidence`.

    `beam`: keyword arguments of a BeamSearchCTCDecoder (lm_path, lm_weight, word_score,
    beam_size, ...) to decode with a word LM instead of greedily; the confidence is the
    acoustic model's either way. A `text` already in the input is kept as
    `reference_text` (it is never used for training here; it only measures how good the
    pseudo-labels are).
    """
    from ..data.collate import SkippedItem
    from ..data.dataset import AudioDataset
    from ..data.manifest import AUDIO_PATH_KEY, read_manifest, write_manifest
    from ..eval.metrics import cer
    from ..inference.ctc import CTCTranscriber
    from ..jsonl import JsonlAppender, iter_jsonl
    from ..progress import progress_bar

    start = time.perf_counter()
    out = Path(out_manifest)
    progress_path = out.with_name(out.name + ".progress.jsonl")
    done = ({rec["id"]: rec for _, rec in iter_jsonl(progress_path, tolerate_torn_tail=True)}
            if progress_path.exists() else {})
    teacher = CTCTranscriber(teacher_dir, device=device, batch_duration=batch_duration)
    if beam is not None:
        from ..inference.ctc_beam import BeamSearchCTCDecoder

        teacher.decoder = BeamSearchCTCDecoder(teacher.tokens, blank=teacher.blank,
                                               word_delimiter=teacher.word_delimiter, **beam)
    blank_id = teacher.tokens.index(teacher.blank)
    records = read_manifest(manifest)
    todo = [r for r in records if str(r["id"]) not in done]
    dataset = AudioDataset(todo, sample_rate=teacher.sample_rate, silence_dbfs=None)
    report = PseudoLabelReport(min_confidence=min_confidence, already_done=len(done))

    with JsonlAppender(progress_path, fsync_every=32) as log:
        durations = [float(r.get("duration") or 0.0) for r in todo]
        bar = progress_bar(total=len(todo), desc="pseudo-label", unit="utt", disable=not progress)
        for batch in teacher._batches(durations):
            items = [dataset[i] for i in batch]
            good = [it for it in items if not isinstance(it, SkippedItem)]
            for item in items:
                if isinstance(item, SkippedItem):
                    entry = {"id": item.id, "status": "unreadable", "reason": item.reason}
                    done[item.id] = entry
                    log.write(entry)
            if good:
                log_probs, frames = teacher.log_probs([it["audio"] for it in good])
                texts = teacher.decoder.decode(log_probs, frames)
                for b, (item, text) in enumerate(zip(good, texts, strict=True)):
                    confidence = ctc_confidence(log_probs[b, : int(frames[b])], blank_id)
                    status = ("empty" if not text.strip() else
                              "low_confidence" if confidence < min_confidence else "kept")
                    entry = {"id": item["id"], "status": status, "text": text,
                             "confidence": round(confidence, 4)}
                    done[item["id"]] = entry
                    log.write(entry)
            bar.update(len(items))
        bar.close()

    kept_records, refs, hyps = [], [], []
    for record in records:
        entry = done.get(str(record["id"]))
        status = entry["status"] if entry else "unreadable"
        report.total += 1
        report.by_reason[status] = report.by_reason.get(status, 0) + 1
        if status != "kept":
            continue
        new = {k: v for k, v in record.items() if k not in ("text", AUDIO_PATH_KEY)}
        new["audio"] = str(record[AUDIO_PATH_KEY])
        if record.get("text"):
            new["reference_text"] = record["text"]
            refs.append(record["text"])
            hyps.append(entry["text"])
        new["text"] = entry["text"]
        new["confidence"] = entry["confidence"]
        kept_records.append(new)
        report.kept_audio_h += float(record.get("duration") or 0.0) / 3600
    write_manifest(out, kept_records)
    report.kept = len(kept_records)
    report.low_confidence = report.by_reason.get("low_confidence", 0)
    report.empty = report.by_reason.get("empty", 0)
    report.unreadable = report.by_reason.get("unreadable", 0)
    if refs:
        langs = {r.get("lang") for r in kept_records}
        report.reference_cer = cer(refs, hyps, lang=langs.pop() if len(langs) == 1 else None)
    report.wall_s = time.perf_counter() - start
    return report
