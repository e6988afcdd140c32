"""Audio loading, resampling and validation, including the bad inputs users actually have."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from speechlm.audio.checks import check_audio, load_checked
from speechlm.audio.io import audio_info, load_audio, resample
from speechlm.errors import (
    AudioDecodeError,
    AudioEmptyError,
    AudioError,
    AudioMissingError,
    AudioNonFiniteError,
    AudioSilentError,
    AudioTooLongError,
    AudioTooShortError,
)


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: torch.Tensor, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(wave.numel())))
    return float(np.argmax(spectrum) * sr / wave.numel())


def raises_naming(cls, path, fn, *args, **kwargs):
    with pytest.raises(cls) as info:
        fn(*args, **kwargs)
    assert str(path) in str(info.value)
    return info.value


# --------------------------------------------------------------------------- good files


def test_audio_info_reads_header(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.zeros((24000, 2), np.float32), 16000, subtype="PCM_16")
    info = audio_info(path)
    assert (info.sample_rate, info.num_frames, info.channels, info.format) == (
        16000,
        24000,
        2,
        "WAV",
    )
    assert info.duration == pytest.approx(1.5)
    assert info.path == str(path)


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_16")])
def test_lossless_file_loads_exactly(tmp_path, fmt, subtype):
    path = tmp_path / f"speech.{fmt}"
    x = sine(220, 1.0, 16000) + sine(1250, 1.0, 16000, amp=0.2)
    sf.write(path, x, 16000, subtype=subtype)
    expected, _ = sf.read(path, dtype="float32")
    wave = load_audio(path)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert torch.equal(wave, torch.from_numpy(expected))


def test_offset_and_duration_read_the_right_samples(tmp_path):
    path = tmp_path / "ramp.wav"
    x = (np.arange(32000) % 1000 / 1000.0 - 0.5).astype(np.float32)
    sf.write(path, x, 16000, subtype="FLOAT")
    seg = load_audio(path, offset=0.5, duration=0.25)
    assert torch.equal(seg, torch.from_numpy(x[8000:12000]))
    # No duration: to the end. A duration past the end: what is there.
    assert torch.equal(load_audio(path, offset=1.75), torch.from_numpy(x[28000:]))
    assert torch.equal(load_audio(path, offset=1.5, duration=10.0), torch.from_numpy(x[24000:]))


def test_8k_stereo_loads_as_mono_16k(tmp_path):
    path = tmp_path / "stereo8k.wav"
    left, right = sine(440, 2.0, 8000, amp=0.6), sine(440, 2.0, 8000, amp=0.2)
    sf.write(path, np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    wave = load_audio(path, 16000)
    assert wave.numel() == 32000
    assert peak_hz(wave, 16000) == pytest.approx(440, abs=1)
    mono = torch.from_numpy((left + right) / 2)
    assert torch.allclose(wave, AF.resample(mono, 8000, 16000), atol=1e-6)
    # Away from the edges the 16 kHz wave is the same sine at amplitude (0.6 + 0.2) / 2.
    t = np.arange(32000) / 16000
    assert np.abs(wave.numpy() - 0.4 * np.sin(2 * np.pi * 440 * t))[200:-200].max() < 1e-3


def test_resample_matches_torchaudio_and_caches(tmp_path):
    x = torch.from_numpy(sine(1000, 0.5, 44100) + sine(3000, 0.5, 44100, amp=0.1))
    for new in (16000, 22050, 48000):
        assert torch.allclose(resample(x, 44100, new), AF.resample(x, 44100, new), atol=1e-6)
    assert resample(x, 44100, 44100) is x


def test_48k_mp3_loads_at_16k(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1)")
    path = tmp_path / "voice48k.mp3"
    sf.write(path, sine(1000, 2.0, 48000), 48000, format="MP3")
    info = audio_info(path)
    assert (info.sample_rate, info.format) == (48000, "MP3")
    wave = load_audio(path)
    assert abs(wave.numel() - 32000) <= 16000 * 0.05  # codec delay/padding is a few ms at most
    assert peak_hz(wave, 16000) == pytest.approx(1000, abs=2)
    assert float(wave.abs().max()) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    "name,kwargs",
    [("seg.mp3", {"format": "MP3"}), ("seg.opus", {"format": "OGG", "subtype": "OPUS"})],
)
def test_compressed_segment_is_sample_exact(tmp_path, name, kwargs):
    # libsndfile's MP3 seek lands hundreds of samples off on this file; the segment
    # must still equal the same samples cut from a full decode.
    if kwargs["format"] == "MP3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    path = tmp_path / name
    t = np.arange(96000) / 48000
    x = (0.5 * np.sin(2 * np.pi * 1000 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    sf.write(path, x, 48000, **kwargs)
    full = load_audio(path, 48000)
    assert torch.equal(load_audio(path, 48000, offset=0.5, duration=0.5), full[24000:48000])
    assert torch.equal(load_audio(path, 48000, offset=1.9), full[91200:])


def test_ogg_vorbis_loads(tmp_path):
    path = tmp_path / "clip.ogg"
    sf.write(path, sine(600, 1.0, 22050), 22050, format="OGG")
    wave = load_audio(path)
    assert abs(wave.numel() - 16000) <= 160
    assert peak_hz(wave, 16000) == pytest.approx(600, abs=2)


def test_one_hour_file_reads_only_the_segment(tmp_path):
    sr = 8000
    path = tmp_path / "hour.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for _ in range(6):  # 6 x 10 min
            f.write(rng.integers(-20000, 20000, size=600 * sr, dtype=np.int16))
    info = audio_info(path)
    assert info.duration == pytest.approx(3600.0) and info.num_frames == 3600 * sr

    expected, _ = sf.read(path, start=1800 * sr, stop=1802 * sr, dtype="float32")
    tracemalloc.start()
    try:
        seg = load_audio(path, sr, offset=1800.0, duration=2.0)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(seg, torch.from_numpy(expected))
    assert peak_bytes < 5_000_000  # the whole hour as float32 would be 115 MB
    seg16 = load_audio(path, 16000, offset=1800.0, duration=2.0)
    assert torch.allclose(seg16, AF.resample(torch.from_numpy(expected), sr, 16000), atol=1e-6)


# --------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    err = raises_naming(AudioMissingError, path, load_audio, path)
    assert "not found" in str(err)
    raises_naming(AudioMissingError, path, audio_info, path)


@pytest.mark.parametrize("name", ["corrupt.wav", "corrupt.flac"])
def test_random_bytes_are_a_decode_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = raises_naming(AudioDecodeError, path, load_audio, path)
    assert "re-encode" in str(err)
    raises_naming(AudioDecodeError, path, audio_info, path)


def test_text_file_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a transcript, not audio\n" * 20)
    raises_naming(AudioDecodeError, path, load_audio, path)


def test_zero_byte_file_is_empty(tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    err = raises_naming(AudioEmptyError, path, load_audio, path)
    assert "0 bytes" in str(err)


def test_header_only_wav_is_empty(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, np.float32), 16000)
    assert os.path.getsize(path) > 0
    assert audio_info(path).num_frames == 0
    raises_naming(AudioEmptyError, path, load_audio, path)


def test_offset_past_end_and_bad_segment(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, sine(300, 1.0, 16000), 16000)
    err = raises_naming(AudioEmptyError, path, load_audio, path, offset=2.0)
    assert "offset 2.000" in str(err)
    raises_naming(AudioEmptyError, path, load_audio, path, offset=0.5, duration=0.0)
    raises_naming(AudioError, path, load_audio, path, offset=-1.0)


def test_directory_is_a_decode_error(tmp_path):
    raises_naming(AudioDecodeError, tmp_path, load_audio, tmp_path)


def test_nan_file_loads_but_fails_the_check(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    assert torch.isnan(load_audio(path)).all()
    err = raises_naming(AudioNonFiniteError, path, load_checked, path)
    assert "16000 of 16000" in str(err)
    x = torch.ones(100) * 0.1
    x[3] = float("inf")
    raises_naming(AudioNonFiniteError, "x.wav", check_audio, x, 16000, "x.wav")


# --------------------------------------------------------------------------- checks


def test_silence_is_rejected_and_quiet_speech_is_not(tmp_path):
    path = tmp_path / "silence.wav"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    err = raises_naming(AudioSilentError, path, load_checked, path)
    assert "-60 dBFS" in str(err)
    # Non-zero but below -60 dBFS RMS (a dither floor) is silent too.
    raises_naming(AudioSilentError, "a.wav", check_audio, torch.full((1600,), 1e-4), 16000, "a.wav")
    quiet = torch.from_numpy(sine(200, 1.0, 16000, amp=0.003))  # about -53 dBFS RMS
    check_audio(quiet, 16000, "quiet.wav")
    raises_naming(
        AudioSilentError, "quiet.wav", check_audio, quiet, 16000, "quiet.wav", silence_dbfs=-40.0
    )
    check_audio(torch.zeros(100), 16000, "z.wav", silence_dbfs=None)


def test_duration_limits_name_the_limit(tmp_path):
    path = tmp_path / "two_seconds.wav"
    sf.write(path, sine(300, 2.0, 8000), 8000)
    err = raises_naming(AudioTooShortError, path, load_checked, path, min_duration=3.0)
    assert "min_duration 3 s" in str(err) and "2.000 s" in str(err)
    err = raises_naming(AudioTooLongError, path, load_checked, path, max_duration=1.5)
    assert "max_duration 1.5 s" in str(err)
    wave = load_checked(path, min_duration=1.0, max_duration=2.5)
    assert wave.numel() == 32000
    # Limits apply to the segment actually loaded.
    raises_naming(AudioTooShortError, path, load_checked, path, offset=1.5, min_duration=1.0)


def test_empty_wave_check():
    raises_naming(AudioEmptyError, "e.wav", check_audio, torch.zeros(0), 16000, "e.wav")


def test_check_audio_warns_once_per_clip_of_an_absurd_peak_then_counts(caplog, monkeypatch):
    import speechlm.audio.checks as checks

    monkeypatch.setattr(checks, "_peak_warnings", 0)
    wave = 0.1 * torch.sin(torch.arange(16000) / 10.0)
    with caplog.at_level("WARNING", logger="speechlm.audio.checks"):
        check_audio(wave * 3, 16000, "hot.wav")  # 3x over: a hot mix, no warning
        assert caplog.messages == []
        for i in range(7):
            check_audio(wave * 32767, 16000, f"loud{i}.wav")  # still usable: no error
    assert [m.split(":")[0] for m in caplog.messages[:5]] == [f"loud{i}.wav" for i in range(5)]
    assert "peak level 3277 (+70.3 dBFS)" in caplog.messages[0]
    assert caplog.messages[5].startswith("further clips with an absurd peak level")
    assert len(caplog.messages) == 6
