"""JSON Lines files: streaming reads, atomic writes, and crash-safe appends.

Three ways to write, for three jobs:
- `atomic_write` / `write_jsonl`: the whole file appears at once (temporary
  name in the same directory, fsync, rename) or not at all; `atomic_directory`
  does the same for a directory of files (a converted model).
- `JsonlAppender`: a long job appends one record per finished item and
  flushes it, so a killed job loses at most the line it was writing;
  `read_jsonl(..., tolerate_torn_tail=True)` ignores that torn last line and
  the appender cuts it off before appending again.
Files ending in `.gz` are read and written gzip-compressed (not appendable).
A write that fails for lack of space raises a WriteError naming the output
(`writing` does that for other writers too).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ManifestError, SpeechLMError, WriteError


def open_lines_binary(path: Path):
    """`path` for reading raw lines (gunzipped for `.gz`): each line is decoded on its own, so
    one line that is not UTF-8 is reported with its number instead of ending the read."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def directory_given(path: Path) -> str:
    """The error for a directory where a JSONL file belongs, pointing at the file inside."""
    inside = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.jsonl.gz"))
    hint = (f"give the file, e.g. {inside[0]}" if inside
            else "give the path of a .jsonl file (this directory holds none)")
    return f"{path}: is a directory, not a JSONL file; {hint}"


def not_utf8(error: UnicodeDecodeError) -> str:
    """The problem of a line that is not UTF-8, with the fix."""
    return (f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at column "
            f"{error.start + 1}); save the file as UTF-8")


def iter_jsonl(path, *, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) lazily; constant memory however long the file.

    Blank lines are skipped. A line that is not a JSON object raises
    ManifestError "file:line: ...". With `tolerate_torn_tail`, a last line
    without a newline that does not parse (a write cut by a kill) is ignored.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: file not found")
    if path.is_dir():
        raise ManifestError(directory_given(path))
    with open_lines_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if tolerate_torn_tail and not raw.endswith(b"\n"):
                    return  # a kill cut the last line inside a character
                raise ManifestError(f"{path}:{lineno}: {not_utf8(e)}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                if tolerate_torn_tail and not line.endswith("\n"):
                    return
                raise ManifestError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                    "each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise ManifestError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def read_jsonl(path, **kwargs) -> list[dict]:
    """All records of a JSONL file (use `iter_jsonl` for large files)."""
    return [rec for _, rec in iter_jsonl(path, **kwargs)]


_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# how libraries that do not raise OSError say it: torch.save, safetensors (a Rust io::Error)
_SPACE_WORDS = ("no space left", "file too large", "quota exceeded", "file write failed")


def write_failure(error: BaseException) -> str | None:
    """What went wrong, when `error` is a failed write for lack of space (or, from libsndfile,
    which names no cause, any failed write); None for other errors."""
    if isinstance(error, OSError):
        return error.strerror or str(error) if error.errno in _SPACE_ERRNOS else None
    text = str(error)
    if any(words in text.lower() for words in _SPACE_WORDS):
        return text.strip().splitlines()[-1][:200]
    if type(error).__name__ == "LibsndfileError":
        return f"libsndfile: {text or 'system error'}; is the disk full?"
    return None


@contextlib.contextmanager
def writing(path):
    """Turn a failed write inside the block (see write_failure) into a WriteError naming
    `path`, the output the user knows, instead of a bare errno or a library's message."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        detail = write_failure(e)
        if detail is None:
            raise
        raise WriteError(path, detail) from e


@contextlib.contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside `path`; on success fsync and rename it over `path`.

    If the block raises (or the process dies), `path` is untouched and the
    temporary file is removed (or left with a `.tmp` suffix after a kill).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with writing(path), os.fdopen(fd, mode.replace("t", "") if "b" in mode else mode,
                                      **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a fresh temporary directory beside `path`; on success rename it to `path`.

    `path` must not exist yet. If the block raises, the temporary directory is
    removed; after a kill it is left as `.NAME.*.tmp` beside `path`, which no
    reader takes for the finished directory (callers may sweep such leftovers).
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with writing(path):
            yield tmp
        # mkdtemp makes 0700 (and some writers 0600 files): give what mkdir/open would
        umask = os.umask(0)
        os.umask(umask)
        for item in [tmp, *tmp.rglob("*")]:
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path, records: Iterable[dict]) -> int:
    """Write records atomically (streaming: records may be a generator). Returns the count."""
    path = Path(path)
    n = 0
    if path.suffix == ".gz":
        with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz:
            for rec in records:
                gz.write((dumps(rec) + "\n").encode("utf-8"))
                n += 1
        return n
    with atomic_write(path) as f:
        for rec in records:
            f.write(dumps(rec) + "\n")
            n += 1
    return n


class JsonlAppender:
    """Append records one at a time, each flushed to disk, for resumable jobs.

    On open, a torn last line left by a killed writer is truncated away, so
    the file always holds whole records. `fsync_every` trades safety against
    speed (1 = fsync each record).
    """

    def __init__(self, path, fsync_every: int = 1):
        self.path = Path(path)
        if self.path.suffix == ".gz":
            raise ValueError(f"{self.path}: cannot append to a gzip file; use .jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync_every = max(1, fsync_every)
        self._pending = 0
        self._failed = False

    def write(self, record: dict) -> None:
        with writing(self.path):
            try:
                self._f.write(dumps(record) + "\n")
                self._f.flush()
            except OSError:
                self._failed = True  # the buffer still holds part of this record
                raise
            self._pending += 1
            if self._pending >= self._fsync_every:
                os.fsync(self._f.fileno())
                self._pending = 0

    def close(self) -> None:
        if self._f.closed:
            return
        if self._failed:
            # the file is closed even when flushing the rest of the record fails again; a
            # torn line on disk is cut when the file is opened to append again
            with contextlib.suppress(OSError):
                self._f.close()
            return
        with writing(self.path):
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        # Walk back to the last newline; everything after it is a torn record.
        pos, chunk = size, 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                f.truncate(start + idx + 1)
                return
            pos = start
        f.truncate(0)


@contextlib.contextmanager
def exclusive(lock_path, busy: str):
    """Hold an advisory lock on `lock_path` (released when the process dies), or raise
    SpeechLMError(busy) at once when another process holds it: one job per output, so a
    stray temporary file is never a live one and two writers never interleave."""
    with open(lock_path, "w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpeechLMError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def blocking_lock(lock_path):
    """Hold an exclusive advisory lock on `lock_path`, waiting for another holder to finish
    (released when the process dies): one process builds a cached thing, the others wait."""
    with open(lock_path, "w") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
