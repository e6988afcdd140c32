"""`speechlm transfer`: the zero-shot transfer table for saved SpeechLMs on any manifest.

    speechlm transfer --model blsp=zoo:blsp_en --model mine=runs/blsp/final \\
        --manifest voices.jsonl --tasks repeat,translate_es --untrained --out hyps.jsonl

The instructions the LLM learned in text ("repeat", "translate to Spanish", ...) are asked
about each record's speech, next to the cascades: the LLM reading the reference text, and
the encoder checkpoint's own transcript when it is an ASR model (CTC, Whisper). The same table as the
BLSP and InSerter recipes print, for models and speech of your choice (e.g. seen voices
reading unseen text, to tell the encoder's limits from the adapter's).
"""

from __future__ import annotations

import argparse

HELP = "zero-shot transfer table (text instruction, spoken input) of saved SpeechLMs on a manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..inference.generate_jsonl import WEIGHT_DTYPES

    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a saved SpeechLM (a directory or zoo:NAME), named in the table; "
                             "repeat for several. The last one's LLM reads the cascades")
    parser.add_argument("--manifest", required=True,
                        help="records with audio and text (translate_es also needs "
                             "`translation`); a path or embedded:LANG/SPLIT")
    parser.add_argument("--tasks", default="repeat,translate_es",
                        help="comma-separated tasks (default repeat,translate_es)")
    parser.add_argument("--items", type=int, default=100, help="first N records (default 100)")
    parser.add_argument("--untrained", action="store_true",
                        help="add the first model's adapter freshly initialised (seed 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32",
                        help="weights of each model's encoder and LLM (bfloat16 halves GPU "
                             "memory)")
    parser.add_argument("--out", help="write every hypothesis here (JSONL)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def parse_models(specs: list[str]) -> dict[str, str]:
    """NAME=DIR pairs in order; a bare DIR is named after itself."""
    from ..errors import ConfigError

    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = spec, spec
        if not name or not path:
            raise ConfigError(f"--model {spec!r}: expected NAME=DIR (or a directory)")
        if name in models:
            raise ConfigError(f"--model: the name {name!r} is given twice; name each model "
                              "differently (NAME=DIR)")
        models[name] = path
    return models


def run(args: argparse.Namespace) -> int:
    import json

    from ..jsonl import write_jsonl
    from ..models.speech_lm import SpeechLM
    from ..pretrained.resolve import resolve_model_dir
    from ..recipes.blsp import _manifest_records
    from ..recipes.blsp_eval import format_transfer_table, systems_table
    from ..recipes.sources import resolve_manifest

    specs = parse_models(args.model)
    records = _manifest_records(resolve_manifest(args.manifest), args.items)
    import torch

    dtype = getattr(torch, args.dtype)
    loaded = {name: SpeechLM.from_pretrained(resolve_model_dir(path, expect=None),
                                             dtype=dtype).eval()
              for name, path in specs.items()}
    rows: list[dict] = []
    table = systems_table(loaded, records, [t for t in args.tasks.split(",") if t],
                          untrained=args.untrained, batch_size=args.batch_size, hyps_out=rows)
    if args.out:
        write_jsonl(args.out, rows)
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        print(f"zero-shot transfer on {len(records)} utterances of {args.manifest} "
              "(WER/CER %, BLEU/chrF):")
        print(format_transfer_table(table))
    return 0
