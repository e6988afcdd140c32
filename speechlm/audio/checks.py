"""Reject audio that would poison training: NaN/Inf, silence, too short or long.

`check_audio` raises an `AudioError` subclass naming the file and the limit;
data jobs catch `AudioError`, skip the item and count it (see DESIGN.md,
"Bad input never crashes a long job").
"""

from __future__ import annotations

import math
import os

import torch

from speechlm.audio.io import load_audio
from speechlm.errors import (
    AudioEmptyError,
    AudioNonFiniteError,
    AudioSilentError,
    AudioTooLongError,
    AudioTooShortError,
)


def _dbfs(amplitude: float) -> float:
    return 20.0 * math.log10(amplitude) if amplitude > 0 else -math.inf


def check_audio(
    wave: torch.Tensor,
    sample_rate: int,
    path: str | os.PathLike,
    *,
    min_duration: float | None = None,
    max_duration: float | None = None,
    silence_dbfs: float | None = -60.0,
) -> None:
    """Raise if `wave` (1-D, float, full scale = 1.0) is unusable; `path` is only for the message.

    Checks, in order: empty, NaN/Inf, shorter than `min_duration` or longer
    than `max_duration` seconds, RMS level below `silence_dbfs` dBFS (all
    zeros included). Pass `silence_dbfs=None` to skip the silence check.
    """
    n = wave.numel()
    if n == 0:
        raise AudioEmptyError(path, "0 samples", hint="drop it from the manifest")
    if not bool(torch.isfinite(wave).all()):
        bad = int((~torch.isfinite(wave)).sum())
        raise AudioNonFiniteError(
            path, f"{bad} of {n} samples", hint="the file is damaged; re-encode or drop it"
        )
    seconds = n / sample_rate
    if min_duration is not None and seconds < min_duration:
        raise AudioTooShortError(
            path,
            f"{seconds:.3f} s < min_duration {min_duration:g} s",
            hint="drop it or lower min_duration",
        )
    if max_duration is not None and seconds > max_duration:
        raise AudioTooLongError(
            path,
            f"{seconds:.3f} s > max_duration {max_duration:g} s",
            hint="segment it into shorter pieces or raise max_duration",
        )
    if silence_dbfs is not None:
        x = wave.detach().double()
        rms_db = _dbfs(float(x.square().mean().sqrt()))
        if rms_db < silence_dbfs:
            peak_db = _dbfs(float(x.abs().max()))
            raise AudioSilentError(
                path,
                f"RMS {rms_db:.1f} dBFS, peak {peak_db:.1f} dBFS, threshold {silence_dbfs:g} dBFS",
                hint="check the recording, or lower silence_dbfs if it is just quiet",
            )


def load_checked(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    *,
    offset: float = 0.0,
    duration: float | None = None,
    min_duration: float | None = None,
    max_duration: float | None = None,
    silence_dbfs: float | None = -60.0,
) -> torch.Tensor:
    """`load_audio` followed by `check_audio`; returns the 1-D float32 wave at `sample_rate`."""
    wave = load_audio(path, sample_rate, offset=offset, duration=duration)
    check_audio(
        wave,
        sample_rate,
        path,
        min_duration=min_duration,
        max_duration=max_duration,
        silence_dbfs=silence_dbfs,
    )
    return wave
