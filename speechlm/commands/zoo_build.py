"""`speechlm zoo build NAME...`: train embedded zoo models into the cache (once)."""

from __future__ import annotations

import argparse

HELP = "train embedded zoo models into the cache (a no-op for those already built)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="zoo model(s); see zoo list")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--retrain", action="store_true",
                        help="train here even when the package ships a build of the model "
                             "(reproduces the shipped one)")


def run(args: argparse.Namespace) -> int:
    from .. import zoo

    for name in args.names:
        zoo.check_name(name)  # unknown names fail before anything trains
    for name in args.names:
        model = zoo.ensure(name, progress=not args.no_progress, retrain=args.retrain)
        verb = ("installed from its shipped build" if model.shipped else "trained") \
            if model.newly_trained else "already built"
        print(f"{name}: {verb}: {model.model_dir}")
    return 0
