"""Convert a faster-whisper (CTranslate2 Whisper) directory into a transformers Whisper directory.

    convert_ct2_whisper("faster-whisper-base", "whisper-base")  # -> Path("whisper-base")

The source holds `model.bin` (CTranslate2 `WhisperSpec` weights, often float16 or
int8), CTranslate2's `config.json` (suppress_ids, suppress_ids_begin, lang_ids,
alignment_heads) and `tokenizer.json`. The result is what
`WhisperForConditionalGeneration.from_pretrained` / `WhisperProcessor.from_pretrained`
read: model.safetensors, config.json, generation_config.json, the tokenizer and
preprocessor_config.json, plus `speechlm_source.json` saying where it came from.

Every CTranslate2 variable must be used and every transformers parameter filled,
with matching shapes; anything else is an error, so a model of another layout is
refused instead of converted wrongly. Multilingual or English-only follows
openai/whisper and CTranslate2: a vocabulary of 51865+ tokens is multilingual.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .ct2 import Ct2Model, dequantize, read_ct2_model

DTYPES = ("float32", "float16", "bfloat16")
RECORD = "speechlm_source.json"
MULTILINGUAL_VOCAB = 51865  # openai/whisper's and CTranslate2's test: n_vocab >= 51865
KNOWN_REVISION = 3  # WhisperSpec.revision in CTranslate2 3.x-4.x

# CTranslate2 decoder options and the values that make it Whisper's decoder.
_DECODER_FLAGS = {
    "decoder/activation": 3,  # common_spec.Activation.GELU
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Runtime options for returning attention weights; the real alignment heads are in config.json.
_IGNORED = ("decoder/alignment_heads", "decoder/alignment_layer")
_NON_LANGUAGE = ("<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                 "<|nocaptions|>", "<|nospeech|>", "<|notimestamps|>")


# --- names ----------------------------------------------------------------------------


def _linear(ct2: str, hf: str) -> list[tuple[str, tuple]]:
    return [(f"{ct2}/weight", (f"{hf}.weight",)), (f"{ct2}/bias", (f"{hf}.bias",))]


def _norm(ct2: str, hf: str) -> list[tuple[str, tuple]]:
    return [(f"{ct2}/gamma", (f"{hf}.weight",)), (f"{ct2}/beta", (f"{hf}.bias",))]


def _layer(side: str, i: int) -> list[tuple[str, tuple]]:
    ct2, hf = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
    attn = f"{hf}.self_attn"
    names = [
        *_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm"),
        # q, k, v fused along the output rows; Whisper's k has no bias (CT2 stores zeros
        # there, and any constant k bias cancels in the softmax anyway).
        (f"{ct2}/self_attention/linear_0/weight",
         (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight")),
        (f"{ct2}/self_attention/linear_0/bias", (f"{attn}.q_proj.bias", None, f"{attn}.v_proj.bias")),
        *_linear(f"{ct2}/self_attention/linear_1", f"{attn}.out_proj"),
        *_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm"),
        *_linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1"),
        *_linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2"),
    ]
    if side == "decoder":  # cross-attention: q alone, k and v fused, then out
        cross = f"{hf}.encoder_attn"
        names += [
            *_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm"),
            *_linear(f"{ct2}/attention/linear_0", f"{cross}.q_proj"),
            (f"{ct2}/attention/linear_1/weight", (f"{cross}.k_proj.weight", f"{cross}.v_proj.weight")),
            (f"{ct2}/attention/linear_1/bias", (None, f"{cross}.v_proj.bias")),
            *_linear(f"{ct2}/attention/linear_2", f"{cross}.out_proj"),
        ]
    return names


def whisper_name_map(encoder_layers: int, decoder_layers: int) -> list[tuple[str, tuple]]:
    """(CTranslate2 name, transformers names) pairs. Several transformers names mean the
    CT2 tensor is theirs concatenated along dim 0 in equal parts; None marks a part
    transformers' Whisper has no parameter for (the k projection's bias)."""
    names = [
        *_linear("encoder/conv1", "model.encoder.conv1"),
        *_linear("encoder/conv2", "model.encoder.conv2"),
        ("encoder/position_encodings/encodings", ("model.encoder.embed_positions.weight",)),
        *_norm("encoder/layer_norm", "model.encoder.layer_norm"),
        ("decoder/embeddings/weight", ("model.decoder.embed_tokens.weight",)),
        ("decoder/position_encodings/encodings", ("model.decoder.embed_positions.weight",)),
        *_norm("decoder/layer_norm", "model.decoder.layer_norm"),
    ]
    for i in range(encoder_layers):
        names += _layer("encoder", i)
    for i in range(decoder_layers):
        names += _layer("decoder", i)
    return names


# --- the model's shape ----------------------------------------------------------------------


def _count_layers(variables, side: str) -> int:
    found = {int(m.group(1)) for name in variables
             if (m := re.match(rf"{side}/layer_(\d+)/", name))}
    return max(found) + 1 if found else 0


def _scalar(model: Ct2Model, name: str, where: Path) -> int:
    value = model.variables.get(name)
    if value is None or value.ndim != 0:
        raise ConfigError(f"{where}: no scalar {name!r}; this is not a complete CTranslate2 "
                          "Whisper model.bin (re-copy it, or reconvert it with ctranslate2)")
    return int(value)


def _whisper_config(model: Ct2Model, where: Path) -> dict:
    """WhisperConfig fields read off the weights' shapes and the head counts."""
    v = model.variables
    try:
        d_model, num_mel_bins, _ = v["encoder/conv1/weight"].shape
        layout = dict(
            vocab_size=v["decoder/embeddings/weight"].shape[0],
            num_mel_bins=num_mel_bins,
            d_model=d_model,
            encoder_layers=_count_layers(v, "encoder"),
            decoder_layers=_count_layers(v, "decoder"),
            encoder_attention_heads=_scalar(model, "encoder/num_heads", where),
            decoder_attention_heads=_scalar(model, "decoder/num_heads", where),
            encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
            max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
        )
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{where}: a WhisperSpec model.bin without the expected variable or "
                          f"shape ({e}); re-copy it, or reconvert it with ctranslate2") from None
    for name, wanted in _DECODER_FLAGS.items():
        got = _scalar(model, name, where)
        if got != wanted:
            raise ConfigError(f"{where}: {name} = {got}, but Whisper's decoder has {wanted}; "
                              "this model is not a standard Whisper and cannot be converted")
    return {k: int(x) for k, x in layout.items()}


# --- weights ---------------------------------------------------------------------------


def _tied_projection(model: Ct2Model, where: Path) -> bool:
    """Whether the output projection is the embedding matrix (Whisper ties them; CTranslate2
    writes the projection as an alias, or as an equal copy)."""
    alias = model.aliases.get("decoder/projection/weight")
    if alias is not None:
        if alias != "decoder/embeddings/weight":
            raise ConfigError(f"{where}: decoder/projection/weight is an alias of {alias}, not of "
                              "the embeddings; this is not a Whisper layout")
        return True
    projection = model.variables.get("decoder/projection/weight")
    if projection is None:
        raise ConfigError(f"{where}: no decoder/projection/weight; re-copy the model.bin")
    return bool(np.array_equal(projection, model.variables["decoder/embeddings/weight"]))


def _state_dict(model: Ct2Model, variables: dict, layout: dict, tied: bool, dtype: str,
                where: Path) -> dict:
    """transformers tensors from the CTranslate2 variables, checked against the real model
    class on the meta device: every parameter filled with its shape, every variable used."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    with torch.device("meta"):
        skeleton = WhisperForConditionalGeneration(
            WhisperConfig(**layout, tie_word_embeddings=tied))
    expected = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    if tied:
        expected.pop("proj_out.weight")  # from_pretrained ties it to embed_tokens
    torch_dtype = getattr(torch, dtype)
    pairs = whisper_name_map(layout["encoder_layers"], layout["decoder_layers"])
    if not tied:
        pairs.append(("decoder/projection/weight", ("proj_out.weight",)))
    used = {"decoder/projection/weight", "encoder/num_heads", "decoder/num_heads",
            *_DECODER_FLAGS, *_IGNORED}
    state, problems = {}, []
    for ct2_name, hf_names in pairs:
        value = variables.get(ct2_name)
        if value is None:
            problems.append(f"missing {ct2_name}")
            continue
        used.add(ct2_name)
        if value.ndim == 0 or value.shape[0] % len(hf_names):
            problems.append(f"{ct2_name} {list(value.shape)} does not split in {len(hf_names)}")
            continue
        for part, hf_name in zip(np.split(value, len(hf_names)), hf_names, strict=True):
            if hf_name is None:
                continue
            if hf_name not in expected:
                problems.append(f"{ct2_name} maps to {hf_name}, which the model lacks")
            elif part.shape != expected[hf_name]:
                problems.append(f"{ct2_name} gives {hf_name} shape {list(part.shape)}, the "
                                f"model wants {list(expected[hf_name])}")
            else:
                state[hf_name] = torch.from_numpy(np.array(part, dtype=np.float32)).to(torch_dtype)
    if not problems:  # a missing CT2 variable already explains an unfilled parameter
        problems += [f"nothing fills {name}" for name in expected if name not in state]
    leftovers = sorted(name for name in variables
                       if name not in used and not name.endswith("/keep_in_float32"))
    if leftovers:
        problems.append(f"unused variables {', '.join(leftovers[:8])}"
                        + (f" and {len(leftovers) - 8} more" if len(leftovers) > 8 else ""))
    if problems:
        raise ConfigError(f"{where}: the weights do not fit transformers' Whisper ("
                          + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else "")
                          + "); the model.bin is not a standard Whisper or is damaged")
    return state


# --- tokenizer ----------------------------------------------------------------------------


def _repair_first_merge(spec: dict) -> bool:
    """Restore the first BPE merge when a tokenizer.json lost it.

    Some published multilingual Whisper tokenizer.json files (e.g. faster-whisper-base's)
    have 49999 merges: the one producing token 256 ("Ġt") is gone, so " the" encodes as
    [220, 3322] instead of [264]. Each merge i makes token 256 + i in a byte-level BPE, so
    when merge 0 makes 257 and token 256 splits into two tokens, that merge goes back first.
    """
    model = spec.get("model", {})
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not vocab or not merges:
        return False
    first = merges[0].split(" ") if isinstance(merges[0], str) else list(merges[0])
    by_id = {i: t for t, i in vocab.items()}
    if vocab.get("".join(first)) != 257 or 256 not in by_id:
        return False
    token = by_id[256]
    splits = [(token[:k], token[k:]) for k in range(1, len(token))
              if token[:k] in vocab and token[k:] in vocab]
    if len(splits) != 1:
        return False
    left, right = splits[0]
    merges.insert(0, f"{left} {right}" if isinstance(merges[0], str) else [left, right])
    return True


def _special_ids(tokenizer, where: Path, vocab_size: int, multilingual: bool) -> dict:
    """The ids of Whisper's special tokens, checked for the layout transformers relies on."""
    get = tokenizer.convert_tokens_to_ids
    added = {t: i for t, i in tokenizer.get_vocab().items() if t.startswith("<|")}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>",
                           "<|transcribe|>", "<|startofprev|>", "<|notimestamps|>")
               if t not in added]
    if missing:
        raise ConfigError(f"{where}: no {', '.join(missing)}; this is not a Whisper tokenizer.json")
    ids = {name: get(f"<|{name}|>") for name in ("endoftext", "startoftranscript", "translate",
                                                  "transcribe", "startofprev", "notimestamps")}
    eot, sot = ids["endoftext"], ids["startoftranscript"]
    languages = {t: i for t, i in added.items() if sot < i < ids["translate"]
                 and t not in _NON_LANGUAGE}
    layout_ok = (sot == eot + 1 and len(languages) == ids["translate"] - sot - 1
                 and ids["transcribe"] == ids["translate"] + 1
                 and ids["notimestamps"] == ids["translate"] + 5)
    if eot >= 50256:  # a full Whisper BPE: English-only has GPT-2's 50256 pieces, else 50257
        layout_ok = layout_ok and eot == (50257 if multilingual else 50256)
    if not layout_ok or ids["notimestamps"] >= vocab_size:
        raise ConfigError(
            f"{where}: special tokens at <|endoftext|> {eot}, <|startoftranscript|> {sot}, "
            f"<|translate|> {ids['translate']}, <|notimestamps|> {ids['notimestamps']} do not fit "
            f"a Whisper model with {vocab_size} tokens; use the tokenizer.json that came with "
            "this model.bin")
    ids["languages"] = languages
    return ids


def _save_tokenizer(tokenizer_json: Path, vocab_size: int, multilingual: bool, out: Path):
    """Save the source tokenizer as a WhisperTokenizerFast; returns (special ids, notes)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizerFast

    notes = []
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        if _repair_first_merge(spec):
            notes.append("tokenizer.json lacked its first BPE merge (Ġ t); restored it")
        backend = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001 - json and tokenizers raise several kinds
        raise ConfigError(f"{tokenizer_json}: not a readable tokenizers file ({e}); re-copy "
                          "it from the model directory") from None
    eot = "<|endoftext|>"
    tokenizer = WhisperTokenizerFast(tokenizer_object=backend, unk_token=eot, bos_token=eot,
                                     eos_token=eot, pad_token=eot, model_max_length=448)
    ids = _special_ids(tokenizer, tokenizer_json, vocab_size, multilingual)
    specials = sorted((i, t) for t, i in tokenizer.get_vocab().items()
                      if ids["startoftranscript"] <= i <= ids["notimestamps"])
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False) for _, t in specials]})
    # Timestamp tokens <|0.00|>..<|30.00|> fill the rest of the vocabulary; the
    # faster-whisper tokenizer.json leaves them out, transformers' tokenizers have them.
    timestamps = vocab_size - ids["notimestamps"] - 1
    if len(tokenizer) == ids["notimestamps"] + 1 and timestamps == 1501:
        tokenizer.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False)
                              for i in range(timestamps)])
    tokenizer.save_pretrained(out)
    return ids, notes


# --- the directory ----------------------------------------------------------------------


def _generation_config(ids: dict, ct2_config: dict, layout: dict, multilingual: bool):
    from transformers import GenerationConfig

    eot, sot = ids["endoftext"], ids["startoftranscript"]
    heads = ct2_config.get("alignment_heads") or [  # CTranslate2's default: the last half
        [layer, head] for layer in range(layout["decoder_layers"] // 2, layout["decoder_layers"])
        for head in range(layout["decoder_attention_heads"])]
    fields = dict(
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot,
        max_length=layout["max_target_positions"],
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
        alignment_heads=[list(h) for h in heads],
        is_multilingual=multilingual,
        no_timestamps_token_id=ids["notimestamps"], prev_sot_token_id=ids["startofprev"],
        max_initial_timestamp_index=50, return_timestamps=False,
    )
    if multilingual:  # an English-only model takes no language or task token
        fields["lang_to_id"] = dict(sorted(ids["languages"].items()))
        fields["task_to_id"] = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return GenerationConfig(**fields)



def _inputs(src_dir, model_bin, dtype: str, out_dir) -> tuple[Path, Path, Path, Path]:
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output directory or remove it")
    if not src_dir.is_dir():
        raise ConfigError(f"{src_dir}: not a directory; give the faster-whisper / CTranslate2 "
                          "model directory (model.bin, config.json, tokenizer.json)")
    model_bin = Path(model_bin) if model_bin is not None else src_dir / "model.bin"
    for path, what in ((model_bin, "the CTranslate2 weights"),
                       (src_dir / "tokenizer.json", "the tokenizer"),
                       (src_dir / "config.json", "CTranslate2's Whisper options")):
        if not path.is_file():
            raise ConfigError(f"{path}: not found ({what}); a faster-whisper directory holds "
                              "model.bin, config.json and tokenizer.json: copy the whole directory")
    return src_dir, model_bin, src_dir / "config.json", out_dir


def convert_ct2_whisper(src_dir, out_dir, *, model_bin=None, dtype: str = "float32",
                        provenance: dict | None = None) -> Path:
    """Write a transformers Whisper directory at `out_dir` (which must not exist) from the
    CTranslate2 Whisper directory `src_dir`; returns `out_dir`.

    model_bin: the weights file when it is not `src_dir/model.bin`. dtype: of the saved
    weights ("float32", "float16" or "bfloat16"); int8/int16 weights are dequantized
    first. provenance: extra fields for speechlm_source.json (e.g. the package it came
    from). Nothing appears at `out_dir` unless the whole conversion succeeds.
    """
    from ..jsonl import atomic_directory, atomic_write
    from ..paths import file_sha256

    src_dir, model_bin, ct2_config_file, out_dir = _inputs(src_dir, model_bin, dtype, out_dir)
    try:
        ct2_config = json.loads(ct2_config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{ct2_config_file}: not valid JSON ({e}); re-copy it") from None
    model = read_ct2_model(model_bin)
    if model.spec != "WhisperSpec":
        raise ConfigError(f"{model_bin} is a CTranslate2 {model.spec or 'unnamed-spec'} model, "
                          "not Whisper; speechlm convert ct2-whisper converts Whisper models only")
    if model.spec_revision > KNOWN_REVISION:
        raise ConfigError(f"{model_bin}: WhisperSpec revision {model.spec_revision} is newer than "
                          f"the {KNOWN_REVISION} this converter knows; its layout may differ")
    layout = _whisper_config(model, model_bin)
    multilingual = layout["vocab_size"] >= MULTILINGUAL_VOCAB
    tied = _tied_projection(model, model_bin)
    variables, dequantized = dequantize(model.variables)
    state = _state_dict(model, variables, layout, tied, dtype, model_bin)
    stored = Counter(model.dtypes[n] for n in model.variables if model.variables[n].ndim >= 2)
    notes = []
    if dequantized:
        kinds = "/".join(sorted({model.dtypes[name] for name in dequantized}))
        notes.append(f"dequantized {len(dequantized)} {kinds} weight matrices ({dtype} out)")

    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor

    with atomic_directory(out_dir) as tmp:
        ids, tokenizer_notes = _save_tokenizer(src_dir / "tokenizer.json",
                                               layout["vocab_size"], multilingual, tmp)
        notes += tokenizer_notes
        eot, sot = ids["endoftext"], ids["startoftranscript"]
        config = WhisperConfig(
            **layout, tie_word_embeddings=tied, activation_function="gelu", scale_embedding=False,
            pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot,
            begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or [220, eot]),
            suppress_tokens=list(ct2_config.get("suppress_ids") or []))
        config.architectures = ["WhisperForConditionalGeneration"]
        config.dtype = dtype
        config.save_pretrained(tmp)
        _generation_config(ids, ct2_config, layout, multilingual).save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        WhisperFeatureExtractor(
            feature_size=layout["num_mel_bins"], sampling_rate=16_000, hop_length=160,
            chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=False,
        ).save_pretrained(tmp)
        record = {
            "format": "ctranslate2-whisper",
            "source_dir": str(src_dir.resolve()),
            "model_bin": str(model_bin.resolve()),
            "model_bin_bytes": model_bin.stat().st_size,
            "model_bin_sha256": file_sha256(model_bin),
            "spec": model.spec, "spec_revision": model.spec_revision,
            "format_version": model.version,
            "stored_dtype": stored.most_common(1)[0][0] if stored else None,
            "stored_dtypes": dict(stored),
            "dtype": dtype,
            "multilingual": multilingual,
            "notes": notes,
            **(provenance or {}),
        }
        with atomic_write(tmp / RECORD) as f:
            f.write(json.dumps(record, indent=1) + "\n")
    return out_dir
