"""Where a recipe's manifests come from: a path, or the embedded corpus by name.

`embedded:en/train` (also `embedded:es/dev`, ...) names a split of the
embedded speech corpus; it is built into the cache on first use, so tiny
recipes run on a fresh machine with no data of the user's.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

PREFIX = "embedded:"


def resolve_manifest(spec: str | Path, *, progress: bool = True) -> Path:
    """The manifest path for `spec` (a file path or `embedded:LANG/SPLIT`)."""
    text = str(spec)
    if not text.startswith(PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"manifest {path} not found; give a JSONL manifest path "
                              f"or an embedded split such as 'embedded:en/train'")
        return path
    from ..pipelines.embedded_corpus import EMBEDDED, SPLITS, build_embedded_corpus

    lang, _, split = text[len(PREFIX):].partition("/")
    if lang not in EMBEDDED or split not in SPLITS:
        raise ConfigError(f"unknown embedded manifest '{text}'; use embedded:LANG/SPLIT with "
                          f"LANG in {sorted(EMBEDDED)} and SPLIT in {list(SPLITS)}")
    return build_embedded_corpus(lang, progress=progress).manifests[split]
