"""Progress bars that stay readable in a log file.

On a terminal `progress_bar` is tqdm as usual. Off a terminal (CI, `nohup`, a
redirected log) tqdm would redraw its bar with carriage returns several times a
second: a long job's log becomes megabytes of one unreadable line. There the
bar prints the same numbers as a plain line at most every
`$SPEECHLM_PROGRESS_INTERVAL` seconds (default 30), plus its first and last state.
"""

from __future__ import annotations

import os
import sys

DEFAULT_INTERVAL_S = 30.0


class _LineWriter:
    """A stream for tqdm that turns each redraw into one line (no carriage returns)."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        done = _work_done(line)
        if line and done != self.last:  # closing redraws the last state once more
            self.stream.write(line + "\n")
            self.last = done

    def flush(self) -> None:
        self.stream.flush()


def _work_done(line: str) -> str:
    """The part of a bar that counts work: "desc: 40%" and "4/10" of "desc: 40%|####  | 4/10
    [00:02<00:03, 1.9it/s]", without the bar itself, whose width changes with the length of
    the rate beside it."""
    head, bar, rest = line.partition("|")
    if not bar:
        return line.split(" [")[0]
    return head + "|" + rest.rpartition("|")[2].split(" [")[0]


def _interval() -> float:
    value = os.environ.get("SPEECHLM_PROGRESS_INTERVAL", "")
    try:
        return max(float(value), 0.0) if value else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def progress_bar(iterable=None, *, file=None, **kwargs):
    """`tqdm(iterable, **kwargs)` writing to `file` (default stderr), one line per update
    every few seconds when `file` is not a terminal."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if hasattr(stream, "isatty") and stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)

    class LogLines(tqdm):
        # a new postfix or description waits for the next line instead of forcing one
        def set_postfix(self, ordered_dict=None, refresh=True, **kw):
            super().set_postfix(ordered_dict, refresh=False, **kw)

        def set_description(self, desc=None, refresh=True):
            super().set_description(desc, refresh=False)

    kwargs.pop("dynamic_ncols", None)
    kwargs.update(file=_LineWriter(stream), mininterval=_interval(), ncols=100, ascii=True)
    return LogLines(iterable, **kwargs)
