"""Teaching a pretrained chat LLM the verse tasks with LoRA (text only), and zoo members that
ship their trained weights: installed in seconds, equal to the trained build, and retrained
on request."""

import json

import pytest
import torch
from safetensors.torch import load_file

from speechlm import zoo
from speechlm.errors import ConfigError
from speechlm.recipes import load_recipe
from speechlm.testing.runs import train_losses

RECIPE = """\
task: text_skills
model:
  init: {llm}
  template: chat
  lora: {{r: 8, alpha: 16, dropout: 0.0,
         target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}}
data:
  mixture: {{repeat: 1.0, last_word: 1.0}}
  num_examples: 8
  replay_continuations: 3
  max_input_words: 12
  max_seq_len: 128
  max_batch_tokens: 1024
train:
  max_steps: 40
  lr: 1.0e-2
  warmup_steps: 2
  log_every: 1
  eval_every: 40
  save_every: 20
  progress: false
  output_dir: {out}
eval: {{split: dev, max_items: 4, dev_items: 4, batch_size: 8}}
"""


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    """A tiny SmolLM2-shaped LLM with a ChatML template (the GGUF tests' source model)."""
    from speechlm.testing.tiny_gguf import write_tiny_gguf

    _, source = write_tiny_gguf(tmp_path_factory.mktemp("llm") / "tiny.gguf")
    return source


def _recipe(tmp_path, llm, out):
    path = tmp_path / f"skills-{out.name}.yaml"
    path.write_text(RECIPE.format(llm=llm, out=out))
    return path


def test_lora_learns_the_tasks_and_saves_a_merged_model_and_its_lora(chat_llm, tmp_path):
    from transformers import AutoModelForCausalLM

    from speechlm.recipes.text_skills import merge_into_base

    out = tmp_path / "run"
    module, config = load_recipe(_recipe(tmp_path, chat_llm, out))
    results = module.run(config)
    losses = train_losses(out)
    # a tiny random LLM learns nothing general, but LoRA alone must fit 8 examples
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert set(results["before"]) == set(results["after"]) == {"repeat", "last_word"}
    # the base LLM's own continuations were replayed, and the drift of its continuations of
    # held-out verses is measured
    assert 0 < results["replayed_continuations"] <= 3
    assert results["continue"]["n"] == 4 and 0 <= results["continue"]["chrf_vs_before"] <= 100
    final = out / "final"
    assert (final / "lora" / "adapter_model.safetensors").is_file()
    assert json.loads((final / "speechlm.json").read_text())["template"] == "chat"
    # the LoRA alone, merged into the base again, is the saved model
    rebuilt = tmp_path / "rebuilt"
    merge_into_base(config, final / "lora", rebuilt)
    a, b = load_file(final / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    base = AutoModelForCausalLM.from_pretrained(chat_llm).state_dict()
    assert any(not torch.equal(base[k], a[k]) for k in a if "q_proj" in k)  # it did change


def test_bad_mixtures_are_refused(chat_llm, tmp_path):
    path = _recipe(tmp_path, chat_llm, tmp_path / "x")
    with pytest.raises(ConfigError, match="plain text has no prompt"):
        load_recipe(path, ["data.mixture={text: 1.0, repeat: 1.0}"])
    with pytest.raises(ConfigError, match="unknown task"):
        load_recipe(path, ["data.mixture={recite: 1.0}"])


def test_a_shipped_build_installs_equal_to_the_trained_one(chat_llm, tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, chat_llm, tmp_path / "unused")
    monkeypatch.setitem(zoo.MEMBERS, "skills", ("skills.yaml", "a tiny skills LLM"))
    monkeypatch.setattr(zoo, "recipe_path", lambda name: recipe)
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache-a"))
    trained = zoo.ensure("skills", progress=False, say=lambda m: None)
    assert trained.newly_trained and not trained.shipped
    shipped_root = tmp_path / "shipped"
    dest = zoo.ship("skills", shipped_root)
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == sorted(
        ["adapter_model.safetensors", "adapter_config.json", "speechlm.json", "results.json",
         "metrics.jsonl", "shipped.json"])
    real_resource = zoo.resource
    monkeypatch.setattr(zoo, "resource", lambda rel: shipped_root / rel.removeprefix(
        "zoo/shipped/") if rel.startswith("zoo/shipped/") else real_resource(rel))

    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache-b"))  # a fresh machine
    said = []
    installed = zoo.ensure("skills", progress=False, say=said.append)
    assert installed.shipped and "from its shipped build" in said[0]
    assert installed.results == trained.results and installed.seconds == trained.seconds
    a = load_file(trained.model_dir / "model.safetensors")
    b = load_file(installed.model_dir / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not list(installed.run_dir.glob("step_*"))  # nothing was trained

    retrained = zoo.ensure("skills", progress=False, retrain=True, say=said.append)
    assert retrained.newly_trained and not retrained.shipped
    assert "training zoo model 'skills'" in said[-1]

    # a shipped build of another recipe is not used
    monkeypatch.setenv("SPEECHLM_CACHE", str(tmp_path / "cache-c"))
    recipe.write_text(recipe.read_text().replace("max_steps: 40", "max_steps: 2"))
    assert zoo.shipped_build("skills") is None
