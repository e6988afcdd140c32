"""The interface every TTS backend implements, and `get_backend` to pick one by name.

A backend turns text into mono float32 samples at its `sample_rate`. Voices
are backend-specific strings (eSpeak: "en-us+f3" = language voice + variant;
SpeechT5: "MODEL_DIR[:SPEAKER]"; VITS: "MODEL_DIR[:SPEAKER_ID]"; Piper: a packaged voice
name or a local ".onnx"); a *backend spec* names both: "espeak:en-us+f3",
"speecht5:/models/speecht5_tts:seed=3", "vits:/models/mms-tts-eng",
"piper:en_US-joe-medium", or just "espeak" for the backend's default voice.
Backends are registered by module path and imported only when asked for, so
this module stays light.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from speechlm.errors import TTSError


@dataclass(frozen=True)
class VoiceInfo:
    """One voice a backend offers."""

    name: str  # what to pass as `voice`
    languages: tuple[str, ...]  # language codes, most specific first
    description: str = ""  # human-readable name, e.g. "English (America)"
    gender: str = ""  # "male", "female" or ""


@runtime_checkable
class TTSBackend(Protocol):
    """What the synthesis pipeline needs from a TTS engine."""

    name: str  # backend name as used in specs, e.g. "espeak"
    default_voice: str

    @property
    def sample_rate(self) -> int:
        """Rate of the samples `synthesize` returns."""
        ...

    def synthesize(self, text: str, *, voice: str | None = None, rate: int | None = None,
                   pitch: int | None = None) -> np.ndarray:
        """Speak `text`: 1-D float32 samples in [-1, 1]. Raises TTSError if it cannot."""
        ...

    def list_voices(self, lang: str | None = None) -> list[VoiceInfo]:
        """The voices available (only those for `lang` when given)."""
        ...

    def resolve_voice(self, voice: str) -> str:
        """The canonical spelling of `voice`; TTSError (with close matches) if unknown."""
        ...

    def language_of(self, voice: str | None = None) -> str:
        """The language code a voice speaks, e.g. "en-us"."""
        ...


# name -> "module:attribute" of a factory called as factory(voice=..., sample_rate=..., **options)
_BACKENDS: dict[str, str] = {
    "espeak": "speechlm.tts.espeak:EspeakTTS",
    "speecht5": "speechlm.tts.transformers_tts:SpeechT5TTS",  # local transformers checkpoints
    "vits": "speechlm.tts.transformers_tts:VitsTTS",
    "piper": "speechlm.tts.piper:PiperTTS",  # neural voices in onnxruntime (piper-tts)
}


def register_backend(name: str, factory_path: str) -> None:
    """Make `get_backend(f"{name}:...")` build `factory_path` ("package.module:Factory")."""
    _BACKENDS[name] = factory_path


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def parse_backend_spec(spec: str) -> tuple[str, str | None]:
    """Split "espeak:en-us+f3" into ("espeak", "en-us+f3"); "espeak" gives ("espeak", None).

    Only the first ":" splits: "speecht5:/m/tts:seed=3" gives ("speecht5", "/m/tts:seed=3").
    """
    spec = spec.strip()
    name, sep, voice = spec.partition(":")
    name = name.strip().lower()
    if name not in _BACKENDS:
        raise TTSError(
            f"unknown TTS backend {name!r} in {spec!r}; available: {', '.join(available_backends())} "
            "(write a spec as BACKEND:VOICE, e.g. espeak:en-us+f3, speecht5:MODEL_DIR[:SPEAKER], "
            "vits:MODEL_DIR or piper:VOICE)"
        )
    voice = voice.strip()
    return name, (voice or None) if sep else None


def get_backend(spec: str = "espeak", *, sample_rate: int = 16000, **options) -> TTSBackend:
    """Build the backend a spec names, e.g. `get_backend("espeak:en-us+f3")`.

    `options` go to the backend (e.g. `get_backend("vits:DIR", seed=1, speaking_rate=1.1)`,
    `get_backend("speecht5:DIR", vocoder="/models/speecht5_hifigan")`).

    The voice part becomes the backend's default voice (validated now, so a
    typo fails here and not half-way through a job).
    """
    name, voice = parse_backend_spec(spec)
    module_name, _, attr = _BACKENDS[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    kwargs = dict(options, sample_rate=sample_rate)
    if voice is not None:
        kwargs["voice"] = voice
    return factory(**kwargs)
