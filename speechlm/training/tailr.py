"""TaiLr token weighting (Ji et al., ICLR 2023; used against pseudo-label noise by Video
DataFlywheel, arXiv 2409.19532), adapted to CTC.

TaiLr weights the loss of each gold token by the model's own probability p of it:

    w = sg[ p / (gamma + (1 - gamma) p) ]     clamped to [w_min, 1]

(sg: no gradient). gamma = 1 gives w = p, a small gamma gives w near 1 unless p is small.
The effect is to trust what the model already finds plausible and to down-weight labels it
finds unlikely, which on pseudo-labels are often the teacher's mistakes. w_min keeps early
training, when every p is small, from switching the loss off.

CTC has no probability of the gold token: log P(y|x) sums over every alignment of the U
labels to the frames, so it does not split into per-label terms. The adaptation here is
per utterance: p = exp(log P(y|x) / U), the utterance's CTC probability normalised by its
length. Where a sequence probability is a product of per-token ones (an autoregressive
model), this is exactly their geometric mean, i.e. the per-token p that TaiLr would see,
averaged in the log domain. The utterance's loss is then multiplied by w (the same w for
each of its labels). Per utterance also fits the noise: a teacher's pseudo-label is wrong
as a transcript, not as scattered independent characters. The other candidate, per-token
weights from the best path's frame posteriors, was not used: the greedy best path is not
aligned to the label sequence (it is the model's own transcript, which can differ from the
pseudo-label), and weighting labels one by one would need a forced alignment per utterance
and a per-label split of the CTC gradient that CTC's sum over alignments does not have.

The weights leave the dev loss and scoring untouched: they only enter the training loss.
AdaTaiLr's adaptive gamma is not implemented: gamma is fixed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class TaiLrConfig:
    """`loss.tailr` of a CTC recipe (`tailr` of a self-training one); null: no weighting."""

    gamma: float = 0.5
    w_min: float = 0.1

    def __post_init__(self):
        if not (isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1):
            raise ConfigError(f"tailr.gamma must be in (0, 1], got {self.gamma!r} (1 weights "
                              "each utterance by its own probability, smaller values trust "
                              "more of them fully)")
        if not (isinstance(self.w_min, (int, float)) and math.isfinite(self.w_min)
                and 0 <= self.w_min <= 1):
            raise ConfigError(f"tailr.w_min must be in [0, 1], got {self.w_min!r} (the "
                              "smallest weight; e.g. 0.1)")


def tailr_weights(p: torch.Tensor, gamma: float, w_min: float) -> torch.Tensor:
    """clamp(p / (gamma + (1 - gamma) p), w_min, 1), without gradient."""
    p = p.detach()
    return (p / (gamma + (1 - gamma) * p)).clamp(min=w_min, max=1.0)


def ctc_label_probability(per_item_loss: torch.Tensor,
                          label_lengths: torch.Tensor) -> torch.Tensor:
    """exp(log P(y|x) / U) per utterance: the length-normalised CTC probability of its labels
    (per_item_loss: -log P(y|x) [B]; U: label_lengths [B]), without gradient."""
    lengths = label_lengths.clamp_min(1).to(per_item_loss.dtype)
    return torch.exp(-per_item_loss.detach() / lengths)
