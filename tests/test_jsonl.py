import json

import pytest

from speechlm.errors import ManifestError
from speechlm.jsonl import JsonlAppender, atomic_write, iter_jsonl, read_jsonl, write_jsonl


def test_write_then_read_round_trip_plain_and_gzip(tmp_path):
    records = [{"id": f"u{i}", "text": "crió ñandú"} for i in range(5)]
    for name in ("m.jsonl", "m.jsonl.gz"):
        assert write_jsonl(tmp_path / name, iter(records)) == 5
        assert read_jsonl(tmp_path / name) == records


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": "b", \n')
    with pytest.raises(ManifestError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(path)


def test_non_object_line_is_rejected(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('[1, 2]\n')
    with pytest.raises(ManifestError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)


def test_atomic_write_keeps_old_content_when_writer_fails(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"id": "old"}])
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write('{"id": "half')
        raise RuntimeError("killed mid-write")
    assert read_jsonl(path) == [{"id": "old"}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left


def test_appender_recovers_from_a_torn_last_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    with JsonlAppender(path) as out:
        out.write({"id": "a"})
        out.write({"id": "b"})
    with open(path, "a") as f:  # what a kill in the middle of a write leaves behind
        f.write('{"id": "c", "te')
    assert [r["id"] for r in read_jsonl(path, tolerate_torn_tail=True)] == ["a", "b"]
    with pytest.raises(ManifestError):
        read_jsonl(path)
    with JsonlAppender(path) as out:
        out.write({"id": "c"})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(ManifestError, match="nope.jsonl: file not found"):
        list(iter_jsonl(tmp_path / "nope.jsonl"))
