"""`speechlm data stats MANIFEST`: size, hours, duration and text-length statistics."""

from __future__ import annotations

import argparse

HELP = "summarize a manifest: count, hours, durations, languages, speakers, text lengths"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help=".jsonl or .jsonl.gz manifest")
    parser.add_argument("--fill-durations", action="store_true",
                        help="first read missing durations from the audio headers and save them "
                             "in the manifest (rewritten atomically; later runs reuse them)")
    parser.add_argument("--jobs", type=int, default=4, metavar="N",
                        help="threads reading audio headers with --fill-durations (default 4)")
    parser.add_argument("--top", type=int, default=10, metavar="N",
                        help="languages and speakers to list (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from speechlm.data.manifest import fill_durations
    from speechlm.data.stats import format_stats, manifest_stats

    if args.fill_durations:
        filled = fill_durations(args.manifest, jobs=args.jobs)
        if not args.json:
            print(f"filled {filled} duration(s) in {args.manifest}")
    stats = manifest_stats(args.manifest, top=args.top)
    if args.json:
        print(json.dumps(stats.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(format_stats(stats))
    return 0
