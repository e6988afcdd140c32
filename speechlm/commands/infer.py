"""`speechlm infer --model MODEL (AUDIO... | --manifest M --out OUT.jsonl)`: transcribe.

MODEL is any name the resolver takes (a directory, `whisper-base`, `zoo:NAME`).
The model's kind is read from its directory (config.json); each kind has a
runner in RUNNERS. CTC models (any *ForCTC checkpoint with a Wav2Vec2
processor) decode greedily or with the LM beam search (--decoder beam);
Whisper models decode greedily (the cascade ASR of the transfer tables).
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = ("run a model on audio files or a manifest (CTC or Whisper ASR, or a speech LM's "
        "asr/st/sqa/chat)")

# Model kinds `speechlm infer` knows, detected from the model directory.
KINDS = ("ctc", "whisper", "speech_lm")


def detect_model_kind(model_dir) -> str:
    """The kind of model in `model_dir` ("ctc", "whisper" or "speech_lm"); a clear error if
    it is not a model directory or a kind this command cannot run."""
    from ..errors import SpeechLMError
    from ..inference.transcriber import asr_kind

    model_dir = Path(model_dir)
    if (model_dir / "speechlm_config.json").is_file():  # a SpeechLM checkpoint (no config.json)
        return "speech_lm"
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise SpeechLMError(f"{model_dir}: not a model directory (no config.json); give the "
                            "directory a training run saved, e.g. runs/tiny/ctc_en/final, or a "
                            "name from `speechlm models list`")
    kind = asr_kind(model_dir)
    if kind is not None:
        return kind
    config = json.loads(config_file.read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    raise SpeechLMError(f"{model_dir}: a {', '.join(architectures) or config.get('model_type')} "
                        "model; speechlm infer runs CTC models (a *ForCTC architecture and a "
                        "vocab.json), Whisper models and speech LM checkpoints (a "
                        "speechlm_config.json)")


def add_arguments(parser):
    parser.add_argument("--model", required=True, metavar="MODEL",
                        help="a model directory (e.g. runs/tiny/ctc_en/final), a pretrained "
                             "model (whisper-base) or zoo:NAME; see `speechlm models list`")
    parser.add_argument("audio", nargs="*", help="audio files to transcribe")
    parser.add_argument("--manifest", metavar="JSONL",
                        help="transcribe every utterance of a manifest (or embedded:LANG/SPLIT)")
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


def _ctc_transcriber(args):
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
    return transcriber


def _whisper_transcriber(args):
    from ..errors import SpeechLMError
    from ..inference.whisper_asr import WhisperTranscriber

    if args.decoder != "greedy":
        raise SpeechLMError("--decoder beam is for CTC models; Whisper decodes greedily")
    task = "transcribe"
    if args.task == "st":
        if (args.target_lang or "en") != "en":
            raise SpeechLMError(f"Whisper translates speech into English only, not into "
                                f"{args.target_lang!r}; use --target-lang en or a speech LM")
        task = "translate"
    return WhisperTranscriber(args.model, device=args.device, language=args.lang or "en",
                              task=task, max_segment_s=args.max_segment_s)


def _run_transcriber(args) -> int:
    import sys

    from ..errors import SpeechLMError

    transcriber = (_ctc_transcriber if args.kind == "ctc" else _whisper_transcriber)(args)
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
    from ..errors import about

    for row in failed:
        print(f"speechlm: {about(row['id'], row['error'])}", file=sys.stderr)
    return 1 if failed else 0


def _run_speech_lm(args) -> int:
    from ..inference.generate_jsonl import run_speech_lm_inference

    return run_speech_lm_inference(args)


RUNNERS = {"ctc": _run_transcriber, "whisper": _run_transcriber, "speech_lm": _run_speech_lm}


def run(args):
    import sys

    from ..errors import SpeechLMError

    if bool(args.audio) == bool(args.manifest):
        raise SpeechLMError("give audio files or --manifest M (one of the two)")
    from ..pretrained.resolve import resolve_model_dir

    args.model = str(resolve_model_dir(args.model, expect=None, progress=not args.quiet,
                                       say=lambda m: print(m, file=sys.stderr)))
    if args.manifest:  # a path, or embedded:LANG/SPLIT as train and tune lm take
        from ..recipes.sources import resolve_if_embedded

        args.manifest = resolve_if_embedded(args.manifest, progress=not args.quiet)
    kind = args.kind = detect_model_kind(args.model)
    task = getattr(args, "task", "asr")
    if kind == "ctc" and task != "asr":
        raise SpeechLMError(f"{args.model}: a CTC model only transcribes (--task asr); "
                            f"--task {args.task} needs a speech LM checkpoint")
    if kind == "whisper" and task not in ("asr", "st"):
        raise SpeechLMError(f"{args.model}: a Whisper model transcribes (--task asr) or "
                            f"translates into English (--task st); --task {task} needs a "
                            "speech LM checkpoint")
    return RUNNERS[kind](args)
