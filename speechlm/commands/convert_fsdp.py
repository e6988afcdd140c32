"""`speechlm convert fsdp CHECKPOINT OUT`: gather a sharded (train.sharding=fsdp) checkpoint."""

from __future__ import annotations

import argparse

HELP = ("gather a sharded checkpoint (train.sharding=fsdp) into a transformers directory, or "
        "plain weights when the model is not a transformers model")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a step_NNNNNN checkpoint, or a run directory (its newest one)")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist)")


def run(args: argparse.Namespace) -> int:
    import importlib
    import json
    from pathlib import Path

    from ..errors import ConfigError
    from ..recipes import TASKS
    from ..training import sharded_checkpoint
    from ..training.checkpoint import CONFIG_FILE

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output directory")
    path = sharded_checkpoint.resolve(args.checkpoint)
    task = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("task")
    # the recipe's own files beside the weights (text_lm: tokenizer, speechlm.json)
    extras = getattr(importlib.import_module(TASKS[task]), "gathered_files", None) \
        if task in TASKS else None
    sharded_checkpoint.gather(path, out, extras=extras)
    kind = ("a transformers directory" if (path / sharded_checkpoint.HF_CONFIG_DIR).is_dir()
            else "a plain checkpoint (model.safetensors)")
    print(f"{out}: {kind} with the weights of {path}")
    return 0
