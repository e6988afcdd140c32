"""LoRA (peft), PLoRA (LoRA only at speech positions) and LoRA inside the speech encoder."""

import pytest
import torch

from speechlm.errors import ConfigError
from speechlm.models.lora import LoraSettings, apply_encoder_lora, apply_llm_lora, merge_llm_lora
from speechlm.models.plora import PLoRALinear, apply_plora


def _llm(tiny_ckpt):
    from speechlm.models.speech_lm import load_llm

    llm, _ = load_llm(tiny_ckpt("llama"))
    return llm


def _randomise_lora(model):
    """LoRA B starts at zero (no effect); give it values so the delta shows."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _embeds(llm, n=9, batch=2):
    ids = torch.arange(10, 10 + batch * n).reshape(batch, n)
    return llm.get_input_embeddings()(ids).detach()


def test_plora_changes_only_speech_positions(tiny_ckpt):
    llm = _llm(tiny_ckpt).eval()
    embeds = _embeds(llm)
    with torch.no_grad():
        base_logits = llm(inputs_embeds=embeds).logits
    state = apply_plora(llm, LoraSettings(r=4, alpha=8, dropout=0.0))
    _randomise_lora(llm)
    wrapped = [m for m in llm.modules() if isinstance(m, PLoRALinear)]
    assert len(wrapped) == 2 * 4  # q, k, v, o in each of the 2 layers

    # layer level: each wrapped projection equals its base layer exactly at text positions
    speech = torch.zeros(2, 9, dtype=torch.bool)
    speech[0, 3:6] = True
    speech[1, 1:3] = True
    seen = []

    def check(module, args, output):
        (x,) = args
        base = module.base_layer(x)
        assert torch.equal(output[~speech], base[~speech])
        assert not torch.allclose(output[speech], base[speech])
        seen.append(module)

    hooks = [m.register_forward_hook(check) for m in wrapped]
    with torch.no_grad(), state.speech_positions(speech):
        logits = llm(inputs_embeds=embeds).logits
    for h in hooks:
        h.remove()
    assert len(seen) == len(wrapped)

    # model level: positions before the first speech frame are the base LLM's, bit for bit;
    # speech positions (and text after them, which attends to them) differ
    assert torch.equal(logits[0, :3], base_logits[0, :3])
    assert torch.equal(logits[1, :1], base_logits[1, :1])
    assert not torch.allclose(logits[0, 3:6], base_logits[0, 3:6])
    # without speech (a text-only batch, or outside the block) it is the base LLM
    with torch.no_grad(), state.speech_positions(torch.zeros_like(speech)):
        assert torch.equal(llm(inputs_embeds=embeds).logits, base_logits)
    with torch.no_grad():
        assert torch.equal(llm(inputs_embeds=embeds).logits, base_logits)


def test_plora_trains_only_lora_weights(tiny_ckpt):
    llm = _llm(tiny_ckpt).train()
    state = apply_plora(llm, LoraSettings())  # r 16, alpha 16, dropout 0.05 (BLSP-KD)
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    speech = torch.zeros(2, 9, dtype=torch.bool)
    speech[:, 2:5] = True
    with state.speech_positions(speech):
        llm(inputs_embeds=_embeds(llm)).logits.square().mean().backward()
    moved = {n for n, p in llm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved == {n for n in trainable if "lora_B" in n}  # B = 0 at start: A's grad is 0
    assert all(p.grad is None for n, p in llm.named_parameters() if "lora_" not in n)


def test_plora_generation_with_and_without_cache_and_beams(tiny_ckpt):
    llm = _llm(tiny_ckpt).eval()
    state = apply_plora(llm, LoraSettings(r=4, dropout=0.0))
    _randomise_lora(llm)
    embeds = _embeds(llm)
    speech = torch.zeros(2, 9, dtype=torch.bool)
    speech[:, 4:7] = True
    kwargs = dict(inputs_embeds=embeds, attention_mask=torch.ones(2, 9, dtype=torch.long),
                  max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=None)
    with torch.no_grad(), state.speech_positions(speech):
        cached = llm.generate(**kwargs)
        uncached = llm.generate(**kwargs, use_cache=False)
        beams = llm.generate(**kwargs, num_beams=2)
    with torch.no_grad():
        base = llm.generate(**kwargs)
    assert torch.equal(cached, uncached)
    assert beams.shape == (2, 5)
    assert not torch.equal(cached, base)  # the speech positions' delta changed the output


def test_peft_lora_trains_only_lora_and_merges_to_the_same_model(tiny_ckpt):
    llm = apply_llm_lora(_llm(tiny_ckpt), LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("o_proj" in n for n in trainable)
    _randomise_lora(llm)
    embeds = _embeds(llm)
    with torch.no_grad():
        with_lora = llm(inputs_embeds=embeds).logits
        with llm.disable_adapter():
            base = llm(inputs_embeds=embeds).logits
    assert not torch.allclose(with_lora, base)
    merged = merge_llm_lora(llm)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs_embeds=embeds).logits, with_lora,
                                   atol=1e-5, rtol=1e-5)


def test_lora_target_errors(tiny_ckpt):
    with pytest.raises(ConfigError, match="target_modules \\['query'\\] match no linear.*q_proj"):
        apply_llm_lora(_llm(tiny_ckpt), LoraSettings(target_modules=["query"]))
    with pytest.raises(ConfigError, match="plora.r must be >= 1"):
        apply_plora(_llm(tiny_ckpt), LoraSettings(r=0))


def test_encoder_lora_trains_inside_the_frozen_encoder(tiny_ckpt):
    from speechlm.models.encoders import load_encoder

    enc = load_encoder("auto", tiny_ckpt("wav2vec2"))
    names = apply_encoder_lora(enc, LoraSettings(r=2, dropout=0.1))
    assert len(names) == 2 * 4  # q, k, v, out projections of 2 layers
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.nn.Sequential(enc).train()
    assert enc.backbone.training  # LoRA trains: the backbone follows train mode (LoRA dropout)
    enc.eval()
    out = enc(torch.randn(1, 8000) * 0.1, torch.tensor([8000]))
    out.hidden.square().mean().backward()
    moved = [n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert moved and all("lora_B" in n for n in moved)
    assert all(p.grad is None for n, p in enc.named_parameters() if "lora_" not in n)
