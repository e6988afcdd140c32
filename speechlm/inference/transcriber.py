"""Batched, resumable transcription of files and manifests, whatever the ASR model.

`Transcriber` holds what every ASR model shares: recordings longer than
`max_segment_s` are cut into pieces (at silences when possible), pieces of
similar duration are packed into batches under a padded-duration budget, the
pieces' texts are joined in order, and `transcribe_manifest` appends one JSON
line per utterance ({id, text, audio_s, decode_s}) and, run again, continues
after the ids already written. A subclass only says how to turn one batch of
waves into texts (`_decode_batch`): `CTCTranscriber` (speechlm.inference.ctc)
and `WhisperTranscriber` (speechlm.inference.whisper_asr).
`load_transcriber(model_dir)` picks the one a model directory needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpeechLMError
from .run_summary import RunSummary

__all__ = ["TranscribeSummary", "Transcriber", "asr_kind", "fixed_windows", "load_transcriber",
           "segment_ranges"]


def fixed_windows(num_samples: int, sample_rate: int, max_segment_s: float) -> list[tuple[int, int]]:
    """Cut [0, num_samples) into equal windows of at most max_segment_s seconds."""
    limit = max(1, int(max_segment_s * sample_rate))
    if num_samples <= limit:
        return [(0, num_samples)]
    pieces = -(-num_samples // limit)
    step = -(-num_samples // pieces)
    return [(start, min(num_samples, start + step)) for start in range(0, num_samples, step)]


def segment_ranges(wave: torch.Tensor, sample_rate: int, max_segment_s: float) -> list[tuple[int, int]]:
    """Sample ranges to transcribe separately: one range for short audio; for longer audio
    cuts at silences (speechlm.audio.segment) or, without that module, fixed windows."""
    n = int(wave.shape[-1])
    if n <= max_segment_s * sample_rate:
        return [(0, n)]
    try:
        from ..audio.segment import split_on_silence
    except ImportError:
        return fixed_windows(n, sample_rate, max_segment_s)
    ranges = split_on_silence(wave, sample_rate, max_segment_s=max_segment_s)
    ranges = [(int(a), int(b)) for a, b in ranges if int(b) > int(a)]
    # No speech found: windows keep memory bounded (the text will be empty anyway).
    return ranges or fixed_windows(n, sample_rate, max_segment_s)


@dataclass
class TranscribeSummary(RunSummary):
    """Totals of a transcription run (this call only, not lines found from earlier runs)."""

    utterances: int = 0

    def summary(self) -> str:
        return (f"transcribed {self.utterances} utterance(s), {self._timing()})"
                + self._tail("could not be read"))


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def asr_kind(model_dir) -> str | None:
    """"ctc" or "whisper" for an ASR model directory (from config.json), else None."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SpeechLMError(f"{config_file}: not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if any(name.endswith("ForCTC") for name in architectures):
        return "ctc"
    if "WhisperForConditionalGeneration" in architectures:
        return "whisper"
    return None


def load_transcriber(model_dir, **options) -> Transcriber:
    """The transcriber for an ASR model directory (a *ForCTC or a Whisper checkpoint)."""
    kind = asr_kind(model_dir)
    if kind == "ctc":
        from .ctc import CTCTranscriber

        return CTCTranscriber(model_dir, **options)
    if kind == "whisper":
        from .whisper_asr import WhisperTranscriber

        return WhisperTranscriber(model_dir, **options)
    raise SpeechLMError(f"{model_dir}: not an ASR model directory (a *ForCTC or "
                        "WhisperForConditionalGeneration checkpoint with its config.json)")


class Transcriber:
    """Batching, long-audio segmentation, files and resumable manifests (see the module doc).

    Subclasses set `sample_rate`, `batch_duration` (padded seconds of audio per forward pass),
    `max_segment_s`, `max_batch_size` and implement `_decode_batch(waves) -> texts`.
    """

    sample_rate: int = 16000
    batch_duration: float = 160.0
    max_segment_s: float = 30.0
    max_batch_size: int = 64

    def _set_batching(self, batch_duration: float, max_segment_s: float,
                      max_batch_size: int) -> None:
        if batch_duration <= 0 or max_segment_s <= 0:
            raise SpeechLMError("batch_duration and max_segment_s must be > 0")
        self.batch_duration = float(batch_duration)
        self.max_segment_s = float(max_segment_s)
        self.max_batch_size = int(max_batch_size)

    def _decode_batch(self, waves: Sequence[torch.Tensor]) -> list[str]:
        raise NotImplementedError

    def _batches(self, durations: Sequence[float]) -> list[list[int]]:
        """Indices sorted by duration, packed so len(batch) x longest <= batch_duration."""
        order = sorted(range(len(durations)), key=lambda i: durations[i])
        batches, batch = [], []
        for i in order:
            longest = max(durations[i], *(durations[j] for j in batch)) if batch else durations[i]
            if batch and ((len(batch) + 1) * longest > self.batch_duration
                          or len(batch) >= self.max_batch_size):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        return batches

    def transcribe_waves(self, waves: Sequence[torch.Tensor]) -> tuple[list[str], list[float]]:
        """(texts, decode seconds per wave) for mono waves at `sample_rate`."""
        if not waves:  # every item of a chunk was unreadable
            return [], []
        pieces: list[tuple[int, torch.Tensor]] = []
        for owner, wave in enumerate(waves):
            wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)
            for start, end in segment_ranges(wave, self.sample_rate, self.max_segment_s):
                pieces.append((owner, wave[start:end]))
        texts: list[list[str]] = [[] for _ in waves]
        piece_texts: list[str] = [""] * len(pieces)
        seconds = [0.0] * len(waves)
        durations = [p.shape[-1] / self.sample_rate for _, p in pieces]
        for batch in self._batches(durations):
            start = time.perf_counter()
            decoded = self._decode_batch([pieces[i][1] for i in batch])
            spent = time.perf_counter() - start
            total = sum(durations[i] for i in batch) or 1.0
            for i, text in zip(batch, decoded, strict=True):
                piece_texts[i] = text
                seconds[pieces[i][0]] += spent * durations[i] / total
        for (owner, _), text in zip(pieces, piece_texts, strict=True):
            if text:
                texts[owner].append(text)
        return [" ".join(t) for t in texts], seconds

    # -- files and manifests ----------------------------------------------------------

    def transcribe_files(self, paths: Sequence, *, progress: bool = False) -> list[dict]:
        """[{id (the path), text, audio_s, decode_s}] for audio files, in the order given."""
        records = [{"id": str(p), "audio": str(p)} for p in paths]
        rows: list[dict] = []
        self._run(records, rows.append, progress=progress)
        by_id = {row["id"]: row for row in rows}
        return [by_id[r["id"]] for r in records]

    def transcribe_manifest(self, manifest, out_jsonl, *, resume: bool = True,
                            progress: bool = True, chunk: int = 256) -> TranscribeSummary:
        """Append {id, text, audio_s, decode_s} per utterance of `manifest` to `out_jsonl`.

        With `resume`, ids already in `out_jsonl` are skipped (a killed run continues);
        without, the file is started afresh.
        """
        from ..data.manifest import no_records, read_manifest
        from ..errors import ManifestError
        from ..jsonl import JsonlAppender, iter_jsonl

        out = Path(out_jsonl)
        done: set[str] = set()
        if out.exists():
            if resume:
                done = {str(rec.get("id")) for _, rec in iter_jsonl(out, tolerate_torn_tail=True)}
            else:
                out.unlink()
        records = read_manifest(manifest)
        if not records:
            raise ManifestError(no_records(manifest))
        records = [r for r in records if str(r["id"]) not in done]
        with JsonlAppender(out) as appender:
            summary = self._run(records, appender.write, progress=progress, chunk=chunk)
        summary.already_done = len(done)
        summary.out_path = out
        return summary

    def _run(self, records: list[dict], emit: Callable[[dict], None], *, progress: bool,
             chunk: int = 256) -> TranscribeSummary:
        from ..data.collate import SkippedItem
        from ..data.dataset import AudioDataset
        from ..progress import progress_bar

        dataset = AudioDataset(records, sample_rate=self.sample_rate, silence_dbfs=None)
        summary = TranscribeSummary()
        start = time.perf_counter()
        bar = progress_bar(total=len(records), desc="transcribe", unit="utt",
                           disable=not progress, dynamic_ncols=True)
        try:
            for first in range(0, len(records), chunk):
                items = [dataset[i] for i in range(first, min(len(records), first + chunk))]
                good = [it for it in items if not isinstance(it, SkippedItem)]
                texts, seconds = self.transcribe_waves([it["audio"] for it in good])
                results = {it["id"]: (text, sec, it["audio"].shape[-1] / self.sample_rate)
                           for it, text, sec in zip(good, texts, seconds, strict=True)}
                for item in items:
                    if isinstance(item, SkippedItem):
                        row = {"id": item.id, "text": "", "audio_s": 0.0, "decode_s": 0.0,
                               "error": f"{item.reason}" + (f" ({item.detail})" if item.detail else "")}
                        summary.failed += 1
                        summary.failures.append({"id": item.id, "audio": item.audio,
                                                 "reason": item.reason})
                    else:
                        text, sec, audio_s = results[item["id"]]
                        row = {"id": item["id"], "text": text, "audio_s": round(audio_s, 3),
                               "decode_s": round(sec, 4)}
                        summary.audio_s += audio_s
                    summary.utterances += 1
                    emit(row)
                bar.update(len(items))
        finally:
            bar.close()
        summary.wall_s = time.perf_counter() - start
        return summary
