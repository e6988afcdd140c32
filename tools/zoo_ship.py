#!/usr/bin/env python
"""Write the cached, trained build of zoo members into the package as shipped builds.

    python tools/zoo_ship.py blsp_whisper_smollm2 [...]   # -> speechlm/resources/zoo/shipped/NAME

A shipped build holds the runner's SHIPPED_FILES (trained weights only: an
adapter, LoRA), the run's results.json and metrics.jsonl (its training log), and
shipped.json (the recipe's run-directory name, which must still match for
`speechlm.zoo.ensure` to install it, and the command that reproduces it). Build
the member by training first: `speechlm zoo build --retrain NAME`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--dest", type=Path, default=ROOT / "speechlm/resources/zoo/shipped")
    args = parser.parse_args(argv)
    from speechlm import zoo

    for name in args.names:
        dest = zoo.ship(name, args.dest)
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        print(f"{name}: {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
