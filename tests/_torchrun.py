"""Run a test worker script under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_workers(worker: Path, out: Path, nproc: int = 2, timeout: int = 240) -> Path:
    """`torchrun --standalone --nproc_per_node NPROC WORKER OUT`; fails the test with the
    workers' output tails when they fail. Returns `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), str(worker), str(out)],
        cwd=worker.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
