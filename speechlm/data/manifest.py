"""Manifests: JSONL files with one utterance per line.

Schema (DESIGN.md): `id` (str, required, unique) and `audio` (str path,
required; a relative path is resolved against the manifest's directory),
optional `offset` (seconds, >= 0) and `duration` (seconds, > 0), `text`,
`lang`, `speaker`, and the task fields `translation`, `question`, `answer`,
`continuation` (str) and `units` (list of non-negative ints). Unknown keys are
kept as they are; known keys are type-checked. `.jsonl` and `.jsonl.gz`.

Reading is lazy (`iter_manifest` holds one line at a time). Each record it
yields carries the resolved absolute audio path under `AUDIO_PATH_KEY`
("_audio_path"); `write_manifest` drops that key again, so a read-modify-write
round trip leaves the `audio` field exactly as the user wrote it.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AudioError, ManifestError
from ..jsonl import directory_given, iter_jsonl, not_utf8, open_lines_binary, write_jsonl

log = logging.getLogger(__name__)

# Key under which `iter_manifest` stores the resolved absolute audio path.
AUDIO_PATH_KEY = "_audio_path"

REQUIRED_FIELDS = ("id", "audio")
STRING_FIELDS = ("id", "audio", "text", "lang", "speaker",
                 "translation", "question", "answer", "continuation")
TASK_FIELDS = ("translation", "question", "answer", "continuation", "units")
KNOWN_FIELDS = (*STRING_FIELDS, "offset", "duration", "units")

# Durations read from headers are rounded to this many decimals (0.1 us):
# exact enough for any sample rate, short enough to keep manifests readable.
_DURATION_DECIMALS = 6


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(record: dict) -> list[tuple[str, str]]:
    """Problems of one record as (field, problem) pairs; empty when the record is valid.

    Checks required fields, the types of known fields and value ranges. It
    does not look at the file system (see `validate_manifest`).
    """
    problems: list[tuple[str, str]] = []
    for name in REQUIRED_FIELDS:
        if name not in record:
            problems.append((name, "missing required field"))
    # One pass over the record's own keys: cheap for the common all-valid case.
    for name, value in record.items():
        kind = _FIELD_KIND.get(name)
        if kind is None:
            continue
        if kind == "str":
            if not isinstance(value, str):
                problems.append((name, f"expected a string, got {_type_name(value)}"))
            elif name in REQUIRED_FIELDS and not value.strip():
                problems.append((name, "must not be empty"))
        elif kind == "units":
            if not isinstance(value, list):
                problems.append((name, f"expected a list of non-negative ints, got {_type_name(value)}"))
            else:
                for pos, unit in enumerate(value):
                    if type(unit) is not int or unit < 0:
                        problems.append((name, f"item {pos} must be a non-negative int, got {unit!r}"))
                        break
        elif not _is_number(value):
            problems.append((name, f"expected a number of seconds, got {_type_name(value)}"))
        elif kind == "offset" and not (math.isfinite(value) and value >= 0):
            problems.append((name, f"must be a finite number >= 0, got {value}"))
        elif kind == "duration" and not (math.isfinite(value) and value > 0):
            problems.append((name, f"must be a finite number > 0, got {value}"))
    return problems


_FIELD_KIND = {**dict.fromkeys(STRING_FIELDS, "str"), "units": "units",
               "offset": "offset", "duration": "duration"}


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value),
                                                                         type(value).__name__)


def resolve_audio(record: dict, manifest_path) -> Path:
    """The absolute path of a record's audio: relative paths are relative to the manifest's directory."""
    return Path(_join_audio(str(Path(manifest_path).resolve().parent), record["audio"]))


def _join_audio(base: str, audio: str) -> str:
    # String ops rather than pathlib: this runs once per line of million-line manifests.
    if audio.startswith("~"):
        audio = os.path.expanduser(audio)
    return audio if os.path.isabs(audio) else os.path.join(base, audio)


def iter_manifest(path, *, validate: bool = True, resolve: bool = True) -> Iterator[dict]:
    """Yield the records of a manifest lazily (constant memory however long the file).

    With `validate`, a record that breaks the schema raises ManifestError
    "file:line: field: problem" (duplicate ids are found by
    `validate_manifest`, which needs memory per id). With `resolve`, each
    record gets the absolute audio path under `AUDIO_PATH_KEY`.
    """
    for _, record in iter_manifest_lines(path, validate=validate, resolve=resolve):
        yield record


def iter_manifest_lines(path, *, validate: bool = True,
                        resolve: bool = True) -> Iterator[tuple[int, dict]]:
    """Like `iter_manifest` but yields (line_number, record), for messages that name the line."""
    path = Path(path)
    base = str(path.resolve().parent)
    for lineno, record in iter_jsonl(path):
        if validate:
            problems = check_record(record)
            if problems:
                name, problem = problems[0]
                more = f" (and {len(problems) - 1} more problem(s) on this line)" if len(problems) > 1 else ""
                raise ManifestError(
                    f"{path}:{lineno}: {name}: {problem}{more}; "
                    f"run `speechlm data validate {path}` to list every problem"
                )
        if resolve:
            audio = record.get("audio")
            if isinstance(audio, str):
                record[AUDIO_PATH_KEY] = _join_audio(base, audio)
        yield lineno, record


def read_manifest(path, *, validate: bool = True) -> list[dict]:
    """All records of a manifest in a list (use `iter_manifest` to stream)."""
    return list(iter_manifest(path, validate=validate))


def _strip_internal(records: Iterable[dict]) -> Iterator[dict]:
    for record in records:
        if AUDIO_PATH_KEY in record:
            record = {k: v for k, v in record.items() if k != AUDIO_PATH_KEY}
        yield record


def write_manifest(path, records: Iterable[dict]) -> int:
    """Write records atomically (streaming; `.gz` compresses). Returns the count.

    The resolved-path key added by `iter_manifest` is not written.
    """
    return write_jsonl(path, _strip_internal(records))


# ---------------------------------------------------------------- validation


@dataclass
class ValidationReport:
    """What `validate_manifest` found in one file.

    `problems` holds "file:line: field: problem" strings in line order (at
    most `max_problems` of them); `n_problems` counts them all. `warnings`
    ("file:line: field: warning: ...") are usable records that are probably a
    mistake (an absurd peak level); they do not make the report fail.
    """

    path: str
    n_lines: int = 0
    n_ok: int = 0
    n_problems: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_lines > 0  # an empty manifest trains nothing

    def summary(self) -> str:
        if self.n_lines == 0 and self.n_problems == 0:
            return no_records(self.path)
        if self.ok:
            warned = f", {len(self.warnings)} warning(s)" if self.warnings else ""
            return f"{self.path}: OK ({self.n_lines} records{warned})"
        return (f"{self.path}: {self.n_problems} problem(s); "
                f"{self.n_ok} of {self.n_lines} records OK")




def no_records(path) -> str:
    """The problem of a manifest without a record, for every job that needs records."""
    return (f"{path}: no records (empty, or blank lines only); a manifest holds one JSON "
            "object per line")


def validate_manifest(path, *, check_audio_exists: bool = True, check_audio_readable: bool = False,
                      max_problems: int | None = None) -> ValidationReport:
    """Check every line of a manifest and report all problems, not just the first.

    Finds invalid JSON, missing required fields, wrong types and ranges,
    duplicate ids (both lines are reported), audio files that do not exist
    and, with `check_audio_readable`, audio that cannot be decoded or whose
    offset/duration reach past its end. Streams the file; keeps one entry per
    id to find duplicates.
    """
    path = Path(path)
    shown = str(path)
    report = ValidationReport(path=shown)
    if not path.exists():
        raise ManifestError(f"{path}: file not found; check the manifest path")
    base = str(path.resolve().parent)
    found: list[tuple[int, int, str]] = []  # (line, sequence, message) sorted at the end
    seq = itertools.count()
    first_line_of: dict[str, int] = {}
    duplicates: dict[str, list[int]] = {}
    bad_lines: set[int] = set()

    def add(lineno: int, name: str, problem: str) -> None:
        bad_lines.add(lineno)
        report.n_problems += 1
        found.append((lineno, next(seq), f"{shown}:{lineno}: {name}: {problem}"))
        if max_problems is not None and len(found) > 2 * max_problems + 100:
            # Keep the earliest lines (a late duplicate may name an early one).
            found.sort()
            del found[max_problems:]

    def warn(lineno: int, name: str, warning: str) -> None:
        if max_problems is None or len(report.warnings) < max_problems:
            report.warnings.append(f"{shown}:{lineno}: {name}: warning: {warning}")

    audio_info = None
    if check_audio_readable:
        from ..audio.io import audio_info

    if path.is_dir():
        raise ManifestError(directory_given(path))
    try:
        handle = open_lines_binary(path)
    except OSError as e:
        raise ManifestError(f"{path}: cannot open ({e})") from None
    with handle as lines:
        try:
            for lineno, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    report.n_lines += 1
                    add(lineno, "(encoding)", not_utf8(e))
                    continue
                if not line.strip():
                    continue
                report.n_lines += 1
                try:
                    record = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    add(lineno, "(json)", f"invalid JSON ({e.msg} at column {e.colno}); "
                                          "each line must be one JSON object")
                    continue
                if not isinstance(record, dict):
                    add(lineno, "(json)", f"expected a JSON object, got {_type_name(record)}")
                    continue
                problems = check_record(record)
                for name, problem in problems:
                    add(lineno, name, problem)
                rid = record.get("id")
                if isinstance(rid, str):
                    if rid in first_line_of:
                        duplicates.setdefault(rid, [first_line_of[rid]]).append(lineno)
                    else:
                        first_line_of[rid] = lineno
                audio = record.get("audio")
                if not isinstance(audio, str) or not audio.strip() or not (
                        check_audio_exists or check_audio_readable):
                    continue
                audio_path = Path(_join_audio(base, audio))
                if not audio_path.is_file():
                    add(lineno, "audio", f"file not found: {audio_path}")
                    continue
                if audio_info is not None:
                    _check_readable(record, audio_path, audio_info, lineno, add, warn,
                                    skip_ranges=bool(problems))
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            add(report.n_lines + 1, "(file)", f"cannot read further ({e}); the file is truncated or corrupt")

    for rid, line_numbers in duplicates.items():
        for lineno in line_numbers:
            others = ", ".join(str(n) for n in line_numbers if n != lineno)
            add(lineno, "id", f"duplicate id {rid!r} (also on line {others})")
    found.sort()
    if max_problems is not None:
        del found[max_problems:]
    report.problems = [message for _, _, message in found]
    report.n_ok = report.n_lines - len(bad_lines)
    return report


def _check_readable(record, audio_path, audio_info, lineno, add, warn, *,
                    skip_ranges: bool) -> None:
    try:
        info = audio_info(audio_path)
    except AudioError as e:
        add(lineno, "audio", f"{e.reason}: {audio_path}" + (f" ({e.detail})" if e.detail else ""))
        return
    if info.can_hold_nonfinite:  # float WAVs: one NaN would poison a training run
        from ..audio.checks import absurd_peak
        from ..audio.io import scan_float_samples

        scan = scan_float_samples(audio_path)
        if scan.nonfinite:
            add(lineno, "audio", f"audio contains NaN or Inf samples ({scan.nonfinite} of "
                                 f"{info.num_frames * info.channels}): {audio_path}; the file "
                                 "is damaged: re-encode it or drop the record")
        if warning := absurd_peak(scan.peak, audio_path):
            warn(lineno, "audio", warning)
    if skip_ranges:  # offset/duration already reported as malformed
        return
    total = float(info.duration)
    offset = float(record.get("offset", 0.0))
    tolerance = 1e-3  # headers and rounding may disagree by a sample or two
    if offset >= total:
        add(lineno, "offset", f"{offset} s is at or past the end of the audio ({total:.3f} s)")
        return
    if "duration" in record and offset + float(record["duration"]) > total + tolerance:
        add(lineno, "duration", f"offset + duration = {offset + float(record['duration']):.3f} s "
                                f"reaches past the end of the audio ({total:.3f} s)")


# ---------------------------------------------------------------- durations


def _duration_of(record: dict, audio_info) -> float:
    info = audio_info(record[AUDIO_PATH_KEY])
    remaining = float(info.duration) - float(record.get("offset", 0.0))
    if remaining <= 0:
        raise ManifestError(
            f"offset {record.get('offset')} s is at or past the end of the audio "
            f"({info.duration:.3f} s)")
    return round(remaining, _DURATION_DECIMALS)


def fill_durations(path, out=None, *, jobs: int = 1, strict: bool = False) -> int:
    """Fill in `duration` where a record lacks it (from the audio header, minus `offset`).

    Rewrites the manifest atomically, streaming (or writes `out`, keeping
    `path`). The durations are cached in the file, so a second call finds
    nothing missing, reads no audio and does not rewrite. Returns the number
    of durations filled. Records whose audio cannot be read keep no duration
    and are logged as warnings with file:line, unless `strict`, which raises
    ManifestError (and writes nothing). `jobs` > 1 reads headers in threads.
    """
    from ..audio.io import audio_info

    path = Path(path)
    target = Path(out) if out is not None else path
    if target == path and not any("duration" not in rec
                                  for rec in iter_manifest(path, validate=False, resolve=False)):
        return 0  # already complete: nothing to read, nothing to rewrite

    filled = 0
    failures: list[str] = []

    def compute(item: tuple[int, dict]) -> tuple[int, dict, float | None, str | None]:
        lineno, record = item
        if "duration" in record:
            return lineno, record, None, None
        try:
            return lineno, record, _duration_of(record, audio_info), None
        except (AudioError, ManifestError) as e:
            return lineno, record, None, str(e)

    def results() -> Iterator[tuple[int, dict, float | None, str | None]]:
        lines = iter_manifest_lines(path)
        if jobs <= 1:
            yield from map(compute, lines)
            return
        from concurrent.futures import ThreadPoolExecutor

        # Bounded chunks keep memory constant while threads overlap header reads.
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while chunk := list(itertools.islice(lines, 64 * jobs)):
                yield from pool.map(compute, chunk)

    def records() -> Iterator[dict]:
        nonlocal filled
        for lineno, record, duration, error in results():
            if error is not None:
                message = f"{path}:{lineno}: duration: cannot compute: {error}"
                if strict:
                    raise ManifestError(message + "; fix or remove the line (or run without strict)")
                failures.append(message)
                log.warning(message)
            elif duration is not None:
                record["duration"] = duration
                filled += 1
            yield record

    write_manifest(target, records())
    if failures:
        log.warning("%s: %d record(s) still lack a duration (audio unreadable); "
                    "run `speechlm data validate --check-readable %s`", path, len(failures), path)
    return filled


def manifest_durations(records: Iterable[dict], *, source="manifest") -> list[float]:
    """The `duration` of every record, for samplers; a record without one is an error naming it."""
    durations = []
    for pos, record in enumerate(records):
        duration = record.get("duration")
        if duration is None:
            raise ManifestError(
                f"{source}: record {pos} (id {record.get('id')!r}) has no duration; duration "
                "bucketing needs every duration: run `speechlm data stats --fill-durations MANIFEST`"
            )
        durations.append(float(duration))
    return durations

