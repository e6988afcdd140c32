"""CTranslate2 (faster-whisper) Whisper -> transformers: the model.bin reader and the converter.

The tiny CT2 models are written from tiny transformers Whispers (speechlm.testing.tiny_ct2),
so a conversion can be compared with the model it came from.
"""

import json
import shutil

import numpy as np
import pytest

from speechlm.errors import ConfigError
from speechlm.pretrained.ct2 import (
    dequantize,
    float32_to_bfloat16,
    quantize_int8,
    read_ct2_model,
    write_ct2_model,
)

# --- the model.bin reader -------------------------------------------------------------------


def test_model_bin_round_trip_keeps_every_dtype_scalar_and_alias(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    q, scale = quantize_int8(weight)
    variables = {
        "a/f32": weight,
        "a/f16": weight.astype(np.float16),
        "a/bf16": float32_to_bfloat16(weight),
        "a/i8": q, "a/i8_scale": scale,
        "a/i16": np.arange(-3, 3, dtype=np.int16),
        "a/i32": np.arange(5, dtype=np.int32).reshape(5, 1),
        "flag": True, "heads": np.int16(6), "eps": 1e-5, "name": "gelu",
    }
    path = write_ct2_model(tmp_path / "model.bin", "SomeSpec", 7, variables,
                           aliases={"b/f16": "a/f16"})
    model = read_ct2_model(path)

    assert (model.spec, model.spec_revision, model.version) == ("SomeSpec", 7, 6)
    assert model.aliases == {"b/f16": "a/f16"}
    assert model.resolve("b/f16") is model.variables["a/f16"]
    v = model.variables
    np.testing.assert_array_equal(v["a/f32"], weight)
    np.testing.assert_array_equal(v["a/f16"], weight.astype(np.float16))
    # bfloat16 comes back as float32 holding the bf16-rounded values (8 mantissa bits).
    assert v["a/bf16"].dtype == np.float32 and model.dtypes["a/bf16"] == "bfloat16"
    np.testing.assert_allclose(v["a/bf16"], weight, rtol=2 ** -8)
    assert not np.array_equal(v["a/bf16"], weight)
    np.testing.assert_array_equal(v["a/i8"], q)
    np.testing.assert_array_equal(v["a/i32"], np.arange(5).reshape(5, 1))
    assert v["flag"].dtype == np.int8 and int(v["flag"]) == 1 and v["flag"].shape == ()
    assert v["heads"].dtype == np.int16 and int(v["heads"]) == 6
    assert v["eps"].dtype == np.float32 and float(v["eps"]) == pytest.approx(1e-5)
    assert v["name"].tobytes() == b"gelu"
    assert model.dtypes["a/f16"] == "float16" and model.dtypes["a/i16"] == "int16"


def test_dequantize_undoes_ctranslate2_int8_and_int16_quantization(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 16)).astype(np.float32) * np.arange(1, 9)[:, None]
    weight[3] = 0  # an all-zero row gets scale 127, as in CTranslate2
    q8, scale8 = quantize_int8(weight)
    assert q8.dtype == np.int8 and np.abs(q8).max() == 127
    scale16 = np.float32(2 ** 10 / np.abs(weight).max())  # CTranslate2's int16: one scale
    q16 = np.rint(weight * scale16).astype(np.int16)
    path = write_ct2_model(tmp_path / "model.bin", "S", 1, {
        "l8/weight": q8, "l8/weight_scale": scale8, "l8/bias": np.ones(8, np.float32),
        "l16/weight": q16, "l16/weight_scale": scale16})

    variables, names = dequantize(read_ct2_model(path).variables)

    assert sorted(names) == ["l16/weight", "l8/weight"]
    assert set(variables) == {"l8/weight", "l8/bias", "l16/weight"}  # scales consumed
    row_step = np.abs(weight).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(variables["l8/weight"] - weight) <= row_step / 2 + 1e-6)
    assert np.abs(variables["l16/weight"] - weight).max() <= 0.5 / scale16 + 1e-6
    np.testing.assert_array_equal(variables["l8/bias"], np.ones(8))


def test_truncated_or_garbled_model_bin_is_refused_with_file_and_offset(tmp_path):
    good = write_ct2_model(tmp_path / "good.bin", "WhisperSpec", 3, {
        "x/weight": np.ones((4, 4), np.float16), "n": np.int16(2)}, aliases={"y": "x/weight"})
    data = good.read_bytes()
    for cut in (2, 10, 40, len(data) - 40, len(data) - 3):
        bad = tmp_path / f"cut{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ConfigError) as err:
            read_ct2_model(bad)
        message = str(err.value)
        assert str(bad) in message and "at byte" in message and "re-copy it" in message
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(ConfigError, match="not a CTranslate2 model.bin"):
        read_ct2_model(garbage)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        read_ct2_model(tmp_path / "empty.bin")


# --- conversion ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory):
    """`(quantize=None, multilingual=True) -> (ct2_dir, source_dir, converted_dir)`, each
    written once per module; the conversion is float32. Treat them as read-only."""
    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper
    from speechlm.testing.tiny_ct2 import TRANSFORMERS_SUBDIR, write_tiny_ct2_whisper

    made = {}

    def get(quantize=None, multilingual=True):
        key = (quantize, multilingual)
        if key not in made:
            root = tmp_path_factory.mktemp("ct2")
            ct2 = write_tiny_ct2_whisper(root / "ct2", quantize=quantize, multilingual=multilingual)
            made[key] = (ct2, ct2 / TRANSFORMERS_SUBDIR,
                         convert_ct2_whisper(ct2, root / "converted"))
        return made[key]

    return get


def _load(path, *, round_to_fp16=False):
    import torch
    from transformers import WhisperForConditionalGeneration

    from speechlm.models.encoders import quiet_transformers

    with quiet_transformers():
        model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    if round_to_fp16:  # what the float16 model.bin holds
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def _features(model_dir):
    """Log-mel features of a 2 s chirp through the converted directory's processor."""
    from transformers import WhisperProcessor

    t = np.arange(32_000) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    processor = WhisperProcessor.from_pretrained(model_dir)
    return processor(wave, sampling_rate=16_000, return_tensors="pt").input_features


def _outputs(model, features, prompt):
    import torch

    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        logits = model(input_features=features, decoder_input_ids=prompt).logits
    return encoded, logits


def test_conversion_reproduces_the_source_model(tiny_ct2):
    import torch

    ct2, source, out = tiny_ct2()
    converted = _load(out)
    features = _features(out)
    generation = json.loads((source / "generation_config.json").read_text())
    sot = generation["decoder_start_token_id"]
    prompt = torch.tensor([[sot, generation["lang_to_id"]["<|en|>"],
                            generation["task_to_id"]["transcribe"],
                            generation["no_timestamps_token_id"], 5, 6, 7]])

    enc, logits = _outputs(converted, features, prompt)
    # The float16 model.bin holds the source's weights rounded to fp16: with those, exact.
    rounded = _load(source, round_to_fp16=True)
    enc_r, logits_r = _outputs(rounded, features, prompt)
    assert torch.equal(enc, enc_r) and torch.equal(logits, logits_r)
    # Against the float32 original: within fp16 rounding.
    enc_s, logits_s = _outputs(_load(source), features, prompt)
    assert (enc - enc_s).abs().max() < 3e-3 * enc_s.abs().max()
    assert (logits - logits_s).abs().max() < 1e-2 * logits_s.std() * 10
    assert not torch.equal(logits, logits_s)  # the fp16 rounding is really there

    kwargs = dict(language="en", task="transcribe", max_new_tokens=12)
    tokens = converted.generate(features, **kwargs)
    assert tokens.tolist() == rounded.generate(features, **kwargs).tolist()
    assert tokens.shape[1] >= 1


def test_converted_directory_has_whisper_config_tokenizer_and_record(tiny_ct2):
    from transformers import WhisperConfig, WhisperProcessor

    ct2, source, out = tiny_ct2()
    config, want = WhisperConfig.from_pretrained(out), WhisperConfig.from_pretrained(source)
    for field in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "num_mel_bins",
                  "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                  "decoder_ffn_dim", "max_source_positions", "max_target_positions",
                  "decoder_start_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        assert getattr(config, field) == getattr(want, field), field
    assert config.architectures == ["WhisperForConditionalGeneration"]

    generation = json.loads((out / "generation_config.json").read_text())
    expected = json.loads((source / "generation_config.json").read_text())
    for field in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "suppress_tokens",
                  "begin_suppress_tokens", "alignment_heads", "lang_to_id", "task_to_id",
                  "no_timestamps_token_id", "prev_sot_token_id", "max_initial_timestamp_index"):
        assert generation[field] == expected[field], field
    assert generation["is_multilingual"] is True and generation["max_length"] == 448

    processor = WhisperProcessor.from_pretrained(out)
    reference = WhisperProcessor.from_pretrained(source)
    text = "In the beginning God created the heaven and the earth."
    assert processor.tokenizer(text).input_ids == reference.tokenizer(text).input_ids
    for token in ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                  "<|notimestamps|>"):
        assert (processor.tokenizer.convert_tokens_to_ids(token)
                == reference.tokenizer.convert_tokens_to_ids(token))
    assert processor.feature_extractor.feature_size == 80
    assert processor.feature_extractor.sampling_rate == 16_000

    record = json.loads((out / "speechlm_source.json").read_text())
    assert record["spec"] == "WhisperSpec" and record["spec_revision"] == 3
    assert record["stored_dtype"] == "float16" and record["dtype"] == "float32"
    import hashlib
    assert record["model_bin_sha256"] == hashlib.sha256((ct2 / "model.bin").read_bytes()).hexdigest()


def test_english_only_model_converts_to_an_english_only_generation_config(tiny_ct2):
    import torch

    ct2, source, out = tiny_ct2(multilingual=False)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["is_multilingual"] is False
    assert "lang_to_id" not in generation and "task_to_id" not in generation
    converted, rounded = _load(out), _load(source, round_to_fp16=True)
    features = _features(out)
    tokens = converted.generate(features, max_new_tokens=12)
    assert tokens.tolist() == rounded.generate(features, max_new_tokens=12).tolist()
    # An English-only prompt is <|startoftranscript|><|notimestamps|>: no language, no task.
    prompt = torch.cat([torch.tensor([[generation["decoder_start_token_id"],
                                       generation["no_timestamps_token_id"]]]), tokens], dim=1)
    assert torch.equal(_outputs(converted, features, prompt)[1],
                       _outputs(rounded, features, prompt)[1])
    with pytest.raises(ValueError, match="English-only"):  # transformers' rule, kept
        converted.generate(features, language="en", max_new_tokens=2)


def test_int8_model_is_dequantized_close_to_the_float_model(tiny_ct2):
    ct2, source, out = tiny_ct2(quantize="int8")
    assert read_ct2_model(ct2 / "model.bin").dtypes["decoder/embeddings/weight"] == "int8"
    record = json.loads((out / "speechlm_source.json").read_text())
    assert record["stored_dtype"] == "int8"
    assert any("dequantized" in note for note in record["notes"])
    features = _features(out)
    import torch
    prompt = torch.tensor([[1025, 1026, 1126, 1130, 5, 6, 7]])
    enc, logits = _outputs(_load(out), features, prompt)
    enc_s, logits_s = _outputs(_load(source), features, prompt)
    # int8 rows keep ~1/254 of their range: close, though not fp16-close.
    assert (logits - logits_s).abs().max() < 0.15 * logits_s.std()
    assert np.corrcoef(logits.flatten(), logits_s.flatten())[0, 1] > 0.999
    assert (enc - enc_s).abs().max() < 0.02 * enc_s.abs().max()


# --- refusals -----------------------------------------------------------------------------


def _copy_without_weights(ct2, to):
    to.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(ct2 / name, to / name)
    return to


def test_other_spec_is_refused_naming_the_file(tiny_ct2, tmp_path):
    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper

    src = _copy_without_weights(tiny_ct2()[0], tmp_path / "mt")
    write_ct2_model(src / "model.bin", "TransformerSpec", 7, {
        "encoder/num_heads": np.int16(8), "decoder/embeddings/weight": np.ones((4, 2), np.float16)})
    with pytest.raises(ConfigError) as err:
        convert_ct2_whisper(src, tmp_path / "out")
    assert str(src / "model.bin") in str(err.value)
    assert "CTranslate2 TransformerSpec model, not Whisper" in str(err.value)
    assert "converts Whisper models only" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_truncated_model_bin_and_missing_files_are_refused(tiny_ct2, tmp_path):
    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper

    ct2 = tiny_ct2()[0]
    src = _copy_without_weights(ct2, tmp_path / "cut")
    data = (ct2 / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"{src / 'model.bin'}: file ends .* re-copy it"):
        convert_ct2_whisper(src, tmp_path / "out")
    # model_bin= reads the weights from elsewhere (a caller assembled them there).
    (src / "model.bin").unlink()
    with pytest.raises(ConfigError, match="model.bin: not found"):
        convert_ct2_whisper(src, tmp_path / "out")
    out = convert_ct2_whisper(src, tmp_path / "out", model_bin=ct2 / "model.bin",
                              provenance={"name": "whisper-tiny-test"})
    record = json.loads((out / "speechlm_source.json").read_text())
    assert record["model_bin"] == str((ct2 / "model.bin").resolve())
    assert record["name"] == "whisper-tiny-test"  # a caller's provenance is kept
    (src / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json: not found"):
        convert_ct2_whisper(src, tmp_path / "out2", model_bin=ct2 / "model.bin")
    with pytest.raises(ConfigError, match="float8"):
        convert_ct2_whisper(ct2, tmp_path / "out3", dtype="float8")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_unknown_or_missing_variables_are_refused(tiny_ct2, tmp_path):
    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper

    ct2 = tiny_ct2()[0]
    model = read_ct2_model(ct2 / "model.bin")
    extra = _copy_without_weights(ct2, tmp_path / "extra")
    write_ct2_model(extra / "model.bin", "WhisperSpec", 3,
                    {**model.variables, "encoder/adapter/weight": np.ones((2, 2), np.float16)},
                    aliases=model.aliases)
    with pytest.raises(ConfigError, match="unused variables encoder/adapter/weight"):
        convert_ct2_whisper(extra, tmp_path / "out")
    short = _copy_without_weights(ct2, tmp_path / "short")
    variables = dict(model.variables)
    del variables["decoder/layer_1/attention/linear_2/bias"]
    write_ct2_model(short / "model.bin", "WhisperSpec", 3, variables, aliases=model.aliases)
    with pytest.raises(ConfigError, match="missing decoder/layer_1/attention/linear_2/bias"):
        convert_ct2_whisper(short, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_a_failure_midway_leaves_nothing(
        tiny_ct2, tmp_path, monkeypatch):
    from speechlm.pretrained import ct2_whisper

    ct2 = tiny_ct2()[0]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        ct2_whisper.convert_ct2_whisper(ct2, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ct2_whisper, "_generation_config", broken)  # after the tokenizer is saved
    with pytest.raises(RuntimeError, match="disk full"):
        ct2_whisper.convert_ct2_whisper(ct2, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no out, no temp dir


def test_a_tokenizer_missing_its_first_merge_is_repaired(tiny_ct2, tmp_path):
    """Published multilingual faster-whisper tokenizer.json files lack the merge making
    token 256, so " the" would not encode as one token; the converter restores it."""
    from transformers import WhisperTokenizerFast

    from speechlm.pretrained.ct2_whisper import convert_ct2_whisper

    ct2, source, _ = tiny_ct2()
    src = _copy_without_weights(ct2, tmp_path / "src")
    spec = json.loads((src / "tokenizer.json").read_text())
    merges = spec["model"]["merges"]
    first = merges.pop(0)
    left, right = first.split(" ") if isinstance(first, str) else first
    (src / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    word = (left + right).replace("\u0120", " ")
    damaged = WhisperTokenizerFast.from_pretrained(source)
    damaged._tokenizer.model = type(damaged._tokenizer.model)(  # the same BPE without merge 0
        vocab=spec["model"]["vocab"], merges=[tuple(m) if not isinstance(m, str)
                                              else tuple(m.split(" ")) for m in merges])
    assert len(damaged(word, add_special_tokens=False).input_ids) == 2

    out = convert_ct2_whisper(src, tmp_path / "out", model_bin=ct2 / "model.bin")
    repaired = WhisperTokenizerFast.from_pretrained(out)
    reference = WhisperTokenizerFast.from_pretrained(source)
    assert len(repaired(word, add_special_tokens=False).input_ids) == 1
    text = "In the beginning God created the heaven and the earth."
    assert repaired(text).input_ids == reference(text).input_ids
    record = json.loads((out / "speechlm_source.json").read_text())
    assert any("first BPE merge" in note for note in record["notes"])


# --- the command --------------------------------------------------------------------------


def test_cli_converts_end_to_end(tiny_ct2, tmp_path, capsys):
    from safetensors import safe_open

    from speechlm.cli import main

    ct2, source, _ = tiny_ct2()
    out = tmp_path / "whisper-tiny"
    assert main(["convert", "ct2-whisper", str(ct2), str(out), "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "multilingual Whisper" in printed
    assert "from_pretrained" in printed
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.decoder.embed_tokens.weight").dtype.is_floating_point
        assert str(f.get_tensor("model.encoder.conv1.weight").dtype) == "torch.float16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    model = _load(out)  # loads (as float16 weights) with every parameter filled
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()

    assert main(["convert", "ct2-whisper", str(ct2), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
