"""Offline data jobs: TTS synthesis, the embedded corpus, BLSP continuations, encoder caches.

Importing this package is cheap; names are loaded from their modules on first use.

    from speechlm.pipelines import synthesize_corpus
    report = synthesize_corpus("texts.txt", "out/", voices=["en-us+f3", "en-us+m1"], jobs=2)
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "synthesize_corpus": "synth",
    "SynthReport": "synth",
    "build_continuations": "continuations",
    "check_continuations": "continuations",
    "read_continuations": "continuations",
    "EncoderCache": "encoder_cache",
    "CachedEncoderDataset": "encoder_cache",
    "collate_encoder_batch": "encoder_cache",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
