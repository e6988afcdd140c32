"""`speechlm convert gguf FILE OUT`: a GGUF causal LM (llama.cpp format) as a transformers dir."""

from __future__ import annotations

import argparse

HELP = "convert a GGUF causal LM (llama.cpp format, any quantization) to a transformers directory"

DTYPES = ("float32", "bfloat16", "float16")  # speechlm.pretrained.gguf_llm.DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="the .gguf file")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the dequantized weights (default: float32)")


def run(args: argparse.Namespace) -> int:
    import json

    from ..pretrained.gguf_llm import SOURCE_FILE, convert_gguf

    out = convert_gguf(args.file, args.out, dtype=args.dtype)
    source = json.loads((out / SOURCE_FILE).read_text(encoding="utf-8"))
    quantization = ", ".join(f"{kind} x{count}" for kind, count in source["quantization"].items())
    print(f"{out}: {source['architecture']} model in {source['dtype']} from {args.file} "
          f"(tensors: {quantization}); use it as a transformers directory, e.g. llm_path: {out}")
    return 0
