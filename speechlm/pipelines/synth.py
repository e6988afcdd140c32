"""Synthesize a text corpus into an audio manifest with a TTS backend (eSpeak NG by default).

Input: a text file (one text per line; blank lines skipped; ids `line-000001`
from the line number) or JSONL (`text` required; optional `id`, `voice`,
`rate`, `pitch`; any other field, e.g. `lang`, `speaker`, `translation`, is
copied into the manifest record), or an iterable of such dicts.

Output in `out_dir`:
- `audio/<id>.flac` (or .wav), 16-bit, written to a temporary name and renamed;
- `manifest.jsonl`: one record per synthesized item, appended and flushed as
  each finishes: id, audio (relative path), duration, text, lang, speaker
  (the backend voice spec, e.g. "espeak:en-us+f3", unless the item has one),
  voice, rate, pitch (null = engine default) and the copied fields;
- `synth_report.json`: counts, timing and every failed item with its reason.

Voice, rate and pitch come from the item when given, else are drawn from
`voices` / the `rate` and `pitch` ranges by a generator seeded with
(seed, id): a rerun, or a resumed run, picks the same for every item.

Resumable: ids already in manifest.jsonl are skipped, so a killed run
continues where it stopped without duplicating or dropping items. Items the
engine cannot say (TTSError) are skipped, counted and reported (and retried
by the next run), unless `strict`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import multiprocessing
import os
import random
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.errors import ConfigError, ManifestError, SpeechLMError, TTSError
from speechlm.jsonl import JsonlAppender, atomic_write, dumps, iter_jsonl, writing

AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "synth_report.json"
# Fields the job writes itself; an input item's own values for these are not copied.
_OWN_FIELDS = ("id", "audio", "duration", "offset", "text", "voice", "rate", "pitch")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
_SAFE_ID = re.compile(r"^[^\x00-\x1f/\\]+$")
# Manifest records are flushed at once (a killed job loses nothing it reported done) and
# fsynced every this many records; audio files are renamed into place but not fsynced, so
# after a power failure (not a kill) run `speechlm data validate` on the manifest.
_FSYNC_EVERY = 16


@dataclass
class SynthReport:
    """What a `synthesize_corpus` run did (this run only, except `skipped`)."""

    out_dir: Path
    manifest: Path
    report: Path
    total: int = 0  # items in the input
    done: int = 0  # synthesized by this run
    skipped: int = 0  # already in the manifest from an earlier run
    failed: int = 0
    audio_seconds: float = 0.0  # synthesized by this run
    wall_seconds: float = 0.0
    finished: bool = False  # False when the run was interrupted or stopped by `strict`
    failures: list[dict] = field(default_factory=list)  # {"id", "line", "voice", "reason"}

    @property
    def audio_hours(self) -> float:
        return self.audio_seconds / 3600.0

    @property
    def real_time_factor(self) -> float:
        """Wall time per second of audio produced (lower is faster); 0 when nothing was made."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else 0.0

    def summary(self) -> str:
        lines = [
            f"items: {self.total} in input, {self.done} synthesized, {self.skipped} already done "
            f"(skipped), {self.failed} failed",
            f"audio: {self.audio_hours:.3f} h ({self.audio_seconds:.1f} s) in "
            f"{self.wall_seconds:.1f} s wall, real-time factor {self.real_time_factor:.4f}",
            f"manifest: {self.manifest}",
        ]
        if self.failures:
            lines.append(f"failures listed in {self.report}; first: "
                         f"{self.failures[0]['id']}: {self.failures[0]['reason']}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "manifest": str(self.manifest),
            "finished": self.finished, "total": self.total, "done": self.done,
            "skipped": self.skipped, "failed": self.failed,
            "audio_seconds": round(self.audio_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "real_time_factor": round(self.real_time_factor, 5),
            "failures": self.failures,
        }


# ---------------------------------------------------------------------------
# Reading the input


@dataclass(frozen=True)
class _Item:
    line: int
    id: str
    record: dict  # the input item, `text` included


def _is_jsonl(path: Path) -> bool:
    return path.name.lower().endswith(_JSONL_SUFFIXES)


def _read_source(source) -> tuple[str, list | None]:
    """(where, None) for a file (read lazily, twice); ("items", list) for an iterable."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ManifestError(f"{path}: input file not found")
        return str(path), None
    if isinstance(source, dict):
        raise ConfigError("items must be a path or an iterable of dicts, not a single dict")
    return "items", list(source)


def _iter_raw(source, where: str, materialized: list | None) -> Iterator[tuple[int, dict]]:
    if materialized is not None:
        yield from enumerate(materialized, start=1)
        return
    path = Path(source)
    if _is_jsonl(path):
        yield from iter_jsonl(path)
        return
    opener = (lambda: io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")) \
        if path.suffix == ".gz" else (lambda: open(path, encoding="utf-8"))
    with opener() as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if text:
                yield lineno, {"id": f"line-{lineno:06d}", "text": text}


def _check_item(where: str, line: int, rec) -> _Item:
    if not isinstance(rec, dict):
        raise ManifestError(f"{where}:{line}: expected an object with a 'text' field, "
                            f"got {type(rec).__name__}")
    if "text" not in rec:
        raise ManifestError(f"{where}:{line}: missing field 'text'; every item needs the text "
                            "to speak")
    if not isinstance(rec["text"], str):
        raise ManifestError(f"{where}:{line}: field 'text' must be a string, "
                            f"got {type(rec['text']).__name__}")
    item_id = rec.get("id")
    if item_id is None:
        item_id = f"line-{line:06d}"
    elif isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise ManifestError(f"{where}:{line}: field 'id' must be a string, "
                            f"got {type(item_id).__name__}")
    item_id = str(item_id)
    if not _SAFE_ID.match(item_id) or item_id.startswith(".") or len(item_id) > 200:
        raise ManifestError(f"{where}:{line}: id {item_id!r} cannot be used as a file name "
                            "(no '/', '\\', control characters or leading '.', at most 200 "
                            "characters); rename it")
    for key in ("voice",):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise ManifestError(f"{where}:{line}: field {key!r} must be a string, "
                                f"got {type(rec[key]).__name__}")
    return _Item(line, item_id, rec)


def _validated_items(source) -> tuple[str, list[_Item] | None, dict[str, int]]:
    """Check every item before any work (structure, ids, duplicates): a bad line fails the
    job at once instead of half-way. Returns (where, items if in memory, id -> line)."""
    where, materialized = _read_source(source)
    first_line: dict[str, int] = {}
    kept: list[_Item] | None = [] if materialized is not None else None
    for line, rec in _iter_raw(source, where, materialized):
        item = _check_item(where, line, rec)
        if item.id in first_line:
            raise ManifestError(f"{where}:{line}: duplicate id {item.id!r} (first at line "
                                f"{first_line[item.id]}); ids must be unique")
        first_line[item.id] = line
        if kept is not None:
            kept.append(item)
    return where, kept, first_line


def _iter_items(source, where: str, kept: list[_Item] | None) -> Iterator[_Item]:
    if kept is not None:
        yield from kept
        return
    for line, rec in _iter_raw(source, where, None):
        yield _check_item(where, line, rec)


# ---------------------------------------------------------------------------
# Choosing voice, rate, pitch


def _as_range(name: str, value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = (int(v) for v in value)
        if lo > hi:
            raise ConfigError(f"{name} range {lo}:{hi} is empty; write LOW:HIGH with LOW <= HIGH")
        return lo, hi
    raise ConfigError(f"{name} must be a number or a (low, high) pair, got {value!r}")


def _strip_backend(voice: str, backend: str) -> str:
    prefix = backend + ":"
    return voice[len(prefix):] if voice.lower().startswith(prefix) else voice


def choose_params(item_id: str, seed: int, voices: list[str], rate: tuple[int, int] | None,
                  pitch: tuple[int, int] | None) -> tuple[str | None, int | None, int | None]:
    """Voice, rate and pitch for an item without its own: a function of (seed, id) only."""
    rng = random.Random(f"{seed}:{item_id}")
    voice = voices[rng.randrange(len(voices))] if voices else None
    r = rng.randint(*rate) if rate else None
    p = rng.randint(*pitch) if pitch else None
    return voice, r, p


# ---------------------------------------------------------------------------
# The work (in-process or in worker processes)

_WORKER: dict = {}


def _init_worker(backend: str, sample_rate: int, out_dir: str, audio_format: str,
                 threads: int | None, backend_options: dict | None = None) -> None:
    from speechlm.tts.base import get_backend

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    _WORKER.clear()
    _WORKER.update(tts=get_backend(backend, sample_rate=sample_rate, **(backend_options or {})),
                   out_dir=Path(out_dir),
                   audio_format=audio_format)


def _synth_task(task: tuple) -> tuple:
    """task = (id, text, voice, rate, pitch) -> ("ok", duration) or ("fail", reason)."""
    import numpy as np
    import soundfile as sf

    item_id, text, voice, rate, pitch = task
    tts = _WORKER["tts"]
    try:
        if voice is None:
            raise TTSError("no voice: pass voices=[...] (--voice) or give the item a 'voice'")
        wave = tts.synthesize(text, voice=voice, rate=rate, pitch=pitch)
    except TTSError as e:
        return ("fail", str(e))
    fmt = _WORKER["audio_format"]
    audio_dir = _WORKER["out_dir"] / "audio"
    final = audio_dir / f"{item_id}.{fmt}"
    tmp = audio_dir / f".{item_id}.{fmt}.tmp"
    # Temporary name, then rename: a killed job never leaves a half-written file under the final
    # name. (No fsync per file: it would cost more than the synthesis; see _FSYNC_EVERY.)
    try:
        with writing(final):
            sf.write(tmp, np.clip(wave, -1.0, 1.0), tts.sample_rate, format=AUDIO_FORMATS[fmt],
                     subtype="PCM_16")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    return ("ok", len(wave) / tts.sample_rate)


def _synth_chunk(tasks: list[tuple]) -> list[tuple]:
    return [_synth_task(t) for t in tasks]


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for x in iterable:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _mp_context():
    # Never plain fork: the parent may hold torch threads or the eSpeak lock.
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # Workers fork from a server that imported these once (torch takes seconds to import).
        ctx.set_forkserver_preload(["speechlm.pipelines.synth", "speechlm.tts.espeak",
                                    "speechlm.audio.io", "soundfile"])
        return ctx
    return multiprocessing.get_context("spawn")


def _run_parallel(tasks: Iterator[tuple], jobs: int, chunk_size: int, init_args: tuple
                  ) -> Iterator[tuple]:
    """Results in input order; at most a few chunks per worker in flight."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=_mp_context(),
                               initializer=_init_worker, initargs=init_args)
    try:
        pending: deque = deque()
        for chunk in _chunks(tasks, chunk_size):
            pending.append(pool.submit(_synth_chunk, chunk))
            while len(pending) >= 3 * jobs:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    except (BrokenProcessPool, EOFError, ConnectionError) as e:
        # EOFError / ConnectionError: the forkserver itself died (e.g. it could not load
        # torch's libraries) before any worker started.
        raise SpeechLMError(
            f"a synthesis worker process died ({type(e).__name__}: {e or 'no message'}); "
            "finished items are saved, so rerun to "
            "resume. Rerun with jobs=1 (--jobs 1) to see the underlying error; when calling "
            "synthesize_corpus from a script, put the call under `if __name__ == '__main__':` "
            "(worker processes re-import the main module)") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_inprocess(tasks: Iterator[tuple], init_args: tuple) -> Iterator[tuple]:
    import torch

    # Resampling one utterance is too small a job for torch's thread pool: with more threads
    # it runs several times slower on a busy machine. Restored when the job ends.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _init_worker(*init_args[:4], threads=None, backend_options=init_args[5])
    try:
        for task in tasks:
            yield _synth_task(task)
    finally:
        _WORKER.clear()
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# The job


def _exclusive(out_dir: Path):
    """One job per output directory."""
    from ..jsonl import exclusive

    return exclusive(out_dir / ".synth.lock", f"{out_dir}: another synthesis job is writing here; "
                     "wait for it or use another --out")


def done_ids(manifest: Path) -> set[str]:
    """Ids already in a (possibly killed mid-write) manifest."""
    if not manifest.exists():
        return set()
    return {str(rec.get("id")) for _, rec in iter_jsonl(manifest, tolerate_torn_tail=True)}


def synthesize_corpus(
    items,
    out_dir,
    *,
    voices: list[str] | None = None,
    rate: int | tuple[int, int] | None = None,
    pitch: int | tuple[int, int] | None = None,
    jobs: int = 1,
    audio_format: str = "flac",
    sample_rate: int = 16000,
    seed: int = 0,
    progress: bool = True,
    strict: bool = False,
    backend: str = "espeak",
    backend_options: dict | None = None,
) -> SynthReport:
    """Speak every item of `items` (path or iterable of dicts) into `out_dir`; see module doc.

    `voices` are the backend's voice names ("en-us+f3"); `rate` and `pitch` a
    fixed value or a (low, high) range drawn per item; `jobs` worker
    processes (1 = in this process). Returns a `SynthReport`; with `strict`,
    the first item that cannot be spoken raises TTSError (after its
    predecessors are safely written). `backend_options` go to the backend's constructor
    (e.g. SpeechT5's `threshold`, `vocoder`; VITS's `noise_scale`), in every worker.
    """
    start = time.perf_counter()
    if audio_format not in AUDIO_FORMATS:
        raise ConfigError(f"audio_format {audio_format!r} is not supported; use "
                          f"{' or '.join(AUDIO_FORMATS)}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a positive integer, got {jobs!r}")
    rate_range, pitch_range = _as_range("rate", rate), _as_range("pitch", pitch)
    out_dir = Path(out_dir)
    report = SynthReport(out_dir=out_dir, manifest=out_dir / MANIFEST_NAME,
                         report=out_dir / REPORT_NAME)

    from speechlm.tts.base import get_backend, parse_backend_spec

    backend_name, _ = parse_backend_spec(backend)
    backend_options = dict(backend_options or {})
    # validates voices and options now
    tts = get_backend(backend_name, sample_rate=sample_rate, **backend_options)
    voices = [tts.resolve_voice(_strip_backend(v, backend_name)) for v in (voices or [])]
    check_options = getattr(tts, "check_options", None)
    if check_options is not None:  # a bad range would fail every item: fail now instead
        for r, p in zip(rate_range or (None, None), pitch_range or (None, None), strict=True):
            check_options(rate=r, pitch=p)

    where, kept, first_line = _validated_items(items)
    report.total = len(first_line)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(exist_ok=True)
    with _exclusive(out_dir):
        for stale in (out_dir / "audio").glob(".*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        already = done_ids(report.manifest)
        report.skipped = sum(1 for i in first_line if i in already)
        todo = report.total - report.skipped
        voice_cache: dict[str, tuple[str, str]] = {}

        def plan() -> Iterator[tuple[_Item, tuple]]:
            for item in _iter_items(items, where, kept):
                if item.id in already:
                    continue
                voice, r, p = choose_params(item.id, seed, voices, rate_range, pitch_range)
                rec = item.record
                if rec.get("voice"):
                    voice = _strip_backend(rec["voice"], backend_name)
                r = rec["rate"] if rec.get("rate") is not None else r
                p = rec["pitch"] if rec.get("pitch") is not None else p
                yield item, (item.id, rec["text"], voice, r, p)

        planned: deque = deque()

        def tasks() -> Iterator[tuple]:
            for item, task in plan():
                planned.append((item, task))
                yield task

        init_args = (backend_name, sample_rate, str(out_dir), audio_format, 1, backend_options)
        n_jobs = max(1, min(jobs, todo))
        if n_jobs == 1:
            results = _run_inprocess(tasks(), init_args)
        else:
            chunk = max(1, min(32, todo // (n_jobs * 8) or 1))
            results = _run_parallel(tasks(), n_jobs, chunk, init_args)

        from ..progress import progress_bar

        bar = progress_bar(total=todo, unit="utt", desc="synth", dynamic_ncols=True,
                   disable=not progress)
        try:
            with JsonlAppender(report.manifest, fsync_every=_FSYNC_EVERY) as out:
                for status, value in results:
                    item, (item_id, text, voice, r, p) = planned.popleft()
                    bar.update(1)
                    if status == "fail":
                        report.failed += 1
                        report.failures.append({"id": item_id, "line": item.line,
                                                "voice": voice, "reason": value})
                        if strict:
                            raise TTSError(f"{where}:{item.line}: item {item_id!r}: {value} "
                                           "(strict: stopping; rerun without strict to skip it)")
                        continue
                    out.write(_record(item, text, voice, r, p, value, audio_format, tts,
                                      backend_name, voice_cache))
                    report.done += 1
                    report.audio_seconds += value
            report.finished = True
        finally:
            bar.close()
            with contextlib.suppress(Exception):
                results.close()
            report.wall_seconds = time.perf_counter() - start
            with atomic_write(report.report) as f:
                f.write(dumps({"input": where, "voices": voices, "backend": backend_name,
                               "backend_options": backend_options, "sample_rate": sample_rate, "seed": seed, **report.to_json()})
                        + "\n")
    return report


def _record(item: _Item, text: str, voice: str, rate, pitch, duration: float, fmt: str, tts,
            backend_name: str, voice_cache: dict[str, tuple[str, str]]) -> dict:
    if voice not in voice_cache:  # canonical spelling and main language ("en-us" -> "en")
        voice_cache[voice] = (tts.resolve_voice(voice), tts.language_of(voice).split("-")[0])
    voice, lang = voice_cache[voice]
    rec = {
        "id": item.id,
        "audio": f"audio/{item.id}.{fmt}",
        "duration": round(duration, 4),
        "text": text,
        "lang": lang,
        "speaker": f"{backend_name}:{voice}",
        "voice": voice,
        "rate": rate,
        "pitch": pitch,
    }
    # The item's own fields (lang, speaker, translation, ...) win over the defaults above.
    rec.update({k: v for k, v in item.record.items() if k not in _OWN_FIELDS})
    return rec
