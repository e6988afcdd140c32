"""The main job end to end on a shrunken corpus recipe, and the CLI contract."""

import re
import subprocess
import sys

import pytest

from speechlm import cli
from speechlm.data.manifest import read_manifest
from speechlm.pipelines import embedded_corpus


def test_demo_builds_reports_and_reuses_the_cache(tiny_real_zoo, monkeypatch, capsys):
    """The main job on tiny stand-ins for its real models (2-update recipes): corpus, the
    text-skills LLM, both BLSP members, the live run, both transfer tables and the
    answered clips; the second run trains nothing and prints the same tables."""
    from speechlm import demo

    monkeypatch.setattr(demo, "TABLE_ITEMS", 2)
    monkeypatch.setattr(demo, "EXAMPLES", 1)
    monkeypatch.setattr(demo, "LIVE_OVERRIDES", (
        "data.max_train_items=6", "train.max_steps=3", "train.eval_every=3",
        "train.save_every=3", "train.log_every=1", "eval.transfer=null", "eval.dev_items=2",
        "eval.generate_items=0"))
    assert cli.main(["demo", "--no-progress", "--jobs", "1"]) == 0
    first_run = capsys.readouterr().out
    # each of the table's slow parts reports its time while the table is computed
    assert "transfer: repeat       BLSP-KD (T=2)" in first_run
    # two tables of 6 systems (the tiny members' own tables do not ask mentions_god)
    assert first_run.count("  transfer: mentions_god") == 2 * 6
    lines = []
    assert demo.run_demo(jobs=1, progress=False, out=lines.append) == 0
    text = "\n".join(lines)
    assert "cached at" in text and "training zoo model" not in text  # nothing built again
    # every stage says how long it took (10: models, corpus, 4 members, live run, 2 tables,
    # the answered clips)
    assert sum(re.fullmatch(r"   \(\d+ s\)", line) is not None for line in lines) == 10
    assert "== Zoo model 'smollm2_verses'" in text and "before" in text and "after" in text
    for name in ("blsp_whisper_smollm2_kd", "blsp_whisper_smollm2_ce",
                 "blsp_whisper_smollm2_kd_more"):
        assert f"== Zoo model '{name}'" in text
    assert "Live: the same BLSP training" in text and "3 updates" in text
    tables = [i for i, line in enumerate(lines) if line.lstrip().startswith("== Zero-shot")]
    assert len(tables) == 2 and "Piper" in lines[tables[1]]
    for row in ("untrained adapter", "BLSP (CE, the paper's loss)", "BLSP-KD (T=2)",
                "BLSP-KD, longer, 3x the speech",
                "cascade (Whisper's own transcript)", "cascade (reference text)"):
        assert sum(row in line for line in lines) == 2, row
    assert "instruction: Repeat the following text exactly." in text and "answer:" in text
    # --web then serves the demo's longest-trained BLSP-KD member (the web page and the API)
    served = {}
    from speechlm.serving import server
    monkeypatch.setattr(server, "serve", lambda model, **kw: served.update(model=model, **kw))
    assert cli.main(["demo", "--no-progress", "--jobs", "1", "--web", "--port", "8123"]) == 0
    from speechlm import zoo
    assert served["model"] == str(zoo.cached("blsp_whisper_smollm2_kd_more").model_dir)
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    test_records = read_manifest(embedded_corpus.embedded_manifest_path("test"))
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


def test_demo_web_without_the_serving_packages_fails_before_the_demo_runs(monkeypatch, capsys):
    import importlib.util

    from speechlm import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo ran"))
    assert cli.main(["demo", "--web"]) == 2
    err = capsys.readouterr().err
    assert "--web needs the serving packages (gradio missing)" in err
    assert "pip install -e '.[serve]'" in err
