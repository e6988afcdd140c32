"""Encoder features agree with the reference implementations (transformers, torchaudio)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio.compliance.kaldi as ta_kaldi
from transformers import (
    Speech2TextFeatureExtractor,
    Wav2Vec2FeatureExtractor,
    WhisperFeatureExtractor,
)
from transformers.utils import logging as hf_logging

from speechlm.audio.features import (
    kaldi_fbank,
    log_mel_spectrogram,
    mel_frame_lengths,
    normalize_waveform,
    whisper_mel_filters,
)

hf_logging.set_verbosity_error()
RNG = np.random.default_rng(1234)


def noise(n: int, amp: float = 0.1) -> np.ndarray:
    return (amp * RNG.standard_normal(n)).astype(np.float32)


def tone(freq: float, n: int, sr: int = 16000) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t) * np.hanning(n)).astype(np.float32)


@pytest.fixture(scope="module", params=[80, 128])
def whisper_fe(request):
    return WhisperFeatureExtractor(feature_size=request.param)


def hf_whisper(fe, clips, **kwargs):
    out = fe(clips, sampling_rate=16000, return_tensors="pt", return_attention_mask=True, **kwargs)
    return out.input_features, out.attention_mask


# --------------------------------------------------------------------------- Whisper log-mel


def test_mel_filters_are_whisper_filters(whisper_fe):
    ours = whisper_mel_filters(whisper_fe.feature_size)
    assert ours.shape == whisper_fe.mel_filters.shape
    assert np.abs(ours - whisper_fe.mel_filters).max() < 1e-12


@pytest.mark.parametrize("kind", ["noise", "sine"])
def test_log_mel_matches_whisper_feature_extractor(whisper_fe, kind):
    lengths = [16000 * 3, 7013, 16000 * 12 + 77]
    make = noise if kind == "noise" else (lambda n: tone(523.0, n))
    clips = [make(n) for n in lengths]
    ref, mask = hf_whisper(whisper_fe, clips)
    ours = log_mel_spectrogram(clips, whisper_fe.feature_size)
    assert ours.shape == ref.shape == (3, whisper_fe.feature_size, 3000)
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(mel_frame_lengths(lengths), mask.sum(-1))


def test_padded_batch_with_lengths_ignores_garbage_past_length(whisper_fe):
    n_mels = whisper_fe.feature_size
    clips = [noise(9000), noise(20000)]
    batch = torch.from_numpy(noise(2 * 20000, amp=5.0).reshape(2, 20000))  # loud garbage
    batch[0, :9000] = torch.from_numpy(clips[0])
    batch[1] = torch.from_numpy(clips[1])
    ours = log_mel_spectrogram(batch, n_mels, lengths=torch.tensor([9000, 20000]))
    ref, _ = hf_whisper(whisper_fe, clips)
    assert (ours - ref).abs().max() < 1e-4
    # A single 1-D wave is a batch of one.
    assert torch.allclose(
        log_mel_spectrogram(torch.from_numpy(clips[0]), n_mels), ref[:1], atol=1e-4
    )


def test_no_padding_matches_longest_padding(whisper_fe):
    clips = [noise(12345), tone(300.0, 30000), noise(150)]
    ref, mask = hf_whisper(whisper_fe, clips, padding="longest")
    ours = log_mel_spectrogram(clips, whisper_fe.feature_size, pad_to=None)
    assert ours.shape == ref.shape == (3, whisper_fe.feature_size, 30000 // 160)
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(mel_frame_lengths([12345, 30000, 150], pad_to=None), mask.sum(-1))


def test_edge_lengths_long_and_silent(whisper_fe):
    n_mels = whisper_fe.feature_size
    # Longer than 30 s is trimmed; ending right at 30 s exercises the right reflect pad;
    # all zeros gives the constant floor.
    clips = [noise(16000 * 31), noise(480000 - 90), np.zeros(16000, np.float32), noise(1)]
    ref, mask = hf_whisper(whisper_fe, clips)
    ours = log_mel_spectrogram(clips, n_mels)
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(mel_frame_lengths([len(c) for c in clips]), mask.sum(-1))
    assert torch.all(ours[2] == ours[2, 0, 0])


def test_frames_past_valid_length_are_the_padding_floor():
    lengths = torch.tensor([16000, 48000])
    feats = log_mel_spectrogram([noise(16000), noise(48000)], lengths=lengths)
    valid = mel_frame_lengths(lengths)
    assert valid.tolist() == [100, 300]
    for row, n in zip(feats, valid.tolist(), strict=True):
        pad = row[:, n + 2 :]  # two frames of window overlap after the last valid one
        assert torch.all(pad == pad[0, 0])
        assert torch.all(row[:, :n] > pad[0, 0] + 0.5)  # real audio sits well above the floor


def test_log_mel_on_gpu_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    clips = [noise(16000), noise(40000)]
    cpu = log_mel_spectrogram(clips)
    gpu = log_mel_spectrogram([torch.from_numpy(c).cuda() for c in clips])
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


# --------------------------------------------------------------------------- Kaldi fbank


def test_kaldi_fbank_matches_torchaudio_per_utterance():
    clips = [noise(16000), noise(9600), noise(200)]  # the last is shorter than one 25 ms window
    feats, frames = kaldi_fbank(clips, 16000, 80, cmvn=False)
    assert frames.tolist() == [98, 58, 0]
    assert feats.shape == (3, 98, 80)
    for i, clip in enumerate(clips[:2]):
        ref = ta_kaldi.fbank(
            torch.from_numpy(clip)[None] * 32768.0, num_mel_bins=80, sample_frequency=16000.0
        )
        assert torch.allclose(feats[i, : frames[i]], ref, atol=1e-4)
        assert torch.all(feats[i, frames[i] :] == 0)


def test_kaldi_fbank_cmvn_matches_speech2text():
    clips = [noise(16000), tone(440.0, 12000) + noise(12000, 0.01)]
    fe = Speech2TextFeatureExtractor(feature_size=80, num_mel_bins=80)
    ref = fe(
        clips, sampling_rate=16000, padding=True, return_tensors="pt", return_attention_mask=True
    )
    feats, frames = kaldi_fbank(clips, 16000, 80)
    assert torch.equal(frames, ref.attention_mask.sum(-1).long())
    assert (feats - ref.input_features).abs().max() < 1e-3
    valid = feats[1, : frames[1]]
    assert torch.allclose(valid.mean(0), torch.zeros(80), atol=1e-4)
    assert torch.allclose(valid.std(0, unbiased=False), torch.ones(80), atol=1e-3)


# --------------------------------------------------------------------------- wav2vec2 normalisation


def test_normalize_waveform_matches_wav2vec2_extractor():
    clips = [noise(8000, 0.3) + 0.2, noise(3000, 0.01), noise(5000, 2.0)]
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    ref = fe(clips, sampling_rate=16000, padding=True, return_tensors="pt").input_values
    ours = normalize_waveform(clips)
    assert ours.shape == ref.shape == (3, 8000)
    assert (ours - ref).abs().max() < 1e-4
    assert torch.all(ours[1, 3000:] == 0)
    # Padded batch + lengths gives the same, whatever the padding held.
    batch = torch.full((3, 8000), 7.0)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = torch.from_numpy(c)
    assert torch.allclose(normalize_waveform(batch, torch.tensor([8000, 3000, 5000])), ours)
    single = normalize_waveform(torch.from_numpy(clips[1]))
    assert single.shape == (3000,)
    assert torch.allclose(single, ref[1, :3000], atol=1e-4)
