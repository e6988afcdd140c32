"""The `speechlm` command.

Each subcommand lives in its own module under `speechlm.commands` with
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int | None`.
Those modules import only the standard library at top level; the work they
call is imported inside `run`, so `speechlm --help` never loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# (group, name) -> module; group None means a top-level command.
COMMANDS: dict[tuple[str | None, str], str] = {
    (None, "demo"): "speechlm.commands.demo",
    (None, "train"): "speechlm.commands.train",
    (None, "infer"): "speechlm.commands.infer",
    (None, "eval"): "speechlm.commands.eval",
    (None, "transfer"): "speechlm.commands.transfer",
    (None, "serve"): "speechlm.commands.serve",
    ("data", "validate"): "speechlm.commands.data_validate",
    ("data", "stats"): "speechlm.commands.data_stats",
    ("data", "import"): "speechlm.commands.data_import",
    ("build", "synth"): "speechlm.commands.build_synth",
    ("build", "lm"): "speechlm.commands.build_lm",
    ("build", "segment"): "speechlm.commands.build_segment",
    ("build", "continuations"): "speechlm.commands.build_continuations",
    ("build", "inserter"): "speechlm.commands.build_inserter",
    ("build", "tokenize"): "speechlm.commands.build_tokenize",
    ("build", "interleave"): "speechlm.commands.build_interleave",
    ("build", "clean-text"): "speechlm.commands.build_clean_text",
    ("build", "prompt-corpus"): "speechlm.commands.build_prompt_corpus",
    ("tune", "lm"): "speechlm.commands.tune_lm",
    ("models", "list"): "speechlm.commands.models_list",
    ("models", "get"): "speechlm.commands.models_get",
    ("convert", "ct2-whisper"): "speechlm.commands.convert_ct2_whisper",
    ("convert", "gguf"): "speechlm.commands.convert_gguf",
    ("convert", "fsdp"): "speechlm.commands.convert_fsdp",
    ("zoo", "list"): "speechlm.commands.zoo_list",
    ("zoo", "build"): "speechlm.commands.zoo_build",
}

GROUP_HELP = {
    "data": "inspect, validate and import manifests",
    "build": "offline data jobs (synthesis, n-gram LM, segmentation, BLSP continuations, InSerter "
             "samples, GLM-4-Voice interleaved sequences, text corpus cleaning, PCP prompt corpora)",
    "tune": "tune decoding settings on a dev set",
    "models": "models by name: pretrained packages, the zoo, local directories",
    "convert": "convert checkpoints of other formats (CTranslate2 Whisper, GGUF, sharded FSDP "
               "checkpoints) to transformers directories",
    "zoo": "the embedded zoo: models the toolkit trains itself on the embedded corpus",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechlm",
        description="Speech-text language models: data, training, inference, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"speechlm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for (group, name), module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        if group is None:
            sub = top.add_parser(name, help=module.HELP, description=module.HELP)
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group])
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                                  required=True)
            sub = groups[group].add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # a long job's progress reaches its log line by line, not when a buffer fills
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        rc = args._run(args)
    except KeyboardInterrupt:
        print("speechlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure is one line unless --debug
        from .errors import SpeechLMError

        if args.debug:
            raise
        from .jsonl import write_failure

        if isinstance(e, SpeechLMError):
            print(f"speechlm: error: {e}", file=sys.stderr)
        elif (detail := write_failure(e)) is not None:  # a writer that names no output
            print(f"speechlm: error: cannot write an output ({detail}); free space on that "
                  "disk (or point the output at another) and rerun", file=sys.stderr)
        elif isinstance(e, OSError):
            print(f"speechlm: error: {e}", file=sys.stderr)
        else:
            print(f"speechlm: error: {type(e).__name__}: {e} (this looks like a bug; "
                  "rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
