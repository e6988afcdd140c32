"""The template's opening, shared by every row, runs once per batch: same logits, same
gradients and same generated tokens as running it in every row."""

import pytest
import torch

from speechlm.models import speech_lm as speech_lm_module
from speechlm.models.shared_prefix import (
    prefix_cache,
    prefix_first,
    rows_prefill_cache,
    shared_prefix_length,
)
from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
from speechlm.training.objectives import blsp as blsp_module
from speechlm.training.objectives.blsp import BlspObjective, response_logits

INSTRUCTION = "Repeat the audio, word for word."
RESPONSES = ["in the beginning god created", "and the earth", "without form and void it was"]


def _model(tiny_ckpt, llm="llama", template="blsp"):
    torch.manual_seed(0)
    return SpeechLM.build(SpeechLMConfig(encoder_path=str(tiny_ckpt("wav2vec2")),
                                         llm_path=str(tiny_ckpt(llm)), template=template,
                                         instruction=INSTRUCTION))


def _audio(seconds=(0.6, 1.0, 0.3)):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    audio = torch.randn(len(seconds), int(lengths.max()), generator=gen) * 0.1
    audio[torch.arange(audio.shape[1]) >= lengths[:, None]] = 0
    return audio, lengths


def _no_sharing(monkeypatch):
    monkeypatch.setattr(blsp_module, "shared_prefix_length", lambda inputs: 0)
    monkeypatch.setattr(speech_lm_module, "shared_prefix_length", lambda inputs: 0)


def test_the_shared_prefix_is_the_template_text_before_the_speech(tiny_ckpt):
    model = _model(tiny_ckpt)
    audio, lengths = _audio()
    inputs = model.build_inputs(audio, lengths, responses=RESPONSES)
    before_speech = model.encode_prompts(1, responses=RESPONSES[:1])[0].pieces[0]
    assert shared_prefix_length(inputs) == len(before_speech) > 4

    # rows that open differently share only their common start (here: nothing)
    other = model.build_inputs(audio, lengths, responses=RESPONSES,
                               instructions=["Say it.", "Repeat it.", "Write it down."])
    assert shared_prefix_length(other) < len(before_speech)

    # a text-only batch whose labels start right after a short common opening: the
    # prefix stops before the position that predicts the first label
    text = model.build_text_inputs(["a", "a"], instructions="x", responses=["b", "b"])
    first_label = int((text.labels[0] != -100).nonzero()[0])
    assert shared_prefix_length(text, min_length=1) <= first_label - 1


def test_generation_inputs_put_the_prefix_first_and_the_padding_after_it(tiny_ckpt):
    model = _model(tiny_ckpt).eval()
    audio, lengths = _audio()
    with torch.no_grad():
        inputs = model.prepare_generation_inputs(audio, lengths)
    shared = shared_prefix_length(inputs)
    assert shared > 4
    moved = prefix_first(inputs, shared)
    pads = (inputs.attention_mask == 0).sum(1)
    assert pads.max() > 0 and pads.min() == 0  # the rows really are padded differently
    for row in range(len(pads)):
        n = int(pads[row])
        assert moved.attention_mask[row, :shared].all()
        assert not moved.attention_mask[row, shared:shared + n].any()
        assert moved.attention_mask[row, shared + n:].all()
        assert torch.equal(moved.inputs_embeds[row, :shared], inputs.inputs_embeds[row, n:n + shared])
        assert torch.equal(moved.inputs_embeds[row, shared + n:], inputs.inputs_embeds[row, n + shared:])
    with pytest.raises(ValueError, match="left-padded"):
        prefix_first(model.build_inputs(audio, lengths, responses=RESPONSES), shared)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_each_row_is_prefilled_alone_and_generate_runs_only_its_last_position(
        tiny_ckpt, shared_prefix):
    model = _model(tiny_ckpt).eval()
    body = model.llm.model
    audio, lengths = _audio()
    with torch.no_grad():
        inputs = model.prepare_generation_inputs(audio, lengths)
        shared = shared_prefix_length(inputs) if shared_prefix else 0
        prefix = prefix_cache(body, inputs, shared) if shared else None
        if shared:
            inputs = prefix_first(inputs, shared)
        cache = rows_prefill_cache(body, inputs, shared, prefix)
        width = inputs.attention_mask.shape[1]
        assert cache.get_seq_length() == width - 1
        for row in range(3):
            keep = inputs.attention_mask[row].bool()
            out = body(inputs_embeds=inputs.inputs_embeds[row:row + 1, keep][:, :-1],
                       use_cache=True)
            alone = getattr(out, "cache", None) or out.past_key_values
            for (keys, values, *_), (k, v, *_) in zip(cache, alone, strict=True):
                own = keep[:-1]
                torch.testing.assert_close(keys[row, :, own], k[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(values[row, :, own], v[0], atol=1e-5, rtol=1e-5)
                assert not keys[row, :, ~own].any() and not values[row, :, ~own].any()

    # generate_ids hands that cache to generate, whose first forward sees one position per row
    seen = []
    hook = body.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            next(kwargs[k] for k in ("inputs_embeds", "input_ids") if kwargs.get(k) is not None)
            .shape[:2]),
        with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate_ids(model.prepare_generation_inputs(audio, lengths), max_new_tokens=3,
                               min_new_tokens=3)
    finally:
        hook.remove()
    # the prefix (once), each row alone, then batched: the last prompt position and 2 new tokens
    assert seen[-3:] == [(3, 1)] * 3
    assert [n for n, _ in seen[:-3]] == [1] * (len(seen) - 3) and len(seen) - 3 == 4


@pytest.mark.parametrize("llm,template", [("llama", "blsp"), ("qwen2", "chat")])
def test_training_logits_and_gradients_match_running_the_prefix_in_every_row(
        tiny_ckpt, monkeypatch, llm, template):
    model = _model(tiny_ckpt, llm, template).train()
    audio, lengths = _audio()

    def run():
        model.zero_grad()
        inputs = model.build_inputs(audio, lengths, responses=RESPONSES)
        out = response_logits(model, inputs)
        torch.nn.functional.cross_entropy(out.logits, out.targets).backward()
        grads = [p.grad.clone() for p in model.adapter.parameters() if p.grad is not None]
        return out, grads, shared_prefix_length(inputs)

    shared_out, shared_grads, shared = run()
    assert shared > 4
    _no_sharing(monkeypatch)
    full_out, full_grads, _ = run()
    assert torch.equal(shared_out.targets, full_out.targets)
    torch.testing.assert_close(shared_out.logits, full_out.logits, atol=2e-5, rtol=1e-4)
    assert len(shared_grads) == len(full_grads) > 0
    for a, b in zip(shared_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_kd_teacher_reads_the_shared_prefix_too(tiny_ckpt, monkeypatch):
    model = _model(tiny_ckpt).train()
    audio, lengths = _audio()
    batch = {"audio": audio, "audio_lengths": lengths, "texts": ["a b c", "d e", "f g h i"],
             "continuation": RESPONSES}
    shared_loss, _ = BlspObjective(model, loss="ce+kd").loss(batch)
    _no_sharing(monkeypatch)
    full_loss, _ = BlspObjective(model, loss="ce+kd").loss(batch)
    torch.testing.assert_close(shared_loss, full_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("llm,template", [("llama", "blsp"), ("qwen2", "chat")])
def test_generation_is_the_same_with_the_prefix_run_once(tiny_ckpt, monkeypatch, llm, template):
    model = _model(tiny_ckpt, llm, template).eval()
    audio, lengths = _audio()
    calls = []
    real_cache = speech_lm_module.prefix_cache
    monkeypatch.setattr(speech_lm_module, "prefix_cache",
                        lambda *a: calls.append(a[2]) or real_cache(*a))
    with torch.no_grad():
        shared = model.generate_ids(model.prepare_generation_inputs(audio, lengths),
                                    max_new_tokens=12, min_new_tokens=12)
        alone = [model.generate_ids(model.prepare_generation_inputs(audio[i:i + 1, :n], lengths[i:i + 1]),
                                    max_new_tokens=12, min_new_tokens=12)[0]
                 for i, n in enumerate(lengths.tolist())]
        _no_sharing(monkeypatch)
        full = model.generate_ids(model.prepare_generation_inputs(audio, lengths),
                                  max_new_tokens=12, min_new_tokens=12)
    assert shared.shape == (3, 12)
    assert len(calls) == 4 and min(calls) > 4  # the batch and each row alone shared a prefix
    assert torch.equal(shared, full)
    for row, ids in enumerate(alone):
        assert torch.equal(shared[row], ids)
