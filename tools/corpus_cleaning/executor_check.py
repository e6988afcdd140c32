#!/usr/bin/env python
"""Check that clean-text on Ray or Slurm writes what the local executor writes.

    python tools/corpus_cleaning/executor_check.py IN... --out DIR --kind ray
    python tools/corpus_cleaning/executor_check.py IN... --out DIR --kind slurm \
        --partition cpu [--venv .venv/bin/activate]

Cleans IN with the local executor into DIR/local and with the chosen executor into
DIR/KIND, both with --tasks shards (default 2), then compares the kept documents record
for record and the two reports' counts, and prints one JSON line. Ray runs in this process
(RAY_ADDRESS picks a running cluster; without it Ray starts one here); for Slurm the
command submits the chain of jobs and this script waits until squeue no longer lists
them. A rerun on the same DIR resumes both runs (datatrove skips completed tasks).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def kept_records(out: Path) -> list[dict]:
    records = []
    for path in sorted((out / "clean").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def wait_for_slurm(out: Path, job_name: str, poll_s: float = 5.0) -> None:
    """Until squeue lists none of this run's jobs (named JOB_NAME-<stage>)."""
    stages = json.loads((out / "_work" / "jobs.json").read_text(encoding="utf-8"))
    names = ",".join(f"{job_name}-{stage}" for stage in stages)
    while subprocess.run(["squeue", "-h", "-n", names], capture_output=True, text=True,
                         check=True).stdout.strip():
        time.sleep(poll_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kind", required=True, choices=["ray", "slurm"])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--partition", default="")
    parser.add_argument("--venv", default=None, help="activate script the Slurm jobs source")
    args = parser.parse_args(argv)

    from speechlm.corpus.config import load_clean_text_config
    from speechlm.corpus.run import report_only, run_clean_text

    def config(kind: str):
        overrides = [f"executor.tasks={args.tasks}", f"executor.workers={args.tasks}",
                     f"executor.kind={kind}"]
        if kind == "slurm":
            overrides.append(f"executor.slurm.partition={args.partition}")
            if args.venv:
                overrides.append(f"executor.slurm.venv_path={Path(args.venv).resolve()}")
        return load_clean_text_config(None, overrides)

    start = time.perf_counter()
    local = run_clean_text(args.inputs, args.out / "local", config("local"), progress=False)
    local_s = time.perf_counter() - start
    start = time.perf_counter()
    cfg = config(args.kind)
    other = run_clean_text(args.inputs, args.out / args.kind, cfg, progress=False)
    if args.kind == "slurm":
        wait_for_slurm(args.out / args.kind, cfg.executor.slurm.job_name)
        other = report_only(args.out / args.kind)
    other_s = time.perf_counter() - start
    a, b = kept_records(args.out / "local"), kept_records(args.out / args.kind)
    result = {"kind": args.kind, "tasks": args.tasks, "kept_local": len(a),
              "kept_other": len(b), "same_records": a == b,
              "same_counts": (local["input"], local["output"]) == (other["input"],
                                                                   other["output"]),
              "local_s": round(local_s, 1), "other_s": round(other_s, 1)}
    print(json.dumps(result))
    return 0 if result["same_records"] and result["same_counts"] else 1


if __name__ == "__main__":
    sys.exit(main())
