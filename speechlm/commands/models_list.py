"""`speechlm models list`: every model a name resolves to, and where it comes from."""

from __future__ import annotations

import argparse

HELP = "list named models: pretrained packages (models:NAME) and the embedded zoo (zoo:NAME)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    import json

    from .. import zoo
    from ..pretrained import packages

    rows = [packages.describe(model) for model in packages.REGISTRY.values()]
    for name, (_, what) in zoo.MEMBERS.items():
        built = zoo.cached(name)
        rows.append({"name": name, "source": "zoo", "what": what,
                     "model_dir": str(built.model_dir) if built else None,
                     "recipe": str(zoo.recipe_path(name))})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("pretrained models from packages (name them models:NAME, or NAME):")
    for row in (r for r in rows if r["source"] == "package"):
        if row["model_dir"]:
            state = row["model_dir"]
        elif row["installed"]:
            state = f"installed, not assembled yet (speechlm models get {row['name']})"
        else:
            state = f"not installed: {row['install']}"
        origin = ", ".join(f"{k}=={v}" for k, v in row["packages"].items())
        print(f"  {row['name']:<22} {row['what']}\n  {'':<22} {row['licence']}; {origin}; "
              f"from {row['upstream']}\n  {'':<22} {state}")
    print("embedded zoo, trained here on first use (name them zoo:NAME):")
    for row in (r for r in rows if r["source"] == "zoo"):
        state = row["model_dir"] or f"not built (speechlm zoo build {row['name']})"
        print(f"  {row['name']:<22} {row['what']}\n  {'':<22} {state}")
    print("any local transformers directory, or a hub id already in the Hugging Face cache, "
          "works as well")
    return 0
