"""A tiny faster-whisper (CTranslate2 Whisper) directory, made from a tiny transformers Whisper.

`write_tiny_ct2_whisper(out_dir)` writes what a faster-whisper model directory
holds — model.bin in CTranslate2's WhisperSpec layout, CTranslate2's config.json
and tokenizer.json — from a `write_tiny_checkpoint(..., "whisper")` model, which
it keeps in `out_dir/transformers` so tests can compare a conversion with the
model it came from. The layout mirrors CTranslate2's own converter: q/k/v fused
(with the zero k bias), float16 weights by default, int8 weights with one scale
per output row when asked, the output projection an alias of the embeddings.

The vocabulary is padded to the real sizes (51865 multilingual, 51864 English-only),
because that size is how openai/whisper, CTranslate2 and the converter tell the two
apart; the tokenizer stays the tiny one (ids past it are never-trained rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tiny_checkpoints import write_tiny_checkpoint

TRANSFORMERS_SUBDIR = "transformers"
VOCAB_MULTILINGUAL, VOCAB_ENGLISH = 51865, 51864

# CTranslate2's scalar options of a Whisper decoder (see speechlm.pretrained.ct2_whisper).
_DECODER_SCALARS = {
    "decoder/activation": np.int8(3),  # GELU
    "decoder/alibi": np.int8(0),
    "decoder/alignment_heads": np.int16(1),
    "decoder/alignment_layer": np.int16(-1),
    "decoder/pre_norm": np.int8(1),
    "decoder/scale_embeddings": np.int8(0),
    "decoder/start_from_zero_embedding": np.int8(0),
}


def _quantizable(name: str) -> bool:
    """CTranslate2 quantizes the weights that have a `weight_scale` (linear layers and the
    embeddings), not convolutions, norms or position tables."""
    return name.endswith("/weight") and ("/linear_" in name or name == "decoder/embeddings/weight")


def _store(value: np.ndarray, dtype: str) -> np.ndarray:
    from ..pretrained.ct2 import float32_to_bfloat16

    if dtype == "bfloat16":
        return float32_to_bfloat16(value)
    return value.astype(np.float16 if dtype == "float16" else np.float32)


def write_tiny_ct2_whisper(out_dir, *, seed: int = 0, quantize: str | None = None,
                           dtype: str = "float16", multilingual: bool = True) -> Path:
    """Write a tiny CTranslate2 Whisper directory at `out_dir` and return it.

    quantize: None or "int8" (linear and embedding weights as int8 + per-row scales,
    like `--quantization int8_float16`). dtype: "float16", "bfloat16" or "float32" for
    the other (or all) weights. multilingual=False gives an English-only model (51864
    tokens; the source's generation config made English-only to match).
    """
    from safetensors.numpy import load_file

    from ..pretrained.ct2 import quantize_int8, write_ct2_model
    from ..pretrained.ct2_whisper import whisper_name_map

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    out_dir = Path(out_dir)
    source = out_dir / TRANSFORMERS_SUBDIR
    write_tiny_checkpoint("whisper", source, seed=seed,
                          vocab_size=VOCAB_MULTILINGUAL if multilingual else VOCAB_ENGLISH)
    config = json.loads((source / "config.json").read_text())
    generation = json.loads((source / "generation_config.json").read_text())
    lang_ids = sorted(generation["lang_to_id"].values())  # CT2 lists them for .en models too
    if not multilingual:  # English-only: no language or task tokens in the prompt
        generation["is_multilingual"] = False
        for key in ("lang_to_id", "task_to_id"):
            generation.pop(key, None)
        (source / "generation_config.json").write_text(json.dumps(generation, indent=2))

    weights = {k: v.astype(np.float32) for k, v in load_file(source / "model.safetensors").items()}
    variables: dict[str, np.ndarray] = {}
    for ct2_name, hf_names in whisper_name_map(config["encoder_layers"], config["decoder_layers"]):
        present = [weights[n] for n in hf_names if n is not None]
        parts = [weights[n] if n is not None else np.zeros_like(present[0]) for n in hf_names]
        value = np.concatenate(parts) if len(parts) > 1 else parts[0]
        if quantize and _quantizable(ct2_name):
            variables[ct2_name], variables[f"{ct2_name}_scale"] = quantize_int8(value)
        else:
            variables[ct2_name] = _store(value, dtype)
    variables["encoder/num_heads"] = np.int16(config["encoder_attention_heads"])
    variables["decoder/num_heads"] = np.int16(config["decoder_attention_heads"])
    variables.update(_DECODER_SCALARS)
    write_ct2_model(out_dir / "model.bin", "WhisperSpec", 3, dict(sorted(variables.items())),
                    aliases={"decoder/projection/weight": "decoder/embeddings/weight"})

    (out_dir / "config.json").write_text(json.dumps({
        "alignment_heads": generation["alignment_heads"],
        "lang_ids": lang_ids,
        "suppress_ids": generation["suppress_tokens"],
        "suppress_ids_begin": generation["begin_suppress_tokens"],
    }, indent=2))
    (out_dir / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    return out_dir
