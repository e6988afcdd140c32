"""`speechlm serve`: the OpenAI-compatible API on a tiny SpeechLM and a tiny Whisper, driven
with the official `openai` client and raw HTTP over loopback. Models are untrained: their
text is arbitrary but deterministic, so answers are compared with the model's own."""

import base64
import concurrent.futures
import io

import numpy as np
import pytest
import soundfile as sf
import torch

openai = pytest.importorskip("openai", reason="the serve extra is not installed")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from speechlm.inference.speech_lm import GenerationOptions  # noqa: E402
from speechlm.inference.tasks import TaskPrompt  # noqa: E402
from speechlm.serving.app import ServerConfig, create_app  # noqa: E402
from speechlm.serving.audio import AudioLimits  # noqa: E402
from speechlm.serving.engines import Job, load_engine  # noqa: E402
from speechlm.serving.protocol import ServeLimits  # noqa: E402
from speechlm.serving.server import BackgroundServer  # noqa: E402

SR = 16000
NAME = "tiny-speech-lm"
LIMITS = ServeLimits(AudioLimits(max_seconds=4.0, max_body_bytes=1_000_000),
                     default_max_tokens=8, max_tokens=64)

# one torch thread: batched and one-at-a-time answers compare bit for bit
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _wave(seconds, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(int(seconds * SR), generator=gen) * 0.1).numpy()


def wav_bytes(seconds=1.0, seed=0):
    buf = io.BytesIO()
    sf.write(buf, _wave(seconds, seed), SR, format="WAV")
    return buf.getvalue()


def audio_part(raw: bytes, fmt="wav"):
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt}}


def user_turn(raw: bytes, text="What is said?"):
    return [{"role": "user", "content": [{"type": "text", "text": text}, audio_part(raw)]}]


@pytest.fixture(scope="module")
def engine(tiny_speech_lm):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_engine(tiny_speech_lm, device="cpu", max_batch=16)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, ServerConfig(NAME, limits=LIMITS, max_wait_s=0.05, web=False))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def direct(engine, raw: bytes, prompt: TaskPrompt, max_new_tokens=8) -> str:
    """The model's own answer, without the server."""
    from speechlm.serving.audio import decode_audio

    wave = decode_audio(raw, "test", LIMITS.audio, engine.sample_rate)
    [answer] = engine.run([Job([wave], prompt, GenerationOptions(max_new_tokens=max_new_tokens))])
    assert answer.error is None
    return answer.text


def chat(client, raw, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=user_turn(raw), **kwargs)


# -- the API through the openai client --------------------------------------------------


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == [NAME]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["kind"] == "speech_lm"


def test_chat_completion_answers_what_the_model_says(client, engine):
    raw = wav_bytes(1.5, seed=1)
    response = chat(client, raw)
    expected = direct(engine, raw, TaskPrompt("chat", question="What is said?"))
    assert expected and response.choices[0].message.content == expected
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.model == NAME
    # max_tokens is honoured: fewer tokens, a prefix-length answer
    short = chat(client, raw, max_tokens=2)
    assert short.choices[0].finish_reason == "length"
    assert expected.startswith(short.choices[0].message.content.strip())


def test_concurrent_requests_are_batched_and_answer_as_alone(client, server):
    clips = [wav_bytes(0.5 + 0.25 * i, seed=10 + i) for i in range(8)]
    alone = [chat(client, raw).choices[0].message.content for raw in clips]
    before = httpx.get(f"{server.url}/health").json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda raw: chat(client, raw).choices[0].message.content,
                                 clips))
    after = httpx.get(f"{server.url}/health").json()
    assert together == alone
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # some requests shared a batch
    assert after["largest_batch"] > 1


def test_streaming_chunks_add_up_to_the_answer(client):
    raw = wav_bytes(1.0, seed=2)
    whole = chat(client, raw, max_tokens=16).choices[0].message.content
    chunks = list(chat(client, raw, max_tokens=16, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole
    assert sum(1 for d in deltas if d) > 1  # it streamed, not one block at the end
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_repeats_whatever_else_runs(client):
    raw = wav_bytes(1.0, seed=3)
    first = chat(client, raw, temperature=1.0, seed=7, max_tokens=12)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(chat, client, wav_bytes(1.0, seed=30 + i), temperature=1.0,
                              seed=7, max_tokens=12) for i in range(3)]
        again = chat(client, raw, temperature=1.0, seed=7, max_tokens=12)
        [f.result() for f in others]
    assert again.choices[0].message.content == first.choices[0].message.content
    greedy = chat(client, raw, max_tokens=12).choices[0].message.content
    drawn = {chat(client, raw, temperature=1.0, seed=s, max_tokens=12).choices[0].message.content
             for s in (1, 2, 3)}
    assert drawn - {greedy}  # sampling is not greedy decoding in disguise


def test_transcriptions_json_and_text(client, engine):
    raw = wav_bytes(1.2, seed=4)
    as_json = client.audio.transcriptions.create(model=NAME, file=("clip.wav", raw))
    as_text = client.audio.transcriptions.create(model=NAME, file=("clip.wav", raw),
                                                 response_format="text")
    assert as_json.text == direct(engine, raw, TaskPrompt("asr"))
    assert as_text.strip() == as_json.text


def test_multi_turn_chat_with_two_clips(client):
    a, b = wav_bytes(0.8, seed=5), wav_bytes(0.9, seed=6)
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [audio_part(a), {"type": "text", "text": "Who?"}]},
                {"role": "assistant", "content": "Someone."},
                {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                             audio_part(b)]}]
    response = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6,
                                              temperature=0)
    assert isinstance(response.choices[0].message.content, str)


# -- bad input --------------------------------------------------------------------------


def _post_chat(url, body, **kwargs):
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60, **kwargs)


def _chat_body(raw=None, **fields):
    body = {"model": NAME, "max_tokens": 4, "messages": user_turn(raw or wav_bytes(1.0, 9))}
    body.update(fields)
    return body


def _with_audio_data(data: str):
    body = _chat_body()
    body["messages"][0]["content"][1]["input_audio"]["data"] = data
    return body


def _transcribe(url, raw, name="clip.wav", model=NAME):
    return httpx.post(f"{url}/v1/audio/transcriptions", data={"model": model},
                      files={"file": (name, raw)}, timeout=60)


def _bad_requests(url):
    """(what, response, expected status, a fragment the message must hold)"""
    big = wav_bytes(3.0, seed=1) + bytes(1_100_000)  # over the 1 MB limit
    long_text = " ".join(["word"] * 600)
    silent = io.BytesIO()
    sf.write(silent, np.zeros(SR), SR, format="WAV")
    yield ("non-audio bytes", _post_chat(url, _with_audio_data(
        base64.b64encode(b"this is not audio at all" * 20).decode())), 400,
        "not a readable audio file")
    yield ("empty file", _transcribe(url, b""), 400, "empty")
    yield ("audio over the max duration", _post_chat(url, _chat_body(wav_bytes(6.0, 1))), 400,
           "limit of 4 s")
    yield ("body over the size limit", _transcribe(url, big), 413, "limit of")
    yield ("chunked body over the size limit", httpx.post(
        f"{url}/v1/chat/completions", content=iter([bytes(600_000), bytes(600_000)]),
        headers={"content-type": "application/json"}), 413, "limit of")
    yield ("malformed JSON", httpx.post(f"{url}/v1/chat/completions", content=b'{"model": ',
                                        headers={"content-type": "application/json"}), 400,
           "not valid JSON")
    yield ("bad base64", _post_chat(url, _with_audio_data("@@not base64@@")), 400,
           "not valid base64")
    yield ("unknown model", _post_chat(url, _chat_body(model="gpt-4o")), 404, "not served here")
    yield ("unknown model (upload)", _transcribe(url, wav_bytes(), model="whisper-1"), 404,
           "not served here")
    yield ("prompt over the context", _post_chat(url, _chat_body(messages=[
        {"role": "user", "content": [{"type": "text", "text": long_text},
                                     audio_part(wav_bytes(1.0, 2))]}])), 400, "prompt too long")
    yield ("silent clip", _transcribe(url, silent.getvalue()), 400, "silent")
    yield ("no audio part", _post_chat(url, _chat_body(messages=[
        {"role": "user", "content": "hello"}])), 400, "no input_audio part")
    yield ("max_tokens over the limit", _post_chat(url, _chat_body(max_tokens=10_000)), 400,
           "max_tokens must be between 1 and 64")
    yield ("unsupported response_format", httpx.post(
        f"{url}/v1/audio/transcriptions", data={"model": NAME, "response_format": "srt"},
        files={"file": ("a.wav", wav_bytes())}), 400, "response_format 'srt'")
    yield ("image part", _post_chat(url, _chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}])), 400, "image_url")


def test_every_bad_request_gets_its_4xx_and_the_next_good_one_succeeds(server):
    good_raw = wav_bytes(1.0, seed=8)
    expected = _post_chat(server.url, _chat_body(good_raw)).json()
    expected_text = expected["choices"][0]["message"]["content"]
    seen = []
    for what, response, status, fragment in _bad_requests(server.url):
        body = response.json()
        assert response.status_code == status, (what, body)
        assert fragment in body["error"]["message"], (what, body)
        seen.append(what)
        good = _post_chat(server.url, _chat_body(good_raw))
        assert good.status_code == 200, (what, good.text)
        assert good.json()["choices"][0]["message"]["content"] == expected_text
    assert len(seen) == 15


def test_a_bad_request_in_a_batch_fails_alone(client, server):
    """Refused and good requests in flight together: each gets its own answer."""
    silent = io.BytesIO()
    sf.write(silent, np.zeros(SR), SR, format="WAV")
    clips = [wav_bytes(1.0, seed=20 + i) for i in range(4)]
    expected = [chat(client, raw).choices[0].message.content for raw in clips]
    long_text = " ".join(["word"] * 600)
    overlong = _chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": long_text}, audio_part(wav_bytes(1.0, 2))]}])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bad = pool.submit(_post_chat, server.url, overlong)
        goods = [pool.submit(lambda r: chat(client, r).choices[0].message.content, raw)
                 for raw in clips]
        answers = [g.result() for g in goods]
    assert bad.result().status_code == 400
    assert bad.result().json()["error"]["code"] == "context_length_exceeded"
    assert answers == expected


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="nope", messages=user_turn(wav_bytes()))
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        chat(client, wav_bytes(), temperature=5)


# -- safety -----------------------------------------------------------------------------


def test_api_key_is_required_on_every_route_but_health(engine):
    app = create_app(engine, ServerConfig(NAME, api_key="s3cret", limits=LIMITS, web=False))
    with BackgroundServer(app) as running:
        assert httpx.get(f"{running.url}/health").status_code == 200
        for path in ("/v1/models",):
            response = httpx.get(f"{running.url}{path}")
            assert response.status_code == 401
            assert "Bearer" in response.json()["error"]["message"]
        assert _transcribe(running.url, wav_bytes()).status_code == 401
        wrong = openai.OpenAI(base_url=f"{running.url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(wrong, wav_bytes())
        right = openai.OpenAI(base_url=f"{running.url}/v1", api_key="s3cret", max_retries=0)
        assert chat(right, wav_bytes()).choices[0].message.content is not None
        assert [m.id for m in right.models.list()] == [NAME]


def test_serve_command_binds_loopback_by_default_and_checks_its_options():
    from speechlm.cli import build_parser, main

    args = build_parser().parse_args(["serve", "some/model"])
    assert args.host == "127.0.0.1" and args.api_key is None and not args.no_web
    assert main(["serve", "some/model", "--max-batch", "0"]) == 2


def test_bfloat16_weights_serve_what_the_bfloat16_model_says(tiny_speech_lm, tmp_path):
    from speechlm.cli import build_parser
    from speechlm.errors import ConfigError

    assert build_parser().parse_args(["serve", "m", "--dtype", "bfloat16"]).dtype == "bfloat16"
    half = load_engine(tiny_speech_lm, device="cpu", max_batch=4, dtype="bfloat16")
    model = half.generator.model
    assert model.llm.dtype == torch.bfloat16
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    raw = wav_bytes(1.0, seed=5)
    expected = direct(half, raw, TaskPrompt("chat", question="What is said?"))
    assert expected  # the tiny model answers something in bf16 too
    app = create_app(half, ServerConfig(NAME, limits=LIMITS, web=False))
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        assert chat(client, raw).choices[0].message.content == expected
    # a CTC model is refused before anything loads
    ctc_dir = tmp_path / "ctc"
    ctc_dir.mkdir()
    (ctc_dir / "config.json").write_text('{"architectures": ["Wav2Vec2ForCTC"]}')
    with pytest.raises(ConfigError, match=r"--dtype bfloat16: .* is a CTC model, which runs "
                                          r"in float32"):
        load_engine(ctc_dir, device="cpu", dtype="bfloat16")


# -- an ASR model -----------------------------------------------------------------------


def test_whisper_model_serves_transcriptions_and_chat(tiny_ckpt):
    whisper = load_engine(tiny_ckpt("whisper"), device="cpu", max_batch=4)
    app = create_app(whisper, ServerConfig("tiny-whisper", limits=LIMITS, web=False))
    raw = wav_bytes(1.0, seed=11)
    expected = direct(whisper, raw, TaskPrompt("asr"))
    with BackgroundServer(app) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        text = client.audio.transcriptions.create(model="tiny-whisper", file=("a.wav", raw)).text
        answer = client.chat.completions.create(model="tiny-whisper", messages=user_turn(raw))
        streamed = client.chat.completions.create(model="tiny-whisper", messages=user_turn(raw),
                                                  stream=True)
        joined = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        refused = httpx.post(f"{running.url}/v1/audio/transcriptions",
                             data={"model": "tiny-whisper", "language": "de"},
                             files={"file": ("a.wav", raw)})
    assert text == expected and answer.choices[0].message.content == expected
    assert joined == expected
    assert refused.status_code == 400 and "--lang de" in refused.json()["error"]["message"]
