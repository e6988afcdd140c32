"""SALT (arXiv 2410.18779): a smaller teacher LM helps the student early, then steps aside.

For the first `kd_steps` updates the loss on each learned token is

    (1 - w) * CE(gold, p_s) + w * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))

averaged over the batch's learned tokens: the teacher's soft labels are extra supervision
(tau^2 keeps the KD gradient's scale independent of tau, as in Hinton et al.). From update
`kd_steps` on the loss is the plain CE and the teacher is not run. The switch depends only
on the trainer's update count, which every checkpoint stores, so a resumed run switches at
the same update as an uninterrupted one.

Data selection (SALT_DS, optional): the KD phase draws only from "challenging yet
learnable" sequences. The teacher scores each training sequence once, before training:
a token is learnable when its gold token is among the teacher's top-k predictions, and the
sequence's score is the median of the teacher's loss over its learnable tokens. A sequence
with no learnable token scores NaN and is never kept. The kept sequences are those scoring
at or above the (1 - keep_fraction) quantile of the pool's scores (keep_fraction 0.5: at or
above the median). After the KD phase training draws from all the data again.

The teacher must share the student's tokenizer (same vocabulary, same ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class SelectionConfig:
    """`salt.selection`: which sequences the KD phase trains on (null: all of them)."""

    top_k: int = 10               # a token is learnable when the gold token is in the top-k
    keep_fraction: float = 0.5    # kept share of the scored pool (0.5: at or above the median)

    def __post_init__(self):
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"salt.selection.top_k must be an integer >= 1, got "
                              f"{self.top_k!r} (the paper's learnability test: gold token in "
                              "the teacher's top-k)")
        if not (isinstance(self.keep_fraction, (int, float)) and 0 < self.keep_fraction <= 1):
            raise ConfigError(f"salt.selection.keep_fraction must be in (0, 1], got "
                              f"{self.keep_fraction!r} (0.5 keeps the sequences at or above "
                              "the median score)")


@dataclass
class SALTConfig:
    """`salt:` of a text LM recipe; null (the default) trains on plain CE throughout."""

    teacher: str = ""             # the smaller LM: a directory, cached hub id or zoo:NAME
    kd_steps: int = 0             # updates with the KD loss; plain CE afterwards
    kd_weight: float = 0.5        # w: the KD term's share of the loss
    temperature: float = 1.0      # tau, applied to both teacher and student logits
    selection: SelectionConfig | None = None

    def __post_init__(self):
        if isinstance(self.selection, dict):
            self.selection = SelectionConfig(**self.selection)
        if not self.teacher:
            raise ConfigError("salt.teacher is empty: name the smaller teacher LM (a trained "
                              "model directory, e.g. runs/tiny/llm_small/final, or zoo:NAME)")
        if not isinstance(self.kd_steps, int) or self.kd_steps < 1:
            raise ConfigError(f"salt.kd_steps must be an integer >= 1, got {self.kd_steps!r} "
                              "(updates distilled from the teacher; the paper uses the first "
                              "~15-20% of training; set salt: null to train without SALT)")
        if not (isinstance(self.kd_weight, (int, float)) and 0 < self.kd_weight <= 1):
            raise ConfigError(f"salt.kd_weight must be in (0, 1], got {self.kd_weight!r} "
                              "(the KD term's share of the loss; 0 would be plain CE)")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ConfigError(f"salt.temperature must be a number > 0, got "
                              f"{self.temperature!r} (1.0 distills the teacher's own "
                              "distribution)")


def kd_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) per row [N]."""
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return kl * (temperature * temperature)


def salt_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              targets: torch.Tensor, *, weight: float, temperature: float,
              probs_buffer: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KD-phase loss, mean CE, mean KD) over the N learned tokens (logits [N, V]).

    One fused pass (`_FusedSALTLoss`) instead of autograd through two log-softmaxes and the
    KL: over a 4096-token vocabulary the element-wise KL graph cost 5x the CE it sits beside.
    Same values and gradient as `(1 - w) * CE + w * kd_token_losses(...)`.

    probs_buffer: float32, at least [N, V]; the teacher's probabilities are written there
    and kept for the backward (a buffer reused across updates spares the page faults of a
    fresh one; it must not be written again before this loss's backward has run)."""
    return _FusedSALTLoss.apply(student_logits, teacher_logits.detach(), targets,
                                float(weight), float(temperature), probs_buffer)


class _FusedSALTLoss(torch.autograd.Function):
    """(1 - w) CE + w tau^2 KL(p_t || p_s) from log-softmaxes and row dot products, with the
    gradient written out in the backward:

        d/dz_s = [(1 - w) (softmax(z_s) - onehot) + w tau (softmax(z_s / tau) - p_t)] / N

    (log_softmax and softmax have vectorised CPU kernels; logsumexp takes 4x as long.)"""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, weight, temperature,
                probs_buffer=None):
        z = student_logits.float()
        tau = temperature
        logp = F.log_softmax(z, dim=-1)
        ce = -logp.gather(1, targets[:, None]).mean()
        logp_tau = logp if tau == 1.0 else F.log_softmax(z / tau, dim=-1)
        teacher = teacher_logits.float() if tau == 1.0 else teacher_logits.float() / tau
        if probs_buffer is None:
            p_teacher = torch.softmax(teacher, dim=-1)
        else:
            p_teacher = torch.softmax(teacher, dim=-1, out=probs_buffer.view(-1)[
                :teacher.numel()].view(teacher.shape))
        # KL per row = sum p_t (z_t - log p_s) - lse(z_t), and lse(z_t) = z_t - log p_t at the
        # row's most likely token, where p_t >= 1/V (no second pass for log p_t)
        lse_teacher = teacher.amax(dim=-1) - p_teacher.amax(dim=-1).log()
        # in place in log p_s's buffer, no longer needed (a fresh [N, V] buffer costs its
        # page faults: more than the arithmetic)
        kl_rows = logp_tau.neg_().add_(teacher).mul_(p_teacher).sum(-1) - lse_teacher
        kd = kl_rows.mean() * (tau * tau)
        ctx.save_for_backward(z, targets, p_teacher)
        ctx.weight, ctx.tau, ctx.in_dtype = weight, tau, student_logits.dtype
        ctx.mark_non_differentiable(ce, kd)  # returned for the metrics only
        return (1 - weight) * ce + weight * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        z, targets, p_teacher = ctx.saved_tensors
        w, tau = ctx.weight, ctx.tau
        grad = torch.softmax(z, dim=-1)
        if tau == 1.0:  # (1 - w) s + w s = s: one softmax serves both terms
            grad.sub_(p_teacher, alpha=w)
        else:
            grad.mul_(1 - w).add_(torch.softmax(z / tau, dim=-1), alpha=w * tau)
            grad.sub_(p_teacher, alpha=w * tau)
        rows = torch.arange(z.shape[0], device=z.device)
        grad[rows, targets] -= 1 - w
        grad.mul_(grad_loss / z.shape[0])
        return grad.to(ctx.in_dtype), None, None, None, None, None


def sequence_scores(teacher_logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                    num_rows: int, top_k: int) -> torch.Tensor:
    """SALT_DS score of each of `num_rows` sequences [num_rows], float64: the median of the
    teacher's loss over the tokens whose gold token is in the teacher's top-k (ties with
    the k-th logit count as in), NaN for a sequence with no such token."""
    logits = teacher_logits.float()
    losses = F.cross_entropy(logits, targets, reduction="none").double()
    gold = logits.gather(1, targets[:, None])
    learnable = (logits > gold).sum(-1) < top_k
    scores = torch.full((num_rows,), math.nan, dtype=torch.float64)
    for row in range(num_rows):
        chosen = losses[(rows == row) & learnable]
        if chosen.numel():
            scores[row] = torch.quantile(chosen, 0.5)
    return scores


def select_sequences(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Boolean mask of the kept sequences: score >= the (1 - keep_fraction) quantile of the
    finite scores (linear interpolation); NaN scores are never kept."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    finite = ~torch.isnan(scores)
    if not bool(finite.any()):
        return finite
    threshold = torch.quantile(scores[finite], 1.0 - keep_fraction)
    return finite & (scores >= threshold)


class SALTDistiller:
    """The teacher and the schedule: KD while `active(step)`, the loss of a KD-phase batch."""

    def __init__(self, teacher: torch.nn.Module, config: SALTConfig):
        self.teacher = teacher.eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.config = config
        self._probs: torch.Tensor | None = None  # see probs_buffer

    def active(self, step: int) -> bool:
        """KD for updates 0 .. kd_steps - 1 (step: updates already made)."""
        return step < self.config.kd_steps

    def to(self, device) -> SALTDistiller:
        self.teacher.to(device)
        self._probs = None
        return self

    def probs_buffer(self, rows: int, vocab: int, device) -> torch.Tensor:
        """A float32 buffer for the teacher's probabilities of `rows` tokens, reused (grown
        when a batch has more learned tokens) across KD-phase updates."""
        probs = self._probs
        if probs is None or probs.numel() < rows * vocab or probs.device != torch.device(device):
            self._probs = probs = torch.empty(rows * vocab, dtype=torch.float32, device=device)
        return probs

    def release_buffer(self) -> None:
        self._probs = None
