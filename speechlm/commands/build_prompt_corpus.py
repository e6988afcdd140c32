"""`speechlm build prompt-corpus IN... --out FILE`: PCP's prompt-templated corpus."""

from __future__ import annotations

import argparse

HELP = ("put unlabeled domain text into the recipes' instruction templates (PCP): continued "
        "training data for the LLM before alignment")

_EXAMPLES = """\
examples:
  speechlm build prompt-corpus data/clean/clean/ --out data/pcp.jsonl
  speechlm build prompt-corpus notes.txt verses.jsonl --tasks continue,repeat,translate_es \\
      --out data/pcp.jsonl
Inputs: plain text (documents are blank-line-separated blocks), JSONL (.gz ok) with
`sentences` (as `speechlm build clean-text` writes) or `text`, optionally `translation`.
Tasks: continue (a sentence, then the next ones of the same document: BLSP's stage-1 prompt),
repeat (the ASR prompt), translate_es (records with a translation). The output trains the LLM
with `task: text_skills` and `data.prompt_corpus: FILE` before BLSP.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("inputs", nargs="+", metavar="IN",
                        help="text or JSONL files (.gz ok) or directories of them")
    parser.add_argument("--out", required=True, metavar="FILE", help="output JSONL")
    parser.add_argument("--tasks", default="continue,repeat",
                        help="comma-separated: continue, repeat, translate_es "
                             "(default continue,repeat)")
    parser.add_argument("--max-input-words", type=int, default=40)
    parser.add_argument("--max-response-words", type=int, default=39,
                        help="continuations stay under 40 words, as BLSP's prompt asks")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from speechlm.pipelines.prompt_corpus import build_prompt_corpus

    summary = build_prompt_corpus(args.inputs, args.out,
                                  tasks=[t for t in args.tasks.split(",") if t],
                                  max_input_words=args.max_input_words,
                                  max_response_words=args.max_response_words, seed=args.seed)
    print(f"{summary.summary()}; written to {args.out}")
    for line in summary.bad_lines[:10]:
        print(f"  skipped {line}")
    return 0
