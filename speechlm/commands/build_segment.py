"""`speechlm build segment MANIFEST --out DIR`: cut long recordings into a manifest of segments."""

from __future__ import annotations

import argparse

HELP = "cut long recordings into utterance segments (VAD or CTC forced alignment), SNR-filtered"

_EXAMPLES = """\
examples:
  speechlm build segment long.jsonl --out data/segments
  speechlm build segment lectures.jsonl --out data/seg --align-with runs/ctc-en/best --lang en
  speechlm build segment raw.jsonl --out data/seg --no-snr-filter --max-segment-s 15
Segments point into the original files (offset/duration); no audio is copied. Rerun the same
command after an interruption: finished recordings are skipped.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("input", metavar="INPUT_MANIFEST", help="manifest of long recordings")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (manifest.jsonl, done.jsonl, segment_report.json)")
    parser.add_argument("--max-segment-s", type=float, default=20.0, metavar="S",
                        help="longest segment in seconds (default 20)")
    parser.add_argument("--min-snr-db", type=float, default=15.0, metavar="DB",
                        help="drop segments whose WADA-SNR is below DB (default 15, as "
                             "IndicWav2Vec)")
    parser.add_argument("--no-snr-filter", action="store_true",
                        help="keep every segment whatever its SNR (still reported in snr_db)")
    parser.add_argument("--align-with", metavar="CTC_MODEL_DIR",
                        help="CTC model directory: cut transcribed recordings at force-aligned "
                             "word boundaries and keep each segment's text")
    parser.add_argument("--lang", default=None,
                        help="language for normalising transcripts of records without 'lang'")
    parser.add_argument("--min-silence-s", type=float, default=0.3, metavar="S",
                        help="VAD: pauses shorter than this do not split (default 0.3)")
    parser.add_argument("--pad-ms", type=float, default=300.0, metavar="MS",
                        help="VAD: context kept around speech (default 300)")
    parser.add_argument("--threshold-db", type=float, default=None, metavar="DBFS",
                        help="VAD: fixed speech level in dBFS (default: adapted per recording)")
    parser.add_argument("--sample-rate", type=int, default=16000, metavar="HZ",
                        help="analysis rate without --align-with (default 16000)")
    parser.add_argument("--device", default="auto", help="device for --align-with (default auto)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unreadable or unalignable recording")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from speechlm.pipelines.segment import segment_manifest

    min_snr = None if args.no_snr_filter else args.min_snr_db
    report = segment_manifest(
        args.input, args.out, max_segment_s=args.max_segment_s, min_snr_db=min_snr,
        align_with=args.align_with, lang=args.lang, sample_rate=args.sample_rate,
        min_silence_s=args.min_silence_s, pad_ms=args.pad_ms, threshold_db=args.threshold_db,
        device=args.device, progress=not args.no_progress, strict=args.strict,
    )
    print(report.summary())
    return 0
