"""`speechlm build interleave --corpus TEXT --t2u DIR --llm DIR --out DIR`: GLM-4-Voice-style
synthetic interleaved pre-training data (text spans replaced by T2U speech units), packed into
fixed-length token sequences; sharded, resumable."""

from __future__ import annotations

import argparse

from .build_synth import _int_or_range

HELP = ("GLM-4-Voice interleaved data: corpus text with spans turned into speech units by a "
        "text-to-token model, packed into LLM token sequences; sharded, resumable")

_EXAMPLES = """\
examples:
  speechlm build interleave --corpus embedded:en --t2u runs/t2u/final --llm models/qwen2.5-1.5b \\
      --out data/interleaved
  speechlm build interleave --corpus books.jsonl --t2u runs/t2u/final --llm models/llama \\
      --speech-share 0.4 --span-words 8:32 --seq-len 2048 --out data/il_2k
Rerun the same command after an interruption: complete shards are kept, the rest rewritten.
The shards hold ids of the LLM tokenizer extended with <|audio_i|> tokens (unit_vocab.json).
"""


def _span_range(text: str) -> tuple[int, int]:
    value = _int_or_range(text)
    return value if isinstance(value, tuple) else (value, value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("--corpus", required=True, metavar="TEXT",
                        help="text file (one document per line), JSONL with a 'text' field, or "
                             "embedded:en / embedded:es")
    parser.add_argument("--t2u", required=True, metavar="DIR",
                        help="text-to-token model directory or zoo:t2u_en (speech units for text)")
    parser.add_argument("--llm", required=True, metavar="DIR",
                        help="the LLM (or just its tokenizer) the data is for: a directory or zoo:NAME")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (shard-*.npy + .json, interleave.json, "
                             "unit_vocab.json)")
    parser.add_argument("--speech-share", type=float, default=0.3, metavar="P",
                        help="probability that a span becomes speech (default 0.3)")
    parser.add_argument("--span-words", type=_span_range, default=(4, 24), metavar="LOW:HIGH",
                        help="words per span, drawn per span (default 4:24)")
    parser.add_argument("--seq-len", type=int, default=512, metavar="N",
                        help="token ids per packed sequence (default 512)")
    parser.add_argument("--docs-per-shard", type=int, default=2000, metavar="N",
                        help="corpus documents per output shard (default 2000)")
    parser.add_argument("--t2u-batch", type=int, default=64, metavar="N",
                        help="texts per T2U generate call (default 64)")
    parser.add_argument("--t2u-method", metavar="NAME",
                        help="the T2U's decoder (e.g. ar or maskgit; default: the model's own)")
    parser.add_argument("--t2u-steps", type=int, metavar="N",
                        help="a MaskGIT T2U's iterations (default: the model's own; on the zoo's "
                             "t2u_en 1-2 read back as well as 16, 6-9x faster)")
    parser.add_argument("--device", metavar="DEV", help="device of the T2U (e.g. cuda; default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the spans and their choice")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:

    from speechlm.pipelines.interleave import InterleaveSettings, build_interleave

    settings = InterleaveSettings(speech_share=args.speech_share, span_words=args.span_words,
                                  seq_len=args.seq_len, docs_per_shard=args.docs_per_shard,
                                  seed=args.seed)
    from speechlm.pretrained.resolve import resolve_model_dir

    paths = {}
    for flag, spec in (("--t2u", args.t2u), ("--llm", args.llm)):
        paths[flag] = resolve_model_dir(spec, what=f"{flag} model", expect=None,
                                        progress=not args.no_progress)  # zoo:NAME too

    from transformers import AutoTokenizer

    from speechlm.models.text_to_token import load_text_to_token

    tokenizer = AutoTokenizer.from_pretrained(paths["--llm"])
    t2u = load_text_to_token(paths["--t2u"], **({"device": args.device} if args.device else {}))
    summary = build_interleave(args.corpus, args.out, t2u=t2u, tokenizer=tokenizer,
                               settings=settings, t2u_batch=args.t2u_batch,
                               t2u_method=args.t2u_method, t2u_steps=args.t2u_steps,
                               progress=not args.no_progress)
    print(summary.summary())
    return 0
