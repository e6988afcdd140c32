"""Transcribing with a Whisper checkpoint: batched greedy decoding through transformers.

`WhisperTranscriber(model_dir)` loads any WhisperForConditionalGeneration
directory (`models:whisper-base`, a converted faster-whisper model, a local
copy of openai/whisper-small) and transcribes files or manifests with the
batching, segmentation and resumable manifests of `Transcriber`. Features are
our `log_mel_spectrogram` (the same numbers as WhisperFeatureExtractor) on
Whisper's 30 s windows, as the decoder was trained; decoding is greedy with
the timestamp tokens off. English-only checkpoints take no language or task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SpeechLMError
from .transcriber import Transcriber, resolve_device

__all__ = ["WhisperTranscriber"]


class WhisperTranscriber(Transcriber):
    """Batched Whisper transcription (see the module doc).

    language: a Whisper language code ("en", "es", ...) for multilingual
    checkpoints; None lets Whisper detect it per clip. task: "transcribe" or
    "translate" (into English). batch_duration: padded seconds per forward pass;
    every clip costs a 30 s window in the encoder, so this is 30 s x batch size.
    """

    def __init__(self, model_dir, *, device: str | torch.device = "auto",
                 language: str | None = "en", task: str = "transcribe",
                 batch_duration: float = 480.0, max_segment_s: float = 30.0,
                 max_batch_size: int = 16, max_new_tokens: int = 200,
                 dtype: str | torch.dtype | None = None):
        from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

        from ..models.encoders import quiet_transformers

        self.model_dir = Path(model_dir)
        if task not in ("transcribe", "translate"):
            raise SpeechLMError(f"Whisper task must be 'transcribe' or 'translate', got {task!r}")
        if max_segment_s > 30.0:
            raise SpeechLMError(f"max_segment_s {max_segment_s} is longer than Whisper's 30 s "
                                "window; give 30 or less (longer recordings are cut into pieces)")
        self.device = resolve_device(device)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with quiet_transformers():
            self.model = WhisperForConditionalGeneration.from_pretrained(
                self.model_dir, local_files_only=True, dtype=dtype or torch.float32)
            self.tokenizer = WhisperTokenizerFast.from_pretrained(self.model_dir,
                                                                  local_files_only=True)
        self.model.to(self.device).eval()
        generation = self.model.generation_config
        self.multilingual = bool(getattr(generation, "is_multilingual", False))
        if not self.multilingual and (task != "transcribe" or language not in (None, "en")):
            raise SpeechLMError(f"{self.model_dir} is an English-only Whisper model: it only "
                                "transcribes English (language en, task transcribe)")
        if self.multilingual and language is not None:
            known = getattr(generation, "lang_to_id", {}) or {}
            if f"<|{language}|>" not in known:
                raise SpeechLMError(f"{self.model_dir}: language {language!r} is not one of "
                                    f"Whisper's ({', '.join(k[2:-2] for k in list(known)[:12])}, "
                                    "...)")
        self.language, self.task = language, task
        self.max_new_tokens = int(max_new_tokens)
        self.n_mels = int(self.model.config.num_mel_bins)
        self.window_samples = int(self.model.config.max_source_positions) * 2 * 160
        self._set_batching(batch_duration, max_segment_s, max_batch_size)

    def _batches(self, durations: Sequence[float]) -> list[list[int]]:
        # every clip is padded to the 30 s window, so the budget counts windows
        windows = [self.window_samples / self.sample_rate] * len(durations)
        order = sorted(range(len(durations)), key=lambda i: durations[i])
        per_batch = max(1, min(self.max_batch_size, int(self.batch_duration // windows[0])))
        return [order[i : i + per_batch] for i in range(0, len(order), per_batch)]

    @torch.inference_mode()
    def _decode_batch(self, waves: Sequence[torch.Tensor]) -> list[str]:
        from ..audio.features import log_mel_spectrogram
        from ..models.encoders import quiet_transformers

        features = log_mel_spectrogram(list(waves), self.n_mels, pad_to=self.window_samples)
        options: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": 1,
                         "do_sample": False, "return_timestamps": False}
        if self.multilingual:
            # the token form, which generate() takes for a language added by fine-tuning too
            options.update(task=self.task, **({"language": f"<|{self.language}|>"}
                                              if self.language else {}))
        with quiet_transformers():  # its notes on max_length and masks do not apply here
            ids = self.model.generate(features.to(self.device, self.model.dtype), **options)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]
