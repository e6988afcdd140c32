"""FSDP2 sharding of the trained model under torchrun (`train.sharding: fsdp`).

DDP keeps a whole copy of the model, its gradients and the AdamW moments on
every device; a 9B LLM trained whole does not fit one GPU that way. FSDP2
(`torch.distributed.fsdp.fully_shard`) splits every parameter over the
processes: each transformer block is one unit (gathered for its forward and
backward, freed after), the root holds what is left (embeddings, final norm,
LM head). The optimizer then steps on the local shards only.

The objective must call the root model's forward (FSDP gathers the root's
parameters in its forward hook), as `CausalLMObjective` does under sharding,
and every rank must run that forward for every micro-batch: the gathers are
collectives, so an objective that returns None (nothing to learn) on one rank
only would stall the others. Evaluation runs on every rank for the same reason.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one: modules whose class a transformers model inside
    `model` names in `_no_split_modules` (its decoder/encoder layers), outermost first."""
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())
    blocks, inside = [], set()
    for module in model.modules():
        if type(module).__name__ in block_names and id(module) not in inside:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def shard_model(model: nn.Module, amp_dtype: torch.dtype | None) -> int:
    """Shard `model` in place over the default process group: each transformer block, then the
    root. `amp_dtype` (bf16): parameters are gathered and computed in it, gradients reduced
    in fp32, the sharded master weights stay fp32. Returns the number of blocks sharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) \
        if amp_dtype is not None else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    # The root keeps its parameters after forward: backward needs them at once.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    return len(blocks)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Reduce-scatter gradients in this backward only when `enabled` (the last micro-batch of
    an update); the others accumulate unsharded gradients locally, as DDP's no_sync does."""
    if enabled:
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients: the norm of the whole gradient, not one shard's."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state_dict (trainable parameters and buffers; parameters frozen for the
    whole run left out, as in a DDP checkpoint) on CPU, on rank 0; {} on the others.
    Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
