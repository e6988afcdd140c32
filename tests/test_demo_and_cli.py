"""The main job end to end on a shrunken corpus recipe, and the CLI contract."""

import subprocess
import sys

import pytest

from speechlm import cli
from speechlm.data.manifest import read_manifest
from speechlm.pipelines import embedded_corpus


def test_demo_builds_validates_and_reuses_the_cache(small_corpus, tiny_zoo):
    lines = []
    assert cli.main(["demo", "--no-progress", "--jobs", "1"]) == 0
    assert embedded_corpus.embedded_manifest_path("test") is not None
    from speechlm.demo import run_demo

    assert run_demo(jobs=1, progress=False, out=lines.append) == 0
    text = "\n".join(lines)
    assert "cached at" in text  # the second run synthesizes nothing
    assert "train: 12/12 lines valid" in text and "test: 4/4 lines valid" in text
    assert "duration buckets" in text and "random batches" in text
    assert "Zoo model: English CTC" in text and "cached; trained in" in text
    assert "Zoo model: English-Spanish instruction LLM" in text and "repeat" in text
    assert "dev        4" in text and "test       4" in text  # the CER/WER table
    assert "Zoo model: BLSP speech LLM" in text and "zero-shot transfer on 2 held-out" in text
    assert "untrained adapter" in text and "cascade (reference text)" in text
    test_records = read_manifest(embedded_corpus.embedded_manifest_path("test"))
    assert {r["speaker"] for r in test_records} == {f"espeak:{v}" for v in
                                                    small_corpus.splits["test"].voices}
    assert all(r["duration"] > 1.0 and r["translation"] for r in test_records)


def test_a_killed_corpus_build_is_not_taken_as_done_and_resumes(small_corpus, monkeypatch):
    from speechlm.pipelines import synth

    real = synth.synthesize_corpus

    def dies_on_dev(items, out_dir, **kw):
        if out_dir.name == "dev":
            raise KeyboardInterrupt("killed")
        return real(items, out_dir, **kw)

    monkeypatch.setattr(synth, "synthesize_corpus", dies_on_dev)
    with pytest.raises(KeyboardInterrupt):
        embedded_corpus.build_embedded_corpus("en", jobs=1, progress=False)
    assert embedded_corpus.embedded_manifest_path("train") is None
    root = embedded_corpus.corpus_root(small_corpus)
    train_audio = sorted((root / "train" / "audio").iterdir())
    stamps = [p.stat().st_mtime_ns for p in train_audio]

    monkeypatch.setattr(synth, "synthesize_corpus", real)
    built = embedded_corpus.build_embedded_corpus("en", jobs=1, progress=False)
    assert built.newly_built
    assert [p.stat().st_mtime_ns for p in train_audio] == stamps  # train was not redone
    for split, size in (("train", 12), ("dev", 4), ("test", 4)):
        ids = [r["id"] for r in read_manifest(built.manifests[split])]
        assert len(ids) == len(set(ids)) == size


def test_help_does_not_import_torch():
    code = ("import sys; from speechlm import cli; cli.build_parser(); "
            "assert 'torch' not in sys.modules, 'torch imported by --help'")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "speechlm.cli", "data", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "validate" in out and "import" in out and "stats" in out


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert cli.main(["data", "stats", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("speechlm: error:") and str(missing) in err
    assert "\n" not in err and "Traceback" not in err


def test_debug_flag_shows_the_traceback(tmp_path):
    from speechlm.errors import SpeechLMError

    with pytest.raises(SpeechLMError):
        cli.main(["--debug", "data", "stats", str(tmp_path / "missing.jsonl")])


def test_every_registered_command_has_help():
    parser = cli.build_parser()
    for (group, name) in cli.COMMANDS:
        argv = [name, "--help"] if group is None else [group, name, "--help"]
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(argv)
        assert exit_info.value.code == 0
