"""`speechlm data validate MANIFEST...`: list every problem as file:line: field: problem."""

from __future__ import annotations

import argparse

HELP = "check manifests: JSON, required fields, types, duplicate ids, audio files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifests", nargs="+", metavar="MANIFEST", help=".jsonl or .jsonl.gz manifest")
    parser.add_argument("--check-readable", action="store_true",
                        help="also open every audio file and check offset/duration against its length")
    parser.add_argument("--no-check-exists", action="store_true",
                        help="do not look at audio files at all (schema checks only)")
    parser.add_argument("--max-problems", type=int, default=50, metavar="N",
                        help="print at most N problems per manifest (default 50; 0 = all)")


def _line_number(message: str) -> int:
    """The line of a "file:line: field: ..." message (file names may hold colons)."""
    try:
        return int(message.split(": ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def run(args: argparse.Namespace) -> int:
    from speechlm.data.manifest import validate_manifest

    limit = args.max_problems if args.max_problems and args.max_problems > 0 else None
    total_problems = 0
    for manifest in args.manifests:
        report = validate_manifest(manifest, check_audio_exists=not args.no_check_exists,
                                   check_audio_readable=args.check_readable, max_problems=limit)
        for line in sorted(report.problems + report.warnings, key=_line_number):
            print(line)
        if report.n_problems > len(report.problems):
            print(f"{manifest}: ... {report.n_problems - len(report.problems)} more problem(s) "
                  "not shown (raise --max-problems)")
        print(report.summary())
        total_problems += report.n_problems + (report.n_lines == 0)
    if len(args.manifests) > 1:
        print(f"{len(args.manifests)} manifests, {total_problems} problem(s)")
    return 1 if total_problems else 0
