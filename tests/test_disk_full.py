"""A disk that fills up mid-write: every writer names its output in one clear error, gives
back what it half-wrote, and a rerun finishes the job as if nothing had happened.

The full disk is simulated with a file-size limit (RLIMIT_FSIZE): the kernel then fails the
write that would grow a file past it (EFBIG), as it fails one on a full disk (ENOSPC)."""

from __future__ import annotations

import contextlib
import resource
import signal

import pytest
import torch

from speechlm.errors import WriteError
from speechlm.jsonl import JsonlAppender, read_jsonl, write_jsonl


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


RECORDS = [{"id": f"r{i:03d}", "text": "word " * 40} for i in range(100)]  # ~22 kB


def test_an_atomic_write_that_runs_out_of_space_leaves_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with file_size_limit(8000), pytest.raises(WriteError) as caught:
        write_jsonl(out, RECORDS)
    assert str(caught.value).startswith(f"{out}: cannot write it (File too large); free space")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_an_appending_job_that_runs_out_of_space_keeps_whole_records(tmp_path):
    out = tmp_path / "done.jsonl"
    written = 0
    with file_size_limit(8000), pytest.raises(WriteError, match="done.jsonl: cannot write it"):
        with JsonlAppender(out) as appender:
            for record in RECORDS:
                appender.write(record)
                written += 1
    assert 0 < written < len(RECORDS)
    with JsonlAppender(out) as appender:  # the rerun: space again
        for record in RECORDS[written:]:
            appender.write(record)
    assert read_jsonl(out) == RECORDS  # the torn line was cut; no record lost or doubled


def test_a_checkpoint_that_runs_out_of_space_is_not_left_half_written(tmp_path):
    from speechlm.training.checkpoint import latest_checkpoint, save_checkpoint, step_dir_name

    small = {"w": torch.zeros(10)}
    big = {"w": torch.zeros(100_000)}  # 400 kB
    save_checkpoint(tmp_path / step_dir_name(1), model_state=small, trainer_state={"step": 1})
    with file_size_limit(100_000), pytest.raises(WriteError) as caught:
        save_checkpoint(tmp_path / step_dir_name(2), model_state=big, trainer_state={"step": 2})
    assert str(caught.value).startswith(f"{tmp_path / step_dir_name(2)}: cannot write it (")
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(1)]
    assert latest_checkpoint(tmp_path).name == step_dir_name(1)


def test_synthesis_that_runs_out_of_space_says_so_and_a_rerun_completes(tmp_path, capsys):
    """The command fails in one line naming the audio file; the rerun synthesises exactly the
    items that were missing."""
    from speechlm.cli import main

    texts = ["Yes.", "No.", "Go.", "In the beginning God created the heavens and the earth, "
             "and the earth was without form and void.", "Amen."]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "synth"
    command = ["build", "synth", str(src), "--out", str(out), "--voice", "en-us+m1",
               "--sample-rate", "16000", "--format", "wav"]
    from speechlm.tts.base import get_backend

    # eSpeak loads from an in-memory copy of its library (a memory file the limit would also
    # cap, unlike a full disk): load it before the limit
    get_backend("espeak", sample_rate=16000).resolve_voice("en-us+m1")
    with file_size_limit(60_000):
        assert main(command) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith("speechlm: error: "), error
    assert ".wav: cannot write it (" in error[0]
    assert not list((out / "audio").glob(".*.tmp"))
    done = read_jsonl(out / "manifest.jsonl")
    assert 0 < len(done) < len(texts)
    assert main(command) == 0
    records = read_jsonl(out / "manifest.jsonl")
    assert sorted(r["text"] for r in records) == sorted(texts)
    assert len({r["id"] for r in records}) == len(texts)
    assert records[: len(done)] == done  # the first run's work was kept
