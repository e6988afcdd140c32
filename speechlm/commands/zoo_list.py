"""`speechlm zoo list`: the embedded zoo's models, and where the built ones are."""

from __future__ import annotations

import argparse

HELP = "list the embedded zoo's models: built or not, where, held-out scores"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from .. import zoo

    rows = []
    for name, (_, what) in zoo.MEMBERS.items():
        built = zoo.cached(name)
        rows.append({"name": name, "what": what, "built": built is not None,
                     "model_dir": str(built.model_dir) if built else None,
                     "recipe": str(zoo.recipe_path(name))})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        state = row["model_dir"] if row["built"] else "not built (speechlm zoo build " \
                                                        f"{row['name']}, or speechlm demo)"
        print(f"{row['name']:<10} {row['what']}\n{'':<10} {state}")
    return 0
