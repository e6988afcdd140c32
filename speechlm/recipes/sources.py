"""Where a recipe's manifests come from: a path, or the embedded corpus by name.

`embedded:en/train` (also `embedded:es/dev`, ...) names a split of the
embedded speech corpus; it is built into the cache on first use, so tiny
recipes run on a fresh machine with no data of the user's. Re-spoken splits
such as `embedded:en/test_piper` (the test verses in a Piper neural voice) are
built the same way, and so is `embedded:LANG/extra` (more speech of the training books
and voices, no train text: the untranscribed audio of self-training).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

PREFIX = "embedded:"


def resolve_if_embedded(spec: str, *, progress: bool = True) -> str:
    """`spec` itself, or the built manifest's path when it names an embedded split: for
    commands that read their other manifests (and report them missing) on their own."""
    return str(resolve_manifest(spec, progress=progress)) if str(spec).startswith(PREFIX) \
        else spec


def resolve_manifest(spec: str | Path, *, progress: bool = True) -> Path:
    """The manifest path for `spec` (a file path or `embedded:LANG/SPLIT`)."""
    text = str(spec)
    if not text.startswith(PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"manifest {path} not found; give a JSONL manifest path "
                              f"or an embedded split such as 'embedded:en/train'")
        return path
    from ..pipelines.embedded_corpus import (
        EMBEDDED,
        EXTRA_SIZES,
        RESPOKEN,
        SPLITS,
        build_embedded_corpus,
        build_extra_speech,
        build_respoken_split,
    )

    lang, _, split = text[len(PREFIX):].partition("/")
    respoken = RESPOKEN.get(lang, {})
    extra = ("extra",) if lang in EXTRA_SIZES else ()
    if lang not in EMBEDDED or split not in (*SPLITS, *respoken, *extra):
        named = ", ".join([f"embedded:{code}/{name}" for code, splits in RESPOKEN.items()
                           for name in splits] + [f"embedded:{code}/extra" for code in EXTRA_SIZES])
        raise ConfigError(f"unknown embedded manifest '{text}'; use embedded:LANG/SPLIT with "
                          f"LANG in {sorted(EMBEDDED)} and SPLIT in {list(SPLITS)}, or {named}")
    if split in respoken:
        return build_respoken_split(lang, split, progress=progress)
    if split in extra:
        return build_extra_speech(lang, progress=progress)
    return build_embedded_corpus(lang, progress=progress).manifests[split]
