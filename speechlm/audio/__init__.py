"""Audio: loading and resampling (io), validation (checks), encoder features (features).

Importing this package is cheap; names are loaded from their modules on first use.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "AudioInfo": "io",
    "audio_info": "io",
    "load_audio": "io",
    "resample": "io",
    "check_audio": "checks",
    "load_checked": "checks",
    "log_mel_spectrogram": "features",
    "mel_frame_lengths": "features",
    "kaldi_fbank": "features",
    "normalize_waveform": "features",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
