"""`speechlm build lm --text CORPUS --out lm.arpa`: a word n-gram LM (+ lexicon) for CTC beam search."""

from __future__ import annotations

import argparse

HELP = "build a word n-gram LM (Kneser-Ney, ARPA) and a CTC lexicon from text for beam search"

_EXAMPLES = """\
examples:
  speechlm build lm --text corpus.txt --lang en --order 4 --out lm/4gram.arpa
  speechlm build lm --text train.jsonl --field text --lang es --out lm.arpa \\
      --lexicon-out lexicon.txt --tokens runs/ctc-es/vocab.json
  speechlm build lm --text embedded:en --exclude embedded:en/dev --exclude embedded:en/test \
      --lang en --out en.arpa
Text is normalised like CTC transcripts (speechlm.text.normalize_transcript for --lang) unless
--no-normalize. Keep dev/test sentences out of the LM text (--exclude) to report honest WERs.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EXAMPLES
    parser.add_argument("--text", action="append", required=True, metavar="FILE",
                        help="text file (one sentence a line, .gz ok), JSONL manifest (see "
                             "--field) or embedded:en / embedded:es; repeat for several")
    parser.add_argument("--field", default="text",
                        help="JSONL field holding the text (default: text)")
    parser.add_argument("--lang", default=None,
                        help="language code for transcript normalisation (e.g. en, es, hi); "
                             "default: generic rules (NFC, lower case)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="use the text as it is (already normalised)")
    parser.add_argument("--exclude", action="append", default=[], metavar="FILE",
                        help="drop sentences that also occur in FILE (text or JSONL, same "
                             "--field, or an embedded split such as embedded:es/test), e.g. "
                             "the dev and test manifests; repeatable")
    parser.add_argument("--order", type=int, default=4, help="n-gram order (default 4)")
    parser.add_argument("--vocab-limit", type=int, default=None, metavar="N",
                        help="keep the N most frequent words; the rest become <unk>")
    parser.add_argument("--out", required=True, metavar="LM.arpa", help="output ARPA file")
    parser.add_argument("--lexicon-out", metavar="FILE",
                        help="also write the flashlight lexicon (word -> its tokens and '|')")
    parser.add_argument("--tokens", metavar="VOCAB",
                        help="the CTC model's vocab.json (or its directory): lexicon spellings "
                             "use its tokens and words it cannot spell are left out")
    parser.add_argument("--word-delimiter", default="|",
                        help="word delimiter token ending each spelling (default '|')")


def _load_tokens(spec: str) -> list[str]:
    import json
    from pathlib import Path

    from speechlm.errors import SpeechLMError

    path = Path(spec)
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise SpeechLMError(f"{path}: CTC vocabulary not found; pass the model's vocab.json "
                            "or the model directory")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpeechLMError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise SpeechLMError(f"{path}: expected a JSON object token -> id (a Wav2Vec2CTCTokenizer "
                            "vocab.json)")
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def run(args: argparse.Namespace) -> int:
    from speechlm.inference.ctc_beam import build_lexicon
    from speechlm.text.ngram import SPECIAL_WORDS, arpa_vocabulary, build_word_lm

    # Check the vocabulary before the (long) estimation, so a typo fails at once.
    tokens = _load_tokens(args.tokens) if args.lexicon_out and args.tokens else None
    stats, dropped = build_word_lm(args.text, args.out, order=args.order, lang=args.lang,
                                   normalize=not args.no_normalize, exclude=args.exclude,
                                   field=args.field, vocab_limit=args.vocab_limit)
    print(stats.summary())
    if args.exclude:
        print(f"excluded {dropped} sentences found in {', '.join(args.exclude)}")
    if args.lexicon_out:
        words = [w for w in arpa_vocabulary(args.out) if w not in SPECIAL_WORDS]
        if tokens is None:  # spell with characters; the decoder checks them against the model
            tokens = sorted({c for w in words for c in w} | {args.word_delimiter})
        lexicon = build_lexicon(words, tokens, word_delimiter=args.word_delimiter)
        lexicon.write(args.lexicon_out)
        print(f"{lexicon.summary()}\nwritten to {args.lexicon_out}")
    return 0
