"""`speechlm infer --model DIR (AUDIO... | --manifest M --out OUT.jsonl)`: transcribe.

The model's kind is read from its directory (config.json); each kind has a
runner in RUNNERS. CTC models (any *ForCTC checkpoint with a Wav2Vec2
processor) decode greedily or with the LM beam search (--decoder beam).
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "run a trained model on audio files or a manifest (CTC ASR, or a speech LM's asr/st/sqa/chat)"

# Model kinds `speechlm infer` knows, detected from the model directory's config.json.
# A later speech-LLM kind adds its entry here and a `--task asr|st|sqa|chat` option.
KINDS = ("ctc", "speech_lm")


def detect_model_kind(model_dir) -> str:
    """The kind of model in `model_dir` ("ctc"), from its config.json; a clear error if
    it is not a model directory or a kind this command cannot run."""
    from ..errors import SpeechLMError

    model_dir = Path(model_dir)
    if (model_dir / "speechlm_config.json").is_file():  # a SpeechLM checkpoint (no config.json)
        return "speech_lm"
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise SpeechLMError(f"{model_dir}: not a model directory (no config.json); give the "
                            "directory a training run saved, e.g. runs/tiny/ctc_en/final")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SpeechLMError(f"{config_file}: not valid JSON ({e})") from None
    architectures = config.get("architectures") or []
    if any(name.endswith("ForCTC") for name in architectures):
        return "ctc"
    meta = model_dir / "speechlm.json"
    if meta.is_file():
        kind = json.loads(meta.read_text(encoding="utf-8")).get("kind")
        if kind in KINDS:
            return kind
    raise SpeechLMError(f"{model_dir}: a {', '.join(architectures) or config.get('model_type')} "
                        "model; speechlm infer runs CTC models (a *ForCTC architecture and a "
                        "vocab.json) and speech LM checkpoints (a speechlm_config.json)")


def add_arguments(parser):
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="trained model directory (e.g. runs/tiny/ctc_en/final)")
    parser.add_argument("audio", nargs="*", help="audio files to transcribe")
    parser.add_argument("--manifest", metavar="JSONL", help="transcribe every utterance of a manifest")
    parser.add_argument("--out", metavar="JSONL",
                        help="write {id, text, audio_s, decode_s} lines here (a manifest run "
                             "appends and skips ids already there); default: print")
    parser.add_argument("--no-resume", action="store_true",
                        help="start --out afresh instead of continuing after its ids")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-duration", type=float, default=160.0, metavar="S",
                        help="padded seconds of audio per forward pass (default 160)")
    parser.add_argument("--max-segment-s", type=float, default=30.0, metavar="S",
                        help="cut longer recordings into segments (at silences) and join the "
                             "texts (default 30)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--decoder", choices=("greedy", "beam"), default="greedy")
    decoding.add_argument("--lm", metavar="ARPA", help="word n-gram LM for --decoder beam")
    decoding.add_argument("--lexicon", metavar="PATH", help="lexicon for --decoder beam")
    decoding.add_argument("--lm-weight", type=float, default=0.5)
    decoding.add_argument("--word-score", type=float, default=0.0)
    decoding.add_argument("--beam-size", type=int, default=50)
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    from ..inference.generate_jsonl import add_speech_lm_arguments

    add_speech_lm_arguments(parser)  # adds only the options above lacks (--task, ...)


def _beam_decoder(args, tokens, blank, word_delimiter):
    """The LM beam-search decoder (imported only when asked for)."""
    from ..inference.ctc_beam import BeamSearchCTCDecoder

    return BeamSearchCTCDecoder(tokens, blank=blank, word_delimiter=word_delimiter,
                                lm_path=args.lm, lexicon_path=args.lexicon,
                                lm_weight=args.lm_weight, word_score=args.word_score,
                                beam_size=args.beam_size)


def _run_ctc(args) -> int:
    import sys

    from ..errors import SpeechLMError
    from ..inference.ctc import CTCTranscriber

    if args.decoder == "greedy" and (args.lm or args.lexicon):
        raise SpeechLMError("--lm / --lexicon are used by --decoder beam; add --decoder beam")
    transcriber = CTCTranscriber(args.model, device=args.device,
                                 batch_duration=args.batch_duration,
                                 max_segment_s=args.max_segment_s)
    if args.decoder == "beam":
        transcriber.decoder = _beam_decoder(args, transcriber.tokens, transcriber.blank,
                                            transcriber.word_delimiter)
    progress = not args.quiet
    if args.manifest:
        if not args.out:
            raise SpeechLMError("--manifest needs --out OUT.jsonl (results are appended there, "
                                "so a killed run can continue)")
        summary = transcriber.transcribe_manifest(args.manifest, args.out,
                                                  resume=not args.no_resume, progress=progress)
        if progress:
            print(summary.summary(), file=sys.stderr)
        return 0
    rows = transcriber.transcribe_files(args.audio)
    if args.out:
        from ..jsonl import write_jsonl

        write_jsonl(args.out, rows)
    else:
        for row in rows:
            if len(rows) > 1:
                print(f"{row['id']}\t{row['text']}")
            else:
                print(row["text"])
    failed = [row for row in rows if row.get("error")]
    for row in failed:
        print(f"speechlm: {row['id']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _run_speech_lm(args) -> int:
    from ..inference.generate_jsonl import run_speech_lm_inference

    return run_speech_lm_inference(args)


RUNNERS = {"ctc": _run_ctc, "speech_lm": _run_speech_lm}


def run(args):
    from ..errors import SpeechLMError

    if bool(args.audio) == bool(args.manifest):
        raise SpeechLMError("give audio files or --manifest M (one of the two)")
    kind = detect_model_kind(args.model)
    if kind == "ctc" and getattr(args, "task", "asr") != "asr":
        raise SpeechLMError(f"{args.model}: a CTC model only transcribes (--task asr); "
                            f"--task {args.task} needs a speech LM checkpoint")
    return RUNNERS[kind](args)
