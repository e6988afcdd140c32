"""Batched generation with a SpeechLM: ASR, speech translation, spoken QA and chat.

    generator = SpeechLMGenerator.from_pretrained("runs/blsp/final", batch_size=16)
    results = generator.generate([
        Request("a", "a.wav"),                                      # asr (English)
        Request("b", "b.flac", task="st", target_lang="es"),
        Request("c", wave, task="sqa", question="Who is speaking?"),
        Request("d", ["q1.wav", "q2.wav"], task="chat", messages=[
            {"role": "user", "content": "<speech>"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "And this one? <speech>"}]),
    ])
    results[0].text, results[0].n_tokens, results[0].latency_s

How a call runs:
1. Each request's audio is loaded (path + offset/duration, or a waveform at
   any rate, resampled to the encoder's 16 kHz) and its task prompt encoded
   in the model's template (`speechlm.inference.tasks`). Unusable audio is
   not fatal: that request's Result carries `error` and empty text.
2. Long audio: for asr / st, a recording longer than `max_segment_s`
   (default 30 s, Whisper's window) is cut at silences
   (`speechlm.audio.segment.split_on_silence`), each piece is asked the same
   task and the texts are joined in order. A question (sqa) or a
   conversation (chat) needs the whole recording, so it is never cut: when
   the encoder works in windows (Whisper always; wav2vec2-family encoders with
   `encoder_max_window_s`) the long recording is encoded window by window and
   the LLM reads all its frames; an encoder without windows refuses such audio
   with an AudioTooLongError in the Result (its attention cost grows with the
   square of the length). Any prompt whose speech frames, text and
   `max_new_tokens` would not fit the LLM's positions is refused the same way.
3. Pieces with the same generation options are sorted by duration and
   packed into batches of at most `batch_size` (and `max_batch_duration`
   padded seconds); the speech embeddings are spliced into left-padded
   prompts and the LLM generates with its KV cache (transformers `generate`,
   `use_cache=True`): greedy, beam search (`num_beams`) or sampling
   (`temperature`, `top_p`, `top_k`; a `seed` makes it reproducible).
   Generation ends at the template's end-of-turn / EOS tokens
   (`SpeechLM.stop_token_ids`), after `max_new_tokens`, or at a stop string
   (a StoppingCriteria decodes each row's last tokens; the text is then cut
   before the first stop string).
4. Results come back in input order.

Streaming: `generate(requests, on_tokens=f)` calls `f(index, ids)` from the
generating thread after every decoding step, for each request whose row is
still open, with the token ids generated for it so far (stop tokens left
out); a server turns these into text deltas while the batch runs. Greedy and
sampling only (transformers streams no beams); a recording cut into pieces
reports each piece's tokens in turn.

Batch independence: greedy outputs do not depend on what else is in the
batch. Prompts are left-padded with masked padding, adapters mask by
length, Whisper pads every window to 30 s, and wav2vec2-family encoders that
take no attention mask (wav2vec2-base, HuBERT: their conv stack would see the
batch's zero padding) are run one clip at a time. Sampling with a seed is
reproducible for the same requests and batch settings (each batch's seed
derives from `seed` and its ids).

Timings per Result: `encode_s` (the request's share of its batches' encoder
+ adapter time, by duration), `generate_s` (its share of the LLM time),
`latency_s` (wall time of the batches it was in: what a caller waits).
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import (
    AudioError,
    AudioTooLongError,
    AudioTooShortError,
    ConfigError,
    PromptTooLongError,
)
from .tasks import TaskPrompt, encode_task_prompt

logger = logging.getLogger(__name__)

__all__ = ["Clip", "GenerationOptions", "Request", "Result", "SpeechLMGenerator",
           "RowStreamer", "StopOnStrings", "cut_at_stop_strings", "resolve_device"]

DEFAULT_MAX_SEGMENT_S = 30.0
ENCODER_PAD_RATIO = 1.25  # clips encoded together differ in length by at most this factor
_NO_SPACE_LANGS = frozenset({"zh", "ja", "th", "lo", "km", "my"})  # joined without spaces


# -- options, requests, results ----------------------------------------------------------


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: greedy (default), beam search (num_beams > 1) or sampling
    (do_sample; temperature, top_p, top_k; seed for reproducible draws).

    stop: strings that end a response (the text is cut before the first one).
    repetition_penalty / top_k: None keeps the LLM's generation config.
    """

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate`."""
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens,
                                      num_beams=self.num_beams, do_sample=self.do_sample,
                                      use_cache=True)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


@dataclass(frozen=True)
class Clip:
    """One recording: a file segment (`path`, `offset`, `duration` in seconds) or a
    waveform (`wave`, 1-D, at `sample_rate`)."""

    path: str | None = None
    offset: float = 0.0
    duration: float | None = None
    wave: Any = None
    sample_rate: int = 16000

    @property
    def name(self) -> str:
        return self.path if self.path is not None else "<waveform>"


AudioInput = Any  # str | os.PathLike | torch.Tensor | np.ndarray | Clip, or a list of them


@dataclass
class Request:
    """One item to generate for: its audio, the task (see speechlm.inference.tasks) and
    optionally its own generation options (None: the generator's).

    audio: a path, a 1-D waveform (tensor / numpy, at `sample_rate`), a Clip, or a
    list of these (chat with several speech turns: one clip per `<speech>` slot).
    offset / duration apply to a single path.
    """

    id: str
    audio: AudioInput
    task: str = "asr"
    lang: str | None = None
    target_lang: str | None = None
    question: str | None = None
    messages: Sequence[dict] | None = None
    instruction: str | None = None
    offset: float = 0.0
    duration: float | None = None
    sample_rate: int = 16000
    options: GenerationOptions | None = None

    @property
    def prompt(self) -> TaskPrompt:
        messages = None if self.messages is None else tuple(self.messages)
        return TaskPrompt(self.task, lang=self.lang, target_lang=self.target_lang,
                          question=self.question, messages=messages, instruction=self.instruction)

    def clips(self) -> list[Clip]:
        items = list(self.audio) if isinstance(self.audio, (list, tuple)) else [self.audio]
        out = []
        for item in items:
            if isinstance(item, Clip):
                out.append(item)
            elif isinstance(item, (str, os.PathLike)):
                single = len(items) == 1
                out.append(Clip(path=str(item), offset=self.offset if single else 0.0,
                                duration=self.duration if single else None))
            else:
                out.append(Clip(wave=item, sample_rate=self.sample_rate))
        return out


@dataclass
class Result:
    """Generated text for one request, with its cost.

    n_tokens: tokens the LLM generated (without the closing EOS), over all segments.
    segments: pieces a long recording was cut into (1 when not cut).
    error: why the request could not run (then text is ""), else None; error_type names
    the SpeechLMError class (e.g. "AudioSilentError", "PromptTooLongError").
    """

    id: str
    task: str
    text: str = ""
    n_tokens: int = 0
    audio_s: float = 0.0
    encode_s: float = 0.0
    generate_s: float = 0.0
    latency_s: float = 0.0
    segments: int = 0
    error: str | None = None
    error_type: str | None = None

    def to_record(self) -> dict:
        """The JSONL line: {id, task, text, audio_s, latency_s, encode_s, generate_s,
        n_tokens, segments[, error]} (seconds rounded to 0.1 ms)."""
        record = {"id": self.id, "task": self.task, "text": self.text,
                  "audio_s": round(self.audio_s, 3), "latency_s": round(self.latency_s, 4),
                  "encode_s": round(self.encode_s, 4), "generate_s": round(self.generate_s, 4),
                  "n_tokens": self.n_tokens, "segments": self.segments}
        if self.error is not None:
            record["error"] = self.error
        return record


# -- stop strings ------------------------------------------------------------------------


def cut_at_stop_strings(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def _stopping_criteria_base():
    from transformers import StoppingCriteria

    return StoppingCriteria


class StopOnStrings:
    """A transformers StoppingCriteria: a row is done once the decoded text of its last
    tokens contains one of `stops`. Only the tail is decoded (enough tokens for the
    longest stop string), so each step costs O(batch), not O(length).

    Built through `StopOnStrings.create(tokenizer, stops)`, which returns an instance
    of a StoppingCriteria subclass (transformers is imported only then).
    """

    _cls = None

    @classmethod
    def create(cls, tokenizer, stops: Sequence[str], tail_tokens: int | None = None):
        if cls._cls is None:
            base = _stopping_criteria_base()

            class _StopOnStrings(base):
                def __init__(self, tokenizer, stops, tail_tokens):
                    self.tokenizer = tokenizer
                    self.stops = [s for s in stops if s]
                    # a token is at least one character, except byte pieces: leave room
                    self.tail = tail_tokens or max(len(s) for s in self.stops) + 8

                def __call__(self, input_ids, scores, **kwargs):
                    tails = input_ids[:, -self.tail:].tolist()
                    texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
                    hits = [any(s in text for s in self.stops) for text in texts]
                    return torch.tensor(hits, dtype=torch.bool, device=input_ids.device)

            cls._cls = _StopOnStrings
        return cls._cls(tokenizer, stops, tail_tokens)


class RowStreamer:
    """A transformers streamer for a whole batch: after each decoding step it calls
    `on_tokens(owner, ids so far)` for every row not yet ended by a stop token (`owners`:
    the request index of each row). Built through `RowStreamer.create(...)` (transformers
    is imported only then)."""

    _cls = None

    @classmethod
    def create(cls, owners: Sequence[int], stop_ids, on_tokens):
        if cls._cls is None:
            from transformers.generation.streamers import BaseStreamer

            class _RowStreamer(BaseStreamer):
                def __init__(self, owners, stop_ids, on_tokens):
                    self.owners = list(owners)
                    self.stop_ids = set(stop_ids)
                    self.on_tokens = on_tokens
                    self.ids: list[list[int]] = [[] for _ in self.owners]
                    self.done = [False] * len(self.owners)

                def put(self, value):
                    if value.dim() > 1:  # the prompt, handed over before the first step
                        return
                    for row, token in enumerate(value.tolist()):
                        if self.done[row]:
                            continue
                        if token in self.stop_ids:
                            self.done[row] = True
                            continue
                        self.ids[row].append(token)
                        self.on_tokens(self.owners[row], list(self.ids[row]))

                def end(self):
                    pass

            cls._cls = _RowStreamer
        return cls._cls(owners, stop_ids, on_tokens)


# -- the generator -----------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None) -> cuda when available, else cpu; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class _Piece:
    """A unit of generation: one segment of a request (or the whole request)."""

    owner: int
    waves: list[torch.Tensor]
    prompt: Any  # EncodedPrompt
    options: GenerationOptions
    seconds: float
    text: str = ""
    n_tokens: int = 0
    encode_s: float = 0.0
    generate_s: float = 0.0
    batch: int = -1


@dataclass
class _Prepared:
    request: Request
    result: Result
    pieces: list[_Piece] = field(default_factory=list)


class SpeechLMGenerator:
    """Batched, length-sorted generation with a SpeechLM (see the module doc).

    model: a SpeechLM (moved to `device` when given). batch_size: most pieces
    per batch. max_batch_duration: most padded seconds of audio per batch (None:
    no limit). max_segment_s: asr / st recordings longer than this are cut at
    silences (None: never cut). options: default GenerationOptions for requests
    without their own. strict: raise AudioErrors instead of returning them in
    Results.
    """

    def __init__(self, model, *, batch_size: int = 16, max_batch_duration: float | None = None,
                 device: str | torch.device | None = None,
                 max_segment_s: float | None = DEFAULT_MAX_SEGMENT_S,
                 options: GenerationOptions | None = None, strict: bool = False):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_duration is not None and max_batch_duration <= 0:
            raise ConfigError(f"max_batch_duration must be > 0, got {max_batch_duration}")
        if max_segment_s is not None and max_segment_s <= 0:
            raise ConfigError(f"max_segment_s must be > 0, got {max_segment_s}")
        if device is not None:
            model.to(resolve_device(device))
        self.model = model.eval()
        self.batch_size = int(batch_size)
        self.max_batch_duration = max_batch_duration
        self.max_segment_s = max_segment_s
        self.options = options or GenerationOptions()
        self.strict = bool(strict)
        self.sample_rate = int(getattr(model.encoder, "sample_rate", 16000))
        self._prompt_cache: dict[str, Any] = {}
        config = getattr(model.llm, "config", None)
        self.max_positions: int | None = getattr(config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(cls, model_dir, *, encoder_path=None, llm_path=None,
                        device: str | torch.device | None = "auto", dtype=None,
                        trust_remote_code: bool = False, **kwargs) -> SpeechLMGenerator:
        """A generator for a saved SpeechLM directory (see SpeechLM.from_pretrained for
        encoder_path / llm_path, the overrides when the base models moved)."""
        from ..models.speech_lm import SpeechLM

        if isinstance(dtype, str):
            dtype = None if dtype in ("", "auto", "float32") else getattr(torch, dtype)
        model = SpeechLM.from_pretrained(model_dir, encoder_path=encoder_path, llm_path=llm_path,
                                         trust_remote_code=trust_remote_code, dtype=dtype)
        return cls(model, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- public --------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], *, progress: bool = False,
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Result]:
        """One Result per request, in order (see the module doc; `on_tokens` streams)."""
        prepared = [self._prepare(i, request) for i, request in enumerate(requests)]
        pieces = [piece for item in prepared for piece in item.pieces]
        batches = self._batches(pieces)
        batch_seconds: list[float] = []
        bar = None
        if progress:
            from ..progress import progress_bar

            bar = progress_bar(total=len(pieces), desc="generate", unit="piece", dynamic_ncols=True)
        try:
            for number, batch in enumerate(batches):
                ids = [prepared[p.owner].request.id for p in batch]
                batch_seconds.append(self._run_batch(batch, ids, on_tokens))
                for piece in batch:
                    piece.batch = number
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        return [self._finish(item, batch_seconds) for item in prepared]

    # -- preparation ---------------------------------------------------------------

    def _prepare(self, owner: int, request: Request) -> _Prepared:
        prompt = request.prompt
        prompt.validate()  # a ConfigError is the caller's mistake: raised, not recorded
        options = request.options or self.options
        result = Result(id=str(request.id), task=prompt.task)
        item = _Prepared(request, result)
        clips = request.clips()
        if len(clips) != prompt.num_speech:
            raise ConfigError(f"request {request.id!r}: {len(clips)} audio clip(s) for "
                              f"{prompt.num_speech} speech slot(s) in its {prompt.task} prompt")
        try:
            waves = [self._load(clip, request.id) for clip in clips]
            result.audio_s = sum(w.numel() for w in waves) / self.sample_rate
            encoded = self._encoded_prompt(prompt)
            item.pieces = self._pieces(owner, request, prompt, waves, encoded, options)
        except (AudioError, PromptTooLongError) as e:
            if self.strict:
                raise
            result.error = str(e)
            result.error_type = type(e).__name__
            item.pieces = []
        return item

    def _encoded_prompt(self, prompt: TaskPrompt):
        key = repr(prompt)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = encode_task_prompt(self.model.template, self.model.tokenizer,
                                                         prompt)
        return self._prompt_cache[key]

    def _load(self, clip: Clip, request_id) -> torch.Tensor:
        """The clip at the encoder's rate, checked: empty, non-finite and silent clips (RMS
        below -60 dBFS: nothing was recorded) are reported instead of answered."""
        from ..audio.checks import check_audio
        from ..audio.io import load_audio, resample

        if clip.path is not None:
            wave = load_audio(clip.path, self.sample_rate, offset=clip.offset,
                              duration=clip.duration)
            check_audio(wave, self.sample_rate, clip.path)
            return wave
        where = f"request {request_id!r} waveform"
        wave = torch.as_tensor(clip.wave, dtype=torch.float32).detach().cpu().reshape(-1)
        check_audio(wave, int(clip.sample_rate), where)
        return resample(wave, int(clip.sample_rate), self.sample_rate)

    def _speech_frames(self, samples: int) -> int:
        """LLM positions the speech of `samples` samples takes (encoder, then adapter)."""
        enc = self.model.encoder.output_lengths(torch.tensor([samples]))
        return int(self.model.adapter.output_lengths(enc)[0])

    def _pieces(self, owner: int, request: Request, prompt: TaskPrompt, waves: list[torch.Tensor],
                encoded, options: GenerationOptions) -> list[_Piece]:
        name = self._name(request)
        seconds = [w.numel() / self.sample_rate for w in waves]
        limit = self.max_segment_s
        if prompt.segmentable and limit is not None and seconds[0] > limit:
            from .transcriber import segment_ranges

            ranges = segment_ranges(waves[0], self.sample_rate, limit)
            parts = [[waves[0][a:b]] for a, b in ranges]
        else:
            if limit is not None and max(seconds) > limit \
                    and getattr(self.model.encoder, "window_samples", None) is None:
                raise AudioTooLongError(
                    name, f"{max(seconds):.1f} s > max_segment_s {limit:g} s for task "
                          f"{prompt.task!r}, which needs the recording whole",
                    hint=f"this {self.model.encoder.kind} encoder has no window to encode it "
                         "piece by piece: cut the audio, raise --max-segment-s, or set "
                         "encoder_max_window_s in the model config")
            parts = [waves]
        text_len = len(encoded.prompt_ids())
        if self.max_positions is not None and text_len + options.max_new_tokens \
                >= self.max_positions:
            raise PromptTooLongError(
                name, f"the prompt (instruction and template) is {text_len} tokens; with "
                      f"max_new_tokens {options.max_new_tokens} it leaves no room for speech in "
                      f"the LLM's {self.max_positions} positions",
                hint="shorten the instruction or question, or lower --max-new-tokens")
        pieces = []
        for part in parts:
            frames = [self._speech_frames(w.numel()) for w in part]
            if min(frames) <= 0:
                if len(parts) > 1:
                    continue  # a sliver between silences: nothing to say
                short = min(w.numel() for w in part) / self.sample_rate
                raise AudioTooShortError(name, f"{short * 1000:.0f} ms gives no speech frames",
                                         hint="give at least 0.1 s of audio")
            total = text_len + sum(frames) + options.max_new_tokens
            if self.max_positions is not None and total > self.max_positions:
                raise AudioTooLongError(
                    name, f"{sum(w.numel() for w in part) / self.sample_rate:.1f} s of speech "
                          f"takes {sum(frames)} LLM positions; with the {text_len}-token prompt "
                          f"and max_new_tokens {options.max_new_tokens} that exceeds the LLM's "
                          f"{self.max_positions}",
                    hint="cut the audio (asr/st: lower --max-segment-s) or lower --max-new-tokens")
            pieces.append(_Piece(owner, part, encoded, options,
                                 sum(w.numel() for w in part) / self.sample_rate))
        if not pieces:
            raise AudioTooShortError(name, "no segment long enough to encode",
                                     hint="check the recording")
        return pieces

    @staticmethod
    def _name(request: Request) -> str:
        clips = request.clips()
        return clips[0].name if len(clips) == 1 and clips[0].path else f"request {request.id!r}"

    # -- batching ------------------------------------------------------------------

    def _batches(self, pieces: list[_Piece]) -> list[list[_Piece]]:
        """Pieces grouped by options, longest first, packed under batch_size and
        max_batch_duration (padded seconds = pieces x longest)."""
        groups: dict[GenerationOptions, list[_Piece]] = {}
        for piece in pieces:
            groups.setdefault(piece.options, []).append(piece)
        batches: list[list[_Piece]] = []
        for group in groups.values():
            group.sort(key=lambda p: -p.seconds)  # stable: ties keep input order
            batch: list[_Piece] = []
            for piece in group:
                longest = batch[0].seconds if batch else piece.seconds
                too_many = len(batch) >= self.batch_size
                too_long = (self.max_batch_duration is not None and batch
                            and (len(batch) + 1) * longest > self.max_batch_duration)
                if batch and (too_many or too_long):
                    batches.append(batch)
                    batch = []
                batch.append(piece)
            if batch:
                batches.append(batch)
        return batches

    # -- running -------------------------------------------------------------------

    def _encoder_groups(self, samples: list[int]) -> list[list[int]]:
        """Clip indices in groups the encoder runs together.

        Whisper pads every window to 30 s, so one call costs the same for any mix.
        Encoders that take no attention mask (their conv stack would see the zero
        padding) run one clip at a time, so outputs do not depend on the batch.
        Others get groups of similar length (longest <= ENCODER_PAD_RATIO x
        shortest): padding a 2 s clip to 10 s would cost 5x its encoder time, and
        on a CPU that outweighs what a bigger batch saves.
        """
        encoder = self.model.encoder
        if getattr(encoder, "pad_to_window", False):  # every clip costs a whole window anyway
            return [list(range(len(samples)))]
        if getattr(encoder, "use_attention_mask", True) is False \
                and not getattr(encoder, "unpadded", False):
            return [[i] for i in range(len(samples))]
        groups: list[list[int]] = []
        for i in sorted(range(len(samples)), key=lambda i: -samples[i]):
            if groups and samples[groups[-1][0]] <= ENCODER_PAD_RATIO * samples[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    @torch.no_grad()
    def _encode(self, waves: list[torch.Tensor]):
        """EncoderOutput [N, F, D] for clips, in their order (see _encoder_groups)."""
        from ..audio.features import as_padded_batch
        from ..models.encoders import EncoderOutput

        encoder = self.model.encoder
        groups = self._encoder_groups([w.numel() for w in waves])
        if len(groups) == 1:
            return encoder(*as_padded_batch(waves))
        rows: list = [None] * len(waves)
        for group in groups:
            out = encoder(*as_padded_batch([waves[i] for i in group]))
            for row, i in enumerate(group):
                rows[i] = out.hidden[row, : int(out.lengths[row])]
        lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
        hidden = rows[0].new_zeros((len(rows), int(lengths.max()), rows[0].shape[-1]))
        for i, r in enumerate(rows):
            hidden[i, : r.shape[0]] = r
        return EncoderOutput(hidden, lengths)

    @torch.no_grad()
    def _run_batch(self, batch: list[_Piece], ids: list[str],
                   on_tokens: Callable[[int, list[int]], None] | None = None) -> float:
        """Generate for one batch; fills each piece's text, tokens and times. Returns the
        batch's wall time."""
        model = self.model
        options = batch[0].options
        start = time.perf_counter()
        encoder_output = self._encode([w for piece in batch for w in piece.waves])
        inputs = model.prepare_generation_inputs(prompts=[p.prompt for p in batch],
                                                 encoder_output=encoder_output)
        encoded = time.perf_counter()
        kwargs = options.generate_kwargs()
        if on_tokens is not None:
            kwargs["streamer"] = RowStreamer.create([p.owner for p in batch],
                                                    model.stop_token_ids(), on_tokens)
        if options.stop:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [StopOnStrings.create(model.tokenizer, options.stop)])
        if options.do_sample and options.seed is not None:
            seed = (options.seed * 1_000_003 + zlib.crc32("\0".join(ids).encode("utf-8"))) \
                % (2 ** 63)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = model.generate_ids(inputs, **kwargs)
        else:
            out = model.generate_ids(inputs, **kwargs)
        done = time.perf_counter()
        texts, counts = self._decode(out, options.stop)
        total_s = sum(p.seconds for p in batch) or 1.0
        for piece, text, n in zip(batch, texts, counts, strict=True):
            piece.text, piece.n_tokens = text, n
            piece.encode_s = (encoded - start) * piece.seconds / total_s
            piece.generate_s = (done - encoded) / len(batch)
        return done - start

    def _decode(self, ids: torch.Tensor, stops: Sequence[str]) -> tuple[list[str], list[int]]:
        """Texts and token counts of generated rows: cut at the first stop token, trailing
        padding dropped (rows a stop string ended), text cut before a stop string."""
        model = self.model
        stop_ids = set(model.stop_token_ids())
        pad = model.pad_id
        texts, counts = [], []
        for row in ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            tokens = row[:cut]
            while tokens and tokens[-1] == pad and cut == len(row) and stops:
                tokens.pop()
            text = model.tokenizer.decode(tokens, skip_special_tokens=True)
            text, _ = cut_at_stop_strings(text, stops)
            texts.append(text.strip())
            counts.append(len(tokens))
        return texts, counts

    def _finish(self, item: _Prepared, batch_seconds: list[float]) -> Result:
        result = item.result
        if result.error is not None:
            return result
        pieces = item.pieces
        joiner = "" if (item.request.prompt.output_lang or "").split("-")[0] in _NO_SPACE_LANGS \
            else " "
        result.text = joiner.join(p.text for p in pieces if p.text)
        result.n_tokens = sum(p.n_tokens for p in pieces)
        result.segments = len(pieces)
        result.encode_s = sum(p.encode_s for p in pieces)
        result.generate_s = sum(p.generate_s for p in pieces)
        result.latency_s = sum(batch_seconds[b] for b in {p.batch for p in pieces})
        return result
