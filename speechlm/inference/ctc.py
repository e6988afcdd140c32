"""Transcribing with a CTC model: greedy decoding and batched, resumable transcription.

`GreedyCTCDecoder(tokens).decode(log_probs, lengths)` takes the best token
per frame, merges repeats, drops blanks and special tokens and turns the word
delimiter into spaces; it has the same `decode` signature as the beam-search
decoder (`speechlm.inference.ctc_beam.BeamSearchCTCDecoder`), so either can be
passed to `CTCTranscriber`.

`CTCTranscriber(model_dir)` loads a saved CTC model directory (any
transformers `*ForCTC` checkpoint with a Wav2Vec2 processor: ours from
`speechlm train`, or e.g. facebook/wav2vec2-base-960h saved locally) and
transcribes files or manifests in batches of similar duration (sorted, then
packed under a padded-duration budget). Recordings longer than
`max_segment_s` are cut into pieces (at silences when
`speechlm.audio.segment.split_on_silence` is available, else at fixed
windows), the pieces are transcribed in the same batches as everything else,
and their texts joined in order. `transcribe_manifest` appends one JSON line
per utterance ({id, text, audio_s, decode_s}) and, run again, continues
after the ids already written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SpeechLMError
from .run_summary import RunSummary

logger = logging.getLogger(__name__)

__all__ = ["CTCTranscriber", "GreedyCTCDecoder", "TranscribeSummary", "fixed_windows",
           "segment_ranges"]


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


# -- long recordings --------------------------------------------------------------------


def fixed_windows(num_samples: int, sample_rate: int, max_segment_s: float) -> list[tuple[int, int]]:
    """Cut [0, num_samples) into equal windows of at most max_segment_s seconds."""
    limit = max(1, int(max_segment_s * sample_rate))
    if num_samples <= limit:
        return [(0, num_samples)]
    pieces = -(-num_samples // limit)
    step = -(-num_samples // pieces)
    return [(start, min(num_samples, start + step)) for start in range(0, num_samples, step)]


def segment_ranges(wave: torch.Tensor, sample_rate: int, max_segment_s: float) -> list[tuple[int, int]]:
    """Sample ranges to transcribe separately: one range for short audio; for longer audio
    cuts at silences (speechlm.audio.segment) or, without that module, fixed windows."""
    n = int(wave.shape[-1])
    if n <= max_segment_s * sample_rate:
        return [(0, n)]
    try:
        from ..audio.segment import split_on_silence
    except ImportError:
        return fixed_windows(n, sample_rate, max_segment_s)
    ranges = split_on_silence(wave, sample_rate, max_segment_s=max_segment_s)
    ranges = [(int(a), int(b)) for a, b in ranges if int(b) > int(a)]
    # No speech found: windows keep memory bounded (the text will be empty anyway).
    return ranges or fixed_windows(n, sample_rate, max_segment_s)


# -- the transcriber ------------------------------------------------------------------------


@dataclass
class TranscribeSummary(RunSummary):
    """Totals of a transcription run (this call only, not lines found from earlier runs)."""

    utterances: int = 0

    def summary(self) -> str:
        return (f"transcribed {self.utterances} utterance(s), {self._timing()})"
                + self._tail("could not be read"))


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


class CTCTranscriber:
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

        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise SpeechLMError(f"{self.model_dir}: not a model directory (no config.json)")
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        self.device = _resolve_device(device)
        self.model = AutoModelForCTC.from_pretrained(self.model_dir, local_files_only=True)
        self.model.to(self.device).eval()
        fe_file = self.model_dir / "preprocessor_config.json"
        fe = json.loads(fe_file.read_text(encoding="utf-8")) if fe_file.is_file() else {}
        self.sample_rate = int(fe.get("sampling_rate", 16000))
        self.do_normalize = bool(fe.get("do_normalize", True))
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
        if batch_duration <= 0 or max_segment_s <= 0:
            raise SpeechLMError("batch_duration and max_segment_s must be > 0")
        self.batch_duration = float(batch_duration)
        self.max_segment_s = float(max_segment_s)
        self.max_batch_size = int(max_batch_size)

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

    def _batches(self, durations: Sequence[float]) -> list[list[int]]:
        """Indices sorted by duration, packed so len(batch) x longest <= batch_duration."""
        order = sorted(range(len(durations)), key=lambda i: durations[i])
        batches, batch = [], []
        for i in order:
            longest = max(durations[i], *(durations[j] for j in batch)) if batch else durations[i]
            if batch and ((len(batch) + 1) * longest > self.batch_duration
                          or len(batch) >= self.max_batch_size):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        return batches

    def transcribe_waves(self, waves: Sequence[torch.Tensor]) -> tuple[list[str], list[float]]:
        """(texts, decode seconds per wave) for mono waves at `sample_rate`."""
        pieces: list[tuple[int, torch.Tensor]] = []
        for owner, wave in enumerate(waves):
            wave = torch.as_tensor(wave, dtype=torch.float32).reshape(-1)
            for start, end in segment_ranges(wave, self.sample_rate, self.max_segment_s):
                pieces.append((owner, wave[start:end]))
        texts: list[list[str]] = [[] for _ in waves]
        piece_texts: list[str] = [""] * len(pieces)
        seconds = [0.0] * len(waves)
        durations = [p.shape[-1] / self.sample_rate for _, p in pieces]
        for batch in self._batches(durations):
            start = time.perf_counter()
            log_probs, frames = self.log_probs([pieces[i][1] for i in batch])
            decoded = self.decoder.decode(log_probs, frames)
            spent = time.perf_counter() - start
            total = sum(durations[i] for i in batch) or 1.0
            for i, text in zip(batch, decoded, strict=True):
                piece_texts[i] = text
                seconds[pieces[i][0]] += spent * durations[i] / total
        for (owner, _), text in zip(pieces, piece_texts, strict=True):
            if text:
                texts[owner].append(text)
        return [" ".join(t) for t in texts], seconds

    # -- files and manifests ----------------------------------------------------------

    def transcribe_files(self, paths: Sequence, *, progress: bool = False) -> list[dict]:
        """[{id (the path), text, audio_s, decode_s}] for audio files, in the order given."""
        records = [{"id": str(p), "audio": str(p)} for p in paths]
        rows: list[dict] = []
        self._run(records, rows.append, progress=progress)
        by_id = {row["id"]: row for row in rows}
        return [by_id[r["id"]] for r in records]

    def transcribe_manifest(self, manifest, out_jsonl, *, resume: bool = True,
                            progress: bool = True, chunk: int = 256) -> TranscribeSummary:
        """Append {id, text, audio_s, decode_s} per utterance of `manifest` to `out_jsonl`.

        With `resume`, ids already in `out_jsonl` are skipped (a killed run continues);
        without, the file is started afresh.
        """
        from ..data.manifest import read_manifest
        from ..jsonl import JsonlAppender, iter_jsonl

        out = Path(out_jsonl)
        done: set[str] = set()
        if out.exists():
            if resume:
                done = {str(rec.get("id")) for _, rec in iter_jsonl(out, tolerate_torn_tail=True)}
            else:
                out.unlink()
        records = [r for r in read_manifest(manifest) if str(r["id"]) not in done]
        with JsonlAppender(out) as appender:
            summary = self._run(records, appender.write, progress=progress, chunk=chunk)
        summary.already_done = len(done)
        summary.out_path = out
        return summary

    def _run(self, records: list[dict], emit: Callable[[dict], None], *, progress: bool,
             chunk: int = 256) -> TranscribeSummary:
        from tqdm.auto import tqdm

        from ..data.collate import SkippedItem
        from ..data.dataset import AudioDataset

        dataset = AudioDataset(records, sample_rate=self.sample_rate, silence_dbfs=None)
        summary = TranscribeSummary()
        start = time.perf_counter()
        bar = tqdm(total=len(records), desc="transcribe", unit="utt", disable=not progress,
                   dynamic_ncols=True)
        try:
            for first in range(0, len(records), chunk):
                items = [dataset[i] for i in range(first, min(len(records), first + chunk))]
                good = [it for it in items if not isinstance(it, SkippedItem)]
                texts, seconds = self.transcribe_waves([it["audio"] for it in good])
                results = {it["id"]: (text, sec, it["audio"].shape[-1] / self.sample_rate)
                           for it, text, sec in zip(good, texts, seconds, strict=True)}
                for item in items:
                    if isinstance(item, SkippedItem):
                        row = {"id": item.id, "text": "", "audio_s": 0.0, "decode_s": 0.0,
                               "error": f"{item.reason}" + (f" ({item.detail})" if item.detail else "")}
                        summary.failed += 1
                        summary.failures.append({"id": item.id, "audio": item.audio,
                                                 "reason": item.reason})
                    else:
                        text, sec, audio_s = results[item["id"]]
                        row = {"id": item["id"], "text": text, "audio_s": round(audio_s, 3),
                               "decode_s": round(sec, 4)}
                        summary.audio_s += audio_s
                    summary.utterances += 1
                    emit(row)
                bar.update(len(items))
        finally:
            bar.close()
        summary.wall_s = time.perf_counter() - start
        return summary
