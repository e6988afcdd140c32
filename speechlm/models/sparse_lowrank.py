"""Sparse and low-rank parameterisations of a model's linear layers, for training from scratch.

- **SLTrain** (arXiv 2406.02214): W = (alpha/r)·B·A + S, where S holds values only on a fixed
  random support of density·d_out·d_in entries and B starts at zero. `SLTrainLinear` trains
  A [r, d_in], B [d_out, r] and the support's values; W is formed in forward for the matmul,
  freed, and formed again in backward (`_SparseLowRankMatmul`), so no d_out×d_in tensor is
  kept between them: beside the parameters, a layer holds only what nn.Linear holds.
- **SPDF** (arXiv 2303.10464): a static random unstructured mask on each weight during
  (pre-)training; masked entries are zero and stay zero (their gradient is masked), then
  `drop_spdf` removes the masks for dense fine-tuning. The layers stay nn.Linear, so the
  state dict is the plain dense one (zeros where masked).

`apply_sltrain` / `apply_spdf` change a model in place; `merge_sltrain` turns every
SLTrainLinear back into an nn.Linear with the same function, so a saved model loads with the
ordinary model code. Supports and masks are drawn from `seed` alone (layers in module order),
so a resumed run rebuilds the same ones; SLTrain also keeps its support in the state dict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError

# Llama-style attention and MLP projections: what both papers sparsify (never embeddings
# or the output head, which a tied model shares with them)
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SparseLowRankConfig:
    """`model.sparse_lowrank` of a recipe: which parameterisation, on which linear layers."""

    kind: Literal["sltrain", "spdf"] = "sltrain"
    # name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`) or, when they hold a
    # regex character, regexes searched in the full module name
    # None: the recipe's own choice (a Llama's DEFAULT_TARGETS; every linear layer of an
    # adapter; the text-to-token model's attention and feed-forward projections)
    targets: list[str] | None = None
    rank: int = 32                # SLTrain: r of B·A
    alpha: float = 32.0           # SLTrain: B·A is scaled by alpha / rank
    density: float = 0.03         # SLTrain: fraction of W's entries on S's support
    sparsity: float = 0.75        # SPDF: fraction of each weight masked to zero
    # SPDF: drop the masks at this update and train dense from there (the paper's dense
    # fine-tuning phase inside one run); None keeps them to the end
    dense_after_steps: int | None = None
    seed: int = 0                 # draws the supports / masks (and SLTrain's A)

    def __post_init__(self):
        where = "sparse_lowrank"  # model.sparse_lowrank in text_lm recipes
        if self.targets is not None and not self.targets:
            raise ConfigError(f"{where}.targets is empty: name the linear layers to change, "
                              f"e.g. {DEFAULT_TARGETS}, or remove it for the recipe's default")
        for pattern in self.targets or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}.targets: {pattern!r} is not a valid regex ({e})"
                                  ) from None
        check_sltrain_settings(self.rank, self.alpha, self.density, where)
        check_spdf_sparsity(self.sparsity, where)
        if self.dense_after_steps is not None:
            if self.kind != "spdf":
                raise ConfigError(f"{where}.dense_after_steps is SPDF's dense phase; with "
                                  f"kind: {self.kind} remove it (or set kind: spdf)")
            if self.dense_after_steps < 1:
                raise ConfigError(f"{where}.dense_after_steps must be >= 1 (the update at "
                                  f"which the masks go), got {self.dense_after_steps}")


def check_not_sharded(sparse: SparseLowRankConfig | None, sharding: str, where: str) -> None:
    """A recipe's check: sparse_lowrank (at `where`) and FSDP do not go together."""
    if sparse is not None and sharding == "fsdp":
        raise ConfigError(f"{where} is not supported with train.sharding=fsdp (gathering "
                          "SLTrain shards into the dense model is untested); use "
                          f"train.sharding=none, or {where}: null")


def check_sltrain_settings(rank: int, alpha: float, density: float, where: str = "sltrain"
                           ) -> None:
    if rank < 1:
        raise ConfigError(f"{where}.rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise ConfigError(f"{where}.alpha must be > 0, got {alpha}")
    if not 0 < density <= 1:
        raise ConfigError(f"{where}.density must be in (0, 1] (the paper uses 0.03), got "
                          f"{density}")


def check_spdf_sparsity(sparsity: float, where: str = "spdf") -> None:
    if not 0 <= sparsity < 1:
        raise ConfigError(f"{where}.sparsity must be in [0, 1) (the paper uses 0.5-0.75), got "
                          f"{sparsity}")


# -- SLTrain ----------------------------------------------------------------------------------


def _sparse_plus_low_rank(A, B, values, support, scale: float) -> torch.Tensor:
    """W = scale·B·A + S, S scattered from `values` at the flat indices `support`, in the
    parameters' dtype (autocast off: the matmul that uses W casts it, as nn.Linear's does)."""
    with torch.autocast(A.device.type, enabled=False):
        weight = (B @ A).mul_(scale)
    weight.view(-1).scatter_add_(0, support, values.to(weight.dtype))
    return weight


class _SparseLowRankMatmul(torch.autograd.Function):
    """x @ Wᵀ + b with W = scale·B·A + S, keeping only x, A, B, S's values and the support for
    backward (never W): W is formed again there."""

    @staticmethod
    def forward(ctx, x, A, B, values, support, bias, scale):
        weight = _sparse_plus_low_rank(A, B, values, support, scale)
        out = nn.functional.linear(x, weight, bias)
        ctx.save_for_backward(x, A, B, values, support)
        ctx.scale, ctx.has_bias = scale, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, values, support = ctx.saved_tensors
        scale = ctx.scale
        grad_x = grad_A = grad_B = grad_values = grad_bias = None
        # under autocast the forward matmul ran in grad_out's dtype (bf16): so do these, and
        # each gradient goes back in its input's dtype
        g = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            weight = _sparse_plus_low_rank(A, B, values, support, scale).to(g.dtype)
            grad_x = (g @ weight).view(*grad_out.shape[:-1], weight.shape[1]).to(x.dtype)
            del weight
        if any(ctx.needs_input_grad[1:4]):
            # dL/dW, transient like W: A, B and S all read from it
            grad_weight = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(A.dtype)
            if ctx.needs_input_grad[1]:
                grad_A = (B.t() @ grad_weight).mul_(scale)
            if ctx.needs_input_grad[2]:
                grad_B = (grad_weight @ A.t()).mul_(scale)
            if ctx.needs_input_grad[3]:
                grad_values = grad_weight.view(-1)[support].to(values.dtype)
            del grad_weight
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_A, grad_B, grad_values, None, grad_bias, None


def random_support(d_out: int, d_in: int, density: float, generator: torch.Generator | None
                   ) -> torch.Tensor:
    """Sorted flat indices of round(density·d_out·d_in) (at least 1) distinct entries."""
    total = d_out * d_in
    nnz = max(1, min(total, round(density * total)))
    return torch.randperm(total, generator=generator)[:nnz].sort().values


class SLTrainLinear(nn.Module):
    """A linear layer whose weight is (alpha/rank)·B·A + S, S sparse on a fixed support."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
                 support: torch.Tensor, bias: bool = True, dtype=None, device=None):
        super().__init__()
        if rank < 1:
            raise ConfigError(f"SLTrainLinear: rank must be >= 1, got {rank}")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, float(alpha)
        kw = {"dtype": dtype, "device": device}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.values = nn.Parameter(torch.zeros(support.numel(), **kw))
        # stored (not only re-drawn) so a checkpoint always pairs values with their positions
        self.register_buffer("support", support.to(device=device, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, density: float,
                    generator: torch.Generator | None = None) -> SLTrainLinear:
        """An SLTrain layer in `linear`'s place: S takes `linear`'s weights on a random
        support (a sparse version of its init), A a Kaiming-uniform init, B = 0."""
        check_sltrain_settings(rank, alpha, density)
        weight = linear.weight.detach()
        d_out, d_in = weight.shape
        support = random_support(d_out, d_in, density, generator).to(weight.device)
        layer = cls(d_in, d_out, rank=rank, alpha=alpha, support=support,
                    bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default init (kaiming_uniform, a=sqrt(5))
            a = torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1
            layer.A.copy_(a * bound)
            layer.values.copy_(weight.reshape(-1)[support])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def dense_weight(self) -> torch.Tensor:
        return _sparse_plus_low_rank(self.A, self.B, self.values, self.support, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseLowRankMatmul.apply(x, self.A, self.B, self.values, self.support,
                                          self.bias, self.scale)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (for saving and loading)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.A.dtype, device=self.A.device)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha:g}, nnz={self.support.numel()}, "
                f"bias={self.bias is not None}")


# -- choosing layers --------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    if re.escape(pattern) == pattern:  # a plain name: a suffix on a dotted boundary
        return name == pattern or name.endswith("." + pattern)
    return re.search(pattern, name) is not None


def matching_linears(module: nn.Module, targets: list[str], kind: type = nn.Linear
                     ) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every `kind` submodule matching a target, in module order; a
    ConfigError names each target that matches none."""
    if not targets:
        raise ConfigError("targets is empty: name the linear layers to change")
    found = [(n, m) for n, m in module.named_modules() if type(m) is kind
             and any(_matches(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(n, t) for n, _ in found)]
    if unmatched:
        linears = [n for n, m in module.named_modules() if type(m) is kind]
        example = ", ".join(linears[:4]) or "none"
        raise ConfigError(f"targets: {', '.join(repr(t) for t in unmatched)} match(es) no "
                          f"{kind.__name__} layer of the model (its {kind.__name__} layers: "
                          f"{example}{', ...' if len(linears) > 4 else ''}); fix the pattern "
                          "or remove it")
    return found


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


def apply_sltrain(module: nn.Module, targets: list[str], *, rank: int, alpha: float,
                  density: float, seed: int) -> list[str]:
    """Replace the matching nn.Linear layers by SLTrainLinear in place; returns their names."""
    check_sltrain_settings(rank, alpha, density)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, linear in matching_linears(module, targets):
        _replace(module, name, SLTrainLinear.from_linear(linear, rank, alpha, density,
                                                         generator))
        names.append(name)
    return names


def merge_sltrain(module: nn.Module) -> int:
    """Replace every SLTrainLinear by its dense nn.Linear in place; returns how many."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, SLTrainLinear)]
    for name, layer in layers:
        _replace(module, name, layer.to_linear())
    return len(layers)


# -- SPDF -------------------------------------------------------------------------------------


def random_mask(shape, sparsity: float, generator: torch.Generator | None) -> torch.Tensor:
    """A bool mask, True where kept, with exactly round(sparsity·numel) entries False."""
    total = math.prod(shape)
    dropped = torch.randperm(total, generator=generator)[: round(sparsity * total)]
    mask = torch.ones(total, dtype=torch.bool)
    mask[dropped] = False
    return mask.view(shape)


def apply_spdf(module: nn.Module, targets: list[str], *, sparsity: float, seed: int
               ) -> list[str]:
    """Mask the matching nn.Linear weights in place: masked entries are set to 0 and their
    gradient is masked, so any optimizer whose update is zero for a zero gradient and a zero
    weight (SGD, Adam, AdamW with decoupled decay) keeps them 0. Returns the layer names."""
    check_spdf_sparsity(sparsity)
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, linear in matching_linears(module, targets):
        if getattr(linear, "spdf_mask", None) is not None:
            raise ConfigError(f"{name} already has an SPDF mask")
        mask = random_mask(linear.weight.shape, sparsity, generator).to(linear.weight.device)
        with torch.no_grad():
            linear.weight.mul_(mask)
        # not a buffer: the state dict stays the plain dense one
        linear.spdf_mask = mask
        # the hook multiplies by the mask in the weight's dtype: 5-10x faster than by the bool
        # mask, which is converted on every call
        keep = mask.to(linear.weight.dtype)
        linear.spdf_hook = linear.weight.register_hook(lambda g, m=keep: g * m.to(g.dtype))
        names.append(name)
    return names


def drop_spdf(module: nn.Module) -> int:
    """Remove every SPDF mask (dense fine-tuning from here); weights are unchanged. Returns
    how many layers had one."""
    count = 0
    for layer in module.modules():
        if getattr(layer, "spdf_mask", None) is not None:
            layer.spdf_hook.remove()
            del layer.spdf_hook, layer.spdf_mask
            count += 1
    return count


# -- for recipes ------------------------------------------------------------------------------


def apply_sparse_lowrank(module: nn.Module, cfg: SparseLowRankConfig,
                         default_targets: list[str] = DEFAULT_TARGETS) -> list[str]:
    """Apply `cfg` (a recipe's sparse_lowrank section) to `module`; returns the layer names.
    `default_targets` stand in for targets the config leaves unset."""
    targets = cfg.targets if cfg.targets is not None else list(default_targets)
    if cfg.kind == "sltrain":
        return apply_sltrain(module, targets, rank=cfg.rank, alpha=cfg.alpha,
                             density=cfg.density, seed=cfg.seed)
    return apply_spdf(module, targets, sparsity=cfg.sparsity, seed=cfg.seed)


def prepare_for_training(module: nn.Module, cfg: SparseLowRankConfig, say,
                         default_targets: list[str] = DEFAULT_TARGETS) -> tuple[list, dict]:
    """What a recipe does with its sparse_lowrank section before training: apply it to
    `module` and say what changed. Returns the Trainer step hooks it needs (SPDF's switch
    to dense, if any) and `parameter_report`. `to_plain_dense` undoes it before saving."""
    names = apply_sparse_lowrank(module, cfg, default_targets)
    report = parameter_report(module)
    when = (f"; dense from update {cfg.dense_after_steps}"
            if cfg.dense_after_steps is not None else "")
    say(f"sparse_lowrank: {cfg.kind} on {len(names)} linear layers; "
        f"{report['trainable'] / 1e6:.3f}M trainable parameters, "
        f"{report['spdf_masked'] / 1e6:.3f}M of them held at zero{when}")
    hook = spdf_phase_hook(module, cfg, say)
    return ([hook] if hook is not None else []), report


def spdf_phase_hook(module: nn.Module, cfg: SparseLowRankConfig, say=print):
    """A Trainer step hook that drops `module`'s SPDF masks once the update count reaches
    cfg.dense_after_steps (also right away when a run resumes past it); None when the config
    has no dense phase."""
    if cfg.kind != "spdf" or cfg.dense_after_steps is None:
        return None

    dense = False  # once dropped, the hook does nothing (no walk over the modules per update)

    def hook(step: int) -> None:
        nonlocal dense
        if not dense and step >= cfg.dense_after_steps:
            dense = True
            dropped = drop_spdf(module)
            if dropped:
                say(f"step {step}: SPDF masks dropped from {dropped} layers, dense from here")

    return hook


def to_plain_dense(module: nn.Module) -> nn.Module:
    """`module` with every SLTrain layer merged and SPDF mask dropped: what is saved."""
    merge_sltrain(module)
    drop_spdf(module)
    return module


def parameter_report(module: nn.Module) -> dict[str, int]:
    """Trainable parameters: all of them, and those SPDF masks hold at zero (not free)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    masked = sum(int((~m.spdf_mask).sum()) for m in module.modules()
                 if getattr(m, "spdf_mask", None) is not None)
    return {"trainable": trainable, "spdf_masked": masked, "spdf_free": trainable - masked}
