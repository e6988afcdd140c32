"""Text-to-speech backends: eSpeak NG (default, offline, 100+ languages), SpeechT5 and
VITS (MMS-TTS) checkpoints from local directories, and Piper neural voices (piper-tts).

Importing this package is cheap; names are loaded from their modules on first use.

    from speechlm.tts import get_backend
    tts = get_backend("espeak:en-us+f3")          # 16 kHz float32 output
    wave = tts.synthesize("Hello world.", rate=160)
    tts = get_backend("vits:/models/mms-tts-eng")   # see speechlm.tts.transformers_tts
    tts = get_backend("piper")                      # en_US-joe-medium; see speechlm.tts.piper
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "TTSBackend": "base",
    "VoiceInfo": "base",
    "get_backend": "base",
    "register_backend": "base",
    "available_backends": "base",
    "parse_backend_spec": "base",
    "EspeakTTS": "espeak",
    "list_voices": "espeak",
    "list_variants": "espeak",
    "resolve_voice": "espeak",
    "SpeechT5TTS": "transformers_tts",
    "VitsTTS": "transformers_tts",
    "PiperTTS": "piper",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
