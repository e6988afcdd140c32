"""A datatrove reader for the text people actually have: plain text, JSONL, gzip of both.

Bad input never stops the job. A binary file, an unreadable gzip, an empty
file, a line over `max_line_bytes` (skipped without being loaded), bytes
that are not UTF-8 and a JSONL line that is not an object with a text field
are each skipped and written to `bad_input/RANK.jsonl` as {file, line, reason}
(the report counts them). The document holding a bad line is dropped whole:
half a paragraph is worse than none.

Why not datatrove's JsonlReader: it stops reading a file at its first
invalid byte and loads a line of any size.

Documents are ids `FILE:LINE` (the line a document starts on), so every
kept or removed text can be traced to its source.
"""

from __future__ import annotations

import gzip
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseReader

__all__ = ["TextCorpusReader", "list_input_files"]

_BINARY_PROBE = 8192
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def list_input_files(inputs) -> list[str]:
    """Every regular file under `inputs` (files or directories), sorted, as absolute paths."""
    files: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(str(p.resolve()) for p in sorted(path.rglob("*")) if p.is_file())
        else:
            files.append(str(path.resolve()))
    return files


def _is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(_JSONL_SUFFIXES)


class TextCorpusReader(BaseReader):
    """Reads this task's share of `files` (file i goes to task i mod tasks)."""

    name = "speechlm text corpus"

    def __init__(self, files: list[str], bad_input_dir: str, text_unit: str = "file",
                 text_key: str = "text", max_line_bytes: int = 1_000_000,
                 progress_dir: str | None = None):
        super().__init__(text_key=text_key)
        self.files = list(files)
        self.bad_input_dir = bad_input_dir
        self.text_unit = text_unit
        self.max_line_bytes = max_line_bytes
        self.progress_dir = progress_dir  # bytes read so far, one file per task (see run.py)

    # -- the datatrove step ---------------------------------------------------------

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        os.makedirs(self.bad_input_dir, exist_ok=True)
        # one file per task, rewritten when the task reruns: a resumed job counts nothing twice
        self._rank, self._bytes_done, self._reported = rank, 0, 0.0
        with open(os.path.join(self.bad_input_dir, f"{rank:05d}.jsonl"), "w",
                  encoding="utf-8") as self._bad:
            for path in self.files[rank::world_size]:
                self.stat_update("input_files")
                for doc in self._read_file(path):
                    self.stat_update("documents_read")
                    self.update_doc_stats(doc)
                    self._report_progress()
                    yield doc
                self._bytes_done += os.path.getsize(path)
                self._report_progress()
        self._report_progress(force=True)

    def _report_progress(self, force: bool = False) -> None:
        """Every second, write how many input bytes this task has read (on-disk sizes)."""
        if self.progress_dir is None or (not force and time.monotonic() - self._reported < 1.0):
            return
        self._reported = time.monotonic()
        raw = getattr(self, "_raw", None)
        position = raw.tell() if raw is not None and not raw.closed else 0
        path = os.path.join(self.progress_dir, f"{self._rank:05d}")
        os.makedirs(self.progress_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(str(self._bytes_done + position))
        os.replace(path + ".tmp", path)

    def _skip(self, path: str, line: int, reason: str) -> None:
        self.stat_update("bad_input")
        self._bad.write(json.dumps({"file": path, "line": line, "reason": reason},
                                   ensure_ascii=False) + "\n")

    # -- one file ---------------------------------------------------------------------

    def _read_file(self, path: str) -> Iterator[Document]:
        self._lineno, self._seen_text = 0, False
        try:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                self._raw = f.fileobj if isinstance(f, gzip.GzipFile) else f
                if b"\x00" in f.peek(_BINARY_PROBE)[:_BINARY_PROBE]:
                    self._skip(path, 0, "binary file (NUL bytes)")
                    return
                yield from self._jsonl(path, f) if _is_jsonl(path) else self._text(path, f)
        except (OSError, EOFError, zlib.error) as e:  # unreadable, truncated or corrupt gzip
            self._skip(path, self._lineno, f"unreadable file ({type(e).__name__}: {e})")
            return
        finally:
            self._raw = None
        if not self._seen_text:
            self._skip(path, 0, "empty file (no text)")

    def _lines(self, path: str, f) -> Iterator[tuple[int, bytes | None]]:
        """(line number, bytes) per line; None for a line over the limit, which is never held
        in memory whole."""
        while True:
            chunk = f.readline(self.max_line_bytes + 1)
            if not chunk:
                return
            self._lineno += 1
            if len(chunk) > self.max_line_bytes and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):
                    chunk = f.readline(1 << 20)
                self._seen_text = True
                self._skip(path, self._lineno, "line longer than input.max_line_bytes="
                                               f"{self.max_line_bytes}")
                yield self._lineno, None
            else:
                self._seen_text = self._seen_text or bool(chunk.strip())
                yield self._lineno, chunk

    def _decoded(self, path: str, f) -> Iterator[tuple[int, str | None]]:
        for lineno, raw in self._lines(path, f):
            if raw is None:
                yield lineno, None
                continue
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                self._skip(path, lineno, f"invalid UTF-8 (byte {e.start})")
                yield lineno, None

    def _document(self, path: str, line: int, text: str, extra: dict | None = None):
        data = {"text": text, "id": f"{path}:{line}", "metadata": {"source": f"{path}:{line}"}}
        if extra:
            data["metadata"].update(extra)
        return Document(**data)

    def _text(self, path: str, f) -> Iterator[Document]:
        if self.text_unit == "line":
            for lineno, text in self._decoded(path, f):
                if text is not None and text.strip():
                    yield self._document(path, lineno, text.rstrip("\r\n"))
            return
        # file or paragraph: lines gathered until the end (of the file or of a paragraph)
        start, lines, bad = 0, [], False
        for lineno, text in self._decoded(path, f):
            if self.text_unit == "paragraph" and text is not None and not text.strip():
                if lines and not bad:
                    yield self._document(path, start, "".join(lines).strip("\r\n"))
                start, lines, bad = 0, [], False
                continue
            if not lines and not bad:
                start = lineno
            if text is None:
                bad = True
            else:
                lines.append(text)
        if lines and not bad and "".join(lines).strip():
            yield self._document(path, start, "".join(lines).strip("\r\n"))

    def _jsonl(self, path: str, f) -> Iterator[Document]:
        for lineno, text in self._decoded(path, f):
            if text is None or not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                self._skip(path, lineno, f"not JSON ({e.msg})")
                continue
            value = record.get(self.text_key) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                self._skip(path, lineno, f"no text in field '{self.text_key}'")
                continue
            extra = {k: v for k, v in record.items() if k not in (self.text_key, "id")}
            doc = self._document(path, lineno, value, extra)
            if isinstance(record.get("id"), (str, int)):
                doc.id = str(record["id"])
            yield doc
