"""`speechlm serve MODEL`: an OpenAI-compatible HTTP API and a web demo for one model.

MODEL is any name the resolver takes: a saved SpeechLM directory, a CTC or
Whisper ASR model, `models:NAME`, `zoo:NAME`. See speechlm.serving.
"""

from __future__ import annotations

import argparse

HELP = ("serve a model over HTTP: OpenAI chat completions with audio, transcriptions, a web "
        "demo at /web (dynamic batching)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..inference.generate_jsonl import WEIGHT_DTYPES

    parser.add_argument("model", metavar="MODEL",
                        help="a SpeechLM checkpoint, a CTC / Whisper model, models:NAME or "
                             "zoo:NAME (see `speechlm models list`)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $SPEECHLM_API_KEY, else no key); the web demo asks "
                             "for it as its password")
    parser.add_argument("--name", default=None,
                        help="the model id clients send (default: MODEL as given)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32",
                        help="weights of a speech LM's encoder and LLM, or of Whisper "
                             "(bfloat16 halves GPU memory; a CTC model runs in float32)")
    parser.add_argument("--lang", default="en",
                        help="the language a Whisper model transcribes (default en)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=16,
                          help="most requests run together (default 16)")
    batching.add_argument("--batch-wait-ms", type=float, default=10.0,
                          help="how long a request waits for others to join its batch "
                               "(default 10)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-audio-s", type=float, default=30.0,
                        help="longest clip accepted, in seconds (default 30)")
    limits.add_argument("--max-body-mb", type=float, default=25.0,
                        help="largest request body, in MiB (default 25, OpenAI's upload limit)")
    limits.add_argument("--max-tokens", type=int, default=128,
                        help="tokens generated when a request gives no max_tokens (default 128)")
    limits.add_argument("--max-tokens-limit", type=int, default=1024,
                        help="the most max_tokens a request may ask for (default 1024)")
    parser.add_argument("--no-web", action="store_true", help="do not mount the web demo")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..errors import ConfigError

    if args.max_batch < 1 or args.batch_wait_ms < 0:
        raise ConfigError("--max-batch must be >= 1 and --batch-wait-ms >= 0")
    if args.max_audio_s <= 0 or args.max_body_mb <= 0 or args.max_tokens < 1 \
            or args.max_tokens_limit < args.max_tokens:
        raise ConfigError("--max-audio-s and --max-body-mb must be > 0, and 1 <= --max-tokens "
                          "<= --max-tokens-limit")
    from ..serving.audio import AudioLimits
    from ..serving.protocol import ServeLimits
    from ..serving.server import serve

    limits = ServeLimits(AudioLimits(max_seconds=args.max_audio_s,
                                     max_body_bytes=int(args.max_body_mb * 2 ** 20)),
                         default_max_tokens=args.max_tokens, max_tokens=args.max_tokens_limit)
    serve(args.model, host=args.host, port=args.port, name=args.name, device=args.device,
          lang=args.lang, dtype=args.dtype, say=lambda m: print(m, file=sys.stderr),
          api_key=args.api_key or os.environ.get("SPEECHLM_API_KEY") or None, limits=limits,
          max_batch=args.max_batch, max_wait_s=args.batch_wait_ms / 1000, web=not args.no_web)
    return 0
