#!/usr/bin/env python
"""Run the speed/memory benchmarks and print a Markdown table for the README.

Each module in tools/benchmarks/ exposes `run(quick=False) -> list[dict]` with
keys benchmark, metric, value, baseline, ratio, note. Ours and the baseline
are always measured in the same process, so ratios are comparable across
machines even when absolute numbers are not.

    python tools/bench.py                 # all benchmarks
    python tools/bench.py logmel sampler_padding --quick
    python tools/bench.py --json results.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def available() -> list[str]:
    return sorted(p.stem for p in (HERE / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")

    rows = []
    for name in names:
        module = importlib.import_module(f"tools.benchmarks.{name}")
        start = time.perf_counter()
        result = module.run(quick=args.quick)
        print(f"[{name}] {time.perf_counter() - start:.1f}s", file=sys.stderr)
        rows.extend(result)

    print(f"Machine: {platform.processor() or platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}{' (quick)' if args.quick else ''}\n")
    print("| benchmark | metric | ours | baseline | ratio | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['metric']} | {fmt(r['value'])} | {fmt(r.get('baseline'))} "
              f"| {fmt(r.get('ratio'))} | {r.get('note', '')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
