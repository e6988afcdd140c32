"""Tiny, randomly initialised checkpoints in the real transformers format.

`write_tiny_checkpoint(kind, out_dir)` writes config.json, model.safetensors
and the tokenizer / feature-extractor files a real checkpoint of that family
ships, so code under test takes the same `from_pretrained(local_dir)` path as
with facebook/wav2vec2-large-xlsr-53, facebook/hubert-base-ls960,
openai/whisper-small, Qwen/Qwen2.5-*-Instruct or a Llama-2 model; the TTS
kinds stand in for microsoft/speecht5_tts (+ microsoft/speecht5_hifigan) and
facebook/mms-tts-*.

The sizes are tiny (hidden 32-64, 2 layers) but the parts that shape the
calling code are real: the wav2vec2/HuBERT conv stack keeps its total stride
of 320 samples (50 frames/s at 16 kHz), Whisper keeps 1500 encoder positions
(30 s of 80-bin log-mel input) and the real special-token layout, the LLMs
have genuine tokenizers trained on the embedded corpus. Weights depend only
on `seed`: the same seed gives byte-identical model.safetensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from . import tiny_tokenizers

KINDS = ("wav2vec2", "hubert", "whisper", "llama", "qwen2")
TTS_KINDS = ("speecht5", "vits")  # text-to-speech checkpoints (speechlm.tts.transformers_tts)

SAMPLING_RATE = 16_000

# The real wav2vec2 / HuBERT feature encoder, with 32 channels instead of 512.
CONV_STACK = dict(
    conv_dim=(32, 32, 32, 32, 32, 32, 32),
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
)

_SSL_ENCODER = dict(
    **CONV_STACK,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    layerdrop=0.0,  # tiny models: keep every layer in every step
)

LLM_SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

TOKENIZER_VOCAB_SIZE = 1024  # BPE pieces before special tokens


def write_tiny_checkpoint(
    kind: str,
    out_dir,
    *,
    seed: int = 0,
    vocab: str | Iterable[str] | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny `kind` checkpoint into `out_dir` and return the directory.

    kind: "wav2vec2" (Wav2Vec2ForPreTraining, XLSR-like, with quantizer),
    "hubert" (HubertModel, hubert-base-like), "whisper"
    (WhisperForConditionalGeneration + tokenizer + feature extractor),
    "llama" (LlamaForCausalLM, SentencePiece tokenizer, no pad token, no chat
    template) or "qwen2" (Qwen2ForCausalLM, byte-level BPE, ChatML template,
    tied embeddings); TTS: "speecht5" (SpeechT5ForTextToSpeech + character
    SentencePiece tokenizer + feature extractor, and a SpeechT5HifiGan
    vocoder in `out_dir/vocoder`) or "vits" (VitsModel + VitsTokenizer,
    MMS-TTS English style: characters, pad token "k", blanks interspersed).
    vocab: wav2vec2/hubert only; characters (or tokens) of a CTC vocabulary.
    When given, vocab.json + tokenizer files are written and the config's
    vocab_size matches, so `*ForCTC` and `Wav2Vec2Processor` load from it.
    config_overrides: any field of the model config (e.g. num_mel_bins=128
    for a large-v3-like Whisper, hidden_size=48); an unknown name raises.
    """
    writers = {
        "wav2vec2": _write_wav2vec2,
        "hubert": _write_hubert,
        "whisper": _write_whisper,
        "llama": _write_llama,
        "qwen2": _write_qwen2,
        "speecht5": _write_speecht5,
        "vits": _write_vits,
    }
    if kind not in writers:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; expected one of "
                         f"{', '.join(KINDS + TTS_KINDS)}")
    if vocab is not None and kind not in ("wav2vec2", "hubert"):
        raise ValueError(f"`vocab` is a CTC vocabulary for wav2vec2/hubert, not for {kind!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writers[kind](out_dir, seed, config_overrides, vocab)
    return out_dir


def _config(config_class, defaults: dict, overrides: dict):
    config = config_class(**{**defaults, **overrides})
    unknown = [key for key in overrides if not hasattr(config_class(), key)]
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {', '.join(unknown)}")
    return config


def _save_model(model_class, config, out_dir: Path, seed: int, generation_config=None):
    """Initialise `model_class(config)` from `seed` and save it as safetensors."""
    import torch
    from transformers.utils import logging as hf_logging

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        model = model_class(config)
    if generation_config is not None:
        model.generation_config = generation_config
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one-shard "Writing model shards" bars only add noise
    try:
        model.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return model


# --- speech encoders ------------------------------------------------------------


def _feature_extractor_wav2vec2(out_dir: Path, config) -> None:
    """Raw-waveform extractor; like the real checkpoints, it returns an attention
    mask only for layer-norm conv stacks (group-norm models must not get one)."""
    from transformers import Wav2Vec2FeatureExtractor

    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=config.feat_extract_norm == "layer",
    ).save_pretrained(out_dir)


def _write_wav2vec2(out_dir: Path, seed: int, overrides: dict, vocab) -> None:
    """XLSR-53 shape: layer-norm conv stack, stable layer norm, quantizer for pre-training."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    defaults = dict(
        _SSL_ENCODER,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        mask_time_prob=0.075,
        mask_time_length=10,
        num_codevector_groups=2,
        num_codevectors_per_group=8,
        codevector_dim=16,
        proj_codevector_dim=16,
        num_negatives=10,
        diversity_loss_weight=0.1,
        pad_token_id=0,
    )
    if vocab is not None:
        defaults["vocab_size"] = len(tiny_tokenizers.ctc_vocab(vocab))
    config = _config(Wav2Vec2Config, defaults, overrides)
    config.architectures = ["Wav2Vec2ForPreTraining"]
    _save_model(Wav2Vec2ForPreTraining, config, out_dir, seed)
    _feature_extractor_wav2vec2(out_dir, config)
    if vocab is not None:
        tiny_tokenizers.save_ctc_tokenizer(out_dir, vocab)


def _write_hubert(out_dir: Path, seed: int, overrides: dict, vocab) -> None:
    """hubert-base shape: group-norm conv stack, no attention mask in the feature extractor."""
    from transformers import HubertConfig, HubertModel

    defaults = dict(_SSL_ENCODER, feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
    if vocab is not None:
        defaults["vocab_size"] = len(tiny_tokenizers.ctc_vocab(vocab))
    config = _config(HubertConfig, defaults, overrides)
    config.architectures = ["HubertModel"]
    _save_model(HubertModel, config, out_dir, seed)
    _feature_extractor_wav2vec2(out_dir, config)
    if vocab is not None:
        tiny_tokenizers.save_ctc_tokenizer(out_dir, vocab)


# --- Whisper ---------------------------------------------------------------------

# Symbols Whisper never emits for speech (openai/whisper tokenizer.non_speech_tokens).
_WHISPER_NON_SPEECH = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
) + list("♩♪♫♬♭♮♯")


def _whisper_suppress_tokens(tokenizer) -> list[int]:
    ids = set()
    for symbol in _WHISPER_NON_SPEECH:
        for variant in (symbol, " " + symbol):
            encoded = tokenizer.encode(variant, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
    for symbol in (" -", " '"):
        ids.add(tokenizer.encode(symbol, add_special_tokens=False)[0])
    return sorted(ids)


def _write_whisper(out_dir: Path, seed: int, overrides: dict, vocab: None) -> None:
    """whisper-small shape (multilingual) at d_model 64; num_mel_bins=128 gives a large-v3 layout."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    num_mel_bins = overrides.get("num_mel_bins", 80)
    v3 = num_mel_bins == 128  # large-v3 adds Cantonese and renames <|nocaptions|>
    num_languages = 100 if v3 else 99
    tokenizer = tiny_tokenizers.save_whisper_tokenizer(
        out_dir, TOKENIZER_VOCAB_SIZE, num_languages=num_languages, v3=v3
    )
    ids = tokenizer.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    space = tokenizer.encode(" ", add_special_tokens=False)[0]
    defaults = dict(
        vocab_size=len(tokenizer),
        num_mel_bins=num_mel_bins,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_source_positions=1500,  # the encoder insists on exactly 2 * 1500 = 3000 mel frames (30 s)
        max_target_positions=448,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        begin_suppress_tokens=[space, eot],
    )
    config = _config(WhisperConfig, defaults, overrides)
    config.architectures = ["WhisperForConditionalGeneration"]
    languages = list(LANGUAGES)[:num_languages]
    generation_config = GenerationConfig(
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
        max_length=config.max_target_positions,
        begin_suppress_tokens=[space, eot],
        suppress_tokens=_whisper_suppress_tokens(tokenizer),
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in languages},
        task_to_id={"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        return_timestamps=False,
        alignment_heads=[[config.decoder_layers - 1, h] for h in range(config.decoder_attention_heads)],
    )
    _save_model(WhisperForConditionalGeneration, config, out_dir, seed, generation_config)
    WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=False,
    ).save_pretrained(out_dir)


# --- LLMs ---------------------------------------------------------------------


def _write_llama(out_dir: Path, seed: int, overrides: dict, vocab: None) -> None:
    """Llama-2 shape: SentencePiece tokenizer, bos <s> / eos </s>, no pad token, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizers.save_llama_tokenizer(out_dir, TOKENIZER_VOCAB_SIZE)
    defaults = dict(
        LLM_SIZE,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    config = _config(LlamaConfig, defaults, overrides)
    config.architectures = ["LlamaForCausalLM"]
    _save_model(LlamaForCausalLM, config, out_dir, seed)


def _write_qwen2(out_dir: Path, seed: int, overrides: dict, vocab: None) -> None:
    """Qwen2.5-Instruct shape: byte-level BPE, ChatML, eos <|im_end|>, pad <|endoftext|>, tied embeddings."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizers.save_qwen2_tokenizer(out_dir, TOKENIZER_VOCAB_SIZE)
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    defaults = dict(
        LLM_SIZE,
        vocab_size=len(tokenizer),
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        tie_word_embeddings=True,
    )
    config = _config(Qwen2Config, defaults, overrides)
    config.architectures = ["Qwen2ForCausalLM"]
    generation_config = GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
    )
    _save_model(Qwen2ForCausalLM, config, out_dir, seed, generation_config)



# --- text-to-speech ----------------------------------------------------------------

# Characters of the tiny SpeechT5 tokenizer (microsoft/speecht5_tts reads cased English
# characters; anything else becomes <unk>).
_SPEECHT5_CHARACTERS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
)

# facebook/mms-tts-eng's vocab.json symbols; id 0 ("k") doubles as the pad/blank token.
_MMS_ENG_VOCAB = ["k", "'", "z", "y", "u", "d", "h", "e", "s", "w", "\u2013", "3", "c", "p", "-",
                  "1", "j", "m", "i", " ", "f", "l", "o", "0", "b", "r", "a", "4", "2", "n", "_",
                  "x", "v", "t", "q", "5", "6", "g"]

# A HiFi-GAN with the real upsampling (4*4*4*4 = 256 samples per mel frame at 16 kHz) but
# 16 channels and one residual kernel. Initialised wider than the real 0.01 so that random
# weights give audible (not 1e-9) output, as a trained vocoder does.
_TINY_HIFIGAN = dict(
    model_in_dim=80,
    sampling_rate=SAMPLING_RATE,
    upsample_initial_channel=16,
    upsample_rates=[4, 4, 4, 4],
    upsample_kernel_sizes=[8, 8, 8, 8],
    resblock_kernel_sizes=[3],
    resblock_dilation_sizes=[[1, 3]],
    initializer_range=0.2,
)


def _speecht5_sentencepiece(path: Path) -> None:
    """A character-level SentencePiece model laid out like speecht5_tts's spm_char.model:
    <s>=0, <pad>=1, </s>=2, <unk>=3, then the word marker and the characters."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    # Each character a different number of times, so the piece order is fixed by frequency.
    lines = [_SPEECHT5_CHARACTERS[: len(_SPEECHT5_CHARACTERS) - i] for i in range(8)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="char",
        vocab_size=len(_SPEECHT5_CHARACTERS) + 5, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    path.write_bytes(model.getvalue())


def _write_speecht5(out_dir: Path, seed: int, overrides: dict, vocab: None) -> None:
    """speecht5_tts shape at hidden 32: 80 mel bins, 512-dim speaker x-vector, reduction 2,
    with its processor files and a tiny HiFi-GAN vocoder in `vocoder/`."""
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        SpeechT5Processor,
        SpeechT5Tokenizer,
    )

    _speecht5_sentencepiece(out_dir / "spm_char.model")
    tokenizer = SpeechT5Tokenizer(str(out_dir / "spm_char.model"))
    (out_dir / "spm_char.model").unlink()  # saved again below, with the processor
    SpeechT5Processor(feature_extractor=SpeechT5FeatureExtractor(), tokenizer=tokenizer
                      ).save_pretrained(out_dir)
    defaults = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        encoder_layerdrop=0.0,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        decoder_layerdrop=0.0,
        speech_decoder_prenet_units=32,
        speech_decoder_postnet_layers=2,
        speech_decoder_postnet_units=32,
        conv_dim=(16,) * 7,  # the speech-input prenet: unused by text-to-speech, kept small
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_mel_bins=80,
        speaker_embedding_dim=512,
        reduction_factor=2,
        max_speech_positions=1876,
        max_text_positions=600,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    config = _config(SpeechT5Config, defaults, overrides)
    config.architectures = ["SpeechT5ForTextToSpeech"]
    _save_model(SpeechT5ForTextToSpeech, config, out_dir, seed)
    vocoder_config = SpeechT5HifiGanConfig(**{**_TINY_HIFIGAN, "model_in_dim": config.num_mel_bins})
    vocoder_config.architectures = ["SpeechT5HifiGan"]
    _save_model(SpeechT5HifiGan, vocoder_config, out_dir / "vocoder", seed + 1)


def _write_vits(out_dir: Path, seed: int, overrides: dict, vocab: None) -> None:
    """facebook/mms-tts-eng shape at hidden 16: character tokenizer (lower-cased, unknown
    characters dropped, blanks interspersed), stochastic durations, 256 samples per frame."""
    import json

    from transformers import VitsConfig, VitsModel, VitsTokenizer

    vocab_file = out_dir / "vocab.json"
    vocab_file.write_text(json.dumps({s: i for i, s in enumerate(_MMS_ENG_VOCAB)},
                                     ensure_ascii=False), encoding="utf-8")
    VitsTokenizer(str(vocab_file), pad_token="k", language="eng", add_blank=True, normalize=True,
                  phonemize=False, is_uroman=False).save_pretrained(out_dir)
    defaults = dict(
        vocab_size=len(_MMS_ENG_VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=32,
        layerdrop=0.0,
        flow_size=16,
        spectrogram_bins=513,
        upsample_initial_channel=16,
        upsample_rates=[8, 8, 2, 2],
        upsample_kernel_sizes=[16, 16, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=16,
        duration_predictor_num_flows=2,
        prior_encoder_num_flows=2,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        sampling_rate=SAMPLING_RATE,
    )
    config = _config(VitsConfig, defaults, overrides)
    config.architectures = ["VitsModel"]
    _save_model(VitsModel, config, out_dir, seed)
