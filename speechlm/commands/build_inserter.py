"""`speechlm build inserter --corpus TEXT --tts espeak:VOICES --out DIR`: InSerter's
speech-text interleaved samples (text segments spoken by TTS), sharded and resumable."""

from __future__ import annotations

import argparse

from .build_synth import _int_or_range, _key_value

HELP = ("InSerter samples: text segments of a corpus spoken by TTS, followed by the text that "
        "continues them; sharded, resumable")

_EXAMPLES = """\
examples:
  speechlm build inserter --corpus embedded:en --tts espeak:en-us+m1,en-us+f3 --out data/ins
  speechlm build inserter --corpus books.txt --tts espeak:en-us+f1,en-gb+m3 --rate 140:200 \\
      --num-samples 50000 --text-first-share 0.3 --jobs 8 --out data/ins
  speechlm build inserter --corpus texts.jsonl --tts vits:models/mms-tts-eng --out data/ins_mms
Rerun the same command after an interruption: spoken segments are kept and skipped.
Train on the result with `speechlm train recipes/tiny/inserter.yaml data.train=DIR`.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("--corpus", required=True, metavar="TEXT",
                        help="text file (one text per line), JSONL with a 'text' field, or "
                             "embedded:en / embedded:es (the embedded corpus's training books)")
    parser.add_argument("--tts", default="espeak:en-us", metavar="BACKEND:V1,V2",
                        help="TTS backend and voices, comma-separated (default espeak:en-us); "
                             "speecht5:MODEL_DIR[:SPEAKER] or vits:MODEL_DIR for a local model")
    parser.add_argument("--backend-option", action="append", default=[], type=_key_value,
                        metavar="KEY=VALUE", help="an option of the TTS backend (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (plan.jsonl, audio/, manifest.jsonl, "
                             "samples-*.jsonl, inserter.json)")
    parser.add_argument("--num-samples", type=int, metavar="N",
                        help="samples to make (default: one per usable text)")
    parser.add_argument("--speech-words", type=_int_or_range, default=(3, 12), metavar="LOW:HIGH",
                        help="words per spoken segment (default 3:12)")
    parser.add_argument("--min-after-words", type=int, default=2, metavar="N",
                        help="fewest text words after the speech (default 2)")
    parser.add_argument("--max-after-words", type=int, default=40, metavar="N",
                        help="most text words after the speech (default 40)")
    parser.add_argument("--text-first-share", type=float, default=0.25, metavar="P",
                        help="share of samples with text before the speech (default 0.25)")
    parser.add_argument("--rate", type=_int_or_range, metavar="WPM|LOW:HIGH",
                        help="speaking rate, or a range drawn per sample (eSpeak: 80-450)")
    parser.add_argument("--pitch", type=_int_or_range, metavar="P|LOW:HIGH",
                        help="base pitch 0-100, or a range drawn per sample")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N",
                        help="samples per shard (default 1000)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="TTS worker processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the cuts and voices")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from speechlm.errors import ConfigError
    from speechlm.pipelines.inserter import PlanSettings, build_inserter
    from speechlm.tts.base import parse_backend_spec

    backend, voices = parse_backend_spec(args.tts)
    if backend == "espeak":
        voices_list = [v.strip() for v in (voices or "en-us").split(",") if v.strip()]
    elif voices:
        voices_list = [voices]
    else:
        raise ConfigError(f"--tts {backend}: give the model directory, e.g. --tts {backend}:DIR")
    speech_words = args.speech_words if isinstance(args.speech_words, tuple) \
        else (args.speech_words, args.speech_words)
    settings = PlanSettings(num_samples=args.num_samples, speech_words=speech_words,
                            min_after_words=args.min_after_words,
                            max_after_words=args.max_after_words,
                            text_first_share=args.text_first_share, seed=args.seed)
    summary = build_inserter(args.corpus, args.out, voices=voices_list, rate=args.rate,
                             pitch=args.pitch, settings=settings, shard_size=args.shard_size,
                             jobs=args.jobs, backend=backend,
                             backend_options=dict(args.backend_option),
                             progress=not args.no_progress)
    print(summary.summary())
    return 0
