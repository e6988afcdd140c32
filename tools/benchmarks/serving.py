"""Benchmark: `speechlm serve` under load, dynamic batching vs one-at-a-time serving.

Both servers run the same model in this process (uvicorn on a loopback port);
clients are threads posting OpenAI chat completions (`input_audio` parts,
temperature 0) over HTTP. Baseline: a server that runs one request at a time
(max batch 1), asked by one client after another, i.e. sequential serving.
Ours: the batching server (max batch 32, 10 ms window) with 1, 8 and 32
concurrent clients. The same requests go to every run, and every run's answers
must equal the baseline's (asserted): batching changes the speed, not the
text. Reported per client count: requests/s (ratio = ours / sequential) and
p50 / p95 latency (seconds from sending a request to its answer; with many
clients this includes the wait for a batch). Issue goal: >= 4x at 32 clients
on CPU.

Audio: eSpeak NG clips of about 2-10 s from the embedded Bible corpus (the
clips of the speech_lm_generation benchmark), cycled to the request count.
Model: `run(model_dir=DIR)` (or SPEECHLM_BENCH_SPEECH_LM=DIR) serves a saved
SpeechLM; `run(real=True)` (`--real`) builds one from Whisper base and
SmolLM2-135M-Instruct (`speechlm models get whisper-base smollm2-135m-instruct`)
with an untrained stack adapter, so answers end at EOS or max_tokens as a real
model's do; otherwise the random-weight SpeechLM of speech_lm_generation
(wav2vec2 encoder, BLSP adapter, Llama LLM; its rows generate exactly
`max_tokens` tokens: an untrained adapter never says EOS). One torch thread
(SPEECHLM_BENCH_THREADS), as in speech_lm_generation.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.benchmarks.speech_lm_generation import _clips, _random_model  # noqa: E402

CLIENTS = (1, 8, 32)
NAME = "bench"


def _bodies(waves, n: int, max_tokens: int) -> list[dict]:
    import soundfile as sf

    encoded = []
    for wave in waves:
        buf = io.BytesIO()
        sf.write(buf, wave.numpy(), 16000, format="WAV")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    return [{"model": NAME, "temperature": 0, "max_tokens": max_tokens,
             "messages": [{"role": "user", "content": [
                 {"type": "input_audio", "input_audio": {"data": encoded[i % len(encoded)],
                                                         "format": "wav"}}]}]}
            for i in range(n)]


def _load(url: str, bodies: list[dict], clients: int) -> tuple[list[str], list[float], float]:
    """(answers in request order, latency of each, wall seconds) with `clients` threads."""
    import httpx

    answers: list[str] = [""] * len(bodies)
    latencies: list[float] = [0.0] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = http.post("/v1/chat/completions", json=bodies[i])
                latencies[i] = time.perf_counter() - start
                response.raise_for_status()
                answers[i] = response.json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, latencies, time.perf_counter() - start


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def _real_model(out_dir: Path) -> Path:
    """Whisper base + SmolLM2-135M-Instruct with an untrained stack adapter, saved."""
    import torch

    from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
    from speechlm.pretrained.resolve import resolve_model_dir

    torch.manual_seed(0)
    config = SpeechLMConfig(encoder_path=str(resolve_model_dir("models:whisper-base")),
                            llm_path=str(resolve_model_dir("models:smollm2-135m-instruct")),
                            adapter="stack", adapter_options={"stack_factor": 4},
                            template="chat")
    return SpeechLM.build(config).save_pretrained(out_dir / "speech_lm")


def run(quick: bool = False, model_dir: str | os.PathLike | None = None,
        threads: int | None = None, real: bool = False) -> list[dict]:
    import torch

    threads = threads or int(os.environ.get("SPEECHLM_BENCH_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, model_dir, real)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, model_dir, real: bool) -> list[dict]:
    from speechlm.serving.app import ServerConfig, create_app
    from speechlm.serving.engines import load_engine
    from speechlm.serving.server import BackgroundServer

    model_dir = model_dir or os.environ.get("SPEECHLM_BENCH_SPEECH_LM")
    n_requests, max_tokens = (32, 12) if quick else (64, 32)
    waves, _ = _clips(16)
    bodies = _bodies(waves, n_requests, max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        source = ("a saved checkpoint" if model_dir else
                  "Whisper base + SmolLM2-135M, untrained adapter" if real else "random weights")
        if real and not model_dir:
            model_dir = _real_model(Path(tmp))
        elif not model_dir:
            model_dir = _random_model(Path(tmp), quick)
        engine = load_engine(model_dir, device="cpu", max_batch=32)
        sequential = create_app(engine, ServerConfig(NAME, max_batch=1, max_wait_s=0.0,
                                                     web=False))
        batching = create_app(engine, ServerConfig(NAME, max_batch=32, max_wait_s=0.01,
                                                   web=False))
        with BackgroundServer(sequential) as server:
            _load(server.url, bodies[:2], 1)  # warm-up: first-call allocations, lazy imports
            base_answers, base_lat, base_s = _load(server.url, bodies, 1)
        results = {}
        with BackgroundServer(batching) as server:
            for clients in CLIENTS:
                results[clients] = _load(server.url, bodies, clients)

    rows = []
    base_rps = n_requests / base_s
    note = (f"{n_requests} chat requests with {len(waves)} eSpeak clips "
            f"{min(w.numel() for w in waves) / 16000:.1f}-{max(w.numel() for w in waves) / 16000:.1f}"
            f" s, temperature 0, {max_tokens} tokens max, {source}, CPU "
            f"{__import__('torch').get_num_threads()} thread(s); answers identical to sequential")
    for clients, (answers, latencies, wall_s) in results.items():
        if answers != base_answers:
            diff = sum(a != b for a, b in zip(answers, base_answers, strict=True))
            raise AssertionError(f"{clients} clients: {diff} of {n_requests} answers differ from "
                                 "sequential serving")
        rows.append({
            "benchmark": "serving", "metric": f"requests_per_s_{clients}_clients",
            "value": n_requests / wall_s, "baseline": base_rps,
            "ratio": (n_requests / wall_s) / base_rps,
            "note": f"latency p50 {_p(latencies, 50):.2f} s, p95 {_p(latencies, 95):.2f} s "
                    f"(sequential: p50 {_p(base_lat, 50):.2f} s, p95 {_p(base_lat, 95):.2f} s); "
                    + note})
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", help="a saved SpeechLM directory (default: random weights)")
    parser.add_argument("--real", action="store_true",
                        help="Whisper base + SmolLM2-135M-Instruct, untrained adapter")
    args = parser.parse_args()
    for row in run(quick=args.quick, model_dir=args.model, real=args.real):
        print(row)
