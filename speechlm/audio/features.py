"""Encoder input features, batched in torch on any device.

- `log_mel_spectrogram`: Whisper's log-mel (numerically the same as
  transformers' WhisperFeatureExtractor, 80 or 128 bins).
- `kaldi_fbank`: Kaldi-compatible log fbank + utterance CMVN (as
  Speech2TextFeatureExtractor computes it), via torchaudio.
- `normalize_waveform`: wav2vec2 / HuBERT input normalisation (as
  Wav2Vec2FeatureExtractor(do_normalize=True) computes it).

Batches come as a padded [B, T] tensor plus `lengths` (valid samples per
row), a 1-D tensor, or a list of 1-D tensors / arrays of any lengths.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Whisper's fixed front end (openai/whisper audio.py; WhisperFeatureExtractor defaults).
WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_N_SAMPLES = 30 * WHISPER_SAMPLE_RATE  # pad_or_trim target: 30 s
_LOG_FLOOR = 1e-10  # log10 clamp; an all-zero frame ends up at log10(1e-10) = -10
_ZERO_FRAME_LOG = float(torch.tensor(_LOG_FLOOR, dtype=torch.float32).log10())
_ONE = torch.ones(())

WaveBatch = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def as_padded_batch(
    waves: WaveBatch, lengths: torch.Tensor | Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (float32 [B, T] zero-padded waves, int64 [B] lengths on the same device).

    Accepts [T], [B, T] (with optional `lengths`) or a list of 1-D waves.
    Samples at or after each row's length are set to 0.
    """
    if isinstance(waves, (list, tuple)):
        rows = [torch.as_tensor(w, dtype=torch.float32).reshape(-1) for w in waves]
        if lengths is None:
            lengths = [r.numel() for r in rows]
        device = rows[0].device if rows else torch.device("cpu")
        batch = torch.zeros(len(rows), max((r.numel() for r in rows), default=0), device=device)
        for i, r in enumerate(rows):
            batch[i, : r.numel()] = r
        waves = batch
    waves = torch.as_tensor(waves)
    if waves.dim() == 1:
        waves = waves.unsqueeze(0)
    if waves.dim() != 2:
        raise ValueError(f"expected waves of shape [T] or [B, T], got {tuple(waves.shape)}")
    waves = waves.to(torch.float32)
    batch_size, width = waves.shape
    if lengths is None:
        return waves, torch.full((batch_size,), width, dtype=torch.long, device=waves.device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=waves.device).reshape(-1)
    if lengths.numel() != batch_size:
        raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {batch_size}")
    lengths = lengths.clamp(0, width)
    if batch_size and int(lengths.min()) < width:
        keep = torch.arange(width, device=waves.device) < lengths[:, None]
        waves = waves * keep
    return waves, lengths


# --------------------------------------------------------------------------- Whisper log-mel


def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp(np.log(6.4) * (mels[log_region] - 15.0) / 27.0)
    return freq


def whisper_mel_filters(
    n_mels: int, n_fft: int = WHISPER_N_FFT, sample_rate: int = WHISPER_SAMPLE_RATE
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised mel filters [n_freqs, n_mels], float64.

    Built exactly as WhisperFeatureExtractor builds them (transformers'
    `mel_filter_bank(..., 0, 8000, norm="slaney", mel_scale="slaney")`).
    """
    n_freqs = 1 + n_fft // 2
    mel_min, mel_max = _hz_to_mel_slaney(np.array([0.0, 8000.0]))
    mel_points = np.linspace(mel_min, mel_max, n_mels + 2)
    filter_freqs = _mel_to_hz_slaney(mel_points)
    fft_freqs = np.linspace(0, sample_rate // 2, n_freqs)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (filter_freqs[2 : n_mels + 2] - filter_freqs[:n_mels])[None, :]
    return filters


@functools.lru_cache(maxsize=16)
def _whisper_constants(n_mels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hann window, mel filters [2 * n_freqs, n_mels]) as float32 on `device`, built once.

    Each filter row appears twice (interleaved) so that it weights the real and
    the imaginary square of a `view_as_real` STFT bin alike.
    """
    window = torch.hann_window(WHISPER_N_FFT, device=device)
    filters = np.repeat(whisper_mel_filters(n_mels).astype(np.float32), 2, axis=0)
    filters = torch.from_numpy(filters).to(device)
    return window, filters


def mel_frame_lengths(
    lengths: torch.Tensor | Sequence[int],
    *,
    pad_to: int | None = WHISPER_N_SAMPLES,
    hop_length: int = WHISPER_HOP,
) -> torch.Tensor:
    """Number of log-mel frames that see real audio, per utterance of `lengths` samples.

    Frame t is centred on sample t * hop, so ceil(length / hop) frames are
    valid, capped at the frame count `log_mel_spectrogram` returns for the
    same `pad_to` (this equals WhisperFeatureExtractor's attention mask sum).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    total = pad_to if pad_to is not None else int(lengths.max()) if lengths.numel() else 0
    return torch.div(
        lengths.clamp(0, total) + hop_length - 1, hop_length, rounding_mode="floor"
    ).clamp(max=total // hop_length)


def log_mel_spectrogram(
    waves: WaveBatch,
    n_mels: int = 80,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    pad_to: int | None = WHISPER_N_SAMPLES,
) -> torch.Tensor:
    """Whisper log-mel features [B, n_mels, frames] (float32, on the waves' device).

    Same numbers as WhisperFeatureExtractor(feature_size=n_mels): audio at
    16 kHz is padded with zeros or trimmed to `pad_to` samples (30 s by
    default; None: to the longest valid length in the batch), then STFT
    (n_fft 400, hop 160, Hann, reflect-centred), power, Slaney mel, log10
    clamped at 1e-10, floor at (per-utterance max - 8), (x + 4) / 4; the last
    STFT frame is dropped, so frames = pad_to // 160. A 1-D input gives B = 1.

    Frames that only see zero padding are not computed: their value is
    known exactly (log10(1e-10) before the dynamic-range floor), which makes
    10 s clips padded to 30 s about three times cheaper.
    """
    waves, lengths = as_padded_batch(waves, lengths)
    batch_size = waves.shape[0]
    total = pad_to if pad_to is not None else (int(lengths.max()) if batch_size else 0)
    half = WHISPER_N_FFT // 2
    if total <= half:
        raise ValueError(f"log-mel needs more than {half} samples per utterance, got {total}")
    n_frames = total // WHISPER_HOP
    lengths = lengths.clamp(max=total)
    longest = int(lengths.max()) if batch_size else 0
    window, filters = _whisper_constants(n_mels, waves.device)

    # Frames t with t * hop - n_fft/2 >= longest see only zeros.
    n_live = min(n_frames, max(2, math.ceil((longest + half) / WHISPER_HOP)))
    x = waves[:, : min(waves.shape[1], total)]
    if n_live == n_frames:
        x = F.pad(x, (0, total - x.shape[1]))
        spec = torch.stft(
            x,
            WHISPER_N_FFT,
            WHISPER_HOP,
            window=window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )[..., :n_frames]
    else:
        # Frames 0..n_live-1 reach sample (n_live - 1) * hop + n_fft/2 < total, so only
        # the left edge needs Whisper's reflect padding; the right side is zeros.
        need = (n_live - 1) * WHISPER_HOP + half
        width = min(need, x.shape[1])
        framed = x.new_empty((batch_size, half + need))
        framed[:, half : half + width] = x[:, :width]
        framed[:, half + width :] = 0.0
        framed[:, :half] = framed[:, half + 1 : 2 * half + 1].flip(-1)
        spec = torch.stft(
            framed, WHISPER_N_FFT, WHISPER_HOP, window=window, center=False, return_complex=True
        )
    # |X|^2 @ mel == [re^2, im^2] @ [mel; mel]: one in-place square and one matmul.
    # (torch.stft returns frames-major memory, so the transpose below is free.)
    parts = torch.view_as_real(spec.transpose(1, 2)).square_()  # [B, n_live, n_freqs, 2]
    n_freqs = parts.shape[2]
    mel = torch.matmul(parts.reshape(batch_size, -1, 2 * n_freqs), filters)  # [B, n_live, n_mels]

    # Whisper: v = max(log10(max(mel, 1e-10)), peak - 8); out = (v + 4) / 4, where
    # peak = max(log10(max(mel, 1e-10))) = log10(max(max(mel), 1e-10)). Equivalently
    # out = max(1 + log10(mel) / 4, (max(peak - 8, -10) + 4) / 4); log10(0) = -inf is
    # fine. Few, large ops: each parallel op costs a barrier on a busy machine.
    peak = mel.amax(dim=(1, 2), keepdim=True).clamp_(min=_LOG_FLOOR).log10_()
    floor = (torch.clamp(peak - 8.0, min=_ZERO_FRAME_LOG) + 4.0) / 4.0  # [B, 1, 1]
    out = mel.new_empty((batch_size, n_mels, n_frames))
    live = out[..., :n_live]
    torch.add(_ONE.to(mel.device), mel.log10_().transpose(1, 2), alpha=0.25, out=live)
    live.clamp_(min=floor)
    if n_live < n_frames:
        out[..., n_live:] = floor  # frames that only saw zeros
    return out


# --------------------------------------------------------------------------- Kaldi fbank


def kaldi_fbank(
    waves: WaveBatch,
    sample_rate: int = 16000,
    n_mels: int = 80,
    *,
    lengths: torch.Tensor | Sequence[int] | None = None,
    cmvn: bool = True,
    scale: float = 32768.0,
    dither: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi log-mel fbank per utterance: (feats [B, frames, n_mels], frame_lengths [B]).

    Each utterance's valid samples are scaled by `scale` (Kaldi works on
    16-bit integer amplitudes) and passed to torchaudio.compliance.kaldi.fbank
    (25 ms / 10 ms, povey window, snip_edges). With `cmvn`, features are
    normalised to zero mean and unit variance per bin over the utterance's
    frames, as Speech2TextFeatureExtractor does. Padding frames are 0.
    An utterance shorter than one window (25 ms) has 0 frames.
    """
    import torchaudio.compliance.kaldi as ta_kaldi

    waves, lengths = as_padded_batch(waves, lengths)
    per_utt = []
    for wave, n in zip(waves, lengths.tolist(), strict=True):
        if n < int(sample_rate * 0.025):
            per_utt.append(waves.new_zeros((0, n_mels)))
            continue
        feats = ta_kaldi.fbank(
            wave[:n].unsqueeze(0) * scale,
            num_mel_bins=n_mels,
            sample_frequency=float(sample_rate),
            dither=dither,
        )
        if cmvn:
            feats = feats - feats.mean(dim=0)
            std = feats.std(dim=0, unbiased=False)
            feats = feats / std.clamp_min(torch.finfo(feats.dtype).tiny)
        per_utt.append(feats)
    frame_lengths = torch.tensor(
        [f.shape[0] for f in per_utt], dtype=torch.long, device=waves.device
    )
    out = waves.new_zeros((len(per_utt), int(frame_lengths.max()) if per_utt else 0, n_mels))
    for i, feats in enumerate(per_utt):
        out[i, : feats.shape[0]] = feats
    return out, frame_lengths


# --------------------------------------------------------------------------- wav2vec2 normalisation


def normalize_waveform(
    waves: WaveBatch, lengths: torch.Tensor | Sequence[int] | None = None, *, eps: float = 1e-7
) -> torch.Tensor:
    """Zero-mean, unit-variance per utterance over its valid samples; padding stays 0.

    Matches Wav2Vec2FeatureExtractor(do_normalize=True): (x - mean) /
    sqrt(var + 1e-7). Returns [T] for a 1-D input, else [B, T] float32.
    """
    one_d = isinstance(waves, (torch.Tensor, np.ndarray)) and waves.ndim == 1
    waves, lengths = as_padded_batch(waves, lengths)
    x = waves.double()  # statistics in float64: long clips lose digits in float32 sums
    n = lengths.clamp_min(1).to(x.dtype)[:, None]
    mean = x.sum(dim=1, keepdim=True) / n  # padding is already zero
    keep = torch.arange(x.shape[1], device=x.device) < lengths[:, None]
    var = ((x - mean) * keep).square().sum(dim=1, keepdim=True) / n
    out = (((x - mean) / torch.sqrt(var + eps)) * keep).to(torch.float32)
    return out[0] if one_d else out
