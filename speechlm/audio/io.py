"""Read audio files: header info, and mono float32 segments at a target rate.

All file access goes through soundfile (libsndfile: wav, flac, ogg, mp3, ...).
Only the requested segment is decoded: a 2 s slice of a 1-hour file costs a
seek and 2 s of samples, not an hour. Every failure is an `AudioError`
subclass whose message names the file and says what to do, so a data job can
skip and count the item instead of crashing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

from speechlm.errors import (
    AudioDecodeError,
    AudioEmptyError,
    AudioError,
    AudioMissingError,
)

_DECODE_HINT = "re-encode it (e.g. `ffmpeg -i IN -ar 16000 OUT.wav`) or drop it from the manifest"
_MISSING_HINT = (
    "check the path in the manifest (relative paths resolve against the working directory)"
)


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says, without decoding samples."""

    path: str
    sample_rate: int
    num_frames: int
    channels: int
    duration: float  # seconds
    format: str  # libsndfile major format, e.g. "WAV", "FLAC", "OGG", "MP3"
    subtype: str = ""  # sample encoding, e.g. "PCM_16", "FLOAT"

    @property
    def can_hold_nonfinite(self) -> bool:
        """Float samples are the only ones that can be NaN or Inf (integer PCM and the
        compressed formats decode to finite numbers)."""
        return self.subtype in ("FLOAT", "DOUBLE")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise AudioMissingError(path, hint=_MISSING_HINT)
    if path.is_dir():
        raise AudioDecodeError(
            path, "it is a directory", hint="point the manifest at an audio file"
        )
    if path.stat().st_size == 0:
        raise AudioEmptyError(
            path, "the file is 0 bytes", hint="re-create or drop it from the manifest"
        )


def _open(path: Path) -> sf.SoundFile:
    _check_exists(path)
    try:
        return sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as exc:
        raise AudioDecodeError(path, _short(exc), hint=_DECODE_HINT) from exc


def _short(exc: BaseException) -> str:
    """First line of a libsndfile error, without the repeated file name."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header of `path` (rate, frames, channels, duration, format) without decoding samples."""
    path = Path(path)
    with _open(path) as f:
        return AudioInfo(
            path=str(path),
            sample_rate=int(f.samplerate),
            num_frames=int(f.frames),
            channels=int(f.channels),
            duration=f.frames / f.samplerate if f.samplerate else 0.0,
            format=str(f.format),
            subtype=str(f.subtype),
        )


class FloatScan(NamedTuple):
    """What a pass over a float file's samples found: NaN / Inf samples and the largest
    finite |sample| (full scale is 1.0)."""

    nonfinite: int
    peak: float


def scan_float_samples(path: str | os.PathLike, block_frames: int = 1 << 16) -> FloatScan:
    """NaN / Inf samples and the peak of `path`, read block by block (memory stays flat on
    long files); FloatScan(0, 0.0) at once for encodings that cannot hold them (integer PCM
    and compressed formats cannot be off scale either)."""
    path = Path(path)
    nonfinite, peak = 0, 0.0
    with _open(path) as f:
        if str(f.subtype) not in ("FLOAT", "DOUBLE"):
            return FloatScan(0, 0.0)
        dtype = "float64" if str(f.subtype) == "DOUBLE" else "float32"
        for block in f.blocks(blocksize=block_frames, dtype=dtype):
            finite = np.isfinite(block)
            nonfinite += int((~finite).sum())
            if finite.any():
                peak = max(peak, float(np.abs(block[finite]).max()))
    return FloatScan(nonfinite, peak)


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int, device: torch.device):
    """A torchaudio Resample module per rate pair and device: its sinc kernel is built once.

    Same defaults, and so the same output, as torchaudio.functional.resample.
    """
    import torchaudio

    return torchaudio.transforms.Resample(orig, new).to(device)


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resample float `wave` [..., T] from `orig_sr` to `new_sr` (band-limited sinc, torchaudio)."""
    if orig_sr == new_sr:
        return wave
    return _resampler(int(orig_sr), int(new_sr), wave.device)(wave)


# libsndfile's MP3 seek can land hundreds of samples off, and soundfile seeks after
# every read() to track its position, so for these files we decode from the start
# with raw libsndfile reads and drop the samples before the offset.
_INEXACT_SEEK_FORMATS = frozenset({"MP3"})
_INEXACT_SEEK_SUBTYPES = frozenset({"OPUS"})
_SKIP_BLOCK = 1 << 16


def _read_segment(f: sf.SoundFile, start: int, count: int) -> np.ndarray:
    """Frames [start, start + count) of `f` as float32 [frames, channels], sample-exact."""
    if start and (f.format in _INEXACT_SEEK_FORMATS or f.subtype in _INEXACT_SEEK_SUBTYPES):
        return _decode_from_start(f, start, count)
    if start:
        f.seek(start)
    return f.read(count, dtype="float32", always_2d=True)


def _decode_from_start(f: sf.SoundFile, start: int, count: int) -> np.ndarray:
    try:  # soundfile's cffi handles; stable for years, but private
        from soundfile import _ffi, _snd

        handle = f._file
    except (ImportError, AttributeError):
        return f.read(start + count, dtype="float32", always_2d=True)[start:]

    def raw_read(buf: np.ndarray) -> int:
        ptr = _ffi.cast("float *", buf.__array_interface__["data"][0])
        got = int(_snd.sf_readf_float(handle, ptr, buf.shape[0]))
        if _snd.sf_error(handle):
            raise sf.LibsndfileError(_snd.sf_error(handle), "Error decoding: ")
        return got

    skip = np.empty((min(start, _SKIP_BLOCK), f.channels), dtype=np.float32)
    left = start
    while left > 0:
        got = raw_read(skip[: min(left, _SKIP_BLOCK)])
        if got <= 0:
            return skip[:0]
        left -= got
    out = np.empty((count, f.channels), dtype=np.float32)
    return out[: raw_read(out)]


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    *,
    offset: float = 0.0,
    duration: float | None = None,
) -> torch.Tensor:
    """Decode `path` to a 1-D float32 mono tensor at `sample_rate`.

    `offset` and `duration` (seconds) select a segment; only that segment is
    read from disk. A `duration` past the end of the file returns what is
    there. Channels are averaged. Raises AudioMissingError, AudioDecodeError
    or AudioEmptyError (zero frames, or an offset at/after the end).
    """
    path = Path(path)
    if offset < 0 or (duration is not None and duration < 0):
        raise AudioError(
            path,
            f"negative offset/duration (offset={offset}, duration={duration})",
            hint="fix the segment in the manifest",
        )
    with _open(path) as f:
        orig_sr = int(f.samplerate)
        total = int(f.frames)
        start = int(round(offset * orig_sr))
        if total <= 0:
            raise AudioEmptyError(path, "0 frames", hint="drop it from the manifest")
        if start >= total:
            raise AudioEmptyError(
                path,
                f"offset {offset:.3f} s is at or past the end, {total / orig_sr:.3f} s",
                hint="fix the offset in the manifest",
            )
        count = (
            total - start
            if duration is None
            else min(int(round(duration * orig_sr)), total - start)
        )
        if count <= 0:
            raise AudioEmptyError(
                path,
                f"requested duration {duration} s is 0 samples",
                hint="fix the duration in the manifest",
            )
        try:
            data = _read_segment(f, start, count)
        except (sf.SoundFileError, RuntimeError) as exc:
            raise AudioDecodeError(path, _short(exc), hint=_DECODE_HINT) from exc
    if data.shape[0] == 0:
        raise AudioEmptyError(path, "no samples could be decoded", hint=_DECODE_HINT)
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(mono))
    return resample(wave, orig_sr, sample_rate)
