"""Shared pytest fixtures. Keep this file small: one fixture, one reason each."""

import os

# Nothing in the test suite may reach a model hub; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A function `(kind, **options) -> Path` returning a tiny checkpoint directory.

    Each distinct (kind, options) is written once per session, e.g.
    `tiny_ckpt("qwen2")` or `tiny_ckpt("wav2vec2", vocab=CTC_CHARACTERS)`;
    options are those of `speechlm.testing.tiny_checkpoints.write_tiny_checkpoint`.
    Treat the directory as read-only: other tests share it.
    """
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    written: dict[tuple, os.PathLike] = {}

    def get(kind: str, **options):
        key = (kind, tuple(sorted((name, repr(value)) for name, value in options.items())))
        if key not in written:
            out_dir = tmp_path_factory.mktemp(f"tiny-{kind}")
            written[key] = write_tiny_checkpoint(kind, out_dir, **options)
        return written[key]

    return get
