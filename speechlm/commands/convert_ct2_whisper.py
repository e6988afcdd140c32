"""`speechlm convert ct2-whisper DIR OUT`: a faster-whisper / CTranslate2 Whisper directory
into a transformers Whisper directory."""

from __future__ import annotations

import argparse

HELP = "convert a faster-whisper (CTranslate2) Whisper directory into a transformers directory"

_EXAMPLES = """\
examples:
  speechlm convert ct2-whisper faster-whisper-base models/whisper-base
  speechlm convert ct2-whisper faster-whisper-small models/whisper-small --dtype float16
DIR holds model.bin, config.json and tokenizer.json (int8 models are dequantized).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("src", metavar="DIR", help="CTranslate2 Whisper directory (faster-whisper)")
    parser.add_argument("out", metavar="OUT", help="new transformers directory (must not exist)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (default float32)")


def run(args: argparse.Namespace) -> int:
    import json
    import time

    from ..pretrained.ct2_whisper import RECORD, convert_ct2_whisper

    start = time.perf_counter()
    out = convert_ct2_whisper(args.src, args.out, dtype=args.dtype)
    record = json.loads((out / RECORD).read_text(encoding="utf-8"))
    kind = "multilingual" if record["multilingual"] else "English-only"
    print(f"converted {args.src} ({kind} Whisper, {record['stored_dtype']} weights) to {out} "
          f"({args.dtype}) in {time.perf_counter() - start:.1f}s")
    for note in record["notes"]:
        print(f"  note: {note}")
    print("use it:")
    if _infer_runs(out):
        print(f"  speechlm infer --model {out} audio.wav")
    print(f"  as a recipe's speech encoder: model.encoder_path={out}\n"
          f"  in Python: WhisperForConditionalGeneration.from_pretrained('{out}') and "
          f"WhisperProcessor.from_pretrained('{out}')")
    return 0


def _infer_runs(model_dir) -> bool:
    """Whether `speechlm infer` has a runner for this model directory (asked, not assumed)."""
    from ..errors import SpeechLMError
    from .infer import detect_model_kind

    try:
        detect_model_kind(model_dir)
    except SpeechLMError:
        return False
    return True
