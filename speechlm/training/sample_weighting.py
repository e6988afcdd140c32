"""Loss-based sample reweighting (arXiv 2502.06733): weight each sample of a batch by where
its loss lies between the batch's smallest and largest.

For per-sample mean losses l_1..l_N of the *global* batch (every rank's micro-batch):

    x_i = 2 delta (l_i - (l_max + l_min) / 2) / (l_max - l_min)     in [-delta, delta]
    f_i = min(x_i + delta, delta)      linupper: up-weight the harder half, flat above it
        = 1 - x_i^2 / delta^2          quadratic: up-weight the middle, down both ends
        = |x_i|                        extremes: up-weight both ends
    w   = softmax(f / r)               (no gradient; r ~ 0.4-1.0, smaller is sharper)

and the update minimises sum_i w_i l_i. For the first `warmup_steps` updates the weights are
uniform (the paper starts reweighting once the losses mean something). When every loss is
equal, x is 0 and the weights are uniform.

The trainer (`train.sample_weighting`) needs the objective's per-sample losses: an objective
that supports it has `sample_losses(batch) -> SampleLosses | None` besides `loss(batch)`.
`SampleLosses.coef` says how the objective reduces per-sample losses to its plain loss
(sum_i coef_i l_i; None: the mean), so uniform weights give exactly the plain loss and, e.g.,
CTC's token-mean reduction is kept: the weighted loss is sum_i (N w_i) coef_i l_i.

The weights are normalised over one global micro-batch: with grad_accum > 1 each micro-batch
is weighted on its own. With 2 items quadratic and extremes weight both equally (both are at
an end, |x| = delta); a batch of 1 is always uniform. Logged at each log step: weight_max and
weight_min (N w, so 1.0 is uniform), weight_ess (effective sample size over N) and
loss_plain (the loss without weights; `loss` is the weighted one that is trained on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from . import distributed

STRATEGIES = ("linupper", "quadratic", "extremes")

# Objectives with `sample_losses`, named in the error for those without (a test keeps this
# list equal to the classes that have the method).
SUPPORTED_OBJECTIVES = ("CTCObjective (task: ctc)",)


@dataclass
class SampleWeightingConfig:
    """`train.sample_weighting`: null (default) trains on the plain loss."""

    strategy: Literal["linupper", "quadratic", "extremes"] = "linupper"
    delta: float = 1.0
    r: float = 0.5                # softmax temperature
    warmup_steps: int = 1000      # updates with uniform weights first

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"train.sample_weighting.strategy must be one of "
                              f"{', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("delta", "r"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"train.sample_weighting.{name} must be a number > 0, got "
                                  f"{value!r} (the paper uses delta=1, r between 0.4 and 1.0)")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.sample_weighting.warmup_steps must be >= 0, got "
                              f"{self.warmup_steps} (0 reweights from the first update)")


@dataclass
class SampleLosses:
    """What `objective.sample_losses(batch)` returns.

    losses: [B] per-sample mean losses (with gradient), e.g. an utterance's loss per token.
    metrics: as the second item of `objective.loss(batch)`.
    coef: [B] the objective's plain loss is sum_i coef_i * losses_i (e.g. CTC token_mean:
          label_length_i / total labels); None: the plain loss is losses.mean().
    """

    losses: torch.Tensor
    metrics: dict
    coef: torch.Tensor | None = None


def scores(losses: torch.Tensor, strategy: str, delta: float) -> torch.Tensor:
    """f(x) of each loss in `losses` (1-D), x scaled into [-delta, delta] (see the module doc)."""
    low, high = losses.min(), losses.max()
    spread = high - low
    if spread > 0:
        x = 2 * delta * (losses - (high + low) / 2) / spread
    else:
        x = torch.zeros_like(losses)
    if strategy == "linupper":
        return torch.clamp(x + delta, max=delta)
    if strategy == "quadratic":
        return 1 - x * x / (delta * delta)
    if strategy == "extremes":
        return x.abs()
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def weights(losses: torch.Tensor, strategy: str, delta: float, r: float) -> torch.Tensor:
    """softmax(f / r) over `losses` (1-D; detached, float64): sums to 1."""
    with torch.no_grad():
        return torch.softmax(scores(losses.detach().double(), strategy, delta) / r, dim=0)


def relative_weights(losses: torch.Tensor, strategy: str, delta: float,
                     r: float) -> torch.Tensor:
    """N * softmax(f / r): 1.0 each (exactly) for a uniform batch, float64, no gradient."""
    with torch.no_grad():
        z = scores(losses.detach().double(), strategy, delta) / r
        e = torch.exp(z - z.max())
        return e * (len(losses) / e.sum())


def summary(rel: torch.Tensor) -> dict[str, float]:
    """weight_max / weight_min relative to uniform (1.0 each when uniform) and weight_ess,
    the effective sample size (sum w)^2 / sum w^2 as a fraction of the batch (1.0: uniform)."""
    if rel.numel() == 0:
        return {}
    return {"weight_max": float(rel.max()), "weight_min": float(rel.min()),
            "weight_ess": float(rel.sum() ** 2 / (rel * rel).sum() / rel.numel())}


def weighted_loss(out: SampleLosses, config: SampleWeightingConfig, *,
                  uniform: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's loss sum_i (N w_i) coef_i l_i, with w over the global batch (an all_gather
    under DDP; every rank must call it, with an empty `losses` if it has no items), and the
    weights' summary (and loss_plain, the unweighted loss). `uniform`: warm-up, w_i = 1/N (no communication)."""
    losses = out.losses.float()
    if uniform:
        rel_local = torch.ones_like(losses)
        stats = {"weight_max": 1.0, "weight_min": 1.0, "weight_ess": 1.0} if losses.numel() \
            else {}
    else:
        everyone, start = distributed.all_gather_1d(losses.detach())
        if everyone.numel() == 0:
            return losses.sum(), {}
        rel = relative_weights(everyone, config.strategy, config.delta, config.r)
        rel_local = rel[start:start + losses.numel()].to(losses.dtype)
        stats = summary(rel)
    if out.coef is None:
        loss = (rel_local * losses).mean() if losses.numel() else losses.sum()
        plain = losses.detach().mean() if losses.numel() else None
    else:
        coef = out.coef.detach().to(losses.dtype)
        loss = (rel_local * coef * losses).sum()
        plain = (coef * losses.detach()).sum()
    if plain is not None:
        stats["loss_plain"] = float(plain)  # what training without weights would report
    return loss, stats
