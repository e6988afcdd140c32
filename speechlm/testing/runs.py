"""What tests of the recipe runners share: run a recipe file, read a run's train losses."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["run_recipe", "train_losses"]


def run_recipe(path, overrides=()):
    """Run a recipe file with `key=value` overrides, as `speechlm train` does; its results."""
    from ..recipes import load_recipe

    module, config = load_recipe(path, list(overrides))
    return module.run(config)


def train_losses(run_dir) -> list[float]:
    """The logged train losses of a run directory, in order."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r.get("split") == "train"]
