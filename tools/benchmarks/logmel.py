"""Benchmark: Whisper log-mel, speechlm (batched torch) vs WhisperFeatureExtractor.

16 clips x 10 s at 16 kHz of speech-like noise (fixed seed), padded to 30 s
as Whisper expects. Baseline: WhisperFeatureExtractor(feature_size=80)'s
default call (list of arrays, sampling_rate=16000, return_tensors="pt"),
which in transformers 5 already runs torch.stft on the padded batch.
Both are warmed up and timed in this process, alternating, and we report
the median (the machine may be shared: the note gives the load average).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch


def speech_like_clips(n: int = 16, seconds: float = 10.0, sample_rate: int = 16000, seed: int = 0):
    """Noise shaped like speech: a low-pass 'voice' band with a ~4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    clips = []
    for _ in range(n):
        noise = rng.standard_normal(t.size)
        voiced = np.convolve(noise, np.hanning(9) / 4.5, mode="same")  # crude low-pass
        f0 = rng.uniform(90, 220)
        buzz = 0.3 * np.sign(np.sin(2 * np.pi * f0 * t))
        envelope = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6.28))) ** 2
        clips.append((0.05 * envelope * (voiced + buzz)).astype(np.float32))
    return clips


def _interleaved_medians(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time of each function; runs alternate so both see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def run(quick: bool = False) -> list[dict]:
    from transformers import WhisperFeatureExtractor
    from transformers.utils import logging as hf_logging

    from speechlm.audio.features import log_mel_spectrogram

    hf_logging.set_verbosity_error()
    clips = speech_like_clips()
    extractor = WhisperFeatureExtractor(feature_size=80)
    batch = torch.from_numpy(np.stack(clips))

    def baseline():
        return extractor(clips, sampling_rate=16000, return_tensors="pt").input_features

    def ours():
        return log_mel_spectrogram(batch, 80)

    repeats = 3 if quick else 11
    audio_seconds = len(clips) * 10.0
    name = "logmel_whisper80_16x10s"

    def speed_row(metric: str) -> dict:
        t_base, t_ours = _interleaved_medians([baseline, ours], repeats)
        return {
            "benchmark": name,
            "metric": metric,
            "value": audio_seconds / t_ours,
            "baseline": audio_seconds / t_base,
            "ratio": t_base / t_ours,
            "note": f"ours {t_ours * 1e3:.1f} ms vs WhisperFeatureExtractor {t_base * 1e3:.1f} ms "
            f"per batch (median of {repeats}, {torch.get_num_threads()} threads, "
            f"load avg {os.getloadavg()[0]:.1f}); target ratio >= 5",
        }

    rows = [speed_row("throughput (audio s / wall s)")]
    # On a shared 2-core machine default threading suffers from oversubscription;
    # one thread shows the cost of the work itself.
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
        try:
            rows.append(speed_row("throughput, 1 thread (audio s / wall s)"))
        finally:
            torch.set_num_threads(threads)
    diff = float((ours() - baseline()).abs().max())
    rows.append(
        {
            "benchmark": name,
            "metric": "max abs difference vs WhisperFeatureExtractor",
            "value": diff,
            "baseline": None,
            "ratio": None,
            "note": "target < 1e-3",
        }
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
