HELP = "run the main job on the embedded default (builds and caches what it needs)"


def add_arguments(parser):
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes for synthesis (default: all CPU cores)")
    parser.add_argument("--cache-dir", default=None,
                        help="where built corpora and models are kept "
                             "(default: $SPEECHLM_CACHE or ~/.cache/speechlm)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    web = parser.add_argument_group("talk to it")
    web.add_argument("--web", action="store_true",
                     help="then serve the demo's BLSP-KD speech LLM: the web demo at "
                          "http://HOST:PORT/web and the OpenAI-compatible API (speechlm serve)")
    web.add_argument("--host", default="127.0.0.1",
                     help="address to bind with --web (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=8000, help="port with --web (default 8000)")


def run(args):
    import os

    if args.cache_dir:
        os.environ["SPEECHLM_CACHE"] = args.cache_dir
    from ..demo import SERVED, run_demo

    if args.web:  # checked first: the demo takes minutes before the server would start
        from importlib.util import find_spec

        from ..errors import ConfigError

        missing = [m for m in ("fastapi", "uvicorn", "multipart", "gradio") if not find_spec(m)]
        if missing:
            raise ConfigError(f"--web needs the serving packages ({', '.join(missing)} missing): "
                              "pip install -e '.[serve]' (make installs them)")
    status = run_demo(jobs=args.jobs, progress=not args.no_progress)
    if status or not args.web:
        return status
    import sys

    from .. import zoo
    from ..serving.server import serve

    model_dir = zoo.ensure(SERVED, progress=False).model_dir  # built by the demo just now
    serve(str(model_dir), host=args.host, port=args.port, name=f"zoo:{SERVED}",
          say=lambda m: print(m, file=sys.stderr))
    return 0
