"""Speech units in an LLM vocabulary: contiguous special tokens that encode and decode exactly,
new embedding rows near the old mean (but distinct), a model that runs on them, a round trip
through save_pretrained, idempotent re-adding, and clear refusals for other units."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechlm.errors import ConfigError
from speechlm.models.unit_vocab import (
    BEGIN_OF_AUDIO,
    END_OF_AUDIO,
    UnitVocab,
    add_unit_tokens,
)

CODES = 16
IDENTITY = "fake-vq-16"


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _pairwise_median(rows: torch.Tensor) -> float:
    return torch.cdist(rows, rows)[torch.triu_indices(len(rows), len(rows), 1).unbind()].median().item()


def test_units_encode_decode_and_get_rows_near_the_old_mean(tiny_ckpt, one_torch_thread):
    model, tok = _load(tiny_ckpt("llama"))
    base = len(tok)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    vocab = add_unit_tokens(model, tok, CODES, tokenizer_identity=IDENTITY)

    assert (vocab.begin_id, vocab.end_id, vocab.unit_base) == (base, base + 1, base + 2)
    text = f"{BEGIN_OF_AUDIO}<|audio_3|><|audio_0|>{END_OF_AUDIO}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [base, base + 5, base + 2, base + 1] == vocab.units_to_ids([3, 0])
    assert tok.decode(ids) == text
    assert [vocab.code_of(i) for i in ids[1:-1]] == [3, 0] and vocab.unit_id(15) == base + 17
    with pytest.raises(ValueError, match="not a speech unit"):
        vocab.code_of(vocab.begin_id)
    with pytest.raises(ValueError, match="outside"):
        vocab.units_to_ids([CODES])

    for old, new in ((old_in, model.get_input_embeddings().weight),
                     (old_out, model.get_output_embeddings().weight)):
        assert new.shape[0] == base + 2 + CODES
        assert torch.equal(new[:base], old)  # the old tokens are untouched
        added = new[base:].detach()
        assert torch.isfinite(added).all()
        to_mean = (added - old.mean(0)).norm(dim=1).max().item()
        assert to_mean < 0.2 * _pairwise_median(old[torch.randperm(base)[:200]])
        assert _pairwise_median(added) > 0  # distinct rows: the head can tell units apart

    bos = tok.bos_token_id
    words = tok("In the beginning", add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([[bos, *words, *vocab.units_to_ids([3, 0, 7])]])).logits
    assert logits.shape[-1] == base + 2 + CODES and torch.isfinite(logits).all()
    # Mean-initialised heads give the new tokens little mass: text continuations are unchanged.
    assert logits[0, len(words)].softmax(-1)[base:].sum() < 0.05


def test_save_reload_readd_and_refuse_other_units(tiny_ckpt, tmp_path, one_torch_thread):
    model, tok = _load(tiny_ckpt("llama"))
    vocab = add_unit_tokens(model, tok, CODES, tokenizer_identity=IDENTITY)
    out = tmp_path / "extended"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    vocab.save(out)

    model2, tok2 = _load(out)
    assert UnitVocab.load(out) == vocab
    text = f"hi {BEGIN_OF_AUDIO}<|audio_9|>{END_OF_AUDIO}"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    weights = model2.get_input_embeddings().weight.detach().clone()
    assert torch.equal(weights, model.get_input_embeddings().weight)
    assert add_unit_tokens(model2, tok2, CODES, tokenizer_identity=IDENTITY) == vocab
    assert torch.equal(model2.get_input_embeddings().weight, weights)  # not re-initialised
    assert len(tok2) == len(tok)

    with pytest.raises(ConfigError, match="num_codes=16.*not 32"):
        add_unit_tokens(model2, tok2, 32, tokenizer_identity=IDENTITY)
    with pytest.raises(ConfigError, match="tokenizer_identity='fake-vq-16', not 'other-vq'"):
        add_unit_tokens(model2, tok2, CODES, tokenizer_identity="other-vq")
    with pytest.raises(ConfigError, match="tokenizer_identity"):
        add_unit_tokens(model2, AutoTokenizer.from_pretrained(tiny_ckpt("llama")), CODES,
                        tokenizer_identity="other-vq")  # the model remembers its units too
    with pytest.raises(ConfigError, match="no speech-unit vocabulary"):
        UnitVocab.load(tmp_path)


def test_tokenizer_only_then_model_and_tied_embeddings(tiny_ckpt, one_torch_thread):
    model, tok = _load(tiny_ckpt("qwen2"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # Data jobs extend just the tokenizer; training later extends the model: same ids.
    alone = add_unit_tokens(None, tok, CODES, tokenizer_identity=IDENTITY)
    assert model.get_input_embeddings().weight.shape[0] < alone.last_id + 1
    assert add_unit_tokens(model, tok, CODES, tokenizer_identity=IDENTITY) == alone
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == alone.last_id + 1
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()  # still tied
    assert torch.isfinite(weight).all()
    ids = torch.tensor([tok("Hello", add_special_tokens=False)["input_ids"]
                        + alone.units_to_ids([1, 2, 3])])
    assert torch.isfinite(model(ids).logits).all()
