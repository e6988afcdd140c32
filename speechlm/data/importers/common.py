"""What every importer shares: candidates, skip reasons, checks, the report, the writer.

An importer reads its corpus layout and yields, in corpus order, one
`Candidate` per utterance it found or one `Skip` per item it could not even
parse. `run_import` does the rest the same way for every format: unique ids,
non-empty transcripts, audio that exists and whose header reads, offsets and
durations inside the file, `lang` override, relative or absolute paths, the
`limit`, and the counts by reason. Bad items are skipped and counted; with
`strict` the first one raises `DatasetImportError` naming file and line, and
no manifest is written (the writer is atomic).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import AudioError, AudioMissingError, ConfigError, ManifestError
from ...jsonl import atomic_write, write_jsonl

# Why an item was skipped -> what that means (and what to do), for messages.
REASONS = {
    "malformed_line": "line cannot be parsed",
    "missing_audio": "audio file not found",
    "unreadable_audio": "audio header cannot be read",
    "empty_audio": "audio holds no samples",
    "unsupported_audio": "audio source is not a plain file",
    "empty_text": "empty or missing transcript",
    "duplicate_id": "id already used by an earlier utterance",
    "bad_segment": "offset/duration outside the audio",
}

# Durations are rounded like speechlm.data.manifest does (0.1 us).
DURATION_DECIMALS = 6
# Headers and segment lists may disagree by a few samples or rounding.
SEGMENT_END_TOLERANCE = 0.05
EXAMPLES_PER_REASON = 3
# Recently probed audio headers kept in memory (many segments share one recording).
_INFO_CACHE_SIZE = 1024


class DatasetImportError(ManifestError):
    """An item of the source corpus cannot be imported (raised in strict mode)."""


@dataclass
class Candidate:
    """One utterance an importer found, before the shared checks.

    `where` names the source line ("file:line") for messages. Audio is either
    a file (`audio`) or raw encoded bytes (`audio_bytes`, written under the
    audio directory as `<id>.<audio_ext>` once the item passed the checks).
    """

    id: str
    where: str
    audio: Path | None = None
    text: str | None = None
    speaker: str | None = None
    lang: str | None = None
    offset: float | None = None
    duration: float | None = None
    audio_bytes: bytes | None = None
    audio_ext: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Skip:
    """An item the importer already knows it cannot use (`reason` is a key of REASONS)."""

    reason: str
    where: str
    detail: str


@dataclass
class ImportReport:
    """What an import wrote and what it skipped, and why.

    `by_reason` counts skipped items per reason (keys of REASONS);
    `examples` keeps the first few "where: detail" messages per reason.
    `hours` sums the durations of the written records that have one.
    """

    fmt: str
    source: str
    out_manifest: str
    n_written: int = 0
    n_skipped: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    total_seconds: float = 0.0
    n_without_duration: int = 0

    @property
    def hours(self) -> float:
        return self.total_seconds / 3600.0

    def add_skip(self, reason: str, message: str) -> None:
        self.n_skipped += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(message)

    def summary(self) -> str:
        """A few human-readable lines: written, hours, skipped by reason with examples."""
        lines = [f"imported {self.fmt} {self.source} -> {self.out_manifest}",
                 f"  written: {self.n_written} utterances, {self.hours:.3f} hours"
                 + (f" ({self.n_without_duration} without a duration)"
                    if self.n_without_duration else "")]
        lines.append(f"  skipped: {self.n_skipped}")
        for reason, count in sorted(self.by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {reason} ({REASONS.get(reason, reason)}): {count}")
            for example in self.examples.get(reason, []):
                lines.append(f"      e.g. {example}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"format": self.fmt, "source": self.source, "out_manifest": self.out_manifest,
                "n_written": self.n_written, "n_skipped": self.n_skipped,
                "by_reason": dict(self.by_reason), "examples": dict(self.examples),
                "hours": self.hours, "n_without_duration": self.n_without_duration}


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _AudioInfoCache:
    """audio_info with a small memory of recent files (segments share recordings)."""

    def __init__(self):
        from ...audio.io import audio_info  # lazy: keeps `speechlm --help` light

        self._audio_info = audio_info
        self._cache: dict[str, object] = {}

    def __call__(self, path: Path):
        key = str(path)
        if key not in self._cache:
            if len(self._cache) >= _INFO_CACHE_SIZE:
                self._cache.clear()
            try:
                self._cache[key] = self._audio_info(path)
            except AudioError as e:
                self._cache[key] = e
        value = self._cache[key]
        if isinstance(value, AudioError):
            raise value
        return value


def safe_filename(utt_id: str) -> str:
    """A file name for an id: unsafe characters become '_' plus a hash so names stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", utt_id).lstrip(".") or "_"
    if safe != utt_id:
        safe += "-" + hashlib.sha1(utt_id.encode("utf-8")).hexdigest()[:8]
    return safe


def _write_bytes_once(path: Path, data: bytes) -> None:
    """Write `data` atomically, unless the file already holds exactly these bytes (re-runs)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    with atomic_write(path, "wb") as f:
        f.write(data)


def run_import(candidates: Iterable[Candidate | Skip], out_manifest, *, fmt: str, source,
               lang: str | None = None, strict: bool = False, relative: bool = False,
               limit: int | None = None, probe: bool = True, allow_no_text: bool = False,
               audio_dir=None, progress: bool = False) -> ImportReport:
    """Check the candidates an importer found and write the good ones as a manifest.

    lang: if given, every record gets this `lang` (overrides the corpus).
    strict: raise DatasetImportError on the first bad item instead of skipping it.
    relative: write audio paths relative to the manifest's directory (default absolute).
    limit: stop after this many written records.
    probe: read each audio header (checks it, fills `duration`, bounds segments);
        without it only existence is checked and durations come from the corpus.
    allow_no_text: keep utterances without a transcript (unlabelled audio).
    audio_dir: where candidates given as bytes are written (default: `audio/`
        beside the manifest).
    progress: show a progress bar on stderr.
    """
    out_manifest = Path(out_manifest)
    out_dir = Path(os.path.abspath(out_manifest.parent))
    audio_dir = Path(os.path.abspath(audio_dir)) if audio_dir is not None else out_dir / "audio"
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    report = ImportReport(fmt=fmt, source=str(source), out_manifest=str(out_manifest))
    info = _AudioInfoCache() if probe else None
    seen_ids: set[str] = set()

    def skip(reason: str, where: str, detail: str) -> None:
        message = f"{where}: {detail}"
        if strict:
            raise DatasetImportError(
                f"{message} [{reason}: {REASONS.get(reason, reason)}]; fix the source or "
                "run without strict to skip and count such items")
        report.add_skip(reason, message)

    def records() -> Iterator[dict]:
        items: Iterable = candidates
        if progress:
            from ...progress import progress_bar

            items = progress_bar(items, desc=f"import {fmt}", unit=" utt", disable=None)
        for item in items:
            if limit is not None and report.n_written >= limit:
                break
            if isinstance(item, Skip):
                skip(item.reason, item.where, item.detail)
                continue
            try:
                record = _check(item)
            except _Rejected as r:
                skip(r.reason, item.where, r.detail)
                continue
            report.n_written += 1
            if "duration" in record:
                report.total_seconds += record["duration"]
            else:
                report.n_without_duration += 1
            yield record

    def _check(c: Candidate) -> dict:
        utt_id = str(c.id).strip() if c.id is not None else ""
        if not utt_id:
            raise _Rejected("malformed_line", "empty utterance id")
        if utt_id in seen_ids:
            raise _Rejected("duplicate_id", f"id {utt_id!r} appears again; the first one is kept")
        text = c.text.strip() if isinstance(c.text, str) else None
        if not text and not allow_no_text:
            raise _Rejected("empty_text", f"utterance {utt_id!r} has no transcript"
                            " (use allow_no_text to keep unlabelled audio)")
        offset, duration = c.offset, c.duration
        if offset is not None and offset < 0:
            raise _Rejected("bad_segment", f"negative offset {offset} s")
        if duration is not None and duration <= 0:
            raise _Rejected("bad_segment", f"duration {duration} s is not positive")

        if c.audio_bytes is not None:
            ext = (c.audio_ext or "bin").lstrip(".").lower()
            audio = audio_dir / f"{safe_filename(utt_id)}.{ext}"
            if not c.audio_bytes:
                raise _Rejected("unreadable_audio", f"utterance {utt_id!r} has 0 bytes of audio")
            _write_bytes_once(audio, c.audio_bytes)
        elif c.audio is None:
            raise _Rejected("missing_audio", f"utterance {utt_id!r} has no audio")
        else:
            audio = Path(os.path.abspath(os.path.expanduser(c.audio)))
            if not audio.is_file():
                raise _Rejected("missing_audio", f"{audio}: file not found")

        if info is not None:
            try:
                header = info(audio)
            except AudioMissingError as e:
                raise _Rejected("missing_audio", str(e)) from None
            except AudioError as e:
                raise _Rejected("unreadable_audio", str(e)) from None
            total = float(header.duration)
            if total <= 0:
                raise _Rejected("empty_audio", f"{audio} holds no samples")
            start = offset or 0.0
            if start >= total:
                raise _Rejected("bad_segment", f"offset {start} s is at or past the end of "
                                f"{audio} ({total:.3f} s)")
            if duration is None:
                duration = total - start
            elif start + duration > total + SEGMENT_END_TOLERANCE:
                raise _Rejected("bad_segment", f"segment {start:.3f}-{start + duration:.3f} s reaches "
                                f"past the end of {audio} ({total:.3f} s)")
            else:
                duration = min(duration, total - start)

        record: dict = {"id": utt_id,
                        "audio": os.path.relpath(audio, out_dir) if relative else str(audio)}
        if offset:
            record["offset"] = round(float(offset), DURATION_DECIMALS)
        if duration is not None:
            record["duration"] = round(float(duration), DURATION_DECIMALS)
        if text:
            record["text"] = text
        record_lang = lang or c.lang
        if record_lang:
            record["lang"] = record_lang
        if c.speaker:
            record["speaker"] = str(c.speaker)
        for key, value in c.extra.items():
            if value is not None and key not in record:
                record[key] = value
        seen_ids.add(utt_id)
        return record

    write_jsonl(out_manifest, records())
    return report


def split_key_value(line: str) -> tuple[str, str]:
    """'key rest of line' -> ('key', 'rest of line'); the rest may be empty."""
    parts = line.strip().split(maxsplit=1)
    if not parts:
        return "", ""
    return parts[0], parts[1].strip() if len(parts) > 1 else ""


def resolve_relative(path_text: str, bases: list[Path]) -> Path:
    """An absolute path for `path_text`: as is if absolute, else the first base where it exists.

    When it exists nowhere, the path under the first base is returned (the
    missing-audio message then names it).
    """
    path = Path(os.path.expanduser(path_text))
    if path.is_absolute() or not bases:
        return path
    for base in bases:
        if (base / path).exists():
            return base / path
    return bases[0] / path


def require_dir(path, what: str) -> Path:
    """`path` as a Path if it is a directory, else ConfigError saying what was expected."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; expected {what}")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory; expected {what}")
    return path
