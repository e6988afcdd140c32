"""`speechlm build synth`: text corpus -> audio + manifest; deterministic, parallel, resumable."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from speechlm.cli import main
from speechlm.errors import ConfigError, ManifestError, SpeechLMError, TTSError
from speechlm.jsonl import read_jsonl, write_jsonl
from speechlm.pipelines.synth import choose_params, synthesize_corpus
from speechlm.tts.espeak import EspeakTTS

VOICES = ["en-us+f3", "en-us+m1"]
SENTENCES = [
    "In the beginning was the word.",
    "The light shines in the darkness.",
    "A voice of one calling in the wilderness.",
    "Make straight the way for the Lord.",
    "He came as a witness to testify.",
    "Grace and truth came through him.",
]


def _text_file(tmp_path, lines, name="texts.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _manifest(out_dir):
    return read_jsonl(out_dir / "manifest.jsonl")


def _check_audio(out_dir, records, sample_rate=16000):
    for rec in records:
        data, sr = sf.read(out_dir / rec["audio"], dtype="float32")
        assert sr == sample_rate and data.ndim == 1
        assert abs(len(data) / sr - rec["duration"]) < 1e-3
        assert np.abs(data).max() > 0.05
    assert not list((out_dir / "audio").glob(".*.tmp"))


def test_text_file_to_manifest_with_failures_reported(tmp_path):
    src = _text_file(tmp_path, [SENTENCES[0], "", SENTENCES[1], "こんにちは世界", "...", SENTENCES[2]])
    out = tmp_path / "out"
    report = synthesize_corpus(src, out, voices=VOICES, rate=(140, 190), pitch=(30, 70),
                               progress=False)
    assert (report.total, report.done, report.skipped, report.failed) == (5, 3, 0, 2)
    records = _manifest(out)
    assert [r["id"] for r in records] == ["line-000001", "line-000003", "line-000006"]
    first = records[0]
    assert first["audio"] == "audio/line-000001.flac" and first["text"] == SENTENCES[0]
    assert first["lang"] == "en" and first["voice"] in VOICES
    assert first["speaker"] == f"espeak:{first['voice']}"
    assert 140 <= first["rate"] <= 190 and 30 <= first["pitch"] <= 70
    _check_audio(out, records)
    assert report.audio_seconds == pytest.approx(sum(r["duration"] for r in records), abs=1e-3)
    saved = json.loads((out / "synth_report.json").read_text())
    assert saved["finished"] and saved["failed"] == 2
    reasons = {f["id"]: f for f in saved["failures"]}
    assert set(reasons) == {"line-000004", "line-000005"}
    assert reasons["line-000004"]["line"] == 4 and "cannot read" in reasons["line-000004"]["reason"]
    assert "nothing to say" in reasons["line-000005"]["reason"]


def test_jsonl_fields_override_and_are_copied(tmp_path):
    items = [
        {"id": "a", "text": SENTENCES[0], "voice": "es+f3", "rate": 200, "pitch": 10,
         "translation": "En el principio era el verbo.", "speaker": "narrator"},
        {"id": "b", "text": SENTENCES[1], "lang": "en-x", "audio": "ignored.wav", "duration": 99},
        {"text": SENTENCES[2]},
    ]
    src = tmp_path / "items.jsonl"
    write_jsonl(src, items)
    out = tmp_path / "out"
    synthesize_corpus(src, out, voices=["en-us"], rate=150, audio_format="wav", progress=False)
    a, b, c = _manifest(out)
    assert (a["voice"], a["rate"], a["pitch"], a["lang"]) == ("es+f3", 200, 10, "es")
    assert a["translation"] == items[0]["translation"] and a["speaker"] == "narrator"
    assert (b["voice"], b["rate"], b["pitch"], b["lang"]) == ("en-us", 150, None, "en-x")
    assert b["audio"] == "audio/b.wav" and b["duration"] < 10 and b["speaker"] == "espeak:en-us"
    assert c["id"] == "line-000003"
    info = sf.info(out / b["audio"])
    assert info.format == "WAV" and info.subtype == "PCM_16" and info.samplerate == 16000
    _check_audio(out, [a, b, c])


def test_choices_depend_only_on_seed_and_id(tmp_path):
    picks = [choose_params(f"u{i}", 0, VOICES, (140, 190), (30, 70)) for i in range(40)]
    assert picks == [choose_params(f"u{i}", 0, VOICES, (140, 190), (30, 70)) for i in range(40)]
    assert {p[0] for p in picks} == set(VOICES) and len({p[1] for p in picks}) > 5
    assert picks != [choose_params(f"u{i}", 1, VOICES, (140, 190), (30, 70)) for i in range(40)]
    # the same item gets the same choices whatever else is in the input
    src_all = _text_file(tmp_path, SENTENCES[:4], "all.txt")
    src_one = tmp_path / "one.jsonl"
    write_jsonl(src_one, [{"id": "line-000003", "text": SENTENCES[2]}])
    synthesize_corpus(src_all, tmp_path / "all", voices=VOICES, rate=(140, 190), progress=False)
    synthesize_corpus(src_one, tmp_path / "one", voices=VOICES, rate=(140, 190), progress=False)
    rec_all = _manifest(tmp_path / "all")[2]
    rec_one = _manifest(tmp_path / "one")[0]
    assert rec_all == rec_one
    assert (tmp_path / "all/audio/line-000003.flac").read_bytes() == \
        (tmp_path / "one/audio/line-000003.flac").read_bytes()


def test_two_workers_match_one_process(tmp_path):
    src = _text_file(tmp_path, SENTENCES)
    one = synthesize_corpus(src, tmp_path / "one", voices=VOICES, rate=(140, 190), jobs=1,
                            progress=False)
    two = synthesize_corpus(src, tmp_path / "two", voices=VOICES, rate=(140, 190), jobs=2,
                            progress=False)
    assert one.done == two.done == len(SENTENCES)
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "two")
    for rec in _manifest(tmp_path / "one"):
        assert (tmp_path / "one" / rec["audio"]).read_bytes() == \
            (tmp_path / "two" / rec["audio"]).read_bytes()


def test_a_dead_worker_server_is_a_clear_error(tmp_path, monkeypatch):
    from concurrent.futures import ProcessPoolExecutor

    def server_died(self, *args, **kwargs):
        raise EOFError()  # what a forkserver that crashed while importing torch gives

    monkeypatch.setattr(ProcessPoolExecutor, "submit", server_died)
    src = _text_file(tmp_path, SENTENCES)
    with pytest.raises(SpeechLMError, match=r"a synthesis worker process died \(EOFError.*"
                                            r"rerun to resume"):
        synthesize_corpus(src, tmp_path / "out", voices=VOICES, jobs=2, progress=False)


def test_rerun_skips_finished_items(tmp_path):
    src = _text_file(tmp_path, SENTENCES[:3])
    out = tmp_path / "out"
    synthesize_corpus(src, out, voices=VOICES, progress=False)
    again = synthesize_corpus(src, out, voices=VOICES, progress=False)
    assert (again.done, again.skipped) == (0, 3)
    assert len(_manifest(out)) == 3


_CHILD = r"""
import sys, time
from speechlm.tts.espeak import EspeakTTS
real = EspeakTTS.synthesize
def slow(self, *args, **kwargs):  # slow enough to be killed half-way
    time.sleep(0.04)
    return real(self, *args, **kwargs)
EspeakTTS.synthesize = slow
from speechlm.pipelines.synth import synthesize_corpus
synthesize_corpus(sys.argv[1], sys.argv[2], voices=["en-us+f3", "en-us+m1"], rate=(140, 190),
                  progress=False)
"""


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path):
    lines = [f"{SENTENCES[i % len(SENTENCES)]} Number {i}." for i in range(40)]
    src = _text_file(tmp_path, lines)
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    written = len(read_jsonl(manifest, tolerate_torn_tail=True))
    assert 5 <= written < len(lines)

    report = synthesize_corpus(src, out, voices=VOICES, rate=(140, 190), progress=False)
    assert report.skipped == written and report.done == len(lines) - written
    records = _manifest(out)
    assert [r["id"] for r in records] == [f"line-{i:06d}" for i in range(1, len(lines) + 1)]
    _check_audio(out, records)
    # and the result equals an uninterrupted run
    clean = tmp_path / "clean"
    synthesize_corpus(src, clean, voices=VOICES, rate=(140, 190), progress=False)
    assert _manifest(clean) == records


def test_interrupted_in_process_run_resumes_exactly(tmp_path, monkeypatch):
    src = _text_file(tmp_path, SENTENCES)
    out = tmp_path / "out"
    real = EspeakTTS.synthesize
    calls = {"n": 0}

    def interrupt_on_fourth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EspeakTTS, "synthesize", interrupt_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        synthesize_corpus(src, out, voices=VOICES, progress=False)
    assert len(_manifest(out)) == 3
    assert json.loads((out / "synth_report.json").read_text())["finished"] is False
    monkeypatch.setattr(EspeakTTS, "synthesize", real)
    # a torn last line, as a kill during the write leaves it
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "line-000004", "audio": "au')
    report = synthesize_corpus(src, out, voices=VOICES, progress=False)
    assert (report.skipped, report.done) == (3, 3)
    clean = tmp_path / "clean"
    synthesize_corpus(src, clean, voices=VOICES, progress=False)
    assert _manifest(out) == _manifest(clean)


def test_strict_stops_at_the_first_failure(tmp_path):
    src = _text_file(tmp_path, [SENTENCES[0], "Привет мир", SENTENCES[1]])
    out = tmp_path / "out"
    with pytest.raises(TTSError, match=r"texts.txt:2: item 'line-000002'.*spell"):
        synthesize_corpus(src, out, voices=["en-us"], strict=True, progress=False)
    assert [r["id"] for r in _manifest(out)] == ["line-000001"]


def test_bad_input_fails_before_any_work(tmp_path):
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, [{"id": "x", "text": "a b"}, {"id": "y", "text": "c"}, {"id": "x", "text": "d"}])
    with pytest.raises(ManifestError, match=r"dup.jsonl:3: duplicate id 'x' \(first at line 1\)"):
        synthesize_corpus(dup, tmp_path / "o1", voices=["en-us"], progress=False)
    assert not (tmp_path / "o1" / "manifest.jsonl").exists()
    no_text = tmp_path / "no_text.jsonl"
    write_jsonl(no_text, [{"id": "x", "text": "fine"}, {"id": "y", "txt": "oops"}])
    with pytest.raises(ManifestError, match=r"no_text.jsonl:2: missing field 'text'"):
        synthesize_corpus(no_text, tmp_path / "o2", voices=["en-us"], progress=False)
    with pytest.raises(ManifestError, match=r"items:1: id '../evil' cannot be used as a file name"):
        synthesize_corpus([{"id": "../evil", "text": "hi"}], tmp_path / "o3", voices=["en-us"],
                          progress=False)
    with pytest.raises(TTSError, match="unknown eSpeak voice 'en-uss'"):
        synthesize_corpus([{"text": "hi"}], tmp_path / "o4", voices=["en-uss"], progress=False)
    with pytest.raises(TTSError, match="rate .* 20 is out of range"):
        synthesize_corpus([{"text": "hi"}], tmp_path / "o5", voices=["en-us"], rate=(20, 150),
                          progress=False)
    with pytest.raises(ConfigError, match="audio_format 'mp3'"):
        synthesize_corpus([{"text": "hi"}], tmp_path / "o6", audio_format="mp3")


def test_one_job_per_output_directory(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".synth.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SpeechLMError, match="another synthesis job is writing here"):
            synthesize_corpus([{"text": "hi"}], out, voices=["en-us"], progress=False)


def test_cli_builds_and_summarises(tmp_path, capsys):
    src = _text_file(tmp_path, SENTENCES[:2] + ["Привет мир"])
    out = tmp_path / "out"
    rc = main(["build", "synth", str(src), "--out", str(out), "--voices", "en-us+f3,en-us+m1",
               "--rate", "140:190", "--pitch", "50", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "2 synthesized" in printed and "1 failed" in printed and "real-time factor" in printed
    records = _manifest(out)
    assert {r["pitch"] for r in records} == {50} and len(records) == 2
    assert main(["build", "synth", "--list-voices", "ja"]) == 0
    assert "ja" in capsys.readouterr().out
    assert main(["build", "synth", str(src), "--out", str(out), "--voice", "xx-yy"]) == 2
    assert "unknown eSpeak voice 'xx-yy'" in capsys.readouterr().err
    assert os.path.exists(out / "synth_report.json")
