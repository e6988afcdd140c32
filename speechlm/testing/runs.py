"""What tests of the recipe runners share: run a recipe file, read a run's train losses."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["run_recipe", "train_losses", "whisper_decoder_sections"]


def run_recipe(path, overrides=()):
    """Run a recipe file with `key=value` overrides, as `speechlm train` does; its results."""
    from ..recipes import load_recipe

    module, config = load_recipe(path, list(overrides))
    return module.run(config)


def train_losses(run_dir) -> list[float]:
    """The logged train losses of a run directory, in order."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r.get("split") == "train"]


def whisper_decoder_sections(corpus: dict, cache, out, *, steps: int, every: int,
                             data: str = "") -> str:
    """The data, eval and train sections of a tiny Whisper-decoder recipe (whisper_lora,
    speech_tokenizer_whisper) on a {train, dev} Spanish corpus: every utterance in one
    batch, a constant high lr, so the loss falls step by step; `data`: more data keys."""
    return f"""\
data:
  train:
    - {{manifest: "{corpus['train']}", lang: es}}
  dev: "{corpus['dev']}"
  test: "{corpus['dev']}"
  max_batch_duration: 20.0   # all four in one batch: a loss that falls step by step
  num_buckets: 1
  encoder_cache: "{cache}"
{data}eval: {{examples: 0, max_new_tokens: 8}}
train:
  max_steps: {steps}
  lr: 1.0e-2
  schedule: constant
  log_every: 1
  best_metric: cer
  eval_every: {every}
  save_every: {every}
  tensorboard: false
  progress: false
  output_dir: "{out}"
"""
