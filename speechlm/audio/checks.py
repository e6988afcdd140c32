"""Reject audio that would poison training: NaN/Inf, silence, too short or long.

`check_audio` raises an `AudioError` subclass naming the file and the limit;
data jobs catch `AudioError`, skip the item and count it (see DESIGN.md,
"Bad input never crashes a long job"). A peak far above full scale is usable
but almost always a mistake (integer PCM values stored as float), so it is
logged as a warning instead (the first few files of a run, then a count).
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)

# Full scale is 1.0. Float audio may go somewhat over it (a mix before limiting); a peak 4x
# over (+12 dBFS) means the samples are on another scale, e.g. int16 values written as float.
ABSURD_PEAK = 4.0
_PEAK_WARNINGS_SHOWN = 5
_peak_warnings = 0


def _dbfs(amplitude: float) -> float:
    return 20.0 * math.log10(amplitude) if amplitude > 0 else -math.inf


def absurd_peak(peak: float, path: str | os.PathLike) -> str | None:
    """The warning for a clip whose peak sample is `peak` (full scale 1.0), or None."""
    if peak <= ABSURD_PEAK:
        return None
    return (f"{path}: peak level {peak:.4g} ({_dbfs(peak):+.1f} dBFS) is far above full scale "
            f"1.0; the samples are probably on another scale (integer PCM stored as float?): "
            f"divide them by the peak or re-encode the file as 16-bit PCM")


def _warn_absurd_peak(peak: float, path) -> None:
    global _peak_warnings
    message = absurd_peak(peak, path)
    if message is None:
        return
    _peak_warnings += 1
    if _peak_warnings <= _PEAK_WARNINGS_SHOWN:
        log.warning(message)
    if _peak_warnings == _PEAK_WARNINGS_SHOWN:
        log.warning("further clips with an absurd peak level are not reported one by one")


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
    zeros included). Pass `silence_dbfs=None` to skip the silence check. A peak above
    ABSURD_PEAK is logged as a warning (see the module doc).
    """
    n = wave.numel()
    if n == 0:
        raise AudioEmptyError(path, "0 samples", hint="drop it from the manifest")
    if not bool(torch.isfinite(wave).all()):
        bad = int((~torch.isfinite(wave)).sum())
        raise AudioNonFiniteError(
            path, f"{bad} of {n} samples", hint="the file is damaged; re-encode or drop it"
        )
    _warn_absurd_peak(float(wave.abs().max()), path)
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
