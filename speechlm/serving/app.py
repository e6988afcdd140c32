"""The HTTP server: OpenAI's routes on one model, the web demo beside them.

    POST /v1/chat/completions    messages with input_audio parts; stream: true for SSE
    POST /v1/audio/transcriptions  multipart upload (file, model[, language,
                                 response_format json|text, temperature])
    GET  /v1/models, GET /health, /web (the Gradio demo)

Every request goes through `Guard` first (the optional Bearer key on every
route but /health; the body size limit), then its audio is decoded and
checked off the event loop, then it waits in the `DynamicBatcher` for its
batch. Bad input is an `APIError` (4xx, OpenAI's error body) for that request
alone; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .batching import DynamicBatcher
from .engines import Answer, Job
from .errors import APIError, error_code
from .protocol import (
    ServeLimits,
    chat_chunk,
    chat_completion,
    chat_job,
    check_model,
    completion_id,
    models_list,
    parse_json,
    transcription_job,
)
from .streaming import TextDeltas, sse

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)
WEB_PATH = "/web"


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id clients send as `model`. api_key: None serves without a key.
    max_batch / max_wait_s: dynamic batching (see batching). web: mount the demo at /web,
    with its example clips written under work_dir."""

    model_name: str
    api_key: str | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)
    max_batch: int = 16
    max_wait_s: float = 0.01
    web: bool = True
    work_dir: Path | None = None


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: the api key and the body size limit, before any route runs."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, open_prefixes=()):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = int(max_body_bytes)
        self.open_prefixes = tuple(open_prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and path not in OPEN_PATHS \
                and not path.startswith(self.open_prefixes) \
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = APIError(401, "missing or wrong API key: send the header 'Authorization: "
                                  "Bearer <key>' with the key the server was started with",
                             code="invalid_api_key")
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            error = _too_large(self.max_body)
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        received = 0

        async def counted():  # a body without Content-Length (chunked) is counted as it comes
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge()
            return message

        return await self.app(scope, counted, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over this server's limit of "
                         f"{limit / 2 ** 20:g} MiB; send a shorter clip (or start the server "
                         "with a larger --max-body-mb)", code="body_too_large")


def answer_or_error(answer: Answer, param: str) -> Answer:
    """The answer, or the 400 of a request the model refused (bad audio, over the context)."""
    if answer.error is not None:
        raise APIError(400, answer.error, param=param, code=error_code(answer.error_type))
    return answer


def create_app(engine, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `engine` (see speechlm.serving.engines)."""
    limits = config.limits
    batcher = DynamicBatcher(engine.run, max_batch=config.max_batch,
                             max_wait_s=config.max_wait_s)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = FastAPI(title="speechlm", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.batcher = batcher
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), error.status)

    async def body_of(request: Request) -> bytes:
        try:
            return await request.body()
        except BodyTooLarge:
            raise _too_large(limits.audio.max_body_bytes) from None

    async def ask(job: Job, param: str) -> Answer:
        engine.check(job, param)
        try:
            answer = await batcher.submit(job)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - the model failed on this request alone
            logger.exception("model failure")
            raise APIError(500, f"the model failed on this request ({type(e).__name__}: {e})",
                           code="model_error") from None
        return answer_or_error(answer, param)

    @app.get("/health")
    async def health():
        stats = batcher.stats
        return {"status": "ok", "model": config.model_name, "kind": engine.kind,
                "requests": stats.requests, "batches": stats.batches,
                "largest_batch": stats.largest_batch}

    @app.get("/v1/models")
    async def models():
        return models_list(config.model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_json(await body_of(request))
        check_model(body.get("model"), config.model_name)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
        job = await run_in_threadpool(chat_job, body, limits, engine.sample_rate)
        if stream:
            return await _stream(job)
        return chat_completion(await ask(job, "messages"), config.model_name)

    async def _stream(job: Job):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_tokens = lambda ids: loop.call_soon_threadsafe(events.put_nowait, ("tokens", ids))
        task = asyncio.ensure_future(ask(job, "messages"))
        task.add_done_callback(lambda t: events.put_nowait(("done", t)))
        first = await events.get()
        if first[0] == "done":
            first[1].result()  # a refused request is a 4xx, not a stream
        hold = max((len(s) for s in job.options.stop), default=0)

        async def chunks():
            cid, model = completion_id(), config.model_name
            yield sse(chat_chunk(cid, model, {"role": "assistant", "content": ""}))
            deltas = TextDeltas(hold=hold)
            kind, value = first
            while True:
                while kind == "tokens" and not events.empty():  # only the newest tokens matter
                    kind, value = events.get_nowait()
                if kind == "tokens":
                    delta = deltas.update(engine.decode(value))
                    if delta:
                        yield sse(chat_chunk(cid, model, {"content": delta}))
                    kind, value = await events.get()
                    continue
                try:
                    answer = value.result()
                except APIError as e:
                    yield sse(e.body())
                    return
                rest = deltas.finish(answer.text)
                if rest:
                    yield sse(chat_chunk(cid, model, {"content": rest}))
                yield sse(chat_chunk(cid, model, {}, answer.finish_reason))
                yield sse("[DONE]")
                return

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send the audio as multipart/form-data with a 'file' field and "
                                "a 'model' field (OpenAI's audio API)", param="file")
        try:
            form = await request.form(max_files=1, max_fields=20)
        except BodyTooLarge:
            raise _too_large(limits.audio.max_body_bytes) from None
        except Exception as e:  # noqa: BLE001 - python-multipart's parse errors
            raise APIError(400, f"the multipart body could not be parsed ({e})",
                           param="file") from None
        try:  # uploads spool to a temporary file: closing the form removes it
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "file is required: send the audio as the multipart field "
                                    "'file'", param="file")
            check_model(form.get("model"), config.model_name)
            raw = await upload.read()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            job, response_format = await run_in_threadpool(
                transcription_job, fields, limits, engine.sample_rate, raw, upload.filename)
        finally:
            await form.close()
        answer = await ask(job, "file")
        if response_format == "text":
            return PlainTextResponse(answer.text)
        return {"text": answer.text}

    open_prefixes: tuple[str, ...] = ()
    if config.web:
        app = _mount_web(app, engine, config, ask)
        if config.api_key:
            open_prefixes = (WEB_PATH,)  # the page has its own login (password: the key)

        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse(f"{WEB_PATH}/")

    app.add_middleware(Guard, api_key=config.api_key,
                       max_body_bytes=limits.audio.max_body_bytes, open_prefixes=open_prefixes)
    return app


def _mount_web(app: FastAPI, engine, config: ServerConfig, ask) -> FastAPI:
    import gradio as gr

    from ..inference.speech_lm import GenerationOptions
    from ..inference.tasks import TaskPrompt, task_instruction
    from .audio import decode_audio
    from .web import build_demo, example_clips

    work_dir = Path(config.work_dir) if config.work_dir else None
    examples = example_clips(work_dir / "examples") if work_dir else []

    async def ask_web(audio_path: str, instruction: str) -> str:
        text = instruction.strip()
        prompt = TaskPrompt("chat", question=text) if text else TaskPrompt("asr")
        try:
            raw = await run_in_threadpool(Path(audio_path).read_bytes)
            wave = await run_in_threadpool(decode_audio, raw, "audio", config.limits.audio,
                                           engine.sample_rate)
            job = Job([wave], prompt, GenerationOptions(
                max_new_tokens=config.limits.default_max_tokens))
            return (await ask(job, "audio")).text
        except APIError as e:
            return f"Could not answer: {e.message}"

    demo = build_demo(ask_web, examples, model_name=config.model_name,
                      instruction=task_instruction(TaskPrompt("asr")),
                      takes_instructions=engine.kind == "speech_lm")
    auth = None
    if config.api_key:
        key = config.api_key

        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), key.encode())

    allowed = [str(work_dir)] if work_dir else None
    return gr.mount_gradio_app(app, demo, path=WEB_PATH, auth=auth, allowed_paths=allowed,
                               footer_links=[])

