"""Audio a client sent, as a checked mono waveform at the model's rate.

Clips are decoded from memory (libsndfile reads wav, flac, ogg, mp3 from a
buffer), so the server writes no upload to disk. The header is read first:
audio over the duration limit is refused before a sample is decoded. Then the
checks every speechlm input gets (`check_audio`: empty, NaN/Inf, silent).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

from ..audio.checks import check_audio
from ..audio.io import resample
from ..errors import AudioError
from .errors import APIError, from_speechlm_error

# What OpenAI's input_audio.format and upload names may say; libsndfile sniffs the content.
FORMATS = ("wav", "mp3", "flac", "ogg", "oga", "opus", "aiff", "aif", "au")


@dataclass(frozen=True)
class AudioLimits:
    """max_seconds: longest clip accepted. max_body_bytes: largest request body."""

    max_seconds: float = 30.0
    max_body_bytes: int = 25 * 1024 * 1024


def decode_base64(data, field: str) -> bytes:
    """The bytes of a base64 string (a `data:` URL prefix is allowed); 400 naming `field`."""
    if not isinstance(data, str) or not data:
        raise APIError(400, f"{field}: expected the audio file as a non-empty base64 string",
                       param=field, code="invalid_base64")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{field}: not valid base64 ({e}); send the file's bytes encoded "
                            "with standard base64 (e.g. base64.b64encode(open(f, 'rb').read()))",
                       param=field, code="invalid_base64") from None


def check_format(fmt, field: str) -> None:
    if fmt is not None and str(fmt).lower() not in FORMATS:
        raise APIError(400, f"{field}: audio format {fmt!r} is not supported; send one of "
                            f"{', '.join(FORMATS)}", param=field, code="invalid_audio_format")


def decode_audio(raw: bytes, field: str, limits: AudioLimits, sample_rate: int) -> torch.Tensor:
    """Mono float32 at `sample_rate` from an audio file's bytes; 400 naming `field` when the
    bytes are empty, not audio, too long, silent or damaged."""
    if not raw:
        raise APIError(400, f"{field}: the audio file is empty (0 bytes); send a recording",
                       param=field, code="empty_audio")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            seconds = f.frames / f.samplerate if f.samplerate else 0.0
            if seconds > limits.max_seconds:
                raise APIError(400, f"{field}: the audio is {seconds:.1f} s, over this server's "
                                    f"limit of {limits.max_seconds:g} s; cut it into shorter "
                                    "clips (or start the server with a larger --max-audio-s)",
                               param=field, code="audio_too_long")
            samples = f.read(dtype="float32", always_2d=True)
            rate = int(f.samplerate)
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        raise APIError(400, f"{field}: not a readable audio file ({str(e).splitlines()[0]}); "
                            f"send {', '.join(FORMATS[:4])} or another format libsndfile reads",
                       param=field, code="invalid_audio") from None
    wave = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1)))
    return checked_wave(wave, rate, field, limits, sample_rate)


def checked_wave(wave: torch.Tensor, rate: int, field: str, limits: AudioLimits,
                 sample_rate: int) -> torch.Tensor:
    """`wave` (1-D at `rate`) checked (empty, NaN/Inf, too long, silent) and resampled."""
    try:
        check_audio(wave, rate, field, max_duration=limits.max_seconds)
    except AudioError as e:
        raise from_speechlm_error(e, param=field) from None
    return resample(wave.float(), rate, sample_rate)
