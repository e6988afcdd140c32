"""`speechlm tune lm`: pick the LM weight and word score of CTC beam search on a dev set."""

from __future__ import annotations

import argparse

HELP = "tune the LM weight and word score of CTC beam search on a dev manifest"

EPILOG = """\
examples:
  speechlm build lm --text embedded:en --exclude DEV.jsonl --exclude TEST.jsonl \\
      --lang en --out en.arpa --lexicon-out en.lex --tokens runs/tiny/ctc_en/final
  speechlm tune lm --model runs/tiny/ctc_en/final --manifest embedded:en/dev \\
      --lm en.arpa --lexicon en.lex --out tune.json
  speechlm infer --model runs/tiny/ctc_en/final --manifest TEST.jsonl --out hyps.jsonl \\
      --decoder beam --lm en.arpa --lexicon en.lex --lm-weight W --word-score S
The acoustic model runs once; every grid point re-decodes its log-probs. Tune on dev, never
on the test set you report."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True, metavar="DIR", help="a saved CTC model")
    parser.add_argument("--manifest", required=True, metavar="JSONL",
                        help="labelled dev manifest (or embedded:LANG/dev)")
    parser.add_argument("--lm", required=True, metavar="ARPA", help="word n-gram LM")
    parser.add_argument("--lexicon", metavar="PATH", help="lexicon (speechlm build lm "
                                                          "--lexicon-out); none: lexicon-free")
    parser.add_argument("--lang", help="transcript normalisation (default: the model's)")
    parser.add_argument("--lm-weights", type=float, nargs="+", metavar="W",
                        help="grid of LM weights (default 0 0.25 0.5 0.75 1 1.5 2 3)")
    parser.add_argument("--word-scores", type=float, nargs="+", metavar="S",
                        help="grid of word insertion scores (default -2 -1 0 1 2)")
    parser.add_argument("--beam-size", type=int, default=50)
    parser.add_argument("--max-items", type=int, metavar="N", help="use the first N utterances")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", metavar="JSON", help="write the grid and the best pair here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import SpeechLMError
    from ..inference.ctc import CTCTranscriber
    from ..inference.lm_tuning import DEFAULT_LM_WEIGHTS, DEFAULT_WORD_SCORES, tune_lm_weights
    from ..recipes.sources import resolve_manifest
    from ..text.normalize import normalize_transcript

    for path, what in ((args.lm, "--lm"), (args.lexicon, "--lexicon")):
        if path and not Path(path).is_file():
            raise SpeechLMError(f"{what} {path}: file not found (speechlm build lm writes it)")
    transcriber = CTCTranscriber(args.model, device=args.device)
    from ..models.ctc import METADATA_FILE

    meta_file = Path(args.model) / METADATA_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    lang = args.lang or meta.get("normalize_lang")
    waves, refs = _load_labelled(resolve_manifest(args.manifest, progress=not args.quiet),
                                 transcriber.sample_rate, args.max_items, lang,
                                 normalize_transcript)
    log_probs, lengths, order = [], [], []
    for batch in transcriber._batches([w.shape[-1] / transcriber.sample_rate for w in waves]):
        lp, frames = transcriber.log_probs([waves[i] for i in batch])
        log_probs.append(lp.cpu())
        lengths.append(frames.cpu())
        order.extend(batch)
    result = tune_lm_weights(
        log_probs, lengths, [refs[i] for i in order], transcriber.tokens, args.lm, args.lexicon,
        lm_weights=args.lm_weights or DEFAULT_LM_WEIGHTS,
        word_scores=args.word_scores or DEFAULT_WORD_SCORES, beam_size=args.beam_size,
        blank=transcriber.blank, word_delimiter=transcriber.word_delimiter,
        progress=not args.quiet)
    print(result.table())
    print(result.summary())
    if args.out:
        from ..jsonl import atomic_write

        with atomic_write(Path(args.out)) as f:
            json.dump({**result.to_json(), "model": str(args.model), "manifest": args.manifest,
                       "lm": str(args.lm), "lexicon": args.lexicon}, f, indent=1)
    return 0


def _load_labelled(manifest, sample_rate, max_items, lang, normalize):
    """(waves, normalised references); unreadable audio is skipped and counted."""
    import sys

    from ..data.collate import SkippedItem
    from ..data.dataset import AudioDataset
    from ..data.manifest import read_manifest
    from ..errors import SpeechLMError

    records = [r for r in read_manifest(manifest) if isinstance(r.get("text"), str)]
    if max_items:
        records = records[:max_items]
    dataset = AudioDataset(records, sample_rate=sample_rate, silence_dbfs=None)
    waves, refs, skipped = [], [], 0
    for i, record in enumerate(records):
        item = dataset[i]
        if isinstance(item, SkippedItem):
            skipped += 1
            continue
        waves.append(item["audio"])
        refs.append(normalize(record["text"], lang or record.get("lang")))
    if skipped:
        print(f"speechlm: {skipped} utterance(s) skipped (unreadable audio)", file=sys.stderr)
    if not waves:
        raise SpeechLMError(f"{manifest}: no labelled utterance with readable audio")
    return waves, refs
