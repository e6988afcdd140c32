"""Recipe runners: one module per training task, chosen by the recipe's `task:` key.

A runner module defines `Config` (a dataclass whose first field is `task: str`
and whose `train` field is a `TrainConfig`) and `run(config) -> dict` (the
final metrics). `speechlm train recipes/tiny/ctc_en.yaml train.max_steps=20`
reads the task, validates the YAML into that module's `Config` and runs it.
Runners sit above pipelines in the import order: they may use everything.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from ..errors import ConfigError

# task name -> runner module
TASKS: dict[str, str] = {
    "ctc": "speechlm.recipes.ctc",
    "wav2vec2_pretrain": "speechlm.recipes.wav2vec2_pretrain",
    "text_lm": "speechlm.recipes.text_lm",
    "text_skills": "speechlm.recipes.text_skills",
    "self_training": "speechlm.recipes.self_training",
    "blsp": "speechlm.recipes.blsp",
    "inserter": "speechlm.recipes.inserter",
    "text_to_token": "speechlm.recipes.text_to_token",
    "speech_tokenizer": "speechlm.recipes.speech_tokenizer",
    "speech_tokenizer_whisper": "speechlm.recipes.speech_tokenizer_whisper",
    "interleaved": "speechlm.recipes.interleaved",
    "whisper_lora": "speechlm.recipes.whisper_lora",
}


def recipe_task(path) -> str:
    """The `task:` of a recipe file, with a clear error when it is missing or unknown."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or "task" not in data:
        raise ConfigError(f"{path}: a recipe must start with `task: NAME`; "
                          f"known tasks: {', '.join(sorted(TASKS)) or '(none)'}")
    task = data["task"]
    if task not in TASKS:
        import difflib

        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: task: unknown task '{task}'{hint}; "
                          f"known tasks: {', '.join(sorted(TASKS))}")
    return task


def load_recipe(path, overrides=()):
    """(runner module, validated config) for a recipe file plus `key=value` overrides."""
    from ..config import load_config

    task = recipe_task(path)
    if any(o.split("=", 1)[0].strip() == "task" for o in overrides):
        raise ConfigError("override 'task=...': the task is fixed by the recipe file; "
                          "use another recipe instead")
    module = importlib.import_module(TASKS[task])
    config = load_config(module.Config, path, overrides)
    check_sharding(task, module, config)
    return module, config


def check_sharding(task: str, module, config) -> None:
    """ConfigError when the recipe asks train.sharding=fsdp of a runner that cannot finish a
    sharded run (its end-of-run code needs the whole model in one process)."""
    # a recipe that chains other runners keeps its train section inside theirs (self_training:
    # ctc.train)
    train = getattr(config, "train", None) or getattr(getattr(config, "ctc", None), "train", None)
    if train is None or train.sharding == "none" or getattr(module, "SHARDING_SUPPORTED", False):
        return
    ready = sorted(name for name, path in TASKS.items()
                   if getattr(importlib.import_module(path), "SHARDING_SUPPORTED", False))
    raise ConfigError(f"train.sharding={train.sharding}: task '{task}' does not support "
                      f"sharded training yet (tasks that do: {', '.join(ready)}); set "
                      "train.sharding=none to train it with DDP")


def run_recipe(path, overrides=()) -> dict:
    module, config = load_recipe(path, overrides)
    return module.run(config)


def start_run(train_config, threads: int | None = None):
    """(distributed info, output dir, say) for a runner: torch threads set, the process
    group up, and `say(message)` printing on the main process when progress is on."""
    import torch

    from ..training import distributed

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1 or null, got {threads}")
        torch.set_num_threads(threads)
    dist = distributed.init_distributed(train_config.device)
    show = dist.is_main and train_config.progress

    def say(message: str) -> None:
        if show:
            print(message, flush=True)

    return dist, Path(train_config.output_dir), say
