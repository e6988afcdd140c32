"""GGUF -> transformers conversion: the tiny SmolLM2-like GGUF comes back as its source model."""

import json

import pytest

pytest.importorskip("gguf", reason="GGUF conversion needs the gguf package (pip install gguf)")
pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from speechlm.cli import main  # noqa: E402
from speechlm.errors import ConfigError, SpeechLMError  # noqa: E402
from speechlm.pretrained import gguf_llm  # noqa: E402
from speechlm.pretrained.gguf_llm import SOURCE_FILE, convert_gguf  # noqa: E402
from speechlm.testing.tiny_gguf import write_tiny_gguf  # noqa: E402

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "  Y dijo Dios: Sea la luz; y fue la luz. 1234 + 56 = 1290!",
    "<|im_start|>user\nWho made the firmament?<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\nnewlines, émigrés — ünïcödé ✓",
]
CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "And God said, Let there be light."}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """`(tensor_type) -> (gguf path, source dir)`, each written once per module."""
    written = {}

    def get(tensor_type="F32"):
        if tensor_type not in written:
            folder = tmp_path_factory.mktemp(f"gguf-{tensor_type}")
            written[tensor_type] = write_tiny_gguf(folder / "tiny.gguf", tensor_type=tensor_type)
        return written[tensor_type]

    return get


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    """The F32 tiny GGUF converted once, with its GGUF path and source dir."""
    gguf_path, source = tiny_gguf("F32")
    out = convert_gguf(gguf_path, tmp_path_factory.mktemp("converted") / "model")
    return out, gguf_path, source


def _logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits, model


def _ids(source):
    tokenizer = AutoTokenizer.from_pretrained(source)
    return tokenizer(TEXTS[0] + " " + TEXTS[1], return_tensors="pt").input_ids


def test_f32_conversion_reproduces_source_logits_and_greedy_tokens(converted):
    out, _, source = converted
    ids = _ids(source)
    expected, source_model = _logits(source, ids)
    got, model = _logits(out, ids)
    # F32 tensors and an exact q/k un-permutation: equal up to float32 summation order.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert torch.equal(model.generate(ids, **kwargs), source_model.generate(ids, **kwargs))


def test_output_is_a_plain_directory_with_tied_head_and_source_record(converted):
    from safetensors import safe_open

    out, gguf_path, _ = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (2, 64, 1027)
    assert "quantization_config" not in config
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in names  # tied: saved once, as the embedding
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) \
        == (1, 2, 2)
    source = json.loads((out / SOURCE_FILE).read_text())
    import hashlib

    assert source["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert source["source"] == str(gguf_path.resolve())
    assert (source["architecture"], source["dtype"]) == ("llama", "float32")
    assert source["quantization"] == {"F32": 20}
    assert "local_files_only" not in json.loads((out / "tokenizer_config.json").read_text())


def test_output_permissions_follow_the_umask(converted):
    import os
    import stat

    out = converted[0]
    umask = os.umask(0)
    os.umask(umask)
    # Not the 0700 / 0600 of the temporary directory and of transformers' weights file.
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_tokenizer_round_trips_and_chat_template_matches_source(converted):
    out, _, source = converted
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source)
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.decode(ids) == theirs.decode(ids) == text
    for token, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert ours.encode(token, add_special_tokens=False) == [token_id]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(CHAT, tokenize=False,
                                                  add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ours.model_max_length == 2048  # the GGUF's context length


def test_f16_tensors_give_logits_within_f16_rounding(tiny_gguf, tmp_path):
    gguf_path, source = tiny_gguf("F16")
    out = convert_gguf(gguf_path, tmp_path / "model")
    ids = _ids(source)
    expected, _ = _logits(source, ids)
    got, _ = _logits(out, ids)
    error = (got - expected).abs().max().item()
    assert 0 < error < 0.05  # rounded weights (not bit-equal), but only by f16's 2**-11
    assert json.loads((out / SOURCE_FILE).read_text())["quantization"] == {"F16": 15, "F32": 5}


def test_q8_0_is_dequantized_close_to_source(tiny_gguf, tmp_path):
    gguf_path, source = tiny_gguf("Q8_0")
    out = convert_gguf(gguf_path, tmp_path / "model")
    ids = _ids(source)
    expected, _ = _logits(source, ids)
    got, _ = _logits(out, ids)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 0.05
    assert json.loads((out / SOURCE_FILE).read_text())["quantization"] == {"F32": 5, "Q8_0": 15}


def test_bfloat16_output(converted, tmp_path):
    from safetensors import safe_open

    _, gguf_path, source = converted
    out = convert_gguf(gguf_path, tmp_path / "model", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    ids = _ids(source)
    expected, _ = _logits(source, ids)
    got, _ = _logits(out, ids)
    assert ((got - expected).norm() / expected.norm()).item() < 0.05
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_unsupported_architecture_is_refused_naming_file_and_architecture(tmp_path):
    gguf_path, _ = write_tiny_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(ConfigError) as error:
        convert_gguf(gguf_path, tmp_path / "out")
    message = str(error.value)
    assert str(gguf_path) in message and "'rwkv6'" in message
    assert "llama" in message and "qwen2" in message  # the supported list, from transformers
    assert not (tmp_path / "out").exists()


def test_supported_list_comes_from_transformers_table():
    supported = gguf_llm.supported_architectures()
    assert {"llama", "qwen2", "gemma2"} <= set(supported)
    assert not {"general", "tokenizer", "t5"} & set(supported)  # table sections, not causal LMs


def test_non_gguf_and_truncated_files_are_refused(converted, tmp_path):
    _, gguf_path, _ = converted
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    with pytest.raises(ConfigError, match="not a GGUF file") as error:
        convert_gguf(not_gguf, tmp_path / "out")
    assert str(not_gguf) in str(error.value)

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:200_000])
    with pytest.raises(ConfigError, match="truncated or corrupt") as error:
        convert_gguf(truncated, tmp_path / "out")
    assert str(truncated) in str(error.value)
    with pytest.raises(ConfigError, match="file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_and_left_alone(converted, tmp_path):
    _, gguf_path, _ = converted
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        convert_gguf(gguf_path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_conversion_leaves_nothing(tmp_path):
    # A chat template Jinja cannot compile: caught by the check before the rename.
    gguf_path, _ = write_tiny_gguf(tmp_path / "src" / "bad.gguf",
                                   chat_template="{{ messages | no_such_filter }}")
    out = tmp_path / "out"
    with pytest.raises(SpeechLMError, match="chat template"):
        convert_gguf(gguf_path, out)
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # no out, no temporary directory


def test_missing_gguf_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install gguf accelerate"):
        gguf_llm.import_gguf()


def test_cli_converts_and_reports_errors_in_one_line(converted, tmp_path, capsys):
    _, gguf_path, _ = converted
    out = tmp_path / "cli-model"
    assert main(["convert", "gguf", str(gguf_path), str(out), "--dtype", "float16"]) == 0
    assert str(out) in capsys.readouterr().out
    assert json.loads((out / SOURCE_FILE).read_text())["dtype"] == "float16"
    AutoModelForCausalLM.from_pretrained(out)  # loads as a plain transformers directory

    assert main(["convert", "gguf", str(gguf_path), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
