"""LibriSpeech: <split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt + <utt-id>.flac.

Each transcript line is "<utt-id> <TRANSCRIPT>" and the audio sits beside it
as <utt-id>.flac. The root may be a split directory (train-clean-100), the
directory holding the splits (LibriSpeech/), or the one holding LibriSpeech/;
with several splits there, `split` picks one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from .common import Candidate, ImportReport, Skip, require_dir, run_import, split_key_value

TRANSCRIPT_GLOB = "*/*/*.trans.txt"


def _is_split_dir(path: Path) -> bool:
    return path.is_dir() and next(path.glob(TRANSCRIPT_GLOB), None) is not None


def find_split_dir(root, split: str | None = None) -> Path:
    """The split directory to import under `root` (see the module docstring)."""
    root = require_dir(root, "a LibriSpeech directory (<split>/<speaker>/<chapter>/*.trans.txt)")
    parents = [root] + ([root / "LibriSpeech"] if (root / "LibriSpeech").is_dir() else [])
    if split:
        for parent in parents:
            if _is_split_dir(parent / split):
                return parent / split
        if root.name == split and _is_split_dir(root):
            return root
    elif _is_split_dir(root):
        return root
    splits = [d for parent in parents for d in sorted(parent.iterdir()) if _is_split_dir(d)]
    names = ", ".join(d.name for d in splits)
    if split:
        raise ConfigError(f"{root}: no LibriSpeech split {split!r} here"
                          + (f"; found: {names}" if names else ""))
    if len(splits) == 1:
        return splits[0]
    if not splits:
        raise ConfigError(f"{root}: no LibriSpeech transcripts ({TRANSCRIPT_GLOB}) found here or "
                          "one level down; point SOURCE at a split such as train-clean-100")
    raise ConfigError(f"{root}: holds several LibriSpeech splits ({names}); choose one with "
                      "--split (split=...)")


def iter_librispeech(split_dir: Path) -> Iterator[Candidate | Skip]:
    """Candidates of one split directory, in sorted speaker/chapter/line order."""
    for transcript in sorted(split_dir.glob(TRANSCRIPT_GLOB)):
        chapter_dir = transcript.parent
        speaker = chapter_dir.parent.name
        with open(transcript, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                utt_id, text = split_key_value(line)
                where = f"{transcript}:{lineno}"
                if "/" in utt_id or utt_id in (".", ".."):
                    yield Skip("malformed_line", where, f"bad utterance id {utt_id!r}")
                    continue
                yield Candidate(id=utt_id, where=where, audio=chapter_dir / f"{utt_id}.flac",
                                text=text, speaker=speaker, lang="en")


def import_librispeech(root, out_manifest, *, split: str | None = None, **options) -> ImportReport:
    """Import a LibriSpeech split (speaker from the directory, lang "en" unless `lang`).

    `options` are those of `run_import` (lang, strict, relative, limit, probe,
    allow_no_text, progress).
    """
    split_dir = find_split_dir(root, split)
    return run_import(iter_librispeech(split_dir), out_manifest, fmt="librispeech",
                      source=split_dir, **options)
