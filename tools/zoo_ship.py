#!/usr/bin/env python
"""Write the cached, trained build of zoo members into the package as shipped builds.

    python tools/zoo_ship.py blsp_whisper_smollm2 [...]   # -> speechlm/resources/zoo/shipped/NAME

    python tools/zoo_ship.py --adopt smollm2_verses=runs/text/smollm2_135m_verse_skills
        # a finished `speechlm train` run of exactly the member's recipe becomes its build

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


IGNORED = {("train", "output_dir"), ("train", "resume"), ("train", "progress")}


def adopt(name: str, run_dir: Path) -> Path:
    """Copy a finished run of `name`'s exact recipe (its config.yaml equal to the member's
    recipe but for where it ran and how it showed progress) into the zoo cache as its build."""
    import json
    import shutil
    import time

    import yaml

    from speechlm import zoo
    from speechlm.config import config_to_dict
    from speechlm.recipes import load_recipe

    _, config = load_recipe(zoo.recipe_path(name))
    wanted = config_to_dict(config)
    ran = yaml.safe_load((run_dir / "config.yaml").read_text())
    for section, key in IGNORED:
        wanted.get(section, {}).pop(key, None)
        ran.get(section, {}).pop(key, None)
    if wanted != ran:
        diff = sorted(f"{s}.{k}" for s in wanted for k in wanted[s] if isinstance(wanted[s], dict)
                      and wanted[s].get(k) != (ran.get(s) or {}).get(k))
        raise SystemExit(f"{run_dir} was not trained with {name}'s recipe (differs in: "
                         f"{', '.join(diff) or 'top-level fields'})")
    results = json.loads((run_dir / "results.json").read_text())
    target = zoo.zoo_run_dir(name)
    if target.exists():
        raise SystemExit(f"{target} exists already; remove it to adopt {run_dir}")
    shutil.copytree(run_dir, target)
    seconds = results.get("train", {}).get("wall_seconds") or results["train"]["train_seconds"]
    (target / "zoo.json").write_text(json.dumps({"name": name, "seconds": seconds,
                                                 "finished": time.time(), "shipped": False,
                                                 "adopted_from": str(run_dir)}))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--adopt", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="make a finished run of the member's exact recipe its cached build")
    parser.add_argument("--dest", type=Path, default=ROOT / "speechlm/resources/zoo/shipped")
    args = parser.parse_args(argv)
    from speechlm import zoo

    for spec in args.adopt:
        name, _, run_dir = spec.partition("=")
        print(f"{name}: adopted {run_dir} as {adopt(name, Path(run_dir))}")
    for name in args.names:
        dest = zoo.ship(name, args.dest)
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        print(f"{name}: {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
