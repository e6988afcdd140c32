"""Where speechlm keeps what it builds once and reuses (corpus, zoo models)."""

import os
from pathlib import Path

CACHE_ENV = "SPEECHLM_CACHE"


def cache_dir() -> Path:
    """The cache root: $SPEECHLM_CACHE, else $XDG_CACHE_HOME/speechlm, else ~/.cache/speechlm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "speechlm"


def resource(name: str) -> Path:
    """A data file shipped inside the package (speechlm/resources)."""
    return Path(__file__).parent / "resources" / name
