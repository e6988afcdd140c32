"""Sharded checkpoints of a `train.sharding: fsdp` run, and gathering them into plain files.

A sharded step checkpoint is `output_dir/step_000100/` holding

    sharded/             torch.distributed.checkpoint (DCP): {"model", "optimizer"}, one
                         file per rank plus .metadata; parameters frozen for the whole
                         run are left out, as in a DDP checkpoint
    trainer_state.pt     as in a DDP checkpoint (step, sampler, scheduler, every rank's RNG,
                         world_size) plus "sharding": "fsdp"
    config.json          the run's config snapshot
    hf_config/           the transformers config of the model (when it is one), so the
                         weights can be gathered into a transformers directory

It is written like every checkpoint: into `step_000100.tmp/` (every rank its
shard, rank 0 the rest), then renamed by rank 0, so a killed save leaves only a
`.tmp` that resume ignores. The processes must share the output directory.
Resume needs the same number of processes (the sampler position and RNG
streams are per rank); `gather()` turns one into files any process can read.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from ..jsonl import writing
from . import checkpoint, distributed
from .checkpoint import CONFIG_FILE, SHARDED_DIR, STATE_FILE, CheckpointError

HF_CONFIG_DIR = "hf_config"
SHARDING = "fsdp"


def save_sharded(directory, *, model, optimizer, trainer_state: dict, config: dict | None,
                 hf_model=None) -> Path:
    """Write a sharded checkpoint atomically (collective: every rank calls it). `hf_model`: a
    transformers model whose config is stored for gathering (None: not one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    main = distributed.is_main_process()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        with writing(final):
            model_state, optimizer_state = get_state_dict(model, optimizer)
            # returns once every rank's file and the metadata are written (and fsynced)
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     checkpoint_id=tmp / SHARDED_DIR)
            if main:
                torch.save({**trainer_state, "sharding": SHARDING}, tmp / STATE_FILE)
                (tmp / CONFIG_FILE).write_text(json.dumps(config or {}, indent=2, default=str)
                                               + "\n", encoding="utf-8")
                if hf_model is not None:
                    hf_model.config.save_pretrained(tmp / HF_CONFIG_DIR)
                    if getattr(hf_model, "generation_config", None) is not None:
                        hf_model.generation_config.save_pretrained(tmp / HF_CONFIG_DIR)
                for file in tmp.iterdir():
                    checkpoint._fsync(file)
                checkpoint._fsync(tmp)
    except Exception:
        if main:  # a failed write (a full disk): give the space back, keep the last good one
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        checkpoint.publish(tmp, final)
    distributed.barrier()
    return final


def read_trainer_state(path) -> dict:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def check_resumable(path, state: dict, world_size: int) -> None:
    """CheckpointError unless `path` (trainer `state`) can resume a sharded run of
    `world_size` processes."""
    if state.get("sharding") != SHARDING:
        raise CheckpointError(
            f"{path}: written without sharding (train.sharding=none), but this run has "
            "train.sharding=fsdp; resume it with train.sharding=none, or start the sharded run "
            "in a new train.output_dir")
    written = int(state.get("world_size", 0))
    if written != world_size:
        raise CheckpointError(
            f"{path}: this sharded checkpoint was written by {written} processes but this run "
            f"has {world_size}; resume it with torchrun --nproc_per_node {written} (the sampler "
            "position and RNG streams are per process), or gather its weights with "
            f"`speechlm convert fsdp {path} OUT_DIR` and start a new run from them")


def load_sharded(path, *, model, optimizer) -> None:
    """Load the model and optimizer shards of `path` into a sharded model and its optimizer
    (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=Path(path) / SHARDED_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


# -- gathering (one process, no process group) --------------------------------------------


def resolve(path) -> Path:
    """A sharded step checkpoint, or the newest one of a run directory."""
    path = Path(path)
    if not checkpoint.is_complete(path):
        latest = checkpoint.latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no complete checkpoint there (expected a "
                                  "step_NNNNNN directory or a run directory holding them)")
        path = latest
    if not checkpoint.is_sharded(path):
        raise CheckpointError(f"{path}: not a sharded checkpoint (it has "
                              f"{checkpoint.MODEL_FILE}, which is already plain weights)")
    return path


def load_full_model_state(path) -> dict[str, torch.Tensor]:
    """The whole model state_dict of a sharded checkpoint, on CPU (its optimizer is not read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if distributed.is_distributed():
        raise CheckpointError("gather a sharded checkpoint in a single process, not under "
                              "torchrun")
    reader = FileSystemReader(Path(path) / SHARDED_DIR)
    prefix = "model."
    state = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in reader.read_metadata().state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return state


def gather(path, out_dir, *, extras=None) -> Path:
    """Write the weights of sharded checkpoint `path` (or a run dir's newest) to `out_dir`:
    a transformers directory (config + safetensors, `from_pretrained` loads it) when the model
    was a transformers model, else a plain checkpoint directory (model.safetensors,
    trainer_state.pt, config.json: what `checkpoint.load_checkpoint` reads, without the
    optimizer). `extras(out_tmp, run_config, run_dir)`: the recipe's other files (tokenizer,
    ...).
    Written to `out_dir.tmp` and renamed. Returns out_dir."""
    path = resolve(path)
    out_dir = Path(out_dir)
    state = load_full_model_state(path)
    trainer_state = read_trainer_state(path)
    run_config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")) \
        if (path / CONFIG_FILE).is_file() else {}
    if not (path / HF_CONFIG_DIR).is_dir():
        kept = {key: trainer_state[key] for key in ("step", "epoch", "world_size", "sharding")
                if key in trainer_state}
        return checkpoint.save_checkpoint(out_dir, model_state=state, trainer_state=kept,
                                          config=run_config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with writing(out_dir):
            _save_transformers(path, state, tmp)
            if extras is not None:
                extras(tmp, run_config, path.parent)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    checkpoint.publish(tmp, out_dir)
    return out_dir


def _save_transformers(path: Path, state: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path / HF_CONFIG_DIR)
    architectures = config.architectures or []
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in architectures) \
        else AutoModel
    model = auto.from_config(config)
    missing = sorted(set(model.state_dict()) - set(state))
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if [key for key in missing if key not in tied]:
        raise CheckpointError(
            f"{path}: the checkpoint lacks weights of the model ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}): they were frozen for the whole run and "
            "are not stored; load them from the run's base model instead")
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointError(f"{path}: weights the model of {HF_CONFIG_DIR}/ does not have: "
                              f"{', '.join(sorted(unexpected)[:5])}")
    model.tie_weights()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line of output from the command, not a bar
    try:
        model.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if (path / HF_CONFIG_DIR / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(path / HF_CONFIG_DIR).save_pretrained(out)
