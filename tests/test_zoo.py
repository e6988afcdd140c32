"""The embedded zoo: a member trains once into the cache, is reused, resumes a killed
build, and is rebuilt when its recipe changes."""

import json

import pytest

from speechlm import zoo
from speechlm.errors import ConfigError


def test_trains_once_then_reuses_the_cache(tiny_zoo):
    said = []
    first = zoo.ensure("ctc_en", progress=False, say=said.append)
    assert first.newly_trained and "training zoo model 'ctc_en'" in said[0]
    assert (first.model_dir / "model.safetensors").is_file()
    assert first.results["step"] == 4 and {"dev", "test"} <= first.results.keys()
    again = zoo.ensure("ctc_en", progress=False, say=said.append)
    assert not again.newly_trained and len(said) == 1
    assert again.results == first.results and again.seconds == first.seconds


def test_a_killed_build_resumes_and_is_not_taken_as_done(tiny_zoo, monkeypatch):
    from speechlm.training.objectives.ctc import CTCObjective

    real_loss, calls = CTCObjective.loss, []

    def dies_at_update_3(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(self, *a, **kw)

    monkeypatch.setattr(CTCObjective, "loss", dies_at_update_3)
    with pytest.raises(KeyboardInterrupt):
        zoo.ensure("ctc_en", progress=False, say=lambda m: None)
    run_dir = zoo.zoo_run_dir("ctc_en")
    assert not (run_dir / "zoo.json").exists() and (run_dir / "step_000002").is_dir()
    monkeypatch.setattr(CTCObjective, "loss", real_loss)
    said = []
    model = zoo.ensure("ctc_en", progress=False, say=said.append)
    assert model.newly_trained and "resuming" in said[0]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if m.get("split") == "train"]
    assert steps[-2:] == [3, 4]  # updates 3 and 4 were run after the restart, 1-2 were not redone
    assert steps.count(1) == 1


def test_an_edited_recipe_trains_a_new_model(small_corpus, monkeypatch, tmp_path):
    from conftest import tiny_zoo_recipe

    tiny_zoo_recipe(monkeypatch, tmp_path, steps=2)
    first = zoo.ensure("ctc_en", progress=False, say=lambda m: None)
    tiny_zoo_recipe(monkeypatch, tmp_path, steps=3)
    second = zoo.ensure("ctc_en", progress=False, say=lambda m: None)
    assert second.newly_trained and second.run_dir != first.run_dir
    assert second.results["step"] == 3


def test_unknown_member_is_rejected():
    with pytest.raises(ConfigError, match="unknown zoo model 'ctc_fr'; known: ctc_en, llm_en_es, blsp_en, inserter_en, blsp_inserter_en, speech_tokenizer_en, t2u_en"):
        zoo.recipe_path("ctc_fr")


def test_cli_lists_builds_and_lists_again(tiny_zoo, capsys):
    import json

    from speechlm.cli import main

    assert main(["zoo", "list", "--json"]) == 0
    before = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(before) >= {"ctc_en", "llm_en_es", "blsp_en", "inserter_en", "blsp_inserter_en",
                           "speech_tokenizer_en", "t2u_en"} and not before["ctc_en"]["built"]
    assert main(["zoo", "build", "ctc_en", "--no-progress"]) == 0
    assert "ctc_en: trained: " in capsys.readouterr().out
    assert main(["zoo", "build", "ctc_en", "--no-progress"]) == 0
    assert "ctc_en: already built: " in capsys.readouterr().out
    assert main(["zoo", "list", "--json"]) == 0
    after = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert after["ctc_en"]["built"] and after["ctc_en"]["model_dir"].endswith("/final")
    assert not after["llm_en_es"]["built"]
    assert main(["zoo", "build", "ctc_fr"]) == 2
    assert "unknown zoo model 'ctc_fr'" in capsys.readouterr().err


def test_cache_key_follows_the_recipe_and_the_members_it_builds_on(tiny_zoo):
    ctc, llm, blsp = (zoo.zoo_run_dir(n) for n in ("ctc_en", "llm_en_es", "blsp_en"))
    assert zoo.dependencies("blsp_en") == {"ctc_en", "llm_en_es"}
    assert zoo.dependencies("blsp_inserter_en") == {"ctc_en", "llm_en_es", "blsp_en"}
    # a comment is not the recipe: the cached model stays valid
    tiny_zoo["llm_en_es"].write_text("# a note\n" + tiny_zoo["llm_en_es"].read_text())
    assert zoo.zoo_run_dir("llm_en_es") == llm and zoo.zoo_run_dir("blsp_en") == blsp
    # a changed LLM recipe retrains the LLM and every member built on it
    tiny_zoo["llm_en_es"].write_text(tiny_zoo["llm_en_es"].read_text().replace(
        "max_steps: 2", "max_steps: 3"))
    assert zoo.zoo_run_dir("llm_en_es") != llm and zoo.zoo_run_dir("blsp_en") != blsp
    assert zoo.zoo_run_dir("ctc_en") == ctc


def test_t2u_builds_the_speech_tokenizer_and_trains_on_its_units(tiny_zoo):
    assert zoo.dependencies("t2u_en") == {"speech_tokenizer_en"}
    t2u = zoo.ensure("t2u_en", progress=False, say=lambda m: None)
    tokenizer = zoo.cached("speech_tokenizer_en")
    assert tokenizer is not None  # built on the way, into the zoo
    from speechlm.models.speech_tokenizer import read_tokenizer_info
    from speechlm.models.text_to_token import load_text_to_token

    identity = read_tokenizer_info(tokenizer.model_dir)["identity"]
    assert load_text_to_token(t2u.model_dir).tokenizer_identity == identity
    assert t2u.results["tokenizer"] == identity and t2u.results["dev"]["scored"] == 1
    # the units it generates are read back to text by the tokenizer's ASR head
    assert set(t2u.results["dev"]["round_trip"]) == {"reference", "ar"}


def test_every_shipped_build_matches_its_members_current_recipe():
    """A recipe edited after its build was shipped would silently retrain for hours on a
    user's machine: each shipped build must name the run its recipe gives today."""
    import json

    shipped_root = zoo.resource("zoo/shipped")
    builds = sorted(p for p in shipped_root.iterdir() if p.is_dir()) if shipped_root.is_dir() \
        else []
    for build in builds:
        record = json.loads((build / "shipped.json").read_text())
        assert record["run"] == zoo.zoo_run_dir(build.name).name, (
            f"{build.name}: shipped for {record['run']}, the recipe now gives "
            f"{zoo.zoo_run_dir(build.name).name}; rerun tools/zoo_ship.py {build.name}")
        assert all((build / f).is_file() for f in record["files"]), build.name
