"""Where speechlm keeps what it builds once and reuses (corpus, zoo models), and the
fingerprint of a file."""

import hashlib
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


def file_sha256(path) -> str:
    """sha256 hex of a file's bytes, read in blocks (models are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
