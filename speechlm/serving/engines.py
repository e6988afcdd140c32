"""What the server runs: a batch of jobs in, one answer per job out, whatever the model.

`load_engine(model_dir)` picks the engine a directory needs:
- `SpeechLMEngine`: a saved SpeechLM (speechlm_config.json). Jobs carry a task
  prompt (chat, asr, ...) and generation options; greedy jobs share one
  `SpeechLMGenerator.generate` call (it groups equal options into batches, and
  greedy output does not depend on the batch). A job sampling with a seed runs
  in a call of its own, so the same request draws the same answer whatever
  else is in flight.
- `TranscriberEngine`: a CTC or Whisper ASR model (`load_transcriber`). Every
  job is transcribed; text instructions and generation options do not apply.

The engine is called from one worker thread (see `batching`); `on_tokens`
callbacks fire on that thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..inference.speech_lm import GenerationOptions, Request
from ..inference.tasks import TaskPrompt
from .errors import APIError


@dataclass
class Job:
    """One request's work: clips (1-D at the engine's rate), what to ask, how to generate.
    on_tokens(ids so far) streams a SpeechLM's tokens while the batch runs."""

    waves: list[torch.Tensor]
    prompt: TaskPrompt
    options: GenerationOptions = field(default_factory=GenerationOptions)
    on_tokens: Callable[[list[int]], None] | None = None


@dataclass
class Answer:
    text: str = ""
    n_tokens: int = 0
    finish_reason: str = "stop"  # "length" when max_new_tokens ended it
    error: str | None = None
    error_type: str | None = None  # the SpeechLMError class name


class SpeechLMEngine:
    kind = "speech_lm"
    streams = True

    def __init__(self, generator):
        self.generator = generator
        self.sample_rate = generator.sample_rate

    @classmethod
    def load(cls, model_dir, *, device="auto", max_batch: int = 16,
             dtype: str = "float32") -> SpeechLMEngine:
        from ..inference.speech_lm import SpeechLMGenerator

        # The server refuses audio over its own limit, so no request is cut into pieces:
        # each streams as one text.
        generator = SpeechLMGenerator.from_pretrained(model_dir, device=device, dtype=dtype,
                                                      batch_size=max_batch, max_segment_s=None)
        return cls(generator)

    def check(self, job: Job, param: str) -> None:
        """400 when the job's prompt cannot be asked (unknown task, bad messages, ...)."""
        try:
            job.prompt.validate()
        except ConfigError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_prompt") from None
        if job.prompt.num_speech != len(job.waves):
            raise APIError(400, f"{param}: {len(job.waves)} audio clip(s) for "
                                f"{job.prompt.num_speech} speech slot(s)", param=param)

    def decode(self, ids: Sequence[int]) -> str:
        return self.generator.model.tokenizer.decode(list(ids), skip_special_tokens=True)

    def run(self, jobs: Sequence[Job]) -> list[Answer]:
        shared = [i for i, job in enumerate(jobs) if not _seeded_sampling(job.options)]
        calls = [shared] if shared else []
        calls += [[i] for i, job in enumerate(jobs) if _seeded_sampling(job.options)]
        answers: list[Answer | None] = [None] * len(jobs)
        for call in calls:
            for i, answer in zip(call, self._generate([jobs[i] for i in call]), strict=True):
                answers[i] = answer
        return answers

    def _generate(self, jobs: Sequence[Job]) -> list[Answer]:
        # A seeded draw depends on the request ids of its call: a constant id keeps it
        # the same for the same request.
        requests = [Request(f"job{i}" if len(jobs) > 1 else "job", job.waves,
                            task=job.prompt.task, lang=job.prompt.lang,
                            target_lang=job.prompt.target_lang, question=job.prompt.question,
                            messages=job.prompt.messages, instruction=job.prompt.instruction,
                            sample_rate=self.sample_rate, options=job.options)
                    for i, job in enumerate(jobs)]

        def on_tokens(index: int, ids: list[int]) -> None:
            if jobs[index].on_tokens is not None:
                jobs[index].on_tokens(ids)

        results = self.generator.generate(requests, on_tokens=on_tokens)
        return [Answer(text=r.text, n_tokens=r.n_tokens, error=r.error,
                       error_type=r.error_type,
                       finish_reason="length" if r.n_tokens >= job.options.max_new_tokens
                       else "stop")
                for r, job in zip(results, jobs, strict=True)]


def _seeded_sampling(options: GenerationOptions) -> bool:
    return options.do_sample and options.seed is not None


class TranscriberEngine:
    kind = "asr"
    streams = False

    def __init__(self, transcriber, asr: str):
        self.transcriber = transcriber
        self.asr = asr
        self.sample_rate = transcriber.sample_rate

    @classmethod
    def load(cls, model_dir, *, device="auto", max_batch: int = 16,
             lang: str = "en", dtype: str = "float32") -> TranscriberEngine:
        from ..inference.transcriber import asr_kind, load_transcriber

        asr = asr_kind(model_dir)
        if asr != "whisper" and dtype != "float32":
            raise ConfigError(f"--dtype {dtype}: {model_dir} is a CTC model, which runs in "
                              "float32; --dtype applies to speech LMs and Whisper")
        options = {"language": lang, "dtype": dtype} if asr == "whisper" else {}
        transcriber = load_transcriber(model_dir, device=device, max_batch_size=max_batch,
                                       **options)
        return cls(transcriber, asr)

    def check(self, job: Job, param: str) -> None:
        if len(job.waves) != 1:
            raise APIError(400, f"{param}: this server runs a {self.asr} ASR model, which "
                                f"transcribes one clip per request, not {len(job.waves)}",
                           param=param)
        language = getattr(self.transcriber, "language", None)
        if job.prompt.lang and language and job.prompt.lang.split("-")[0] != language:
            raise APIError(400, f"{param}: this server's Whisper model transcribes "
                                f"{language!r}, not {job.prompt.lang!r}; leave language out or "
                                f"start the server with --lang {job.prompt.lang}", param=param)

    def run(self, jobs: Sequence[Job]) -> list[Answer]:
        texts, _ = self.transcriber.transcribe_waves([job.waves[0] for job in jobs])
        return [Answer(text=text) for text in texts]


def load_engine(model_dir, *, device="auto", max_batch: int = 16, lang: str = "en",
                dtype: str = "float32"):
    """The engine for a model directory: a SpeechLM, or a CTC / Whisper ASR model (dtype:
    of the weights, float32, bfloat16 or float16). Weights are loaded with transformers'
    own classes; no code from the directory runs."""
    from ..errors import SpeechLMError
    from ..inference.generate_jsonl import is_speech_lm_dir
    from ..inference.transcriber import asr_kind

    if is_speech_lm_dir(model_dir):
        return SpeechLMEngine.load(model_dir, device=device, max_batch=max_batch, dtype=dtype)
    if asr_kind(model_dir) is not None:
        return TranscriberEngine.load(model_dir, device=device, max_batch=max_batch, lang=lang,
                                      dtype=dtype)
    raise SpeechLMError(f"{model_dir}: not a model speechlm can serve; give a SpeechLM "
                        "checkpoint (a directory with speechlm_config.json), a CTC or Whisper "
                        "ASR model, or a name from `speechlm models list`")
