"""`speechlm build clean-text IN... --out DIR`: clean a text corpus on datatrove."""

from __future__ import annotations

import argparse

HELP = ("clean text corpora on datatrove: Unicode repair, language, Gopher/C4/FineWeb filters, "
        "exact and MinHash dedup, sentences for TTS; resumable, with a report")

_EXAMPLES = """\
examples:
  speechlm build clean-text books/ web.jsonl.gz --out data/clean
  speechlm build clean-text corpus/ --out data/clean --config corpus.yaml --tasks 8 --workers 2
  speechlm build clean-text corpus/ --out data/clean --set language.keep=[en,es] --set c4.enabled=false
  speechlm build clean-text --report-only --out data/clean
Inputs: files or directories of plain text (a file is one document; input.text_unit: paragraph
or line splits it), JSONL with a 'text' field, and .gz of both. Output: DIR/clean/*.jsonl.gz
(id, text, language, sentences, ...), DIR/removed/STAGE/ and DIR/report.md. Rerun the same
command after an interruption: finished tasks are skipped. Config keys: docs/corpus.md.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("inputs", nargs="*", metavar="IN",
                        help="text or JSONL files (.gz ok) or directories of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--config", metavar="YAML",
                        help="stage settings (default: every stage on, datatrove's thresholds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides", help="override a config key, e.g. near_dedup.enabled="
                                               "false (repeatable)")
    parser.add_argument("--tasks", type=int, metavar="N",
                        help="input shards (executor.tasks); fixed for the life of --out")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="tasks run at once (executor.workers)")
    parser.add_argument("--report-only", action="store_true",
                        help="only (re)write the report of the run in --out (e.g. after Slurm)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _require_corpus_extra() -> None:
    import importlib.util

    from speechlm.errors import SpeechLMError

    missing = [m for m in ("datatrove", "ftfy", "py3langid", "num2words", "spacy", "orjson")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SpeechLMError(f"speechlm build clean-text needs {', '.join(missing)}: "
                            "pip install 'speechlm[corpus]'")


def run(args: argparse.Namespace) -> int:
    from speechlm.errors import SpeechLMError

    _require_corpus_extra()
    from speechlm.corpus.run import report_only, run_clean_text

    if args.report_only:
        report = report_only(args.out)
    else:
        if not args.inputs:
            raise SpeechLMError("no input: pass text/JSONL files or directories (IN ...)")
        from speechlm.corpus.config import load_clean_text_config

        overrides = list(args.overrides)
        if args.tasks is not None:
            overrides.append(f"executor.tasks={args.tasks}")
        if args.workers is not None:
            overrides.append(f"executor.workers={args.workers}")
        cfg = load_clean_text_config(args.config, overrides)
        report = run_clean_text(args.inputs, args.out, cfg, progress=not args.no_progress)
        if report is None:
            return 0
    inp, out = report["input"], report["output"]
    print(f"{inp['documents']} documents in ({inp['bad_input']} bad inputs skipped), "
          f"{out['documents']} kept ({out['docs_kept_fraction']:.1%}, "
          f"{out['chars_kept_fraction']:.1%} of characters)")
    for stage in report["stages"]:
        if "docs_changed" in stage:
            print(f"  {stage['stage']:<18} changed {stage['docs_changed']:>8} of "
                  f"{stage['docs_in']:>8}")
            continue
        print(f"  {stage['stage']:<18} removed {stage['docs_removed']:>8} of "
              f"{stage['docs_in']:>8} ({stage['docs_removed_fraction']:.1%})")
    print(f"report: {args.out}/report.md")
    return 0
