"""Atomic, complete training checkpoints and finding the one to resume from.

A checkpoint is a directory `output_dir/step_000100/` holding

    model.safetensors    trainable weights and buffers (frozen pretrained weights
                         are rebuilt from their source, not copied each time)
    optimizer.pt         optimizer state_dict
    trainer_state.pt     step, epoch, sampler position, scheduler, grad scaler,
                         RNG states of every rank, counters (plain containers
                         and tensors only: loaded with torch.load(weights_only=True))
    config.json          snapshot of the run's config

Everything is written into `step_000100.tmp/`, fsynced, then renamed: a
directory with a final name is always complete, and a job killed while
saving leaves only a `.tmp` that resume ignores and the next run removes.
`output_dir/best/` (weights of the best evaluation so far) is written the
same way. Under `train.sharding: fsdp` a step checkpoint holds `sharded/` (a
torch.distributed.checkpoint directory, one file per rank) in place of
`model.safetensors` and `optimizer.pt`; see speechlm.training.sharded_checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpeechLMError
from ..jsonl import writing

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.json"
SHARDED_DIR = "sharded"           # model + optimizer of a train.sharding=fsdp run (DCP)
BEST_DIR = "best"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(SpeechLMError):
    """A checkpoint directory is missing, incomplete or does not fit this run."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written by another recipe or model."""


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    trainer_state: dict
    config: dict | None


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_checkpoint(directory, *, model_state: Mapping[str, torch.Tensor],
                    trainer_state: dict, optimizer_state: dict | None = None,
                    config: dict | None = None) -> Path:
    """Write a checkpoint atomically to `directory` (replacing an existing one). Returns it."""
    from safetensors.torch import save_file

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with writing(final):
            save_file(_unshared(model_state), str(tmp / MODEL_FILE), metadata={"format": "pt"})
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
            torch.save(trainer_state, tmp / STATE_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config or {}, indent=2, default=str)
                                           + "\n", encoding="utf-8")
            for file in tmp.iterdir():
                _fsync(file)
            _fsync(tmp)
    except Exception:
        # a failed write (a full disk): give the space back; the last good checkpoint stays.
        # (A kill leaves the .tmp, which the next run removes.)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final)
    return final


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` directory to `final`, replacing an existing one."""
    if final.exists():
        # Swap: final -> .old, tmp -> final, drop .old. A kill in between leaves
        # .old, which remove_stale() renames back when final is missing.
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(final.parent)


def is_sharded(path) -> bool:
    """A checkpoint written under train.sharding=fsdp (its weights are in sharded/)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def is_complete(path) -> bool:
    path = Path(path)
    return (path.is_dir() and not path.name.endswith((".tmp", ".old"))
            and ((path / MODEL_FILE).is_file() or is_sharded(path))
            and (path / STATE_FILE).is_file())


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete step checkpoints in `output_dir` as (step, path), oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir) -> Path | None:
    """The newest complete step checkpoint in `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_stale(output_dir) -> list[Path]:
    """Delete `.tmp` leftovers of killed saves (restoring an `.old` whose swap was cut). """
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for child in sorted(output_dir.iterdir()):
        if not child.is_dir():
            continue
        if child.name.endswith(".old"):
            final = child.with_name(child.name[: -len(".old")])
            if not final.exists():
                os.replace(child, final)
                continue
        if child.name.endswith((".tmp", ".old")):
            shutil.rmtree(child)
            removed.append(child)
    return removed


def rotate_checkpoints(output_dir, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints (None keeps all)."""
    if keep_last is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [path for _, path in found[: max(0, len(found) - keep_last)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(path, *, map_location="cpu", load_optimizer: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint directory (safetensors + torch.load(weights_only=True))."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(
            f"{path}: not a complete checkpoint directory (needs {MODEL_FILE} and "
            f"{STATE_FILE}); pass a directory like <output_dir>/step_000100")
    if is_sharded(path):
        raise CheckpointError(
            f"{path}: a sharded checkpoint (train.sharding=fsdp): resume it with "
            "train.sharding=fsdp under torchrun with as many processes as wrote it, or gather "
            f"its weights into a plain directory with `speechlm convert fsdp {path} OUT_DIR`")
    model_state = load_file(str(path / MODEL_FILE), device=str(map_location))
    optimizer_state = None
    if load_optimizer and (path / OPTIMIZER_FILE).is_file():
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location=map_location,
                                     weights_only=True)
    trainer_state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    config = None
    if (path / CONFIG_FILE).is_file():
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    return LoadedCheckpoint(path, model_state, optimizer_state, trainer_state, config)


def check_config_compatible(path, saved: Mapping | None, current: Mapping | None,
                            keys: Sequence[str]) -> None:
    """CheckpointMismatchError naming every differing field under the dotted `keys`."""
    if not saved or not current:
        return
    differences = []
    for key in keys:
        ours, theirs = _lookup(current, key), _lookup(saved, key)
        differences += [f"{name} (checkpoint: {a!r}, this run: {b!r})"
                        for name, a, b in _diff(theirs, ours, key)]
    if differences:
        raise CheckpointMismatchError(
            f"{path}: checkpoint was written by a different model/recipe; differs in "
            f"{_shorten(differences)}. Point train.output_dir at a new directory (or resume "
            "with the recipe that wrote it)")


def check_weights_compatible(path, saved: Mapping[str, torch.Tensor],
                             expected: Mapping[str, tuple]) -> None:
    """CheckpointMismatchError when weight names or shapes differ from the model's."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(f"{k} (checkpoint {tuple(saved[k].shape)}, model {tuple(expected[k])})"
                    for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k]))
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing from checkpoint: {_shorten(missing)}")
    if unexpected:
        parts.append(f"not in this model: {_shorten(unexpected)}")
    if shapes:
        parts.append(f"different shapes: {_shorten(shapes)}")
    raise CheckpointMismatchError(
        f"{path}: checkpoint weights do not fit this model ({'; '.join(parts)}). It was written "
        "by another model or freezing setup; point train.output_dir at a new directory")


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; tied weights are copied (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


def _lookup(tree: Mapping, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _diff(a, b, prefix: str) -> list[tuple[str, object, object]]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    return [] if a == b else [(prefix, a, b)]


def _shorten(items: Sequence[str], limit: int = 8) -> str:
    text = ", ".join(items[:limit])
    return text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
