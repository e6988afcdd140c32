"""Long-audio segmentation: energy VAD, WADA-SNR, CTC forced alignment, and the resumable
`speechlm build segment` job."""

import json
import math
from itertools import pairwise

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.audio.quality import wada_snr
from speechlm.audio.segment import (
    WordSpan,
    align_transcript,
    group_words,
    split_on_silence,
    transcript_token_ids,
)
from speechlm.errors import SpeechLMError

SR = 16000
SENTENCES = ["In the beginning God created the heavens and the earth.",
             "And the earth was without form.",
             "And God said, Let there be light: and there was light.",
             "And God saw the light, that it was good."]


@pytest.fixture(scope="module")
def speech():
    """eSpeak sentences, trimmed to their first and last audible sample."""
    from speechlm.tts.espeak import EspeakTTS

    tts = EspeakTTS("en-us", sample_rate=SR)
    out = []
    for text in SENTENCES:
        wave = tts.synthesize(text)
        audible = np.nonzero(np.abs(wave) > 1e-3)[0]
        out.append(wave[audible[0]:audible[-1] + 1])
    return out


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def with_noise(wave: np.ndarray, level: float = 1e-3, seed: int = 0) -> np.ndarray:
    return (wave + level * np.random.default_rng(seed).standard_normal(wave.shape)).astype(np.float32)


def test_vad_finds_each_sentence_with_padding(speech):
    a, b = speech[0], speech[1]
    wave = with_noise(np.concatenate([silence(1.0), a, silence(1.5), b, silence(0.8)]))
    ranges = split_on_silence(torch.from_numpy(wave), SR)
    assert len(ranges) == 2
    spans = [(1.0, 1.0 + len(a) / SR), (2.5 + len(a) / SR, 2.5 + (len(a) + len(b)) / SR)]
    for (start, end), (s, e) in zip(ranges, spans, strict=True):
        # Covers the speech with about 300 ms of context on each side.
        assert s - 0.45 <= start / SR <= s - 0.15
        assert e + 0.15 <= end / SR <= e + 0.45
    assert ranges[0][1] <= ranges[1][0]


def test_vad_bridges_short_pauses_and_splits_long_ones(speech):
    a, b = speech[0], speech[1]
    short = with_noise(np.concatenate([silence(0.5), a, silence(0.2), b, silence(0.5)]))
    assert len(split_on_silence(torch.from_numpy(short), SR)) == 1
    # A 0.5 s pause splits; the two paddings (300 ms each) would overlap and meet in the middle.
    split = with_noise(np.concatenate([silence(0.5), a, silence(0.5), b, silence(0.5)]))
    ranges = split_on_silence(torch.from_numpy(split), SR)
    assert len(ranges) == 2 and ranges[0][1] == ranges[1][0]
    assert abs(ranges[0][1] / SR - (0.5 + len(a) / SR + 0.25)) < 0.1


def test_vad_on_silence_and_with_a_fixed_threshold(speech):
    assert split_on_silence(torch.zeros(SR * 3), SR) == []
    assert split_on_silence(torch.zeros(0), SR) == []
    wave = with_noise(np.concatenate([silence(1.0), speech[1], silence(1.0)]), level=0.01)
    # A threshold above the speech level finds nothing; one between noise and speech finds it.
    assert split_on_silence(torch.from_numpy(wave), SR, threshold_db=0.0) == []
    assert len(split_on_silence(torch.from_numpy(wave), SR, threshold_db=-30.0)) == 1


def test_long_audio_is_cut_below_the_limit(speech):
    # 50 s of noise: no silence anywhere -> 20 s chunks (IndicWav2Vec's rule).
    noise = 0.1 * torch.randn(50 * SR, generator=torch.Generator().manual_seed(0))
    ranges = split_on_silence(noise, SR, max_segment_s=20.0)
    assert [round((b - a) / SR, 2) for a, b in ranges] == [19.98, 19.98, 10.04]
    assert ranges[0][0] == 0 and ranges[-1][1] == noise.numel()
    # Continuous speech (pauses < 0.3 s) for ~45 s: cut at quiet frames, every piece <= 20 s.
    talk = np.concatenate([np.concatenate([s, silence(0.12)]) for s in speech * 4])
    ranges = split_on_silence(torch.from_numpy(with_noise(talk)), SR, max_segment_s=20.0)
    lengths = [(b - a) / SR for a, b in ranges]
    assert len(ranges) >= 3 and max(lengths) <= 20.0 and min(lengths) > 1.0
    assert sum(lengths) > 0.95 * len(talk) / SR
    levels = [float(np.sqrt(np.mean(talk[max(0, a - 240):a + 240] ** 2))) for a, _ in ranges[1:]]
    assert max(levels) < 0.01  # every cut falls in a pause, not inside a word


def test_wada_snr_tracks_known_noise_levels(speech):
    clean = np.concatenate(speech[:2])
    rng = np.random.default_rng(0)
    estimates = []
    for snr in (0, 5, 10, 20, 30):
        noise = rng.standard_normal(clean.shape)
        noise *= np.sqrt(np.mean(clean ** 2) / np.mean(noise ** 2) / 10 ** (snr / 10))
        estimates.append(wada_snr(torch.from_numpy((clean + noise).astype(np.float32))))
    assert estimates == sorted(estimates)
    for snr, estimate in zip((5, 10, 20), estimates[1:4], strict=True):
        assert abs(estimate - snr) < 3.0, (snr, estimate)
    assert wada_snr(clean) > 50
    assert wada_snr(np.zeros(100)) == -math.inf and wada_snr(np.zeros(0)) == -math.inf


# --- forced alignment ---------------------------------------------------------------------

VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
         **{c: 5 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}


def frames_for(words_at: list[tuple[str, int]], total: int) -> torch.Tensor:
    """Log-probs [total, V] that say each word's letters from its start frame (2 frames each),
    with a delimiter after it and blanks elsewhere, plus a little noise."""
    labels = [0] * total
    for word, start in words_at:
        f = start
        for ch in word:
            labels[f] = labels[f + 1] = VOCAB[ch]
            f += 3  # letter, letter, blank
        labels[f] = VOCAB["|"]
    logits = 0.3 * torch.randn(total, len(VOCAB), generator=torch.Generator().manual_seed(0))
    logits[torch.arange(total), torch.tensor(labels)] += 6.0
    return logits.log_softmax(-1)


def test_forced_alignment_places_each_word():
    placed = [("hello", 10), ("big", 60), ("world", 130)]
    log_probs = frames_for(placed, 200)
    ids = transcript_token_ids("hello big world", VOCAB)
    assert ids[:6] == [VOCAB[c] for c in "hello"] + [VOCAB["|"]]
    spans = align_transcript(log_probs, ids, word_delimiter_id=VOCAB["|"],
                             words=["hello", "big", "world"], frame_shift_s=0.02)
    assert [s.word for s in spans] == ["hello", "big", "world"]
    for span, (word, start) in zip(spans, placed, strict=True):
        assert span.start_frame == start
        assert span.end_frame == start + 3 * len(word) - 1  # last letter's second frame + 1
        assert span.start_s == pytest.approx(start * 0.02)
        assert span.score > 0.9
    # Frame times from chunked emissions override the fixed shift.
    times = [10.0 + 0.02 * f for f in range(200)]
    shifted = align_transcript(log_probs, ids, word_delimiter_id=VOCAB["|"], frame_times=times)
    assert shifted[1].start_s == pytest.approx(10.0 + 60 * 0.02)


def test_forced_alignment_errors():
    with pytest.raises(SpeechLMError, match="lacks: 'ß'"):
        transcript_token_ids("straße", VOCAB)
    ids = transcript_token_ids("hello world", VOCAB)
    with pytest.raises(SpeechLMError, match="has 8 CTC frames but the transcript needs at least 12"):
        align_transcript(torch.zeros(8, len(VOCAB)).log_softmax(-1), ids)


def test_group_words_splits_at_the_longest_pauses():
    words = [WordSpan(w, 0, 0, s, e, 0.9) for w, s, e in
             [("a", 0.5, 2.0), ("b", 2.1, 4.0), ("c", 6.0, 7.5), ("d", 7.6, 9.0),
              ("e", 9.3, 11.0), ("f", 14.0, 15.0)]]
    utts = group_words(words, max_segment_s=6.0, pad_s=0.2, total_s=15.5)
    assert [u.text for u in utts] == ["a b", "c d e", "f"]
    assert all(u.end_s - u.start_s <= 6.0 for u in utts)
    assert utts[0].start_s == pytest.approx(0.3) and utts[-1].end_s == pytest.approx(15.2)
    assert utts[1].end_s <= utts[2].start_s
    assert [u.text for u in group_words(words, max_segment_s=60.0)] == ["a b c d e f"]


# --- the pipeline --------------------------------------------------------------------------


@pytest.fixture
def long_recordings(tmp_path, speech):
    """A 'lecture' (4 sentences with pauses), a very noisy recording and a missing file."""
    lecture = with_noise(np.concatenate(
        [silence(0.6)] + [np.concatenate([s, silence(0.9)]) for s in speech]))
    sf.write(tmp_path / "lecture.wav", lecture, SR)
    noisy = np.concatenate([silence(0.5), speech[1], silence(0.5)])
    noisy = noisy + 0.5 * np.sqrt(np.mean(speech[1] ** 2)) * np.random.default_rng(1).standard_normal(
        noisy.shape).astype(np.float32)
    sf.write(tmp_path / "noisy.wav", noisy.astype(np.float32), SR)
    manifest = tmp_path / "in.jsonl"
    records = [
        {"id": "lecture", "audio": "lecture.wav", "lang": "en", "speaker": "s1",
         "text": " ".join(SENTENCES)},
        {"id": "noisy", "audio": "noisy.wav"},
        {"id": "gone", "audio": "missing.wav"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest, lecture


def test_segment_job_cuts_filters_and_resumes(tmp_path, long_recordings):
    from speechlm.audio.io import load_audio
    from speechlm.pipelines.segment import segment_manifest

    manifest, lecture = long_recordings
    out = tmp_path / "out"
    # The lecture (~14 s) is longer than the 8 s limit: VAD cuts it, without its text.
    report = segment_manifest(manifest, out, max_segment_s=8.0, min_snr_db=15.0, progress=False)
    assert (report.recordings, report.done, report.failed) == (3, 2, 1)
    assert "missing.wav" in report.failures[0]["reason"]
    assert report.dropped_low_snr == 1  # the noisy recording (about 6 dB)
    assert report.text_dropped == 1
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"lecture_{k:04d}" for k in range(4)]
    for row in rows:
        assert row["source"] == "lecture" and row["lang"] == "en" and row["speaker"] == "s1"
        assert "text" not in row and row["snr_db"] > 15
        piece = load_audio(row["audio"], SR, offset=row["offset"], duration=row["duration"])
        start = int(round(row["offset"] * SR))
        expected = torch.from_numpy(lecture[start:start + piece.numel()])
        assert torch.allclose(piece, expected, atol=1 / 32768)  # the file is 16-bit PCM
    saved = json.loads((out / "segment_report.json").read_text())
    assert saved["segments"] == 4 and saved["finished"] is True

    # A run killed before finishing "lecture": its done line and last segment are lost.
    (out / "done.jsonl").write_text("")
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    again = segment_manifest(manifest, out, max_segment_s=8.0, progress=False)
    assert again.segments == 2 and again.failed == 1
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids == [f"lecture_{k:04d}" for k in range(4)]
    third = segment_manifest(manifest, out, max_segment_s=8.0, progress=False)
    assert third.already_done == 2 and third.segments == 0


def test_segment_job_with_forced_alignment_keeps_text(tmp_path, long_recordings, tiny_ckpt):
    from speechlm.pipelines.segment import segment_manifest
    from speechlm.testing.tiny_tokenizers import CTC_CHARACTERS
    from speechlm.text.normalize import normalize_transcript

    manifest, _ = long_recordings
    model_dir = tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS)
    # The tiny checkpoint has no trained CTC head: loading it initialises one from the global
    # RNG, which earlier tests leave in any state; seed it so the alignments are always these.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        report = segment_manifest(manifest, tmp_path / "aligned", max_segment_s=6.0,
                                  min_snr_db=None, align_with=model_dir, device="cpu",
                                  progress=False)
    assert report.aligned == 1 and report.failed == 1
    rows = [json.loads(line) for line in (tmp_path / "aligned" / "manifest.jsonl").read_text()
            .splitlines() if json.loads(line)["source"] == "lecture"]
    # An untrained model places words badly, but the text is all there, in order, and every
    # segment is within the limit and inside the file.
    assert " ".join(r["text"] for r in rows) == normalize_transcript(" ".join(SENTENCES), "en")
    assert len(rows) >= 3
    assert all(r["duration"] <= 6.0 and 0 <= r["align_score"] <= 1 for r in rows)
    assert all(a["offset"] + a["duration"] <= b["offset"] + 1e-6 for a, b in pairwise(rows))


def test_build_segment_command(tmp_path, long_recordings, capsys):
    from speechlm.cli import main

    manifest, _ = long_recordings
    assert main(["build", "segment", str(manifest), "--out", str(tmp_path / "o"),
                 "--no-progress", "--no-snr-filter"]) == 0
    out = capsys.readouterr().out
    assert "0 dropped below the SNR threshold" in out and "1 failed" in out
    assert main(["build", "segment", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "o2")]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
