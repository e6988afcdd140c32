"""PLoRA: LoRA whose delta is applied only at speech positions (BLSP-KD).

    state = apply_plora(llm, LoraSettings(r=16, alpha=16, dropout=0.05))
    with state.speech_positions(speech_mask):      # bool [B, L]
        out = llm(inputs_embeds=..., attention_mask=...)

Each targeted nn.Linear becomes a `PLoRALinear`: y = W x + mask · (B A x) · α / r,
with `mask` 1 at speech positions and 0 elsewhere, so text positions compute
exactly what the base LLM computes (the delta is skipped or multiplied by 0).

The mask lives in a `SpeechMaskState` shared by all wrapped layers and set
for the duration of a forward / generate call. During generation the
prompt (prefill) matches the mask; later steps with a KV cache see only new
(text) tokens and get no delta; without a cache, positions beyond the mask
are text. Beam search's repeat_interleave of the batch is followed.
Outside a `speech_positions` block the model is the base LLM. PLoRA cannot be
merged into the LLM weights (the delta depends on the position); the LLM's
gradient checkpointing (which re-runs forward outside the block) is not
supported with PLoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import ConfigError
from .lora import DEFAULT_LLM_TARGETS, LoraSettings, matching_linear_modules

__all__ = ["PLoRALinear", "SpeechMaskState", "apply_plora", "plora_state"]


class SpeechMaskState:
    """The current speech-position mask, shared by every PLoRALinear of a model."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self._cache: dict[tuple, torch.Tensor | None] = {}

    @contextlib.contextmanager
    def speech_positions(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Apply the LoRA delta at positions where `mask` [B, L] is True, inside the block."""
        previous, previous_cache = self.mask, self._cache
        self.mask = None if mask is None else mask.to(torch.bool)
        self._cache = {}
        try:
            yield
        finally:
            self.mask, self._cache = previous, previous_cache

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B', T, 1] multiplier for an input x [B', T, *] or None when no position is speech."""
        mask = self.mask
        if mask is None or x.dim() < 3:
            return None
        key = (x.shape[0], x.shape[1], x.device, x.dtype)
        if key in self._cache:
            return self._cache[key]
        batch, steps = x.shape[0], x.shape[1]
        out: torch.Tensor | None = None
        if batch % mask.shape[0] == 0:
            m = mask.repeat_interleave(batch // mask.shape[0], dim=0)
            if steps >= m.shape[1]:  # the prompt itself (+ new text tokens without a cache)
                m = nn.functional.pad(m, (0, steps - m.shape[1]))
                if bool(m.any()):
                    out = m.to(device=x.device, dtype=x.dtype)[..., None]
            # steps < prompt length: cached decoding of new (text) tokens: no delta
        else:
            raise RuntimeError(f"PLoRA speech mask has batch {mask.shape[0]}, the layer input "
                               f"has batch {batch}")
        self._cache[key] = out
        return out


class PLoRALinear(nn.Module):
    """nn.Linear + a LoRA delta gated per token by the shared speech mask."""

    def __init__(self, base_layer: nn.Linear, settings: LoraSettings, state: SpeechMaskState):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.r = settings.r
        self.scaling = settings.alpha / settings.r
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, settings.r, bias=False, device=device)
        self.lora_B = nn.Linear(settings.r, base_layer.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)  # as peft initialises LoRA
        nn.init.zeros_(self.lora_B.weight)  # the delta starts at zero
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of its projections
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        gate = self.state.mask_for(x)
        if gate is None:
            return y
        h = self.dropout(x).to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(h)) * self.scaling
        return y + delta.to(y.dtype) * gate.to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}"


def apply_plora(model: nn.Module, settings: LoraSettings) -> SpeechMaskState:
    """Replace the targeted nn.Linear layers of `model` by PLoRALinear (in place).

    Base weights are frozen; only lora_A / lora_B train. Returns the shared state
    whose `speech_positions(mask)` context turns the deltas on.
    """
    settings.validate("plora")
    targets = list(settings.target_modules or DEFAULT_LLM_TARGETS)
    names = matching_linear_modules(model, targets)
    if not names:
        raise ConfigError(f"plora.target_modules {targets} match no linear layer of "
                          f"{type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    state = SpeechMaskState()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PLoRALinear(getattr(parent, child), settings, state))
    model._speechlm_plora_state = state
    return state


def plora_state(model: nn.Module) -> SpeechMaskState | None:
    """The SpeechMaskState `apply_plora` attached to `model`, if any."""
    return getattr(model, "_speechlm_plora_state", None)
