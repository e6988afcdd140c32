"""The one resolver of model names: whatever a user names a model with, a local directory.

A model may be named four ways, everywhere the toolkit takes one (encoders,
LLMs, continuations, infer, recipes):
- a local directory (`runs/x/final`, `~/models/whisper-small`);
- a hub id already in the local Hugging Face cache (`openai/whisper-small`);
- a pretrained model assembled from a registry package (`models:whisper-base`,
  or the bare name `whisper-base` when no such path exists);
- a model the toolkit trains itself (`zoo:llm_en_es`), trained on first use.
Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from . import packages

ZOO_PREFIX = "zoo:"


def resolve_model_dir(spec: str | os.PathLike, *, what: str = "model", hint: str = "",
                      expect: str | None = "config.json", progress: bool = True,
                      say: Callable[[str], None] = print) -> Path:
    """The local directory `spec` names (see the module docstring).

    expect: a file the directory must hold (None: any directory); a directory without it
    is a ConfigError that names the path, says what it should hold and (with `hint`) how
    to point elsewhere.
    """
    text = str(spec)
    suffix = f"; {hint}" if hint else ""
    if text.startswith(ZOO_PREFIX):
        from .. import zoo

        return zoo.ensure(text[len(ZOO_PREFIX):], progress=progress, say=say).model_dir
    path = Path(text).expanduser()
    if text.startswith(packages.MODELS_PREFIX) or (
            not path.exists() and packages.lookup(text) is not None):
        return packages.get(text, say=say)
    if path.is_dir():
        if expect and not (path / expect).is_file():
            raise ConfigError(f"{what} directory {path} has no {expect}; point it at a "
                              f"transformers model directory (config.json + weights){suffix}")
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: fall through to the message below
            pass
        raise ConfigError(
            f"{what} '{text}' is neither a local directory nor in the local Hugging Face cache "
            f"(speechlm never downloads models); run `huggingface-cli download {text}` on a "
            f"machine with network, give a local directory, or use a pretrained model from "
            f"`speechlm models list`{suffix}")
    raise ConfigError(f"{what} directory not found: {path}{suffix}")


def portable_name(spec: str | os.PathLike, resolved: str | os.PathLike) -> str:
    """What a saved checkpoint should record for a model it was built on: the name itself
    when it is one (`models:NAME`, a registry name, `zoo:NAME`: the same on every machine),
    else the resolved absolute directory (a relative path would depend on the cwd)."""
    text = str(spec)
    if text.startswith((ZOO_PREFIX, packages.MODELS_PREFIX)) or (
            not Path(text).expanduser().exists() and packages.lookup(text) is not None):
        return text
    return str(Path(resolved).resolve())
