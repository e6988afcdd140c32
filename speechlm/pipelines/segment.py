"""Turn long recordings into a manifest of utterance-sized segments (no audio is copied).

For each input record (a whole file, or its `offset`/`duration` part):
- with a CTC model (`align_with`) and a transcript: the transcript is
  normalised for the record's language, force-aligned to the model's
  emissions (computed in 30 s chunks), and the aligned words grouped into
  utterances of at most `max_segment_s`, split at the longest pauses; each
  segment carries its part of the text and an `align_score`;
- otherwise: energy VAD (`speechlm.audio.segment.split_on_silence`, 30 ms
  frames, 300 ms padding). A transcribed record no longer than
  `max_segment_s` stays one segment (trimmed to its speech) and keeps its
  text; a longer one is segmented without text (counted as `text_dropped`:
  pass a CTC model to keep the labels).
Segments whose WADA-SNR is below `min_snr_db` (IndicWav2Vec: 15 dB) are
dropped and counted.

Output in `out_dir`:
- `manifest.jsonl`: one record per kept segment: id (`<source id>_<k>`,
  k counting every segment of the source, dropped ones included), audio (the
  source's absolute path), offset and duration (seconds into that file),
  source, snr_db, text and align_score when aligned, lang and speaker copied;
- `done.jsonl`: one line per finished source record (its counts), so a
  killed run resumes without repeating or dropping segments;
- `segment_report.json`: this run's counts and every failure with its reason.

A record whose audio cannot be read, or whose transcript cannot be aligned,
is skipped, counted and listed (and retried by the next run), unless `strict`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.errors import SpeechLMError
from speechlm.jsonl import JsonlAppender, atomic_write, dumps, iter_jsonl

MANIFEST_NAME = "manifest.jsonl"
DONE_NAME = "done.jsonl"
REPORT_NAME = "segment_report.json"
_COPIED_FIELDS = ("lang", "speaker")
_EMISSION_CHUNK_S = 30.0  # CTC emissions are computed in chunks of this length


@dataclass
class SegmentReport:
    """What one `segment_manifest` run did (`already_done` counts earlier runs' sources)."""

    out_dir: Path
    manifest: Path
    report: Path
    recordings: int = 0  # input records
    done: int = 0  # processed by this run
    already_done: int = 0
    failed: int = 0
    segments: int = 0  # kept and written by this run
    dropped_low_snr: int = 0
    no_speech: int = 0  # records where no speech was found
    aligned: int = 0  # records cut by forced alignment
    text_dropped: int = 0  # transcribed records segmented without their text
    input_seconds: float = 0.0
    kept_seconds: float = 0.0
    wall_seconds: float = 0.0
    finished: bool = False
    failures: list[dict] = field(default_factory=list)  # {"id", "reason"}

    def summary(self) -> str:
        lines = [
            f"recordings: {self.recordings} in input, {self.done} segmented, "
            f"{self.already_done} already done, {self.failed} failed, {self.no_speech} without speech",
            f"segments: {self.segments} kept ({self.kept_seconds / 3600:.3f} h of "
            f"{self.input_seconds / 3600:.3f} h), {self.dropped_low_snr} dropped below the SNR "
            f"threshold",
        ]
        if self.aligned:
            lines.append(f"{self.aligned} recordings cut at forced-aligned word boundaries")
        if self.text_dropped:
            lines.append(f"{self.text_dropped} transcribed recordings were longer than the "
                         "segment limit and were cut without their text; pass --align-with "
                         "CTC_MODEL_DIR to keep it")
        lines.append(f"manifest: {self.manifest}")
        if self.failures:
            lines.append(f"failures listed in {self.report}; first: {self.failures[0]['id']}: "
                         f"{self.failures[0]['reason']}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "manifest": str(self.manifest), "finished": self.finished,
            "recordings": self.recordings, "done": self.done, "already_done": self.already_done,
            "failed": self.failed, "segments": self.segments,
            "dropped_low_snr": self.dropped_low_snr, "no_speech": self.no_speech,
            "aligned": self.aligned, "text_dropped": self.text_dropped,
            "input_seconds": round(self.input_seconds, 3),
            "kept_seconds": round(self.kept_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3), "failures": self.failures,
        }


class _Aligner:
    """A CTC model that places transcripts on long recordings."""

    def __init__(self, model_dir, device: str):
        from speechlm.inference.ctc import CTCTranscriber

        self.transcriber = CTCTranscriber(model_dir, device=device)
        self.sample_rate = self.transcriber.sample_rate
        self.tokens = self.transcriber.tokens
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.blank_id = self.vocab[self.transcriber.blank]
        self.word_delimiter = self.transcriber.word_delimiter
        config = self.transcriber.model.config
        self.hop = math.prod(getattr(config, "conv_stride", (320,)))

    def emissions(self, wave, batch_chunks: int = 4):
        """(log-probs [T, V], start time of each frame in seconds) for a whole recording."""
        import torch

        chunk = max(self.hop, int(_EMISSION_CHUNK_S * self.sample_rate) // self.hop * self.hop)
        starts = list(range(0, wave.numel(), chunk))
        parts, times = [], []
        for i in range(0, len(starts), batch_chunks):
            group = starts[i:i + batch_chunks]
            log_probs, frames = self.transcriber.log_probs([wave[s:s + chunk] for s in group])
            for row, s in enumerate(group):
                n = int(frames[row])
                parts.append(log_probs[row, :n].cpu())
                times.extend((s + f * self.hop) / self.sample_rate for f in range(n))
        return torch.cat(parts), times

    def utterances(self, wave, text: str, lang: str | None, max_segment_s: float):
        from speechlm.audio.segment import align_transcript, group_words, transcript_token_ids
        from speechlm.text.normalize import normalize_transcript

        words = normalize_transcript(text, lang).split()
        if not words:
            raise SpeechLMError("the transcript is empty after normalisation")
        ids = transcript_token_ids(" ".join(words), self.vocab, word_delimiter=self.word_delimiter)
        log_probs, times = self.emissions(wave)
        spans = align_transcript(log_probs, ids, blank=self.blank_id,
                                 word_delimiter_id=self.vocab[self.word_delimiter], words=words,
                                 frame_times=times)
        return group_words(spans, max_segment_s=max_segment_s,
                           total_s=wave.numel() / self.sample_rate)


def _count_records(path) -> int:
    return sum(1 for _ in iter_jsonl(path))


def segment_manifest(
    input_manifest,
    out_dir,
    *,
    max_segment_s: float = 20.0,
    min_snr_db: float | None = 15.0,
    align_with=None,
    lang: str | None = None,
    sample_rate: int = 16000,
    min_silence_s: float = 0.3,
    pad_ms: float = 300.0,
    threshold_db: float | None = None,
    device: str = "auto",
    progress: bool = True,
    strict: bool = False,
) -> SegmentReport:
    """Segment every recording of `input_manifest` into `out_dir` (see the module doc).

    `lang` is the fallback language for normalising transcripts of records
    without a `lang` field; `min_snr_db=None` keeps every segment.
    Rerunning with the same arguments continues an interrupted run.
    """
    from speechlm.audio.io import load_audio
    from speechlm.audio.quality import wada_snr
    from speechlm.audio.segment import split_on_silence
    from speechlm.data.manifest import AUDIO_PATH_KEY, iter_manifest
    from speechlm.errors import AudioError

    from ..progress import progress_bar

    if max_segment_s <= 0:
        raise SpeechLMError(f"max_segment_s must be > 0, got {max_segment_s}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SegmentReport(out_dir=out_dir, manifest=out_dir / MANIFEST_NAME,
                           report=out_dir / REPORT_NAME)
    done_path = out_dir / DONE_NAME
    done_ids = {str(r["id"]) for _, r in iter_jsonl(done_path, tolerate_torn_tail=True)} \
        if done_path.exists() else set()
    written = {str(r["id"]) for _, r in iter_jsonl(report.manifest, tolerate_torn_tail=True)} \
        if report.manifest.exists() else set()
    report.recordings = _count_records(input_manifest)

    aligner = _Aligner(align_with, device) if align_with is not None else None
    if aligner is not None:
        sample_rate = aligner.sample_rate

    start_time = time.perf_counter()
    bar = progress_bar(total=report.recordings, desc="segment", unit="rec", disable=not progress,
               dynamic_ncols=True)
    try:
        with JsonlAppender(report.manifest, fsync_every=16) as out, \
                JsonlAppender(done_path) as done_log:
            for record in iter_manifest(input_manifest):
                bar.update(1)
                rec_id = str(record["id"])
                if rec_id in done_ids:
                    report.already_done += 1
                    continue
                base_offset = float(record.get("offset") or 0.0)
                text = (record.get("text") or "").strip()
                try:
                    wave = load_audio(record[AUDIO_PATH_KEY], sample_rate, offset=base_offset,
                                      duration=record.get("duration"))
                    total_s = wave.numel() / sample_rate
                    pieces: list[tuple[float, float, str | None, float | None]] = []
                    if aligner is not None and text:
                        for u in aligner.utterances(wave, text, record.get("lang") or lang,
                                                    max_segment_s):
                            pieces.append((u.start_s, u.end_s, u.text, round(u.score, 4)))
                        report.aligned += 1
                    else:
                        ranges = split_on_silence(wave, sample_rate, max_segment_s=max_segment_s,
                                                  min_silence_s=min_silence_s, pad_ms=pad_ms,
                                                  threshold_db=threshold_db)
                        if text and ranges and total_s <= max_segment_s:
                            ranges = [(ranges[0][0], ranges[-1][1])]
                            pieces = [(ranges[0][0] / sample_rate, ranges[0][1] / sample_rate,
                                       text, None)]
                        else:
                            if text and ranges:
                                report.text_dropped += 1
                            pieces = [(a / sample_rate, b / sample_rate, None, None)
                                      for a, b in ranges]
                except (AudioError, SpeechLMError) as e:
                    report.failed += 1
                    report.failures.append({"id": rec_id, "reason": str(e)})
                    if strict:
                        raise
                    continue
                report.input_seconds += total_s
                if not pieces:
                    report.no_speech += 1
                kept = dropped = 0
                for k, (start_s, end_s, seg_text, score) in enumerate(pieces):
                    a, b = int(round(start_s * sample_rate)), int(round(end_s * sample_rate))
                    snr = wada_snr(wave[a:b])
                    if min_snr_db is not None and not snr >= min_snr_db:
                        dropped += 1
                        continue
                    kept += 1
                    seg_id = f"{rec_id}_{k:04d}"
                    report.kept_seconds += (b - a) / sample_rate
                    if seg_id in written:  # written by a run killed before this source finished
                        continue
                    seg = {"id": seg_id, "audio": record[AUDIO_PATH_KEY],
                           "offset": round(base_offset + a / sample_rate, 6),
                           "duration": round((b - a) / sample_rate, 6), "source": rec_id,
                           "snr_db": round(snr, 2) if math.isfinite(snr) else None}
                    if seg_text is not None:
                        seg["text"] = seg_text
                    if score is not None:
                        seg["align_score"] = score
                    for name in _COPIED_FIELDS:
                        if name in record:
                            seg[name] = record[name]
                    out.write(seg)
                    report.segments += 1
                report.dropped_low_snr += dropped
                done_log.write({"id": rec_id, "segments": len(pieces), "kept": kept,
                                "dropped_low_snr": dropped, "seconds": round(total_s, 3)})
                report.done += 1
        report.finished = True
    finally:
        bar.close()
        report.wall_seconds = time.perf_counter() - start_time
        with atomic_write(report.report) as f:
            f.write(dumps(report.to_json()) + "\n")
    return report
