"""Models: character CTC; speech encoders, adapters, LoRA/PLoRA, the SpeechLM; VQ bottleneck.

Importing this package is cheap; names are loaded from their modules on first use.
"""

from .._lazy import lazy_exports

_EXPORTS = {
    "CharVocab": "ctc",
    "build_char_vocab": "ctc",
    "vocab_report": "ctc",
    "unseen_characters": "ctc",
    "load_ctc_model": "ctc",
    "save_ctc_model": "ctc",
    "SpeechLM": "speech_lm",
    "SpeechLMConfig": "speech_lm",
    "load_llm": "speech_lm",
    "load_encoder": "encoders",
    "SpeechEncoder": "encoders",
    "EncoderOutput": "encoders",
    "build_adapter": "adapters",
    "AdapterOutput": "adapters",
    "LoraSettings": "lora",
    "get_template": "prompts",
    "LMInputs": "prompts",
    "EncodedPrompt": "prompts",
    "apply_plora": "plora",
    "VectorQuantizer": "vq",
    "VQOutput": "vq",
    "AvgPoolDownsample": "vq",
    "bits_per_second": "vq",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
