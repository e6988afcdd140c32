"""`speechlm eval --hyp HYPS.jsonl --ref MANIFEST.jsonl [--metric wer cer ...]`: score by id."""

from __future__ import annotations

import argparse

HELP = "score hypotheses (JSONL with id, text) against a reference manifest: WER, CER, BLEU, ..."

METRIC_NAMES = ("wer", "cer", "bleu", "chrf", "exact_match", "accuracy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hyp", required=True, metavar="JSONL",
                        help="hypotheses: one {id, text} per line (speechlm infer --out)")
    parser.add_argument("--ref", required=True, metavar="MANIFEST",
                        help="reference manifest (or embedded:LANG/SPLIT)")
    parser.add_argument("--metric", nargs="+", choices=METRIC_NAMES, default=["wer", "cer"],
                        help="metrics to compute (default: wer cer)")
    parser.add_argument("--lang", help="normalisation language for both sides (default: each "
                                       "reference's lang field)")
    parser.add_argument("--ref-field", default="text",
                        help="reference field to score against (e.g. translation for BLEU)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="compare the texts as written (only whitespace collapsed)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out references without a hypothesis (default: score them "
                             "as empty hypotheses)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..eval.metrics import METRICS, score_manifest
    from ..recipes.sources import resolve_if_embedded

    args.ref = resolve_if_embedded(args.ref, progress=False)

    result = score_manifest(args.hyp, args.ref, args.metric, lang=args.lang,
                            ref_field=args.ref_field, normalize=not args.no_normalize,
                            missing="skip" if args.skip_missing else "empty")
    if args.json:
        out = result.to_dict()
        out["missing"], out["extra"] = out["missing"][:100], out["extra"][:100]
        print(json.dumps(out, ensure_ascii=False, indent=1))
    else:
        print(f"{'metric':<12} {'value':>8}")
        for name, value in result.scores.items():
            percent = name in ("wer", "cer", "exact_match", "accuracy")
            shown = f"{100 * value:.2f}%" if percent else f"{value:.2f}"
            better = "higher is better" if METRICS[name][2] else "lower is better"
            print(f"{name:<12} {shown:>8}   ({better})")
        print(f"{'utterances':<12} {result.num_scored:>8}")
    if result.missing:
        how = "left out" if args.skip_missing else "scored as empty hypotheses"
        print(f"speechlm: warning: {len(result.missing)} reference id(s) have no hypothesis "
              f"({how}), e.g. {', '.join(result.missing[:3])}", file=sys.stderr)
    if result.extra:
        print(f"speechlm: warning: {len(result.extra)} hypothesis id(s) are not in the "
              f"reference (ignored), e.g. {', '.join(result.extra[:3])}", file=sys.stderr)
    return 0
