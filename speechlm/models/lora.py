"""LoRA through peft: on the LLM (mergeable) and, optionally, inside the speech encoder.

    llm = apply_llm_lora(llm, LoraSettings(r=16, alpha=32))     # a peft PeftModel
    apply_encoder_lora(encoder, LoraSettings(r=8))              # injected in place
    llm = merge_llm_lora(llm)                                   # plain transformers model again

Only the LoRA matrices train (peft freezes everything else in the wrapped
model). For PLoRA (LoRA applied only at speech positions) see `plora.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError

__all__ = [
    "DEFAULT_ENCODER_TARGETS", "DEFAULT_LLM_TARGETS", "LoraSettings", "apply_encoder_lora",
    "apply_llm_lora", "has_llm_lora", "merge_llm_lora",
]

# attention projections of Llama / Qwen2 / Mistral / Gemma style decoders
DEFAULT_LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# attention projections of wav2vec2 / HuBERT / WavLM / Whisper encoder layers
DEFAULT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (recipe section). target_modules: last components of module
    names (e.g. "q_proj"); None = the defaults for the LLM / encoder."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None

    def validate(self, what: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{what}.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{what}.dropout must be in [0, 1), got {self.dropout}")


def matching_linear_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of nn.Linear modules whose last name component is in `targets`."""
    wanted = set(targets)
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted]


def _peft_config(settings: LoraSettings, targets: list[str], task_type: str | None):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(targets), bias="none", task_type=task_type)


def _targets(model: nn.Module, settings: LoraSettings, default: list[str], what: str) -> list[str]:
    settings.validate(what)
    targets = list(settings.target_modules or default)
    if not matching_linear_modules(model, targets):
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear)})
        raise ConfigError(f"{what}.target_modules {targets} match no linear layer of "
                          f"{type(model).__name__}; its linear layers are named: {', '.join(names)}")
    return targets


def apply_llm_lora(llm: nn.Module, settings: LoraSettings):
    """Wrap a causal LM in a peft PeftModel with LoRA on `settings.target_modules`."""
    import warnings

    from peft import get_peft_model

    targets = _targets(llm, settings, DEFAULT_LLM_TARGETS, "lora")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                                category=FutureWarning)
        return get_peft_model(llm, _peft_config(settings, targets, "CAUSAL_LM"))


def has_llm_lora(llm: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(llm, PeftModel)


def merge_llm_lora(llm: nn.Module) -> nn.Module:
    """Fold the LoRA deltas into the LLM's weights and return the plain transformers model."""
    if not has_llm_lora(llm):
        raise ConfigError("the LLM has no peft LoRA to merge")
    return llm.merge_and_unload()


def apply_encoder_lora(encoder, settings: LoraSettings) -> list[str]:
    """Inject LoRA into a SpeechEncoder's backbone in place; returns the adapted module names.

    The backbone's own weights stay frozen; the encoder then runs with grad and
    its backbone follows the parent's train/eval mode (LoRA dropout).
    """
    from peft import inject_adapter_in_model

    backbone = encoder.backbone
    targets = _targets(backbone, settings, DEFAULT_ENCODER_TARGETS, "encoder_lora")
    names = matching_linear_modules(backbone, targets)
    inject_adapter_in_model(_peft_config(settings, targets, None), backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    encoder.train(encoder.training)
    return names
