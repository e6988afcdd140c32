"""Manifests: validation messages with file:line, lazy reading, atomic writes, duration fill, stats, CLI."""

from __future__ import annotations

import gzip
import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf

from speechlm.cli import main as cli_main
from speechlm.data.manifest import (
    AUDIO_PATH_KEY,
    check_record,
    fill_durations,
    iter_manifest,
    read_manifest,
    resolve_audio,
    validate_manifest,
    write_manifest,
)
from speechlm.data.stats import format_stats, manifest_stats
from speechlm.errors import ManifestError

SR = 16000


def write_wav(path, seconds: float, sr: int = SR, freq: float = 220.0):
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def write_lines(path, lines):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


@pytest.fixture
def audio_dir(tmp_path):
    d = tmp_path / "wav"
    d.mkdir()
    for name, seconds in [("a", 1.0), ("b", 2.5), ("c", 0.5)]:
        write_wav(d / f"{name}.wav", seconds)
    return d


# ----------------------------------------------------------------- validation


def test_validate_reports_each_problem_with_file_and_line(tmp_path, audio_dir):
    path = write_lines(tmp_path / "train.jsonl", [
        {"id": "u1", "audio": "wav/a.wav", "text": "hello"},
        {"id": "u2", "audio": "wav/b.wav"},
        '{"id": "u3", "audio": "wav/a.wav"',                       # broken JSON
        {"id": "u4", "audio": "wav/c.wav", "lang": "en"},
        {"id": "u5", "text": "no audio"},                          # missing audio
        "",                                                        # blank: ignored
        {"id": "u7", "audio": "/nonexistent/y.wav"},               # missing file
        {"id": "u2", "audio": "wav/c.wav"},                        # duplicate of line 2
    ])
    report = validate_manifest(path)
    shown = str(path)
    assert report.problems == [
        f"{shown}:2: id: duplicate id 'u2' (also on line 8)",
        f"{shown}:3: (json): invalid JSON (Expecting ',' delimiter at column 34); "
        "each line must be one JSON object",
        f"{shown}:5: audio: missing required field",
        f"{shown}:7: audio: file not found: /nonexistent/y.wav",
        f"{shown}:8: id: duplicate id 'u2' (also on line 2)",
    ]
    assert (report.n_lines, report.n_ok, report.n_problems) == (7, 2, 5)
    assert not report.ok
    assert "5 problem(s)" in report.summary()


def test_validate_type_and_range_problems(tmp_path, audio_dir):
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": 7, "audio": "wav/a.wav"},
        {"id": "x1", "audio": "wav/a.wav", "duration": 0},
        {"id": "x2", "audio": "wav/a.wav", "offset": -1.0},
        {"id": "x3", "audio": "wav/a.wav", "units": [1, -2]},
        {"id": "x4", "audio": "wav/a.wav", "text": ["not", "a", "string"]},
        {"id": "x5", "audio": "wav/a.wav", "duration": "1.0"},
        [1, 2],
        {"id": "x6", "audio": "wav/a.wav", "units": [0, 5, 3], "offset": 0.1, "duration": 0.5,
         "extra_key": {"kept": True}},
    ])
    p = str(path)
    assert validate_manifest(path).problems == [
        f"{p}:1: id: expected a string, got a number",
        f"{p}:2: duration: must be a finite number > 0, got 0",
        f"{p}:3: offset: must be a finite number >= 0, got -1.0",
        f"{p}:4: units: item 1 must be a non-negative int, got -2",
        f"{p}:5: text: expected a string, got a list",
        f"{p}:6: duration: expected a number of seconds, got a string",
        f"{p}:7: (json): expected a JSON object, got a list",
    ]
    assert check_record({"id": "ok", "audio": "x.wav", "whatever": None}) == []


def test_validate_max_problems_keeps_earliest_and_counts_all(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [{"id": f"u{i}"} for i in range(500)])
    report = validate_manifest(path, max_problems=3)
    assert report.n_problems == 500
    assert [p.split(":")[1] for p in report.problems] == ["1", "2", "3"]


def test_validate_check_readable_finds_corrupt_audio_and_bad_segments(tmp_path, audio_dir):
    (audio_dir / "bad.wav").write_bytes(b"RIFF....not really a wav file at all")
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "ok", "audio": "wav/b.wav", "offset": 1.0, "duration": 1.5},
        {"id": "bad", "audio": "wav/bad.wav"},
        {"id": "late", "audio": "wav/a.wav", "offset": 3.0},
        {"id": "long", "audio": "wav/a.wav", "offset": 0.5, "duration": 2.0},
    ])
    assert validate_manifest(path).ok  # existence only: all files exist
    problems = validate_manifest(path, check_audio_readable=True).problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: audio: unreadable or corrupt audio: ")
    assert str(audio_dir / "bad.wav") in problems[0]
    assert problems[1] == (f"{path}:3: offset: 3.0 s is at or past the end of the audio (1.000 s)")
    assert problems[2] == (f"{path}:4: duration: offset + duration = 2.500 s reaches past "
                           "the end of the audio (1.000 s)")


def test_validate_check_readable_finds_nan_and_inf_samples(tmp_path, audio_dir):
    wave = (0.1 * np.sin(np.arange(SR) / 10)).astype(np.float32)
    sf.write(audio_dir / "clean_float.wav", wave, SR, subtype="FLOAT")
    sf.write(audio_dir / "pcm.wav", wave, SR, subtype="PCM_16")  # integers: never NaN
    broken = wave.copy()
    broken[[10, 500]] = [np.nan, np.inf]
    sf.write(audio_dir / "nan.wav", broken, SR, subtype="FLOAT")
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "wav/clean_float.wav"}, {"id": "b", "audio": "wav/nan.wav"},
        {"id": "c", "audio": "wav/pcm.wav"}])
    report = validate_manifest(path, check_audio_readable=True)
    assert report.problems == [
        f"{path}:2: audio: audio contains NaN or Inf samples (2 of {SR}): "
        f"{audio_dir / 'nan.wav'}; the file is damaged: re-encode it or drop the record"]
    assert report.n_ok == 2


def test_validate_warns_of_an_absurd_peak_level_without_failing(tmp_path, audio_dir, capsys):
    """int16 values stored in a float WAV: usable, but almost surely a mistake."""
    from speechlm.cli import main

    wave = (0.1 * np.sin(np.arange(SR) / 10)).astype(np.float32)
    sf.write(audio_dir / "loud.wav", wave * 32767, SR, subtype="FLOAT")
    sf.write(audio_dir / "hot.wav", wave * 30, SR, subtype="FLOAT")  # peak 3.0: a hot mix
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "wav/hot.wav"}, {"id": "b", "audio": "wav/loud.wav"}])
    report = validate_manifest(path, check_audio_readable=True)
    assert report.ok and report.problems == []
    assert report.warnings == [
        f"{path}:2: audio: warning: {audio_dir / 'loud.wav'}: peak level 3277 (+70.3 dBFS) is far "
        "above full scale 1.0; the samples are probably on another scale (integer PCM stored "
        "as float?): divide them by the peak or re-encode the file as 16-bit PCM"]
    assert main(["data", "validate", "--check-readable", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loud.wav: peak level 3277" in out and f"{path}: OK (2 records, 1 warning(s))" in out


def test_a_line_that_is_not_utf8_is_named_by_every_reader(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"id": "a", "audio": "a.wav", "text": "hello", "duration": 1.0})
    path.write_bytes(good.encode() + b"\n" + b'{"id": "b", "audio": "b.wav", "text": "h\xff"}\n'
                     + good.replace('"a"', '"c"').encode() + b"\n")
    report = validate_manifest(path, check_audio_exists=False)
    assert report.problems == [f"{path}:2: (encoding): not UTF-8 text (byte 0xff at column "
                               "41); save the file as UTF-8"]
    assert report.n_lines == 3 and report.n_ok == 2  # the lines after it are still checked
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not UTF-8 text .* save the file as"):
        read_manifest(path)
    assert cli_main(["data", "stats", str(path)]) == 2
    assert "m.jsonl:2: not UTF-8 text" in capsys.readouterr().err


def test_a_last_line_cut_inside_a_character_is_a_torn_tail(tmp_path):
    from speechlm.jsonl import read_jsonl

    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "text": "caf' + "é".encode()[:1])
    assert read_jsonl(path, tolerate_torn_tail=True) == [{"id": "a"}]
    with pytest.raises(ManifestError, match="out.jsonl:2: not UTF-8"):
        read_jsonl(path)


def test_a_directory_given_as_manifest_points_at_the_file_inside(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    write_lines(tmp_path / "corpus" / "manifest.jsonl", [{"id": "a", "audio": "a.wav"}])
    message = (f"{tmp_path / 'corpus'}: is a directory, not a JSONL file; give the file, e.g. "
               f"{tmp_path / 'corpus' / 'manifest.jsonl'}")
    for read in (validate_manifest, read_manifest):
        with pytest.raises(ManifestError) as e:
            read(tmp_path / "corpus")
        assert str(e.value) == message
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ManifestError, match="this directory holds none"):
        read_manifest(tmp_path / "empty_dir")


def test_an_empty_manifest_does_not_validate(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    report = validate_manifest(path)
    assert not report.ok and report.n_lines == 0
    assert cli_main(["data", "validate", str(path)]) == 1
    assert "no records (empty, or blank lines only)" in capsys.readouterr().out


def test_validate_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="nope.jsonl: file not found"):
        validate_manifest(tmp_path / "nope.jsonl")


# -------------------------------------------------------------------- reading


def test_iter_manifest_is_lazy_and_resolves_relative_paths(tmp_path, audio_dir):
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "u1", "audio": "wav/a.wav", "speaker": "s1", "custom": [1, 2]},
        {"id": "u2", "audio": str(audio_dir / "b.wav")},
        '{"id": "u3", broken',
    ])
    records = iter_manifest(path)
    first = next(records)  # the broken line 3 has not been read yet
    assert first[AUDIO_PATH_KEY] == str(audio_dir / "a.wav")
    assert first["audio"] == "wav/a.wav" and first["custom"] == [1, 2]
    assert next(records)[AUDIO_PATH_KEY] == str(audio_dir / "b.wav")
    with pytest.raises(ManifestError, match=r"m\.jsonl:3: invalid JSON"):
        next(records)
    assert resolve_audio({"audio": "wav/a.wav"}, path) == audio_dir / "a.wav"


def test_iter_manifest_validation_names_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [{"id": "u1", "audio": "a.wav"}, {"id": "u2"}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: audio: missing required field"):
        list(iter_manifest(path))
    assert [r["id"] for r in iter_manifest(path, validate=False)] == ["u1", "u2"]


def test_write_manifest_round_trip_gz_and_drops_resolved_path(tmp_path, audio_dir):
    records = [{"id": "u1", "audio": "wav/a.wav", "text": "héllo", "units": [3, 1]},
               {"id": "u2", "audio": "wav/b.wav", "lang": "es", "offset": 0.25}]
    for name in ("m.jsonl", "m.jsonl.gz"):
        path = tmp_path / name
        assert write_manifest(path, iter(records)) == 2
        loaded = read_manifest(path)
        assert [{k: v for k, v in r.items() if k != AUDIO_PATH_KEY} for r in loaded] == records
        # Writing what was read does not persist the resolved absolute path.
        write_manifest(path, loaded)
        assert read_manifest(path, validate=False)[0][AUDIO_PATH_KEY] == str(audio_dir / "a.wav")
        raw = (gzip.open if name.endswith(".gz") else open)(path, "rt", encoding="utf-8").read()
        assert AUDIO_PATH_KEY not in raw and "héllo" in raw
    with gzip.open(tmp_path / "m.jsonl.gz", "rb") as f:
        assert f.read(1) == b"{"  # really gzip-compressed


# ------------------------------------------------------------------ durations


def _count_audio_info(monkeypatch):
    """Count header reads: fill_durations looks audio_info up in speechlm.audio.io at call time."""
    import speechlm.audio.io as audio_io

    calls = []

    original = audio_io.audio_info

    def counting(path):
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(audio_io, "audio_info", counting)
    return calls


@pytest.mark.parametrize("name,jobs", [("m.jsonl", 1), ("m.jsonl.gz", 2)])
def test_fill_durations_round_trip_computes_once(tmp_path, audio_dir, monkeypatch, name, jobs):
    path = write_lines(tmp_path / name, [
        {"id": "u1", "audio": "wav/a.wav", "text": "one"},
        {"id": "u2", "audio": "wav/b.wav", "offset": 1.0},          # 2.5 s file, from 1.0 s
        {"id": "u3", "audio": "wav/c.wav", "duration": 0.25},       # already known: kept
    ])
    calls = _count_audio_info(monkeypatch)
    assert fill_durations(path, jobs=jobs) == 2
    assert sorted(calls) == sorted([str(audio_dir / "a.wav"), str(audio_dir / "b.wav")])
    records = read_manifest(path)
    assert [r["duration"] for r in records] == [1.0, 1.5, 0.25]
    assert records[0]["text"] == "one" and records[1]["offset"] == 1.0
    assert records[1]["audio"] == "wav/b.wav"  # relative path kept as written

    calls.clear()
    before = os.stat(path)
    assert fill_durations(path, jobs=jobs) == 0
    assert calls == []  # cached in the manifest: no audio read
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


def test_fill_durations_to_other_file_and_unreadable_items(tmp_path, audio_dir, caplog):
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "u1", "audio": "wav/a.wav"},
        {"id": "gone", "audio": "wav/missing.wav"},
        {"id": "late", "audio": "wav/c.wav", "offset": 0.5},
    ])
    original = path.read_text()
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: duration: cannot compute: .*file not found"):
        fill_durations(path, strict=True)
    assert path.read_text() == original  # strict failure writes nothing
    out = tmp_path / "filled.jsonl"
    with caplog.at_level(logging.WARNING, logger="speechlm.data.manifest"):
        assert fill_durations(path, out) == 1
    assert path.read_text() == original
    assert [r.get("duration") for r in read_manifest(out)] == [1.0, None, None]
    warnings = "\n".join(caplog.messages)
    assert f"{path}:2: duration: cannot compute" in warnings
    assert f"{path}:3: duration: cannot compute" in warnings and "past the end" in warnings


# ---------------------------------------------------------------------- stats


def test_manifest_stats_values(tmp_path):
    records = [
        {"id": f"u{i}", "audio": "x.wav", "duration": float(d), "lang": lang, "speaker": spk,
         "text": text}
        for i, (d, lang, spk, text) in enumerate([
            (1, "en", "s1", "a b c"), (2, "en", "s1", "hello"), (3, "es", "s2", "hola que tal"),
            (4, "en", "s3", "x y"), (10, "fr", "s1", "bonjour"),
        ])
    ] + [{"id": "nodur", "audio": "x.wav", "lang": "en"}]
    path = tmp_path / "m.jsonl"
    write_manifest(path, records)
    stats = manifest_stats(path, top=2)
    assert stats.count == 6 and stats.missing_duration == 1
    assert stats.total_seconds == pytest.approx(20.0)
    assert stats.total_hours == pytest.approx(20.0 / 3600)
    assert stats.duration == pytest.approx({"min": 1.0, "median": 3.0, "mean": 4.0,
                                            "p95": 8.8, "max": 10.0})
    assert stats.text_words["max"] == 3 and stats.text_chars["min"] == 3
    assert stats.langs == [("en", 4), ("es", 1)] and stats.n_langs == 3
    assert stats.speakers[0] == ("s1", 3) and stats.n_speakers == 3
    assert stats.fields["id"] == 6 and stats.fields["text"] == 5
    table = format_stats(stats)
    assert "0.006 h" in table and "top 2 of 3" in table and "no duration" in table
    assert json.loads(json.dumps(stats.to_dict()))["langs"] == {"en": 4, "es": 1}


def test_cli_stats_fill_durations_and_json(tmp_path, audio_dir, capsys):
    path = write_lines(tmp_path / "m.jsonl", [
        {"id": "u1", "audio": "wav/a.wav", "lang": "en", "text": "one two"},
        {"id": "u2", "audio": "wav/b.wav", "lang": "en"},
    ])
    assert cli_main(["data", "stats", str(path), "--fill-durations", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 2 and out["total_seconds"] == pytest.approx(3.5)
    assert out["missing_duration"] == 0 and out["langs"] == {"en": 2}
    assert [r["duration"] for r in read_manifest(path)] == [1.0, 2.5]
    assert cli_main(["data", "stats", str(path)]) == 0
    table = capsys.readouterr().out
    assert "utterances" in table and "0.001 h (3.5 s)" in table


def test_cli_validate_exit_codes_and_output(tmp_path, audio_dir, capsys):
    good = write_lines(tmp_path / "good.jsonl", [{"id": "u1", "audio": "wav/a.wav"}])
    bad = write_lines(tmp_path / "bad.jsonl", [{"id": "u1", "audio": "wav/a.wav"}, "{oops",
                                               {"id": "u3"}])
    assert cli_main(["data", "validate", str(good)]) == 0
    assert "OK (1 records)" in capsys.readouterr().out
    assert cli_main(["data", "validate", str(good), str(bad), "--max-problems", "1"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}:2: (json): invalid JSON" in out
    assert f"{bad}:3: audio" not in out and "1 more problem(s) not shown" in out
    assert "2 manifests, 2 problem(s)" in out
    assert cli_main(["data", "validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
