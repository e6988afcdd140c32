"""OpenAI's wire format: requests in (chat completions, transcriptions), responses out.

A chat request's messages become a speechlm `TaskPrompt`; each `input_audio`
part is one clip, and its place in the text is a `<speech>` slot:

    {"role": "user", "content": [{"type": "text", "text": "What is said?"},
                                 {"type": "input_audio",
                                  "input_audio": {"data": "<base64>", "format": "wav"}}]}

A conversation of one user turn with one clip is asked the way the model was
trained to be asked (`TaskPrompt("chat", question=...)`: the template's own
layout of instruction and speech); anything longer goes in as the messages.

Sampling: `temperature` 0 or absent decodes greedily (the model's one best
answer; OpenAI's default is 1, a speech model's answers are usually wanted
deterministic); above 0 samples, with `top_p` and `seed` when given.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..inference.speech_lm import GenerationOptions
from ..inference.tasks import SPEECH, TaskPrompt
from .audio import AudioLimits, check_format, decode_audio, decode_base64
from .engines import Answer, Job
from .errors import APIError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
RESPONSE_FORMATS = ("json", "text")


@dataclass(frozen=True)
class ServeLimits:
    """What the server accepts: audio (duration, body size) and generation lengths."""

    audio: AudioLimits = AudioLimits()
    default_max_tokens: int = 128
    max_tokens: int = 1024


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object "
                            "with Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{type(body).__name__}", code="invalid_json")
    return body


def check_model(name, served: str, param: str = "model") -> None:
    if name is None or name == "":
        raise APIError(400, f"{param} is required; this server serves {served!r}", param=param)
    if name != served:
        raise APIError(404, f"model {name!r} is not served here; use {served!r} (GET /v1/models "
                            "lists it)", param=param, code="model_not_found")


def _number(body: dict, key: str, kind, low, high, default):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise APIError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got "
                            f"{value!r}", param=key)
    if not low <= value <= high:
        raise APIError(400, f"{key} must be between {low:g} and {high:g}, got {value!r}",
                       param=key)
    return kind(value)


def generation_options(body: dict, limits: ServeLimits) -> GenerationOptions:
    """max_tokens (or max_completion_tokens), temperature, top_p, seed, stop."""
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, key, int, 1, limits.max_tokens, limits.default_max_tokens)
    temperature = _number(body, "temperature", float, 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", float, 1e-6, 1.0, 1.0)
    seed = _number(body, "seed", int, -(2 ** 63), 2 ** 63 - 1, None)
    _number(body, "n", int, 1, 1, 1)  # one answer per request
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > 4
                              or not all(isinstance(s, str) for s in stops)):
        raise APIError(400, f"stop must be a string or a list of at most 4 strings, got "
                            f"{stop!r}", param="stop")
    return GenerationOptions(max_new_tokens=max_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else 1.0,
                             top_p=top_p if temperature > 0 else 1.0,
                             seed=seed if temperature > 0 else None, stop=tuple(stops or ()))


def chat_job(body: dict, limits: ServeLimits, sample_rate: int) -> Job:
    """The Job of a chat completion request (messages with input_audio parts)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    turns, waves = [], []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"{where}: expected {{'role': 'system'|'user'|'assistant', "
                                f"'content': ...}}, got {str(message)[:200]}", param=where)
        content = message.get("content")
        if isinstance(content, str) or content is None:
            texts = [content or ""]
        elif isinstance(content, list):
            texts = []
            for p, part in enumerate(content):
                texts.append(_part(part, f"{where}.content[{p}]", limits, sample_rate, waves))
        else:
            raise APIError(400, f"{where}.content must be a string or a list of parts",
                           param=f"{where}.content")
        turns.append({"role": ROLES[message["role"]],
                      "content": "\n".join(t for t in texts if t)})
    if not waves:
        raise APIError(400, "messages hold no input_audio part; a speech model answers about a "
                            "recording: add {'type': 'input_audio', 'input_audio': {'data': "
                            "<base64 file>, 'format': 'wav'}} to a user message",
                       param="messages")
    options = generation_options(body, limits)
    if len(turns) == 1 and len(waves) == 1 and turns[0]["role"] == "user":
        question = turns[0]["content"].replace(SPEECH, "").strip()
        return Job(waves, TaskPrompt("chat", question=question or None), options)
    return Job(waves, TaskPrompt("chat", messages=tuple(turns)), options)


def _part(part, where: str, limits: ServeLimits, sample_rate: int, waves: list) -> str:
    """The text of one content part (SPEECH for an audio part, whose clip joins `waves`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise APIError(400, f"{where}.text must be a string", param=f"{where}.text")
        return text
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise APIError(400, f"{where}.input_audio must be {{'data': <base64>, 'format': "
                                "'wav'}}", param=f"{where}.input_audio")
        check_format(audio.get("format"), f"{where}.input_audio.format")
        raw = decode_base64(audio.get("data"), f"{where}.input_audio.data")
        waves.append(decode_audio(raw, f"{where}.input_audio.data", limits.audio, sample_rate))
        return SPEECH
    raise APIError(400, f"{where}.type: {kind!r} parts are not supported; send 'text' or "
                        "'input_audio' parts", param=f"{where}.type")


def transcription_job(form: dict, limits: ServeLimits, sample_rate: int, raw: bytes,
                      filename: str | None) -> tuple[Job, str]:
    """(Job, response_format) of a transcription upload (OpenAI's audio API)."""
    response_format = form.get("response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format {response_format!r} is not supported; use "
                            f"{' or '.join(RESPONSE_FORMATS)}", param="response_format")
    if filename and "." in filename:
        check_format(filename.rsplit(".", 1)[1], "file")
    temperature = form.get("temperature")
    try:
        body = {"temperature": None if temperature in (None, "") else float(temperature)}
    except ValueError:
        raise APIError(400, f"temperature must be a number, got {temperature!r}",
                       param="temperature") from None
    wave = decode_audio(raw, "file", limits.audio, sample_rate)
    language = form.get("language") or None
    return Job([wave], TaskPrompt("asr", lang=language), generation_options(body, limits)), \
        response_format


# -- responses --------------------------------------------------------------------------


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(answer: Answer, model: str) -> dict:
    return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason}]}


def chat_chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "speechlm"}]}
