"""Training: one loop for every objective, with checkpoints, schedules and DDP.

    from speechlm.training.trainer import Trainer, TrainConfig

Submodules: `trainer` (the loop and TrainConfig), `schedules` (lr factors),
`checkpoint` (atomic save / resume), `distributed` (torchrun helpers),
`metrics_log` (metrics.jsonl + TensorBoard). Importing this package does not
import torch; the names below are loaded on first use.
"""

from .._lazy import lazy_exports

_LAZY = {
    "Trainer": "trainer", "TrainConfig": "trainer", "TrainResult": "trainer",
    "NonFiniteLossError": "trainer", "CheckpointError": "checkpoint",
    "CheckpointMismatchError": "checkpoint",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
