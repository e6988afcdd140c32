"""`speechlm build tokenize --tokenizer DIR --manifest M --out UNITS.jsonl`: speech units."""

from __future__ import annotations

import argparse

from .build_continuations import add_rank_job_options, run_rank_job

HELP = ("speech units of every recording of a manifest, with a trained speech tokenizer; "
        "resumable, shards over torchrun ranks")

_EXAMPLES = """\
examples:
  speechlm build tokenize --tokenizer runs/tiny/speech_tokenizer/final \\
      --manifest embedded:en/train --out data/units/en_train.jsonl
  torchrun --nproc_per_node 8 -m speechlm.cli build tokenize --tokenizer runs/tok/final \\
      --manifest train.jsonl --out units.jsonl --batch-duration 600
Each output line is the manifest record + `units`, `tokenizer` (its identity), `num_codes`,
`frame_rate`; skipped records (unreadable audio, shorter than one unit) go to
UNITS.jsonl.skipped.jsonl. Rerun the same command after an interruption: finished records are
kept and skipped.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="a trained speech tokenizer (output_dir/final of a "
                             "`task: speech_tokenizer` recipe)")
    parser.add_argument("--manifest", required=True, metavar="JSONL|embedded:LANG/SPLIT",
                        help="manifest whose audio is tokenized")
    parser.add_argument("--out", required=True, metavar="UNITS.jsonl",
                        help="output JSONL (beside it: .meta.json, .skipped.jsonl)")
    parser.add_argument("--batch-duration", type=float, default=120.0, metavar="SECONDS",
                        help="padded audio seconds per batch (default 120)")
    add_rank_job_options(parser)


def run(args: argparse.Namespace) -> int:
    from speechlm.pipelines.tokenize import build_tokenize

    return run_rank_job(lambda: build_tokenize(
        args.tokenizer, args.manifest, args.out, batch_duration=args.batch_duration,
        device=args.device, progress=not args.no_progress))
