from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from speechlm.config import (
    Registry,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from speechlm.errors import ConfigError


class Pooling(enum.Enum):
    MEAN = "mean"
    LAST = "last"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0


@dataclass
class ModelConfig:
    encoder: str = "wav2vec2"
    hidden: int = 32
    dropout: float = 0.1
    pooling: Pooling = Pooling.MEAN
    lora: LoraConfig | None = None


@dataclass
class DataConfig:
    train_manifest: Path
    langs: list[str] = field(default_factory=lambda: ["en"])
    weights: dict[str, float] = field(default_factory=dict)
    max_duration: float | None = 20.0
    shape: tuple[int, int] = (2, 3)


@dataclass
class TrainSection:
    max_steps: int = 100
    lr: float = 1e-4
    schedule: Literal["constant", "cosine", "tri_stage"] = "cosine"
    shuffle: bool = True
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


@dataclass
class Recipe:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainSection = field(default_factory=TrainSection)
    name: str = "run"


RECIPE = """\
name: tiny
model:
  hidden: 64
  pooling: last
data:
  train_manifest: data/train.jsonl
  langs: [en, es]
  weights: {en: 0.7, es: 0.3}
train:
  max_steps: 20
  lr: 3e-4
  freeze: [encoder.feature_extractor]
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_nested_sections_with_types(tmp_path):
    cfg = load_config(Recipe, write(tmp_path, RECIPE))
    assert cfg.name == "tiny"
    assert cfg.model == ModelConfig(hidden=64, pooling=Pooling.LAST)
    assert cfg.data.train_manifest == Path("data/train.jsonl")
    assert cfg.data.langs == ["en", "es"] and cfg.data.weights == {"en": 0.7, "es": 0.3}
    assert cfg.train.lr == 3e-4  # PyYAML reads 3e-4 as a string; float fields accept it
    assert cfg.train.max_steps == 20 and cfg.train.freeze == ["encoder.feature_extractor"]
    assert cfg.data.shape == (2, 3) and cfg.data.max_duration == 20.0


def test_unknown_key_names_key_file_line_and_suggests(tmp_path):
    path = write(tmp_path, RECIPE.replace("  max_steps: 20", "  max_step: 20"))
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    message = str(err.value)
    assert f"{path}:10: unknown key 'train.max_step'" in message
    assert "did you mean 'max_steps'?" in message
    assert "valid keys in 'train': max_steps, lr, schedule, shuffle, freeze" in message


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, RECIPE + "trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:13: unknown key 'trian' \(did you mean "
                       r"'train'\?\); valid keys: data, model, train, name"):
        load_config(Recipe, path)


def test_wrong_types_name_key_and_expected_type(tmp_path):
    cases = {
        "  max_steps: 20": ("  max_steps: twenty", r":10: 'train.max_steps' must be int, got str"),
        "  hidden: 64": ("  hidden: 6.5", r":3: 'model.hidden' must be int, got float 6.5"),
        "  lr: 3e-4": ("  lr: fast", r":11: 'train.lr' must be float, got str 'fast'"),
        "  langs: [en, es]": ("  langs: [en, no]",
                              r":7: 'data.langs\[1\]' must be str, got bool False; quote it"),
        "name: tiny": ("name: [a]", r":1: 'name' must be str, got list"),
        "  weights: {en: 0.7, es: 0.3}": ("  weights: [0.7]",
                                          r":8: 'data.weights' must be dict\[str, float\]"),
        "  pooling: last": ("  pooling: max", r":4: 'model.pooling' must be one of 'mean', 'last'"),
    }
    for old, (new, pattern) in cases.items():
        path = write(tmp_path, RECIPE.replace(old, new))
        with pytest.raises(ConfigError, match=pattern):
            load_config(Recipe, path)


def test_literal_choices_and_suggestion(tmp_path):
    path = write(tmp_path, RECIPE + "  schedule: cosin\n")
    with pytest.raises(ConfigError, match=r":13: 'train.schedule' must be one of 'constant', "
                       r"'cosine', 'tri_stage'; got 'cosin' \(did you mean 'cosine'\?\)"):
        load_config(Recipe, path)
    assert load_config(Recipe, path, ["train.schedule=tri_stage"]).train.schedule == "tri_stage"


def test_missing_required_key_and_post_init_errors(tmp_path):
    path = write(tmp_path, "model:\n  hidden: 8\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml: missing required key 'data'"):
        load_config(Recipe, path)
    path = write(tmp_path, "data: {}\n")
    with pytest.raises(ConfigError, match=r":1: missing required key 'data.train_manifest'"):
        load_config(Recipe, path)
    path = write(tmp_path, RECIPE.replace("max_steps: 20", "max_steps: 0"))
    with pytest.raises(ConfigError, match=r":9: invalid 'train': max_steps must be >= 1, got 0"):
        load_config(Recipe, path)


def test_overrides_follow_yaml_scalar_rules(tmp_path):
    path = write(tmp_path, RECIPE)
    cfg = load_config(Recipe, path, [
        "train.max_steps=5", "train.lr=1e-3", "train.shuffle=false", "data.max_duration=null",
        "data.langs=[fr, de]", "data.shape=[4, 5]", "name=no", "model.dropout=0",
        "data.weights.fr=0.5", "model.lora.r=4", "data.train_manifest=other.jsonl",
    ])
    assert cfg.train.max_steps == 5 and cfg.train.lr == 1e-3 and cfg.train.shuffle is False
    assert cfg.data.max_duration is None and cfg.data.langs == ["fr", "de"]
    assert cfg.data.shape == (4, 5)
    assert cfg.name == "no"  # str fields take the text as written (not YAML's False)
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.data.weights == {"en": 0.7, "es": 0.3, "fr": 0.5}  # dict entries can be added
    assert cfg.model.lora == LoraConfig(r=4)  # a null Optional section starts from defaults
    assert cfg.data.train_manifest == Path("other.jsonl")
    assert load_config(Recipe, path, ["name='quoted'"]).name == "quoted"


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, RECIPE)
    with pytest.raises(ConfigError, match=r"override 'train.max_step=5': unknown key "
                       r"'train.max_step' \(did you mean 'max_steps'\?\); valid keys in 'train'"):
        load_config(Recipe, path, ["train.max_step=5"])
    with pytest.raises(ConfigError, match=r"override 'train.max_steps=many': 'train.max_steps' "
                       r"must be int, got str 'many'"):
        load_config(Recipe, path, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"override 'train.shuffle=1': 'train.shuffle' must be "
                       r"bool, got int 1; use true or false"):
        load_config(Recipe, path, ["train.shuffle=1"])
    with pytest.raises(ConfigError, match=r"override 'train.max_steps': expected key=value"):
        load_config(Recipe, path, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"'name' is a str, not a section"):
        load_config(Recipe, path, ["name.first=x"])
    with pytest.raises(ConfigError, match=r"override 'data.shape=\[1\]': 'data.shape' must be a "
                       r"list of 2 values"):
        load_config(Recipe, path, ["data.shape=[1]"])
    with pytest.raises(ConfigError, match=r"recipe\.yaml:9: invalid 'train' \(after override "
                       r"'train.max_steps=0'\): max_steps must be >= 1"):
        load_config(Recipe, path, ["train.max_steps=0"])


def test_apply_overrides_returns_a_new_object():
    cfg = config_from_dict(Recipe, {"data": {"train_manifest": "a.jsonl"}})
    changed = apply_overrides(cfg, ["train.freeze=[encoder]", "model.hidden=7"])
    assert changed.train.freeze == ["encoder"] and changed.model.hidden == 7
    assert cfg.train.freeze == [] and cfg.model.hidden == 32
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden' \(did you mean 'hidden'"):
        apply_overrides(cfg, ["model.hiden=3"])


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(Recipe, write(tmp_path, RECIPE),
                      ["model.lora.alpha=32", "data.max_duration=null", "name=no"])
    save_config(cfg, tmp_path / "saved.yaml")
    again = load_config(Recipe, tmp_path / "saved.yaml")
    assert again == cfg
    assert config_to_dict(again)["data"]["train_manifest"] == "data/train.jsonl"
    assert config_to_dict(again)["model"]["pooling"] == "last"
    # and from plain data (e.g. a checkpoint's config.json)
    assert config_from_dict(Recipe, config_to_dict(cfg)) == cfg


def test_no_python_tags_or_code_from_yaml(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:1: invalid YAML.*!!python"):
        load_config(Recipe, path)


def test_invalid_yaml_duplicate_keys_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.yaml:3: invalid YAML: mapping values are "
                       "not allowed here"):
        load_config(Recipe, write(tmp_path, "model:\n  hidden: 3\n  x: a: b\n"))
    with pytest.raises(ConfigError, match=r":3: duplicate key 'model.hidden' \(first on line 2\)"):
        load_config(Recipe, write(tmp_path, "model:\n  hidden: 3\n  hidden: 4\n"))
    with pytest.raises(ConfigError, match="top level of a recipe must be a mapping"):
        load_config(Recipe, write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: recipe file not found"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_section_given_a_scalar(tmp_path):
    with pytest.raises(ConfigError, match=r":1: 'model' must be a mapping of keys \(encoder, "
                       r"hidden, .*\), got int 3"):
        load_config(Recipe, write(tmp_path, "model: 3\ndata: {train_manifest: a}\n"))


def test_registry_looks_names_up_and_suggests():
    encoders = Registry("encoder")

    @encoders.register("wav2vec2")
    class Wav2Vec2:
        pass

    encoders.register("whisper", dict)
    assert encoders.get("wav2vec2") is Wav2Vec2 and "whisper" in encoders
    assert encoders.names() == ["wav2vec2", "whisper"]
    with pytest.raises(ConfigError, match=r"unknown encoder 'wav2vec' \(did you mean 'wav2vec2'"
                       r"\?\); available: wav2vec2, whisper"):
        encoders.get("wav2vec")


def test_dataclass_defaults_are_not_shared():
    a = config_from_dict(Recipe, {"data": {"train_manifest": "a"}})
    b = config_from_dict(Recipe, {"data": {"train_manifest": "b"}})
    a.train.freeze.append("x")
    assert b.train.freeze == []
    assert dataclasses.asdict(b)["data"]["train_manifest"] == Path("b")


@dataclass
class TaskRecipe:
    """A task that declares its own training defaults (as speechlm's tasks do)."""
    train: TrainSection = field(default_factory=lambda: TrainSection(lr=3e-3,
                                                                     schedule="constant"))
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig(r=4)))


def test_a_section_given_in_part_keeps_the_tasks_defaults(tmp_path):
    cfg = load_config(TaskRecipe, write(tmp_path, "train: {max_steps: 5}\nmodel: {lora: {alpha: 2}}\n"))
    assert cfg.train == TrainSection(max_steps=5, lr=3e-3, schedule="constant")
    assert cfg.model.lora == LoraConfig(r=4, alpha=2.0)  # nested sections too
    # an override that creates the section keeps them as well
    cfg = load_config(TaskRecipe, write(tmp_path, "{}\n"), ["train.max_steps=7"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.schedule) == (7, 3e-3, "constant")
    # what is given is still checked
    with pytest.raises(ConfigError, match=r"invalid 'train'.*max_steps must be >= 1"):
        load_config(TaskRecipe, write(tmp_path, "train: {max_steps: 0}\n"))
    a = load_config(TaskRecipe, write(tmp_path, "train: {max_steps: 5}\n"))
    a.train.freeze.append("x")
    assert load_config(TaskRecipe, write(tmp_path, "train: {max_steps: 5}\n")).train.freeze == []


def test_a_real_tasks_train_defaults_survive_a_short_train_section(tmp_path):
    from speechlm.recipes import load_recipe

    path = write(tmp_path, "task: blsp\nmodel: {encoder_path: enc, llm_path: llm}\n"
                           "train: {max_steps: 3}\n")
    _, cfg = load_recipe(path)
    # BLSP's own defaults (lr 1e-3, weight decay 0.05, checkpoint picked on align_kl), not
    # TrainConfig's generic ones (1e-4, 0.01, loss)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.weight_decay,
            cfg.train.best_metric) == (3, 1e-3, 0.05, "align_kl")
