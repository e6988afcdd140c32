"""Tiny checkpoints load through the real transformers Auto classes and behave like their families."""

import hashlib
import json

import numpy as np
import pytest
import torch

from speechlm.testing import tiny_tokenizers
from speechlm.testing.tiny_checkpoints import KINDS, write_tiny_checkpoint
from speechlm.testing.tiny_tokenizers import CTC_CHARACTERS

SR = 16_000

TEXTS = [
    "In the beginning, God created the heavens and the earth.",
    "EN el principio crió Dios los cielos y la tierra.",
    "¿Quién es el niño? Año, señor, pingüino: ÁÉÍÓÚ ñ Ñ.",
    "God said, “Let there be light,” and there was light. 1234 — ok",
    "Ωmega and emoji 😀 use the byte fallback / rare bytes.",
]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _audio(seconds: float, batch: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [0.1 * rng.standard_normal(int(seconds * SR)).astype(np.float32) for _ in range(batch)]


# --- files and determinism ---------------------------------------------------------


EXPECTED_FILES = {
    "wav2vec2": {"config.json", "model.safetensors", "preprocessor_config.json"},
    "hubert": {"config.json", "model.safetensors", "preprocessor_config.json"},
    "whisper": {"config.json", "generation_config.json", "model.safetensors", "normalizer.json",
                "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"},
    "llama": {"config.json", "generation_config.json", "model.safetensors",
              "tokenizer.json", "tokenizer.model", "tokenizer_config.json"},
    "qwen2": {"config.json", "generation_config.json", "model.safetensors",
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"},
}
ARCHITECTURE = {
    "wav2vec2": ("wav2vec2", "Wav2Vec2ForPreTraining"),
    "hubert": ("hubert", "HubertModel"),
    "whisper": ("whisper", "WhisperForConditionalGeneration"),
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_writes_the_files_of_a_real_checkpoint(tiny_ckpt, kind):
    path = tiny_ckpt(kind)
    assert {p.name for p in path.iterdir()} == EXPECTED_FILES[kind]
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (ARCHITECTURE[kind][0], [ARCHITECTURE[kind][1]])


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    from safetensors.torch import load_file

    state = torch.random.get_rng_state()
    a = write_tiny_checkpoint("llama", tmp_path / "a", seed=3)
    b = write_tiny_checkpoint("llama", tmp_path / "b", seed=3)
    c = write_tiny_checkpoint("llama", tmp_path / "c", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state), "writing must not move the caller's RNG"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer.model", "config.json"):
        assert _sha(a / name) == _sha(b / name), name
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


def test_speech_encoder_weights_are_deterministic(tmp_path):
    a = write_tiny_checkpoint("wav2vec2", tmp_path / "a", seed=1)
    b = write_tiny_checkpoint("wav2vec2", tmp_path / "b", seed=1)
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny checkpoint kind 'gpt2'"):
        write_tiny_checkpoint("gpt2", tmp_path)
    with pytest.raises(ValueError, match="no field.*hidden_sizes"):
        write_tiny_checkpoint("hubert", tmp_path, hidden_sizes=8)
    with pytest.raises(ValueError, match="CTC vocabulary"):
        write_tiny_checkpoint("llama", tmp_path, vocab="abc")


def test_config_overrides_reach_the_model(tmp_path):
    from transformers import AutoConfig

    path = write_tiny_checkpoint("hubert", tmp_path, hidden_size=48, num_hidden_layers=1)
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers) == (48, 1)


# --- wav2vec2 / HuBERT --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_speech_encoder_runs_at_50_frames_per_second(tiny_ckpt, kind):
    from transformers import AutoFeatureExtractor, AutoModel

    path = tiny_ckpt(kind)
    extractor = AutoFeatureExtractor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert type(model).__name__ == {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel"}[kind]
    for seconds, frames in ((1.0, 49), (2.0, 99)):
        inputs = extractor(_audio(seconds), sampling_rate=SR, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        assert hidden.shape[:2] == (2, frames)
        assert torch.isfinite(hidden).all() and hidden.std() > 0
        assert int(model._get_feat_extract_output_lengths(int(seconds * SR))) == frames
    # XLSR (layer norm) takes an attention mask; hubert-base (group norm) does not.
    assert ("attention_mask" in inputs) == (kind == "wav2vec2")


def test_wav2vec2_pretraining_loss_backpropagates(tiny_ckpt):
    from transformers import AutoFeatureExtractor, AutoModelForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import (
        _compute_mask_indices,
        _sample_negative_indices,
    )

    path = tiny_ckpt("wav2vec2")
    extractor = AutoFeatureExtractor.from_pretrained(path)
    model = AutoModelForPreTraining.from_pretrained(path)
    assert type(model).__name__ == "Wav2Vec2ForPreTraining"
    inputs = extractor(_audio(1.0), sampling_rate=SR, return_tensors="pt")
    frames = int(model._get_feat_extract_output_lengths(SR))
    mask = _compute_mask_indices((2, frames), mask_prob=0.3, mask_length=5, min_masks=2)
    negatives = _sample_negative_indices((2, frames), model.config.num_negatives, mask_time_indices=mask)
    torch.manual_seed(0)
    out = model(
        inputs.input_values,
        attention_mask=inputs.attention_mask,
        mask_time_indices=torch.tensor(mask),
        sampled_negative_indices=torch.tensor(negatives),
    )
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    codevectors = model.quantizer.codevectors.grad
    assert codevectors is not None and torch.isfinite(codevectors).all() and codevectors.abs().sum() > 0


def test_wav2vec2_pretraining_checkpoint_loads_as_ctc_model(tiny_ckpt):
    from transformers import AutoModelForCTC, Wav2Vec2ForPreTraining

    path = tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS)
    ctc, info = AutoModelForCTC.from_pretrained(path, output_loading_info=True)
    assert type(ctc).__name__ == "Wav2Vec2ForCTC"
    # Only the CTC head is new; the quantizer and projections of pre-training are dropped.
    assert set(info["missing_keys"]) == {"lm_head.weight", "lm_head.bias"}
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"quantizer", "project_q", "project_hid"}
    assert ctc.lm_head.out_features == len(tiny_tokenizers.ctc_vocab(CTC_CHARACTERS))
    pretraining = Wav2Vec2ForPreTraining.from_pretrained(path)
    encoder = dict(pretraining.wav2vec2.named_parameters())
    for name, param in ctc.wav2vec2.named_parameters():
        assert torch.equal(param, encoder[name]), name


def test_ctc_processor_encodes_and_decodes(tiny_ckpt):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS))
    assert type(processor).__name__ == "Wav2Vec2Processor"
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "|")] == [0, 1, 2, 3, 4]
    ids = tokenizer("crió la tierra").input_ids
    assert ids.count(vocab["|"]) == 2
    assert tokenizer.decode(ids, group_tokens=False) == "crió la tierra"  # labels: no CTC collapse
    # CTC decoding: repeats collapse, blanks (<pad>) separate real repeats, "|" is a space.
    a, b, n = vocab["a"], vocab["b"], vocab["n"]
    frames = [[a, a, 0, a, vocab["|"], b, b, 0, 0, n, 0]]
    assert processor.batch_decode(torch.tensor(frames)) == ["aa bn"]


def test_hubert_loads_as_ctc_model_with_only_the_head_missing(tiny_ckpt):
    from transformers import HubertForCTC

    _, info = HubertForCTC.from_pretrained(tiny_ckpt("hubert"), output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight", "lm_head.bias"}
    assert not info["unexpected_keys"]


# --- Whisper ----------------------------------------------------------------------


def test_whisper_processor_and_encoder_take_30_seconds(tiny_ckpt):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    path = tiny_ckpt("whisper")
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "WhisperProcessor"
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    features = processor(_audio(1.0), sampling_rate=SR, return_tensors="pt").input_features
    assert features.shape == (2, 80, 3000)  # padded to 30 s of 10 ms frames
    with torch.no_grad():
        encoded = model.get_encoder()(features).last_hidden_state
    assert encoded.shape == (2, 1500, model.config.d_model)
    assert torch.isfinite(encoded).all()
    assert model.config.vocab_size == len(processor.tokenizer)


def test_whisper_special_tokens_follow_the_real_layout(tiny_ckpt):
    from transformers import AutoTokenizer, GenerationConfig

    path = tiny_ckpt("whisper")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.set_prefix_tokens(language="spanish", task="transcribe")
    prefix = tokenizer.convert_ids_to_tokens(tokenizer.prefix_tokens)
    assert prefix == ["<|startoftranscript|>", "<|es|>", "<|transcribe|>", "<|notimestamps|>"]
    ids = tokenizer("EN el principio crió Dios").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "EN el principio crió Dios"
    assert ids[-1] == tokenizer.eos_token_id == tokenizer.pad_token_id
    generation = GenerationConfig.from_pretrained(path)
    assert generation.lang_to_id["<|en|>"] == tokenizer.convert_tokens_to_ids("<|en|>")
    assert generation.lang_to_id["<|es|>"] == tokenizer.convert_tokens_to_ids("<|es|>")
    assert generation.no_timestamps_token_id == tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    # Timestamp tokens come right after the last special token, as Whisper's decoding assumes.
    assert tokenizer.convert_ids_to_tokens(tokenizer.all_special_ids[-1] + 1) == "<|0.00|>"
    assert tokenizer.convert_ids_to_tokens(len(tokenizer) - 1) == "<|30.00|>"
    # The English normalizer used for WER reads normalizer.json.
    assert tokenizer.normalize("The Colour of the Centre!") == "the color of the center"


def test_whisper_generate_produces_tokens(tiny_ckpt):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    path = tiny_ckpt("whisper")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    features = processor(_audio(1.0), sampling_rate=SR, return_tensors="pt").input_features
    with torch.no_grad():
        out = model.generate(features, language="es", task="transcribe", max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] >= 1
    assert int(out.max()) < len(processor.tokenizer)
    assert all(isinstance(text, str) for text in processor.batch_decode(out, skip_special_tokens=True))


def test_whisper_large_v3_layout_with_128_mel_bins(tmp_path):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    path = write_tiny_checkpoint("whisper", tmp_path, num_mel_bins=128)
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path).eval()
    features = processor(_audio(0.5, batch=1), sampling_rate=SR, return_tensors="pt").input_features
    assert features.shape == (1, 128, 3000)
    with torch.no_grad():
        assert torch.isfinite(model.get_encoder()(features).last_hidden_state).all()
    assert processor.tokenizer.convert_tokens_to_ids("<|yue|>") != processor.tokenizer.unk_token_id
    assert model.config.vocab_size == len(processor.tokenizer)


# --- LLMs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llm_tokenizer_round_trips_english_and_spanish(tiny_ckpt, kind):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_ckpt(kind))
    assert type(tokenizer).__name__ == {"llama": "LlamaTokenizer", "qwen2": "Qwen2Tokenizer"}[kind]
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # A trained vocabulary, not bytes: common words are single tokens.
    assert len(tokenizer(" the", add_special_tokens=False).input_ids) == 1


def test_llama_tokenizer_matches_its_sentencepiece_model(tiny_ckpt):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    path = tiny_ckpt("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    lines = list(tiny_tokenizers.corpus_lines()[:200]) + TEXTS
    for line in lines:
        assert tokenizer(line).input_ids == [sp.bos_id(), *sp.encode(line)], line


def test_llama_has_no_pad_token_and_no_chat_template(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_ckpt("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.pad_token is None and model.config.pad_token_id is None
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError):
        tokenizer.apply_chat_template([{"role": "user", "content": "hola"}])
    assert tokenizer("hola").input_ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert not model.config.tie_word_embeddings


def test_qwen2_chatml_template_and_special_tokens(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_ckpt("qwen2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    messages = [{"role": "user", "content": "¿Quién creó los cielos?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n¿Quién creó los cielos?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "Eres útil."}, *messages]
    assert tokenizer.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nEres útil.<|im_end|>")
    ids = tokenizer(text).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llm_loss_backpropagates_and_generates(tiny_ckpt, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_ckpt(kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = tokenizer([TEXTS[1]], return_tensors="pt")
    out = model(**batch, labels=batch.input_ids)
    # Random init: the loss is close to uniform over the vocabulary.
    assert abs(out.loss.item() - np.log(len(tokenizer))) < 1.0
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "layers.1" in name)
    model.eval()
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, batch.input_ids.shape[1] + 5)
    assert torch.equal(generated[:, : batch.input_ids.shape[1]], batch.input_ids)


# --- tokenizer cache -------------------------------------------------------------------


def test_trained_tokenizers_are_cached_by_settings(tmp_path):
    first = tiny_tokenizers.train_sentencepiece(640, root=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = tiny_tokenizers.train_sentencepiece(640, root=tmp_path)
    other = tiny_tokenizers.train_sentencepiece(660, root=tmp_path)
    assert again == first and first.stat().st_mtime_ns == stamp
    assert other != first and other.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folders left"


def test_ctc_vocab_layout():
    vocab = tiny_tokenizers.ctc_vocab("hola mundo")
    assert list(vocab)[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    assert list(vocab)[5:] == ["h", "o", "l", "a", "m", "u", "n", "d"]
    assert list(vocab.values()) == list(range(len(vocab)))
