"""Training metrics to `output_dir/metrics.jsonl` and, when installed, TensorBoard.

One JSON object per line: {"split": "train" | "eval", "step": N, "time": unix
seconds, <metric>: value, ...}. Lines are appended and flushed as they are
logged (`JsonlAppender`), so a killed run keeps everything up to its last
line. A resumed run first drops the lines logged after the checkpoint it
resumes from, so each step appears once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

from ..jsonl import JsonlAppender, iter_jsonl, write_jsonl

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_notice_shown = False


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Writes metrics on the main process; on other ranks every call does nothing.

    `resume_step`: lines of an earlier run with a larger step are removed
    (they were logged after the checkpoint being resumed from).
    """

    def __init__(self, output_dir, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        _drop_records_after(self.path, resume_step)
        self._jsonl = JsonlAppender(self.path, fsync_every=16)
        if tensorboard:
            self._tb = _open_tensorboard(Path(output_dir) / TENSORBOARD_DIR, resume_step)

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {key: _plain(value) for key, value in metrics.items()}
        self._jsonl.write({"split": split, "step": int(step), "time": round(time.time(), 3),
                           **values})
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path, split: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl (a file or the run's output_dir), optionally one split."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = [r for _, r in iter_jsonl(path, tolerate_torn_tail=True)]
    return [r for r in records if split is None or r.get("split") == split]


def _plain(value):
    """A JSON-ready number: floats stay floats (NaN/inf become None: JSON has no NaN)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop_records_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    records = [r for _, r in iter_jsonl(path, tolerate_torn_tail=True)]
    kept = [r for r in records if not isinstance(r.get("step"), int) or r["step"] <= step]
    if len(kept) != len(records):
        write_jsonl(path, kept)


def _open_tensorboard(log_dir: Path, resume_step: int):
    global _notice_shown
    if not tensorboard_available():
        if not _notice_shown:
            logger.warning("tensorboard is not installed: metrics go to %s only "
                           "(pip install tensorboard for live curves)", METRICS_FILE)
            _notice_shown = True
        return None
    from torch.utils.tensorboard import SummaryWriter

    # purge_step hides events a killed run logged after the checkpoint we resume from.
    return SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)
