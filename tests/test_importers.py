"""Manifest importers: each corpus layout built for real in tmp_path, imported, checked."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechlm.data.importers import DatasetImportError, import_dataset
from speechlm.errors import ConfigError
from speechlm.jsonl import read_jsonl

SR = 16000


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32")


def write_audio(path: Path, seconds: float, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds), SR, **kwargs)
    return path


def by_id(manifest: Path) -> dict[str, dict]:
    records = read_jsonl(manifest)
    assert len({r["id"] for r in records}) == len(records)
    return {r["id"]: r for r in records}


# ---------------------------------------------------------------- LibriSpeech


def make_librispeech(root: Path, split: str = "dev-clean") -> Path:
    """Two speakers; one transcript line without its flac, one with an empty transcript."""
    split_dir = root / "LibriSpeech" / split
    ch1 = split_dir / "19" / "198"
    write_audio(ch1 / "19-198-0000.flac", 1.0)
    write_audio(ch1 / "19-198-0001.flac", 0.5)
    (ch1 / "19-198.trans.txt").write_text(
        "19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n19-198-0002 NO AUDIO HERE\n")
    ch2 = split_dir / "26" / "495"
    write_audio(ch2 / "26-495-0000.flac", 0.75)
    write_audio(ch2 / "26-495-0001.flac", 0.25)
    (ch2 / "26-495.trans.txt").write_text("26-495-0000 THE SECOND SPEAKER\n26-495-0001\n")
    return split_dir


def test_librispeech_import_records_and_skips(tmp_path):
    split_dir = make_librispeech(tmp_path)
    out = tmp_path / "out" / "libri.jsonl"
    report = import_dataset("librispeech", split_dir, out)

    recs = by_id(out)
    assert sorted(recs) == ["19-198-0000", "19-198-0001", "26-495-0000"]
    assert recs["19-198-0000"]["text"] == "NORTHANGER ABBEY"
    assert recs["26-495-0000"]["speaker"] == "26"
    assert recs["19-198-0001"]["speaker"] == "19"
    assert all(r["lang"] == "en" for r in recs.values())
    assert recs["19-198-0000"]["duration"] == pytest.approx(1.0, abs=1e-6)
    assert recs["26-495-0000"]["duration"] == pytest.approx(0.75, abs=1e-6)
    for r in recs.values():
        assert os.path.isabs(r["audio"]) and Path(r["audio"]).is_file()
        assert "offset" not in r

    assert report.n_written == 3 and report.n_skipped == 2
    assert report.by_reason == {"missing_audio": 1, "empty_text": 1}
    assert "19-198.trans.txt:3" in report.examples["missing_audio"][0]
    assert "26-495.trans.txt:2" in report.examples["empty_text"][0]
    assert report.hours == pytest.approx(2.25 / 3600)


def test_librispeech_root_forms_and_split_choice(tmp_path):
    make_librispeech(tmp_path, "dev-clean")
    out = tmp_path / "m.jsonl"
    # The parent of one split, and the directory holding LibriSpeech/, both work.
    assert import_dataset("librispeech", tmp_path / "LibriSpeech", out).n_written == 3
    assert import_dataset("librispeech", tmp_path, out, split="dev-clean").n_written == 3
    make_librispeech(tmp_path, "test-clean")
    with pytest.raises(ConfigError, match="several LibriSpeech splits.*dev-clean, test-clean"):
        import_dataset("librispeech", tmp_path / "LibriSpeech", out)
    with pytest.raises(ConfigError, match="no LibriSpeech split 'train-other-500'"):
        import_dataset("librispeech", tmp_path, out, split="train-other-500")


def test_librispeech_strict_names_line_and_writes_nothing(tmp_path):
    split_dir = make_librispeech(tmp_path)
    out = tmp_path / "strict.jsonl"
    with pytest.raises(DatasetImportError, match=r"19-198\.trans\.txt:3: .*19-198-0002\.flac"):
        import_dataset("librispeech", split_dir, out, strict=True)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict.jsonl")]


def test_limit_relative_paths_and_lang_override(tmp_path):
    split_dir = make_librispeech(tmp_path)
    out = tmp_path / "sub" / "rel.jsonl.gz"
    report = import_dataset("librispeech", split_dir, out, relative=True, limit=2, lang="en-US")
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["19-198-0000", "19-198-0001"]
    assert report.n_written == 2
    for r in recs:
        assert not os.path.isabs(r["audio"])
        assert (out.parent / r["audio"]).resolve().is_file()
        assert r["lang"] == "en-US"


# ---------------------------------------------------------------- Common Voice

CV_HEADER = ("client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\t"
             "age\tgender\taccents\tvariant\tlocale\tsegment")


def cv_row(client, clip, sentence, locale="es"):
    return f"{client}\t{clip}\tsid\t{sentence}\t\t2\t0\ttwenties\t\t\t\t{locale}\t"


def make_commonvoice(root: Path) -> Path:
    lang_dir = root / "cv-corpus-17.0" / "es"
    clips = lang_dir / "clips"
    ext, fmt = ("mp3", "MP3") if "MP3" in sf.available_formats() else ("wav", "WAV")
    for name, seconds in [("common_voice_es_1", 0.6), ("common_voice_es_2", 0.9),
                          ("common_voice_es_3", 0.4), ("common_voice_es_9", 0.5)]:
        write_audio(clips / f"{name}.{ext}", seconds, format=fmt)
    rows = [
        cv_row("spk_a", f"common_voice_es_1.{ext}", 'Dijo "hola" y se fue.'),
        cv_row("spk_b", f"common_voice_es_2.{ext}", '"Comillas" al principio'),
        cv_row("spk_a", f"common_voice_es_3.{ext}", ""),                      # empty sentence
        cv_row("spk_c", f"common_voice_es_4.{ext}", "No existe el audio."),   # missing clip
    ]
    (lang_dir / "train.tsv").write_text(CV_HEADER + "\n" + "\n".join(rows) + "\n")
    (lang_dir / "dev.tsv").write_text(
        CV_HEADER + "\n" + cv_row("spk_d", f"common_voice_es_9.{ext}", "Validación.") + "\n")
    return lang_dir


def test_commonvoice_quotes_speakers_lang_and_skips(tmp_path):
    lang_dir = make_commonvoice(tmp_path)
    out = tmp_path / "cv.jsonl"
    report = import_dataset("commonvoice", lang_dir, out, split="train")
    recs = by_id(out)
    assert sorted(recs) == ["common_voice_es_1", "common_voice_es_2"]
    # Quotes are text, not CSV quoting (Common Voice TSVs are unquoted).
    assert recs["common_voice_es_1"]["text"] == 'Dijo "hola" y se fue.'
    assert recs["common_voice_es_2"]["text"] == '"Comillas" al principio'
    assert recs["common_voice_es_1"]["speaker"] == "spk_a"
    assert recs["common_voice_es_2"]["lang"] == "es"
    assert recs["common_voice_es_1"]["duration"] == pytest.approx(0.6, abs=0.03)
    assert recs["common_voice_es_2"]["duration"] == pytest.approx(0.9, abs=0.03)
    assert report.by_reason == {"empty_text": 1, "missing_audio": 1}
    assert "train.tsv:4" in report.examples["empty_text"][0]
    assert "train.tsv:5" in report.examples["missing_audio"][0]


def test_commonvoice_split_alias_tsv_source_and_errors(tmp_path):
    lang_dir = make_commonvoice(tmp_path)
    out = tmp_path / "cv.jsonl"
    import_dataset("commonvoice", lang_dir, out, split="validation", lang="es-ES")
    assert [(r["id"], r["text"], r["lang"]) for r in read_jsonl(out)] == [
        ("common_voice_es_9", "Validación.", "es-ES")]
    assert import_dataset("commonvoice", lang_dir / "train.tsv", out).n_written == 2
    with pytest.raises(ConfigError, match=r"test\.tsv: not found.*dev, train"):
        import_dataset("commonvoice", lang_dir, out, split="test")
    with pytest.raises(DatasetImportError, match=r"train\.tsv:4: .*no transcript"):
        import_dataset("commonvoice", lang_dir, out, strict=True)


# ---------------------------------------------------------------- Kaldi


def make_kaldi(root: Path, *, segments: bool = True) -> Path:
    wav = root / "s5" / "wav"
    write_audio(wav / "rec1.wav", 2.0)
    write_audio(wav / "rec2.wav", 1.0)
    data = root / "s5" / "data" / "train"
    data.mkdir(parents=True)
    (data / "wav.scp").write_text(
        f"rec1 {wav / 'rec1.wav'}\n"
        "rec2 wav/rec2.wav\n"                                   # relative to s5/
        "rec3 sox /corpus/rec3.sph -t wav -r 16000 - |\n"       # pipe
        "rec4 /exp/raw_wav.1.ark:1234\n")                       # extended filename
    if segments:
        (data / "segments").write_text(
            "utt1 rec1 0.00 0.80\nutt2 rec1 0.80 2.00\nutt3 rec2 0.0 -1\n"
            "utt4 rec3 0.0 1.0\nutt5 rec1 1.50 3.50\nutt6 rec4 0 1\nutt1 rec1 0.0 0.5\n")
        texts = {"utt1": "hello there", "utt2": "general kenobi", "utt3": "third one",
                 "utt4": "piped", "utt5": "too long", "utt6": "archived", "utt7": "orphan"}
        spk = {"utt1": "alice", "utt2": "bob", "utt3": "alice", "utt4": "x", "utt5": "x",
               "utt6": "x", "utt7": "x"}
    else:
        texts = {"rec1": "whole one", "rec2": "whole two", "rec3": "piped", "rec4": "ark"}
        spk = {"rec1": "alice", "rec2": "bob", "rec3": "x", "rec4": "x"}
    (data / "text").write_text("".join(f"{k} {v}\n" for k, v in texts.items()))
    (data / "utt2spk").write_text("".join(f"{k} {v}\n" for k, v in spk.items()))
    (data / "spk2gender").write_text("alice f\nbob m\n")
    return data


def test_kaldi_segments_pipes_and_bad_segments(tmp_path, monkeypatch):
    data = make_kaldi(tmp_path)
    monkeypatch.chdir(tmp_path)  # rec2's relative path resolves via the recipe dir (s5/)
    out = tmp_path / "kaldi.jsonl"
    report = import_dataset("kaldi", data, out, lang="en")
    recs = by_id(out)
    assert sorted(recs) == ["utt1", "utt2", "utt3"]
    assert "offset" not in recs["utt1"]  # offset 0 is the default
    assert recs["utt1"]["duration"] == pytest.approx(0.8)
    assert recs["utt2"]["offset"] == pytest.approx(0.8)
    assert recs["utt2"]["duration"] == pytest.approx(1.2)
    assert recs["utt3"]["duration"] == pytest.approx(1.0)  # end -1: to the end of rec2
    assert recs["utt3"]["audio"] == str(tmp_path / "s5" / "wav" / "rec2.wav")
    assert recs["utt2"]["speaker"] == "bob" and recs["utt1"]["text"] == "hello there"
    assert report.by_reason == {"unsupported_audio": 2, "bad_segment": 1, "missing_audio": 1,
                                "duplicate_id": 1}
    assert "segments:7" in report.examples["duplicate_id"][0]
    unsupported = " ".join(report.examples["unsupported_audio"])
    assert "pipe command" in unsupported and "wav.scp:3" in unsupported
    assert "extended filename" in unsupported
    assert "segments:5" in report.examples["bad_segment"][0]
    assert "utt7" in report.examples["missing_audio"][0]
    with pytest.raises(DatasetImportError, match=r"segments:4: .*pipe command"):
        import_dataset("kaldi", data, tmp_path / "strict.jsonl", strict=True)


def test_kaldi_without_segments_and_audio_root(tmp_path):
    data = make_kaldi(tmp_path, segments=False)
    out = tmp_path / "kaldi.jsonl"
    report = import_dataset("kaldi", data, out, audio_root=tmp_path / "s5")
    recs = by_id(out)
    assert sorted(recs) == ["rec1", "rec2"]
    assert recs["rec1"]["duration"] == pytest.approx(2.0)
    assert recs["rec2"]["text"] == "whole two" and recs["rec2"]["speaker"] == "bob"
    assert report.by_reason == {"unsupported_audio": 2}
    with pytest.raises(ConfigError, match="no wav.scp"):
        import_dataset("kaldi", tmp_path, out)


def test_unreadable_and_empty_audio_are_skipped(tmp_path):
    data = tmp_path / "data"
    good = write_audio(tmp_path / "good.wav", 0.5)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"this is not a wav file at all" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype="float32"), SR)
    data.mkdir()
    (data / "wav.scp").write_text(f"a {good}\nb {corrupt}\nc {empty}\n")
    (data / "text").write_text("a fine\nb broken\nc nothing\n")
    out = tmp_path / "m.jsonl"
    report = import_dataset("kaldi", data, out)
    assert [r["id"] for r in read_jsonl(out)] == ["a"]
    assert report.by_reason == {"unreadable_audio": 1, "empty_audio": 1}
    assert "wav.scp:2" in report.examples["unreadable_audio"][0]
    # Without probing, headers are not read: existence is all that is checked.
    report = import_dataset("kaldi", data, out, probe=False)
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]
    assert report.n_without_duration == 3 and report.hours == 0


# ---------------------------------------------------------------- Hugging Face datasets


def test_hf_saved_datasetdict_embedded_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    files = [write_audio(src / f"clip{i}.wav", 0.3 + 0.2 * i) for i in range(3)]
    ds = datasets.Dataset.from_dict({
        "id": ["a/1", "b", "c"],
        "audio": [str(f) for f in files],
        "sentence": ["first clip", "second clip", "  "],
        "speaker_id": [7, 8, 9],
    }).cast_column("audio", datasets.Audio())
    test = datasets.Dataset.from_dict({"id": ["t"], "audio": [str(files[0])],
                                       "sentence": ["test"], "speaker_id": [1]}
                                      ).cast_column("audio", datasets.Audio())
    saved = tmp_path / "hf"
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(saved))
    original = [f.read_bytes() for f in files]
    for f in files:  # the saved dataset must not depend on the source files
        f.unlink()

    out = tmp_path / "out" / "hf.jsonl"
    report = import_dataset("hf", saved, out, split="train")
    recs = by_id(out)
    assert sorted(recs) == ["a/1", "b"]
    assert recs["a/1"]["text"] == "first clip" and recs["b"]["speaker"] == "8"
    assert recs["b"]["duration"] == pytest.approx(0.5)
    for rid, index in (("a/1", 0), ("b", 1)):
        path = Path(recs[rid]["audio"])
        assert path.parent == tmp_path / "out" / "audio" and path.suffix == ".wav"
        assert path.read_bytes() == original[index]
    assert report.by_reason == {"empty_text": 1}
    assert "row 2" in report.examples["empty_text"][0]
    # Re-running finds the audio already there and gives the same manifest.
    first = out.read_text()
    import_dataset("hf", saved, out, split="train")
    assert out.read_text() == first
    with pytest.raises(ConfigError, match="splits test, train|splits train, test"):
        import_dataset("hf", saved, out)


def test_hf_path_column_missing_files_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    good = write_audio(tmp_path / "good.flac", 0.4)
    ds = datasets.Dataset.from_dict({"audio": [str(good), str(tmp_path / "gone.flac")],
                                     "transcription": ["kept", "lost"]})
    out = tmp_path / "hf.jsonl"
    report = import_dataset("hf", ds, out)
    recs = read_jsonl(out)
    assert recs == [{"id": "00000000", "audio": str(good), "duration": pytest.approx(0.4),
                     "text": "kept"}]
    assert report.by_reason == {"missing_audio": 1}
    with pytest.raises(ConfigError, match="no text column.*columns: audio, x"):
        import_dataset("hf", ds.remove_columns("transcription").add_column("x", ["a", "b"]), out)


# ---------------------------------------------------------------- lhotse


def lhotse_recording(rec_id: str, path, seconds: float, kind: str = "file") -> dict:
    return {"id": rec_id, "sources": [{"type": kind, "channels": [0], "source": str(path)}],
            "sampling_rate": SR, "num_samples": int(seconds * SR), "duration": seconds}


def write_jsonl_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def test_lhotse_cuts(tmp_path, monkeypatch):
    long = write_audio(tmp_path / "audio" / "long.wav", 3.0)
    write_audio(tmp_path / "audio" / "short.wav", 1.0)
    rec_long = lhotse_recording("long", long, 3.0)
    rec_short = lhotse_recording("short", "audio/short.wav", 1.0)  # relative, like lhotse's cwd
    cuts = [
        {"id": "cut-a", "start": 0.5, "duration": 2.0, "channel": 0,
         "supervisions": [
             {"id": "s2", "recording_id": "long", "start": 1.0, "duration": 1.0, "channel": 0,
              "text": "world", "speaker": "spk1", "language": "English"},
             {"id": "s1", "recording_id": "long", "start": 0.0, "duration": 1.0, "channel": 0,
              "text": "hello", "speaker": "spk1", "language": "English"}],
         "recording": rec_long, "type": "MonoCut"},
        {"id": "cut-b", "start": 0, "duration": 1.0, "channel": 0,
         "supervisions": [{"id": "s3", "recording_id": "short", "start": 0.0, "duration": 1.0,
                           "channel": 0, "text": "short one", "speaker": "spk2"}],
         "recording": rec_short, "type": "MonoCut"},
        {"id": "cut-url", "start": 0, "duration": 1.0, "channel": 0,
         "supervisions": [{"id": "s4", "recording_id": "u", "start": 0, "duration": 1.0,
                           "text": "remote"}],
         "recording": lhotse_recording("u", "https://example.org/a.wav", 1.0, kind="url"),
         "type": "MonoCut"},
        {"id": "mix", "tracks": [], "type": "MixedCut"},
        {"id": "cut-gone", "start": 0, "duration": 1.0, "channel": 0,
         "supervisions": [{"id": "s5", "recording_id": "g", "start": 0, "duration": 1.0,
                           "text": "gone"}],
         "recording": lhotse_recording("g", tmp_path / "nope.wav", 1.0), "type": "MonoCut"},
    ]
    manifest = write_jsonl_gz(tmp_path / "cuts_train.jsonl.gz", cuts)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "lhotse.jsonl"
    report = import_dataset("lhotse", manifest, out)
    recs = by_id(out)
    assert sorted(recs) == ["cut-a", "cut-b"]
    a = recs["cut-a"]
    assert a["text"] == "hello world" and a["speaker"] == "spk1" and a["lang"] == "English"
    assert a["offset"] == pytest.approx(0.5) and a["duration"] == pytest.approx(2.0)
    assert a["audio"] == str(long)
    assert recs["cut-b"]["audio"] == str(tmp_path / "audio" / "short.wav")
    assert report.by_reason == {"unsupported_audio": 2, "missing_audio": 1}
    assert any("'url'" in e for e in report.examples["unsupported_audio"])
    assert any("MixedCut" in e and "cuts_train.jsonl.gz:4" in e
               for e in report.examples["unsupported_audio"])
    # A directory holding the cuts file works too.
    assert import_dataset("lhotse", tmp_path, out, split="train").n_written == 2


def test_lhotse_recordings_and_supervisions(tmp_path):
    wav = write_audio(tmp_path / "r1.wav", 2.0)
    recordings = write_jsonl_gz(tmp_path / "x_recordings_dev.jsonl.gz",
                                [lhotse_recording("r1", wav, 2.0)])
    sups = [
        {"id": "r1-0", "recording_id": "r1", "start": 0.0, "duration": 0.9, "channel": 0,
         "text": "first part", "language": "en", "speaker": "s"},
        {"id": "r1-1", "recording_id": "r1", "start": 1.0, "duration": 1.0, "channel": 0,
         "text": "second part", "language": "en", "speaker": "s"},
        {"id": "r9-0", "recording_id": "r9", "start": 0.0, "duration": 1.0, "text": "lost"},
        {"id": "r1-2", "recording_id": "r1", "start": 1.5, "duration": 2.0, "text": "overrun"},
    ]
    write_jsonl_gz(tmp_path / "x_supervisions_dev.jsonl.gz", sups)
    out = tmp_path / "pair.jsonl"
    report = import_dataset("lhotse", recordings, out)  # the partner file is found by name
    recs = by_id(out)
    assert sorted(recs) == ["r1-0", "r1-1"]
    assert recs["r1-1"]["offset"] == pytest.approx(1.0)
    assert recs["r1-1"]["duration"] == pytest.approx(1.0)
    assert recs["r1-0"]["text"] == "first part" and recs["r1-0"]["lang"] == "en"
    assert report.by_reason == {"missing_audio": 1, "bad_segment": 1}
    assert "x_supervisions_dev.jsonl.gz:3" in report.examples["missing_audio"][0]


# ---------------------------------------------------------------- dispatch and CLI


def test_unknown_format_and_option(tmp_path):
    with pytest.raises(ConfigError, match="unknown import format 'timit'"):
        import_dataset("timit", tmp_path, tmp_path / "x.jsonl")
    with pytest.raises(ConfigError, match="unknown option.*audio_column.*librispeech"):
        import_dataset("librispeech", tmp_path, tmp_path / "x.jsonl", audio_column="a")


def test_cli_import_prints_summary(tmp_path, capsys):
    from speechlm.cli import main

    split_dir = make_librispeech(tmp_path)
    out = tmp_path / "cli.jsonl"
    rc = main(["data", "import", "librispeech", str(split_dir), "--out", str(out),
               "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "written: 3 utterances" in text
    assert "missing_audio" in text and "empty_text" in text
    assert "hours" in text
    assert len(read_jsonl(out)) == 3

    rc = main(["data", "import", "librispeech", str(split_dir), "--out", str(out), "--strict"])
    assert rc == 2
    assert "19-198.trans.txt:3" in capsys.readouterr().err
