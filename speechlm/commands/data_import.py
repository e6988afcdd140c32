"""`speechlm data import FORMAT SOURCE --out MANIFEST`: a corpus layout -> a JSONL manifest."""

from __future__ import annotations

import argparse
import sys

HELP = "import LibriSpeech, Common Voice, Kaldi, HF datasets or lhotse data into a manifest"

_FORMAT_HELP = {
    "librispeech": ("LibriSpeech directory (a split such as train-clean-100, or its parent "
                    "with --split)"),
    "commonvoice": ("Common Voice language directory (clips/ + train.tsv, dev.tsv, ...; "
                    "--split picks the TSV, default train) or one .tsv file"),
    "kaldi": "Kaldi data directory (wav.scp, text, optional segments, utt2spk, utt2lang)",
    "hf": "Hugging Face dataset saved with save_to_disk (Dataset, or DatasetDict + --split)",
    "lhotse": ("lhotse cuts manifest (.jsonl/.jsonl.gz), a recordings or supervisions "
               "manifest, or a directory holding them"),
}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("source", metavar="SOURCE", help="the corpus to import (see the format's description)")
    common.add_argument("--out", required=True, metavar="MANIFEST",
                        help="output manifest (.jsonl or .jsonl.gz), written atomically")
    common.add_argument("--lang", help="set this lang on every record (overrides the corpus)")
    common.add_argument("--split", help="which split to import (where the format has several)")
    common.add_argument("--relative", action="store_true",
                        help="write audio paths relative to the manifest's directory")
    common.add_argument("--limit", type=int, metavar="N", help="stop after N records")
    common.add_argument("--strict", action="store_true",
                        help="stop at the first bad item instead of skipping and counting it")
    common.add_argument("--no-probe", dest="probe", action="store_false",
                        help="do not read audio headers (faster; durations only from the corpus)")
    common.add_argument("--allow-no-text", action="store_true",
                        help="keep utterances without a transcript (unlabelled audio)")
    common.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar")
    return common


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = _common_options()
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, description in _FORMAT_HELP.items():
        sub = formats.add_parser(name, parents=[common], help=description,
                                 description=f"SOURCE: {description}")
        if name == "commonvoice":
            sub.add_argument("--clips-dir", help="clips directory (default: clips/ beside the TSV)")
        if name in ("kaldi", "lhotse"):
            sub.add_argument("--audio-root", help="resolve relative audio paths against this "
                             "directory (default: current directory, then near the manifest)")
        if name == "lhotse":
            sub.add_argument("--recordings", help="lhotse recordings manifest (pair layout)")
            sub.add_argument("--supervisions", help="lhotse supervisions manifest (pair layout)")
        if name == "hf":
            sub.add_argument("--audio-column", default="audio", help="Audio column (default audio)")
            sub.add_argument("--text-column", help="transcript column (default: first of text, "
                             "sentence, transcription, normalized_text, transcript)")
            sub.add_argument("--id-column", help="id column (default: id if present, else "
                             "<split>-<row>)")
            sub.add_argument("--speaker-column", help="speaker column (default: speaker_id, "
                             "speaker or client_id if present)")
            sub.add_argument("--lang-column", help="language column (default: lang, language "
                             "or locale if present)")
            sub.add_argument("--audio-dir", help="where embedded audio bytes are written "
                             "(default: audio/ beside the manifest)")


def run(args: argparse.Namespace) -> int:
    from ..data.importers import format_options, import_dataset

    options = {"probe": args.probe, "allow_no_text": args.allow_no_text,
               "progress": args.progress}
    accepted = set(format_options(args.format))
    if "split" in accepted:
        options["split"] = args.split
    elif args.split:
        from ..errors import ConfigError

        raise ConfigError(f"--split does not apply to {args.format}; point SOURCE at the "
                          "split's own directory")
    for name in ("clips_dir", "audio_root", "recordings", "supervisions", "audio_column",
                 "text_column", "id_column", "speaker_column", "lang_column", "audio_dir"):
        if hasattr(args, name) and getattr(args, name) is not None:
            options[name] = getattr(args, name)
    report = import_dataset(args.format, args.source, args.out, lang=args.lang,
                            strict=args.strict, relative=args.relative, limit=args.limit,
                            **options)
    print(report.summary())
    if report.n_written == 0:
        print("speechlm: error: no utterance was imported; see the skipped reasons above",
              file=sys.stderr)
        return 1
    return 0
