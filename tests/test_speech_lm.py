"""SpeechLM assembly: prompts, labels only on responses, every encoder x adapter end to end,
batched generation with left padding, and the checkpoint format (save / reload / merge)."""

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from speechlm.errors import ConfigError, SpeechLMError
from speechlm.models.lora import LoraSettings
from speechlm.models.prompts import IGNORE_INDEX, get_template
from speechlm.models.speech_lm import CONFIG_FILE, WEIGHTS_FILE, SpeechLM, SpeechLMConfig

INSTRUCTION = "Repeat the audio."
SMALL_QFORMER = {"d_model": 32, "num_heads": 4, "ffn_dim": 64, "window_frames": 8}


def _config(tiny_ckpt, encoder="wav2vec2", llm="llama", **fields):
    fields.setdefault("template", "chat" if llm == "qwen2" else "blsp")
    if fields.get("adapter") == "qformer":
        fields.setdefault("adapter_options", SMALL_QFORMER)
    return SpeechLMConfig(encoder_path=str(tiny_ckpt(encoder)), llm_path=str(tiny_ckpt(llm)),
                          instruction=INSTRUCTION, **fields)


def _model(tiny_ckpt, encoder="wav2vec2", llm="llama", **fields):
    torch.manual_seed(0)
    return SpeechLM.build(_config(tiny_ckpt, encoder, llm, **fields))


def _batch(seconds=(0.6, 1.0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    audio = torch.randn(len(seconds), int(lengths.max()), generator=gen) * 0.1
    audio[torch.arange(audio.shape[1]) >= lengths[:, None]] = 0
    return audio, lengths


RESPONSES = ["in the beginning god created", "and the earth was without form"]


def _manual_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def test_blsp_inputs_put_labels_only_on_response_tokens(tiny_ckpt):
    model = _model(tiny_ckpt).eval()
    tok = model.tokenizer
    audio, lengths = _batch()
    inputs = model.build_inputs(audio, lengths, responses=RESPONSES)
    with torch.no_grad():
        speech = model.encode_speech(audio, lengths)
    assert tok.pad_token_id is None and model.pad_id == tok.eos_token_id  # llama: no pad token

    for row, response in enumerate(RESPONSES):
        valid = inputs.attention_mask[row].bool()
        labels, speech_at = inputs.labels[row], inputs.speech_mask[row]
        # speech: exactly the adapter's frames, spliced in, with -100 labels (the BLSP bug)
        assert int(speech_at.sum()) == int(speech.lengths[row])
        assert torch.all(labels[speech_at] == IGNORE_INDEX)
        torch.testing.assert_close(inputs.inputs_embeds[row, speech_at],
                                   speech.hidden[row, : int(speech.lengths[row])])
        # only response tokens + EOS carry labels; prompt and padding are -100
        expected = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        assert torch.all(labels[~valid] == IGNORE_INDEX)
        text_ids = inputs.input_ids[row][valid & ~speech_at].tolist()
        assert text_ids[0] == tok.bos_token_id
        prompt_len = len(text_ids) - len(expected)
        assert torch.all(labels[valid][: int(valid.sum()) - len(expected)] == IGNORE_INDEX)
        assert tok.decode(text_ids[:prompt_len], skip_special_tokens=True).replace(" ", "") == \
            f"###[Human]:{INSTRUCTION}\n\n\n###[Assistant]:".replace(" ", "")
        # text positions hold the LLM's own token embeddings
        emb = model.llm.get_input_embeddings()(inputs.input_ids[row][valid & ~speech_at])
        torch.testing.assert_close(inputs.inputs_embeds[row, valid & ~speech_at], emb)
    assert inputs.attention_mask[0, -1] == 0 and inputs.attention_mask[1, -1] == 1  # right padding

    out = model(audio, lengths, responses=RESPONSES)
    torch.testing.assert_close(out.loss, _manual_loss(out.logits, out.inputs.labels))


def test_chat_template_splits_the_user_turn_and_ends_with_end_of_turn(tiny_ckpt):
    model = _model(tiny_ckpt, llm="qwen2", template="chat", system_prompt="Be brief.")
    tok = model.tokenizer
    prompt = model.encode_prompts(1, responses=["amen"])[0]
    before, slot, after = prompt.pieces
    assert slot is None
    assert tok.decode(before) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                  f"<|im_start|>user\n{INSTRUCTION}\n")
    assert tok.decode(after) == "<|im_end|>\n<|im_start|>assistant\n"
    assert prompt.response[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.stop_token_ids()

    first = get_template("chat", speech_first=True).encode(tok, "Translate.")
    assert first.pieces[0][-4:] == tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(first.pieces[2]).startswith("\nTranslate.<|im_end|>")

    with pytest.raises(ConfigError, match="no chat template.*use template 'blsp'"):
        _model(tiny_ckpt, llm="llama", template="chat")


def test_text_path_aligns_its_response_with_the_speech_path(tiny_ckpt):
    model = _model(tiny_ckpt, llm="qwen2")
    audio, lengths = _batch()
    speech_inputs = model.build_inputs(audio, lengths, responses=RESPONSES)
    text_inputs = model.build_text_inputs(["god said let there be light", "and there was"],
                                          responses=RESPONSES)
    assert not text_inputs.speech_mask.any()
    for row in range(2):
        s, t = speech_inputs.labels[row], text_inputs.labels[row]
        assert s[s != IGNORE_INDEX].tolist() == t[t != IGNORE_INDEX].tolist()
    decoded = model.tokenizer.decode(text_inputs.input_ids[0][text_inputs.attention_mask[0].bool()])
    assert f"{INSTRUCTION}\ngod said let there be light<|im_end|>" in decoded


E2E = [("wav2vec2", "blsp", "llama"), ("wav2vec2", "stack", "qwen2"), ("wav2vec2", "qformer", "llama"),
       ("hubert", "blsp", "qwen2"), ("hubert", "stack", "llama"), ("hubert", "qformer", "qwen2"),
       ("whisper", "blsp", "llama"), ("whisper", "stack", "qwen2"), ("whisper", "qformer", "llama"),
       ("wav2vec2", "cif", "qwen2"), ("whisper", "cif", "llama")]


@pytest.mark.parametrize("encoder,adapter,llm", E2E)
def test_end_to_end_forward_backward_generate(tiny_ckpt, encoder, adapter, llm):
    lora = LoraSettings(r=2) if adapter == "stack" else None
    model = _model(tiny_ckpt, encoder, llm, adapter=adapter, lora=lora).train()
    audio, lengths = _batch()
    out = model(audio, lengths, responses=RESPONSES)
    torch.testing.assert_close(out.loss, _manual_loss(out.logits, out.inputs.labels))
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("adapter.") for n in trainable)
    assert all(n.startswith("adapter.") or (lora and ".lora_" in n) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in trainable if "adapter" in n)

    inputs = model.prepare_generation_inputs(audio, lengths)
    assert inputs.attention_mask[0, 0] == 0 and torch.all(inputs.attention_mask[:, -1] == 1)
    ids = model.generate_ids(inputs, max_new_tokens=3, eos_token_id=None)
    assert ids.shape == (2, 3)
    texts = model.decode(ids)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("llm", ["llama", "qwen2"])
def test_batched_left_padded_generation_equals_one_at_a_time(tiny_ckpt, llm):
    model = _model(tiny_ckpt, "wav2vec2", llm).eval()
    audio, lengths = _batch((0.4, 1.1, 0.7), seed=2)
    batched = model.generate_ids(model.prepare_generation_inputs(audio, lengths),
                                 max_new_tokens=6, eos_token_id=None)
    for row in range(3):
        n = int(lengths[row])
        single = model.generate_ids(model.prepare_generation_inputs(audio[row : row + 1, :n],
                                                                    lengths[row : row + 1]),
                                    max_new_tokens=6, eos_token_id=None)
        assert batched[row].tolist() == single[0].tolist()
    model.train()
    texts = model.generate(audio, lengths, max_new_tokens=6)
    assert texts == model.decode(batched) and model.training  # generate() restores the mode


def _train_steps(model, steps=3):
    audio, lengths = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(audio, lengths, responses=RESPONSES).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    return model.eval()


def _outputs(model, seed=5):
    audio, lengths = _batch((0.5, 0.9), seed=seed)
    with torch.no_grad():
        logits = model(audio, lengths, responses=RESPONSES).logits
    ids = model.generate_ids(model.prepare_generation_inputs(audio, lengths), max_new_tokens=5,
                             eos_token_id=None)
    return logits, ids


@pytest.mark.parametrize("fields", [
    dict(adapter="blsp", encoder_layer="weighted", lora=LoraSettings(r=2, dropout=0.0)),
    dict(adapter="qformer", llm="qwen2", plora=LoraSettings(r=2, dropout=0.0),
         encoder_lora=LoraSettings(r=2, dropout=0.0)),
    # at inference a CIF adapter fires its own count: the reloaded one must fire the same
    dict(adapter="cif", adapter_options={"num_layers": 1, "num_heads": 2}),
])
def test_trained_model_saved_and_reloaded_gives_identical_outputs(tiny_ckpt, tmp_path, fields):
    fields = dict(fields)
    llm = fields.pop("llm", "llama")
    model = _train_steps(_model(tiny_ckpt, "wav2vec2", llm, **fields))
    logits, ids = _outputs(model)
    ckpt = model.save_pretrained(tmp_path / "ckpt")

    from safetensors.torch import load_file

    saved = load_file(str(ckpt / WEIGHTS_FILE))
    assert set(saved) == set(model.trainable_state_dict())  # only what was trained
    assert not any(n.startswith("llm.") and "lora_" not in n for n in saved)
    assert not any(n.startswith("encoder.backbone.") and "lora_" not in n for n in saved)
    record = json.loads((ckpt / CONFIG_FILE).read_text())
    assert record["base"]["llm"]["path"] == str(tiny_ckpt(llm))
    assert len(record["base"]["encoder"]["config_sha256"]) == 64
    assert record["config"]["adapter"] == fields["adapter"]

    reloaded = SpeechLM.from_pretrained(ckpt)
    logits2, ids2 = _outputs(reloaded)
    assert torch.equal(logits, logits2)
    assert torch.equal(ids, ids2)


def test_merged_lora_checkpoint_holds_the_merged_llm(tiny_ckpt, tmp_path):
    model = _train_steps(_model(tiny_ckpt, lora=LoraSettings(r=2, dropout=0.0)))
    logits, _ = _outputs(model)
    ckpt = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert (ckpt / "llm" / "config.json").is_file() and model.config.lora is None
    from safetensors.torch import load_file

    assert all(n.startswith("adapter.") for n in load_file(str(ckpt / WEIGHTS_FILE)))
    reloaded = SpeechLM.from_pretrained(ckpt)
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    torch.testing.assert_close(_outputs(reloaded)[0], logits, atol=1e-5, rtol=1e-5)

    plora = _model(tiny_ckpt, plora=LoraSettings(r=2))
    with pytest.raises(ConfigError, match="PLoRA cannot be merged.*speech positions"):
        plora.save_pretrained(tmp_path / "plora", merge_lora=True)


def test_missing_base_model_is_reported_and_can_be_overridden(tiny_ckpt, tmp_path, caplog):
    llm_dir = tmp_path / "my-llm"
    shutil.copytree(tiny_ckpt("llama"), llm_dir)
    model = SpeechLM.build(SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                                          llm_path=str(llm_dir), adapter="stack"))
    logits, _ = _outputs(model.eval())
    ckpt = model.save_pretrained(tmp_path / "ckpt")
    moved = llm_dir.rename(tmp_path / "moved-llm")
    with pytest.raises(ConfigError, match=f"{llm_dir}.*pass llm_path=NEW_DIR"):
        SpeechLM.from_pretrained(ckpt)
    reloaded = SpeechLM.from_pretrained(ckpt, llm_path=moved)
    assert torch.equal(_outputs(reloaded)[0], logits)

    # a base whose config.json changed (not just re-saved) is loaded with a warning
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0"}))
    with caplog.at_level(logging.WARNING, logger="speechlm.models.speech_lm"):
        SpeechLM.from_pretrained(ckpt, llm_path=moved)
    assert not caplog.records  # volatile fields do not count
    (moved / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with caplog.at_level(logging.WARNING, logger="speechlm.models.speech_lm"):
        SpeechLM.from_pretrained(ckpt, llm_path=moved)
    assert "base llm config differs" in caplog.text

    with pytest.raises(SpeechLMError, match="not a speechlm checkpoint"):
        SpeechLM.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="lora and plora are exclusive"):
        _model(tiny_ckpt, lora=LoraSettings(), plora=LoraSettings())


def test_adapter_output_scale_starts_speech_at_the_llms_embedding_scale(tiny_ckpt):
    model = _model(tiny_ckpt, adapter="blsp", adapter_output_scale="llm")
    weight = model.llm.get_input_embeddings().weight.detach()
    rms = float(weight.pow(2).mean().sqrt())
    assert torch.allclose(model.adapter.norm.weight, torch.full_like(model.adapter.norm.weight, rms))
    audio, lengths = _batch()
    with torch.no_grad():
        speech = model.encode_speech(audio, lengths)
    row = speech.hidden[0, : int(speech.lengths[0])]
    # a LayerNorm (zero bias at init) outputs per-dimension RMS equal to its gain
    assert float(row.pow(2).mean().sqrt()) == pytest.approx(rms, rel=2e-2)
    default = _model(tiny_ckpt, adapter="blsp")
    assert torch.all(default.adapter.norm.weight == 1.0)  # BLSP's own init
    with pytest.raises(ConfigError, match="adapter_output_scale must be 'llm', a number or null"):
        _model(tiny_ckpt, adapter="blsp", adapter_output_scale="tokens")


def test_a_frozen_llm_trains_through_bf16_weights_and_eager_attention(tiny_ckpt):
    from speechlm.training.objectives.blsp import BlspObjective

    audio, lengths = _batch()
    batch = {"audio": audio, "audio_lengths": lengths, "texts": ["a b", "c d e"],
             "continuation": RESPONSES}

    def loss_and_grads(model):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = BlspObjective(model, loss="ce+kd").loss(batch)
        loss.backward()
        return float(loss), [p.grad for p in model.adapter.parameters()]

    reference = loss_and_grads(_model(tiny_ckpt))
    model = _model(tiny_ckpt)
    assert model.speed_up_frozen_llm(torch.bfloat16, "cpu") == ["LLM weights in bf16",
                                                                "eager attention"]
    assert model.llm.dtype == torch.bfloat16 and model.llm.config._attn_implementation == "eager"
    assert next(model.adapter.parameters()).dtype == torch.float32  # what trains stays fp32
    loss, grads = loss_and_grads(model)
    assert loss == pytest.approx(reference[0], rel=0.02)
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)

    # after training it goes back to the LLM as saved and loaded: its own fp32 weights
    model.restore_frozen_llm()
    fresh = _model(tiny_ckpt)
    assert model.llm.dtype == torch.float32
    assert model.llm.config._attn_implementation == fresh.llm.config._attn_implementation
    assert all(torch.equal(a, b) for a, b in zip(model.llm.state_dict().values(),
                                                   fresh.llm.state_dict().values(), strict=True))

    # nothing changes when the LLM trains (its weights need their fp32 copy) or under fp32
    tuned = _model(tiny_ckpt, lora=LoraSettings(r=4))
    assert tuned.speed_up_frozen_llm(torch.bfloat16, "cpu") == []
    assert tuned.llm.dtype == torch.float32
    assert _model(tiny_ckpt).speed_up_frozen_llm(None, "cuda") == []
