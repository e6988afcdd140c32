"""Learning-rate schedules as a factor of the peak lr, one value per optimizer update.

`lr_factor(u, ...)` is the multiplier for update `u` (0-based): update u runs
with lr = peak_lr * lr_factor(u). Schedules:

- constant: linear warmup, then 1.
- linear:   linear warmup, then linear decay to `final_lr_scale` at max_steps.
- cosine:   linear warmup, then half a cosine down to `final_lr_scale` at max_steps.
- tri_stage (fairseq, used for wav2vec2 CTC fine-tuning): phases given as
  ratios of max_steps (default 0.1 / 0.4 / 0.5): linear warmup from
  `init_lr_scale` to 1, hold at 1, exponential decay to `final_lr_scale`,
  then stay there.

Warmup for the first three is nanoGPT's (u + 1) / (warmup_steps + 1), so the
first update already moves the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("constant", "linear", "cosine", "tri_stage")


def lr_factor(step: int, *, schedule: str, max_steps: int, warmup_steps: int = 0,
              final_lr_scale: float = 0.05, init_lr_scale: float = 0.01,
              tri_stage_ratios: tuple[float, float, float] = (0.1, 0.4, 0.5)) -> float:
    """Multiplier of the peak lr for 0-based update `step`."""
    if schedule == "tri_stage":
        return _tri_stage(step, max_steps, tri_stage_ratios, init_lr_scale, final_lr_scale)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - final_lr_scale) * progress
    return final_lr_scale + (1.0 - final_lr_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


def tri_stage_phases(max_steps: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(warmup, hold, decay) update counts of the tri-stage schedule."""
    warmup, hold, decay = (int(r * max_steps) for r in ratios)
    return warmup, hold, decay


def _tri_stage(step: int, max_steps: int, ratios, init_lr_scale: float,
               final_lr_scale: float) -> float:
    warmup, hold, decay = tri_stage_phases(max_steps, ratios)
    if step < warmup:
        return init_lr_scale + (1.0 - init_lr_scale) * step / warmup
    step -= warmup
    if step < hold:
        return 1.0
    step -= hold
    if step < decay:
        return math.exp(math.log(final_lr_scale) * step / decay)
    return final_lr_scale


def lr_lambda(config) -> Callable[[int], float]:
    """The factor function for a TrainConfig-like object (fields named as in lr_factor)."""
    # schedule_steps: the length the schedule is laid out over, when a run stops before it
    kwargs = dict(schedule=config.schedule,
                  max_steps=getattr(config, "schedule_steps", None) or config.max_steps,
                  warmup_steps=config.warmup_steps, final_lr_scale=config.final_lr_scale,
                  init_lr_scale=config.init_lr_scale,
                  tri_stage_ratios=tuple(config.tri_stage_ratios))

    def factor(step: int) -> float:
        return lr_factor(step, **kwargs)

    return factor


def build_scheduler(optimizer, config):
    """A torch LambdaLR following `lr_factor`; call `.step()` once per optimizer update."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_lambda(config))
