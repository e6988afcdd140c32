"""`torchrun` data parallelism: process-group setup and the few collectives training needs.

Single process is the default and costs nothing: without `WORLD_SIZE` > 1 in
the environment every helper is a no-op (rank 0 of 1). Under
`torchrun --nproc_per_node N` call `init_distributed()` before building the
batch sampler, so the sampler can be sharded with `rank()` / `world_size()`.
Backend: nccl when the job trains on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _wants_cuda(device: str) -> bool:
    if device == "cuda":
        return True
    return device == "auto" and torch.cuda.is_available()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group described by the environment (idempotent).

    `device` is the trainer's setting ("auto", "cpu", "cuda"): CUDA jobs use
    nccl and pin each process to GPU LOCAL_RANK; CPU jobs use gloo.
    """
    if is_distributed():
        return info()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(0, 1, 0, None)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _wants_cuda(device):
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return info()


def info() -> DistInfo:
    return DistInfo(rank(), world_size(), local_rank(),
                    dist.get_backend() if is_distributed() else None)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device this process trains on: cuda:LOCAL_RANK when CUDA is used, else cpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("train.device=cuda but no CUDA device is available; "
                          "use train.device=auto or cpu")
    if _wants_cuda(device):
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(fn):
    """fn() on the main process first, then on the others (after a barrier): work that
    builds something into a shared cache (a zoo model, a dataset) happens once, and the
    other ranks find it done."""
    if not is_distributed():
        return fn()
    if is_main_process():
        value = fn()
        barrier()
        return value
    barrier()
    return fn()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (returns the tensor)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world_size()
    return tensor


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_1d(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's 1-D `tensor` concatenated in rank order (lengths may differ, 0 included),
    on every rank, and the index where this rank's part starts."""
    if not is_distributed():
        return tensor, 0
    size = torch.tensor([tensor.numel()], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    start = sum(sizes[: rank()])
    longest = max(sizes)
    if longest == 0:
        return tensor.new_empty(0), start
    padded = tensor.new_zeros(longest)
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]), start


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src`, on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over the ranks that report it (keys may differ between ranks)."""
    if not is_distributed():
        return dict(metrics)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for part in all_gather_object({k: float(v) for k, v in metrics.items()}):
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {key: sums[key] / counts[key] for key in sums}


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun job)."""
    if is_distributed():
        dist.destroy_process_group()
