"""Transcribing with a CTC model: greedy decoding and batched, resumable transcription.

`GreedyCTCDecoder(tokens).decode(log_probs, lengths)` takes the best token
per frame, merges repeats, drops blanks and special tokens and turns the word
delimiter into spaces; it has the same `decode` signature as the beam-search
decoder (`speechlm.inference.ctc_beam.BeamSearchCTCDecoder`), so either can be
passed to `CTCTranscriber`.

`CTCTranscriber(model_dir)` loads a saved CTC model directory (any
transformers `*ForCTC` checkpoint with a Wav2Vec2 processor: ours from
`speechlm train`, or e.g. facebook/wav2vec2-base-960h saved locally) and
transcribes files or manifests with the batching, long-audio segmentation and
resumable manifests of `speechlm.inference.transcriber.Transcriber`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SpeechLMError
from .transcriber import Transcriber, resolve_device

logger = logging.getLogger(__name__)

__all__ = ["CTCTranscriber", "GreedyCTCDecoder", "load_ctc_vocabulary"]


class GreedyCTCDecoder:
    """Best path decoding: argmax per frame, merge repeats, drop blanks; `|` -> space.

    tokens: the vocabulary (index = id). Tokens written <like this> (blank,
    <s>, </s>, <unk>) never appear in the text.
    """

    def __init__(self, tokens: Sequence[str], *, blank: str = "<pad>", word_delimiter: str = "|"):
        self.tokens = list(tokens)
        if blank not in self.tokens:
            raise ValueError(f"blank token {blank!r} is not in the vocabulary")
        self.blank_id = self.tokens.index(blank)
        self.word_delimiter = word_delimiter
        self._text = [" " if t == word_delimiter else
                      ("" if (t.startswith("<") and t.endswith(">") and len(t) > 2) else t)
                      for t in self.tokens]

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Texts for a batch of frame scores [B, T, V] (log-probs or logits) with valid
        frame counts `lengths` [B] (default: all T)."""
        if log_probs.dim() != 3:
            raise ValueError(f"expected [B, T, V] scores, got shape {tuple(log_probs.shape)}")
        best = log_probs.argmax(dim=-1).cpu()
        batch, frames = best.shape
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long)
        lengths = torch.as_tensor(lengths).cpu().clamp(0, frames).tolist()
        return [self.decode_ids(best[b, : int(lengths[b])].tolist()) for b in range(batch)]

    def decode_ids(self, frame_ids: Sequence[int]) -> str:
        """Text of one utterance's best token per frame."""
        out, previous = [], None
        for token_id in frame_ids:
            if token_id != previous and token_id != self.blank_id:
                out.append(self._text[token_id])
            previous = token_id
        return " ".join("".join(out).split())


def load_ctc_vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], str, str]:
    """(tokens by id, blank token, word delimiter) from a CTC model directory's tokenizer."""
    vocab_file = model_dir / "vocab.json"
    if not vocab_file.is_file():
        raise SpeechLMError(f"{model_dir}: no vocab.json; a CTC model directory needs its "
                            "tokenizer (save the Wav2Vec2Processor beside the model)")
    mapping = json.loads(vocab_file.read_text(encoding="utf-8"))
    config_file = model_dir / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    target_lang = tok_config.get("target_lang")
    if mapping and all(isinstance(v, dict) for v in mapping.values()):
        if not target_lang or target_lang not in mapping:
            raise SpeechLMError(f"{vocab_file}: a multi-language vocabulary; the tokenizer "
                                "config must name target_lang")
        mapping = mapping[target_lang]
    tokens = [""] * vocab_size
    for token, index in mapping.items():
        if 0 <= int(index) < vocab_size:
            tokens[int(index)] = token
    for token, info in (tok_config.get("added_tokens_decoder") or {}).items():
        index = int(token)
        if 0 <= index < vocab_size and not tokens[index]:
            tokens[index] = info.get("content", "")
    tokens = [t or f"<unused{i}>" for i, t in enumerate(tokens)]

    def special(name, default):
        value = tok_config.get(name, default)
        return value.get("content", default) if isinstance(value, dict) else (value or default)

    return tokens, special("pad_token", "<pad>"), special("word_delimiter_token", "|")


def feature_extractor_settings(model_dir: Path) -> dict:
    """The feature extractor's settings of a model directory: preprocessor_config.json, or
    the `feature_extractor` part of processor_config.json (what newer transformers write)."""
    for name, part in (("preprocessor_config.json", None),
                       ("processor_config.json", "feature_extractor")):
        file = model_dir / name
        if file.is_file():
            settings = json.loads(file.read_text(encoding="utf-8"))
            settings = settings.get(part) if part else settings
            if isinstance(settings, dict):
                return settings
    return {}


class CTCTranscriber(Transcriber):
    """Batched transcription with a saved CTC model directory (see the module doc).

    decoder: "greedy" (default), or any object with
    `decode(log_probs [B,T,V], lengths [B]) -> list[str]` (e.g. a
    BeamSearchCTCDecoder built for `self.tokens`).
    batch_duration: padded seconds of audio per forward pass.
    """

    def __init__(self, model_dir, *, device: str | torch.device = "auto", decoder="greedy",
                 batch_duration: float = 160.0, max_segment_s: float = 30.0,
                 max_batch_size: int = 64):
        from transformers import AutoConfig, AutoModelForCTC

        from ..models import whisper_ctc  # noqa: F401 - registers WhisperEncoderForCTC
        from ..models.ctc import normalizes_waveform

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise SpeechLMError(f"{self.model_dir}: not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        self.device = resolve_device(device)
        self.model = AutoModelForCTC.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device).eval()
        fe = feature_extractor_settings(self.model_dir)
        self.sample_rate = int(fe.get("sampling_rate", 16000))
        self.do_normalize = bool(fe.get("do_normalize", normalizes_waveform(config)))
        self.use_attention_mask = bool(fe.get("return_attention_mask",
                                              getattr(config, "feat_extract_norm", "layer") == "layer"))
        self.tokens, self.blank, self.word_delimiter = load_ctc_vocabulary(
            self.model_dir, int(config.vocab_size))
        if decoder == "greedy" or decoder is None:
            decoder = GreedyCTCDecoder(self.tokens, blank=self.blank,
                                       word_delimiter=self.word_delimiter)
        elif not hasattr(decoder, "decode"):
            raise TypeError("decoder must be 'greedy' or have decode(log_probs, lengths)")
        self.decoder = decoder
        self._set_batching(batch_duration, max_segment_s, max_batch_size)

    # -- core -------------------------------------------------------------------------

    @torch.inference_mode()
    def log_probs(self, waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame log-probabilities [B, T, V] and valid frame counts [B] for one batch of waves."""
        from ..audio.features import as_padded_batch, normalize_waveform

        audio, lengths = as_padded_batch(list(waves))
        audio, lengths = audio.to(self.device), lengths.to(self.device)
        if self.do_normalize:
            audio = normalize_waveform(audio, lengths)
        mask = None
        if self.use_attention_mask:
            mask = (torch.arange(audio.shape[1], device=self.device) < lengths[:, None]).long()
        logits = self.model(audio, attention_mask=mask).logits
        frames = self.model._get_feat_extract_output_lengths(lengths).clamp(max=logits.shape[1])
        return torch.log_softmax(logits.float(), dim=-1), frames

    def _decode_batch(self, waves: Sequence[torch.Tensor]) -> list[str]:
        log_probs, frames = self.log_probs(waves)
        return self.decoder.decode(log_probs, frames)
