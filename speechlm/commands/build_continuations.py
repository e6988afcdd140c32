"""`speechlm build continuations --llm DIR --manifest M --out OUT`: BLSP stage-1 data."""

from __future__ import annotations

import argparse

HELP = ("BLSP stage 1: the text LLM's greedy continuation of every transcript of a manifest; "
        "resumable, shards over torchrun ranks")

_EXAMPLES = """\
examples:
  speechlm build continuations --llm zoo:llm_en_es --manifest embedded:en/train \\
      --out data/blsp/en_train_cont.jsonl
  torchrun --nproc_per_node 8 -m speechlm.cli build continuations \\
      --llm ~/models/Qwen2.5-7B-Instruct --template chat --manifest train.jsonl --out cont.jsonl
Each output line is the manifest record + `continuation` + `continuation_tokens`; skipped
records (empty transcript, prompt too long, empty continuation) go to OUT.skipped.jsonl.
Rerun the same command after an interruption: finished records are kept and skipped.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("--llm", required=True, metavar="DIR|zoo:NAME",
                        help="the text LLM: a transformers model directory or a zoo model "
                             "(e.g. zoo:llm_en_es)")
    parser.add_argument("--manifest", required=True, metavar="JSONL|embedded:LANG/SPLIT",
                        help="manifest whose `text` fields are continued (audio is not read)")
    parser.add_argument("--out", required=True, metavar="OUT.jsonl",
                        help="output JSONL (beside it: OUT.meta.json, OUT.skipped.jsonl)")
    parser.add_argument("--instruction", default=None, metavar="TEXT",
                        help="prompt instruction (default: BLSP's 'Continue the following text "
                             "in a coherent and engaging style with less than 40 words.')")
    parser.add_argument("--template", choices=("blsp", "chat"), default="blsp",
                        help="blsp: ###[Human]:... ###[Assistant]: (default); chat: the "
                             "tokenizer's chat template (instruct models)")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                        help="longest continuation in tokens (default 64)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: generate under bf16 autocast (2.5x faster on an AVX-512 CPU; "
                             "greedy outputs may differ from fp32)")
    parser.add_argument("--max-prompt-tokens", type=int, default=192, metavar="N",
                        help="skip records whose prompt is longer (default 192)")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N",
                        help="prompts per generate call (default 32)")
    add_rank_job_options(parser)


def add_rank_job_options(parser: argparse.ArgumentParser) -> None:
    """--device and --no-progress of a job that shards records over torchrun ranks."""
    parser.add_argument("--device", default="auto",
                        help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, cuda, "
                             "cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_rank_job(job) -> int:
    """Run `job()` (returning a summary), leave the process group it joined under torchrun,
    print the summary."""
    from speechlm.training import distributed

    try:
        summary = job()
    finally:
        distributed.cleanup()
    print(summary.summary())
    return 0


def run(args: argparse.Namespace) -> int:
    from speechlm.data.instructions import CONTINUE_INSTRUCTION
    from speechlm.pipelines.continuations import build_continuations

    return run_rank_job(lambda: build_continuations(
        args.llm, args.manifest, args.out,
        instruction=CONTINUE_INSTRUCTION if args.instruction is None else args.instruction,
        template=args.template, max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size,
        precision=args.precision,
        device=args.device, progress=not args.no_progress))
