"""Running the app: `serve` for the command line, `BackgroundServer` for tests and benchmarks.

`serve` resolves the model name (directory, `models:NAME`, `zoo:NAME`, a
cached hub id), loads it (transformers' own classes, never remote code),
keeps every temporary file (the demo's example clips, Gradio's upload cache)
in one temporary directory that is removed on exit, and runs uvicorn.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from .app import ServerConfig, create_app


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          device: str = "auto", lang: str = "en", dtype: str = "float32", say=print,
          log_level: str = "info", **config) -> None:
    """Load `model` and serve it until interrupted (config: ServerConfig fields)."""
    import uvicorn

    from ..pretrained.resolve import resolve_model_dir
    from .engines import load_engine

    model_dir = resolve_model_dir(model, expect=None, say=say)
    with tempfile.TemporaryDirectory(prefix="speechlm-serve-") as work_dir:
        # Gradio caches uploads under this directory; it goes when the server stops
        os.environ["GRADIO_TEMP_DIR"] = str(Path(work_dir) / "gradio")
        engine = load_engine(model_dir, device=device, max_batch=config.get("max_batch", 16),
                             lang=lang, dtype=dtype)
        app = create_app(engine, ServerConfig(model_name=name or model, work_dir=Path(work_dir),
                                              **config))
        where = f"http://{host}:{port}"
        say(f"serving {model_dir} as {name or model!r} ({engine.kind}) at {where}/v1"
            + (f", web demo at {where}/web" if config.get("web", True) else ""))
        uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """The app on a free loopback port, in a thread (`with BackgroundServer(app) as s:
    s.url`). Stopped, and its thread joined, on exit."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                    log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="speechlm-server",
                                       daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
