"""lhotse manifests, read as plain JSON (lhotse itself is not needed).

Two layouts:
- a CutSet (cuts.jsonl[.gz], or a .json list): one MonoCut per line with
  `id`, `start`, `duration`, `channel`, `recording` {id, sources [{type,
  channels, source}], sampling_rate, num_samples, duration} and
  `supervisions` [{text, speaker, language, start, duration, ...}]. One
  manifest line per cut: offset = cut start, duration = cut duration, text =
  the supervision texts joined in time order.
- a RecordingSet + SupervisionSet pair (recordings.jsonl.gz and
  supervisions.jsonl.gz): one manifest line per supervision, offset = its
  start in the recording.
SOURCE is a cuts file, a recordings or supervisions file (its partner is
found by swapping the word in the name, or given explicitly), or a directory
holding one cuts file or one pair (`split` picks among several by name).
Only "file" audio sources with a single channel can be used; URL, command,
in-memory, MixedCut, PaddingCut and recordings with transforms (speed
perturbation, ...) are skipped as unsupported. Relative source paths are
resolved like lhotse does (current directory), falling back to the
manifest's directory, or against `audio_root` when given.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError, ManifestError
from ...jsonl import iter_jsonl
from .common import Candidate, ImportReport, Skip, resolve_relative, run_import

MONO_CUT_TYPES = ("MonoCut", "Cut")
SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def iter_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line or position, record) of a lhotse manifest: JSONL (lazy) or a JSON list."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        yield from iter_jsonl(path)
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON list of lhotse manifest items")
    yield from enumerate(data, start=1)


def manifest_kind(path: Path) -> str:
    """'cuts', 'recordings' or 'supervisions', from the first record of the file."""
    for _, record in iter_records(path):
        if "recording" in record or record.get("type") in (*MONO_CUT_TYPES, "MixedCut",
                                                             "PaddingCut", "MultiCut"):
            return "cuts"
        if "sources" in record:
            return "recordings"
        if "recording_id" in record:
            return "supervisions"
        raise ConfigError(f"{path}:1: not a lhotse cut, recording or supervision manifest "
                          f"(keys: {', '.join(sorted(record))})")
    raise ConfigError(f"{path}: empty lhotse manifest")


def _is_manifest(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SUFFIXES)


def _partner(path: Path, kind: str, other: str) -> Path:
    candidate = path.with_name(path.name.replace(kind, other))
    if candidate != path and candidate.is_file():
        return candidate
    raise ConfigError(f"{path}: a lhotse {kind} manifest needs its {other} manifest; none found "
                      f"beside it (tried {candidate.name}); pass it with --{other}")


def resolve_layout(source, split: str | None, recordings=None,
                   supervisions=None) -> tuple[str, Path, Path | None]:
    """('cuts', cuts_file, None) or ('pair', recordings_file, supervisions_file)."""
    if recordings is not None and supervisions is not None:
        return "pair", Path(recordings), Path(supervisions)
    source = Path(source)
    if source.is_dir():
        files = [p for p in sorted(source.iterdir()) if _is_manifest(p)]
        if split:
            files = [p for p in files if split in p.name]
        cuts = [p for p in files if "cuts" in p.name]
        recs = [p for p in files if "recordings" in p.name]
        sups = [p for p in files if "supervisions" in p.name]
        if len(cuts) == 1:
            return "cuts", cuts[0], None
        if not cuts and len(recs) == 1 and len(sups) == 1:
            return "pair", recs[0], sups[0]
        listing = ", ".join(p.name for p in files) or "none"
        raise ConfigError(f"{source}: expected one lhotse cuts file or one recordings + "
                          f"supervisions pair{f' matching {split!r}' if split else ''}; "
                          f"found: {listing} (pick with --split or name the file)")
    if not source.is_file():
        raise ConfigError(f"{source}: not found; expected a lhotse cuts/recordings/supervisions "
                          "manifest (.jsonl, .jsonl.gz, .json) or a directory of them")
    kind = manifest_kind(source)
    if kind == "cuts":
        return "cuts", source, None
    if kind == "recordings":
        return "pair", source, Path(supervisions) if supervisions else _partner(
            source, "recordings", "supervisions")
    return "pair", Path(recordings) if recordings else _partner(
        source, "supervisions", "recordings"), source


class _Unsupported(Exception):
    pass


def _channel(value) -> int:
    if isinstance(value, list):
        if len(value) != 1:
            raise _Unsupported(f"multi-channel selection {value} is not supported; "
                               "use one channel per cut")
        value = value[0]
    return int(value or 0)


def recording_path(recording: dict, channel: int, bases: list[Path]) -> Path:
    """The audio file holding `channel` of a lhotse recording dict (raises _Unsupported)."""
    if recording.get("transforms"):
        names = ", ".join(str(t.get("name", t)) for t in recording["transforms"])
        raise _Unsupported(f"recording {recording.get('id')!r} has transforms ({names}); "
                           "apply them offline (e.g. save the perturbed audio) first")
    sources = recording.get("sources") or []
    source = next((s for s in sources if channel in (s.get("channels") or [0])), None)
    if source is None:
        raise _Unsupported(f"recording {recording.get('id')!r} has no source for channel {channel}")
    if source.get("type", "file") != "file":
        raise _Unsupported(f"audio source type {source.get('type')!r} is not supported, only "
                           "'file'; save the audio to files first")
    if len(source.get("channels") or [0]) > 1:
        raise _Unsupported(f"source {source.get('source')} holds channels {source['channels']}; "
                           "multi-channel files are not supported (split them into mono files)")
    return resolve_relative(str(source["source"]), bases)


def _common(values) -> str | None:
    """The single non-empty value in `values`, or None when there are none or several."""
    found = {str(v) for v in values if v}
    return found.pop() if len(found) == 1 else None


def iter_cuts(path: Path, bases: list[Path]) -> Iterator[Candidate | Skip]:
    """Candidates of a CutSet manifest, one per cut, in file order."""
    for lineno, cut in iter_records(path):
        where = f"{path}:{lineno}"
        kind = cut.get("type", "MonoCut")
        if kind not in MONO_CUT_TYPES:
            yield Skip("unsupported_audio", where, f"{kind} {cut.get('id')!r} is not supported, "
                       "only MonoCut (mix or pad the audio offline first)")
            continue
        try:
            recording = cut.get("recording")
            if not recording:
                raise _Unsupported(f"cut {cut.get('id')!r} has no recording (features only?)")
            audio = recording_path(recording, _channel(cut.get("channel", 0)), bases)
            start, duration = float(cut.get("start", 0.0)), float(cut["duration"])
            sups = sorted(cut.get("supervisions") or [], key=lambda s: float(s.get("start", 0)))
            text = " ".join(str(s["text"]).strip() for s in sups if str(s.get("text") or "").strip())
        except _Unsupported as e:
            yield Skip("unsupported_audio", where, str(e))
            continue
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            yield Skip("malformed_line", where, f"not a valid lhotse MonoCut ({e!r})")
            continue
        yield Candidate(id=str(cut.get("id", "")), where=where, audio=audio, text=text,
                        offset=start, duration=duration,
                        speaker=_common(s.get("speaker") for s in sups),
                        lang=_common(s.get("language") for s in sups))


def iter_pair(recordings_path: Path, supervisions_path: Path,
              bases: list[Path]) -> Iterator[Candidate | Skip]:
    """Candidates of a RecordingSet + SupervisionSet, one per supervision."""
    recordings = {str(r.get("id")): r for _, r in iter_records(recordings_path)}
    for lineno, sup in iter_records(supervisions_path):
        where = f"{supervisions_path}:{lineno}"
        recording = recordings.get(str(sup.get("recording_id")))
        if recording is None:
            yield Skip("missing_audio", where, f"recording {sup.get('recording_id')!r} is not "
                       f"in {recordings_path}")
            continue
        try:
            audio = recording_path(recording, _channel(sup.get("channel", 0)), bases)
            start, duration = float(sup.get("start", 0.0)), float(sup["duration"])
        except _Unsupported as e:
            yield Skip("unsupported_audio", where, str(e))
            continue
        except (KeyError, TypeError, ValueError) as e:
            yield Skip("malformed_line", where, f"not a valid lhotse supervision ({e!r})")
            continue
        yield Candidate(id=str(sup.get("id", "")), where=where, audio=audio,
                        text=sup.get("text"), offset=start, duration=duration,
                        speaker=sup.get("speaker"), lang=sup.get("language"))


def import_lhotse(source, out_manifest, *, split: str | None = None, recordings=None,
                  supervisions=None, audio_root=None, **options) -> ImportReport:
    """Import a lhotse CutSet, or a RecordingSet + SupervisionSet (see the module docstring).

    `options` are those of `run_import`; `lang` overrides the supervisions' language.
    """
    layout, first, second = resolve_layout(source, split, recordings, supervisions)
    if audio_root is not None:
        bases = [Path(audio_root).absolute()]
    else:
        bases = [Path.cwd(), first.absolute().parent]
    if layout == "cuts":
        candidates = iter_cuts(first, bases)
    else:
        for path in (first, second):
            if not path.is_file():
                raise ConfigError(f"{path}: lhotse manifest not found")
        candidates = iter_pair(first, second, bases)
    return run_import(candidates, out_manifest, fmt="lhotse", source=first, **options)
