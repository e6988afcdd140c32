"""Word n-gram language models in ARPA format: a Kneser-Ney builder and a reader.

`build_arpa` estimates an interpolated modified Kneser-Ney model (Chen &
Goodman 1998, the estimate KenLM's `lmplz` makes) from sentences and writes
it as an ARPA file that KenLM, and so the flashlight/torchaudio CTC beam
decoder, loads directly:

- Sentences are split on whitespace and padded with one `<s>` and one
  `</s>`. The highest order uses raw counts; lower orders use continuation
  counts (how many distinct words precede the n-gram), except n-grams that
  start with `<s>`, which have no left context and keep their raw counts.
- Each order n has three discounts D1, D2, D3+ from its count-of-counts
  t1..t4: Y = t1 / (t1 + 2 t2), Dk = k - (k + 1) Y t(k+1) / tk. When a small
  corpus makes them undefined or out of range, KenLM's `--discount_fallback`
  values (0.5, 1.0, 1.5) are used instead and the stats say so.
- p(w | h) = (a(hw) - D(a(hw))) / Σ a(h·) + γ(h) p(w | h'), with
  γ(h) = (D1 N1(h·) + D2 N2(h·) + D3+ N3+(h·)) / Σ a(h·); unigrams
  interpolate with the uniform distribution over the vocabulary, so `<unk>`
  gets probability mass even when the text has no unknown words. γ(h) is
  the ARPA backoff weight of h, so the file reproduces the interpolated
  model exactly, and every p(· | h) sums to 1 over the vocabulary.

The builder counts in memory in pure Python: fine for a few million words
(the embedded Bible corpus, a dev set's domain text); for web-scale text use
KenLM's `lmplz`, whose ARPA files `ArpaModel` also reads.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speechlm.errors import SpeechLMError

SENTENCE_START = "<s>"
SENTENCE_END = "</s>"
UNKNOWN_WORD = "<unk>"
SPECIAL_WORDS = (UNKNOWN_WORD, SENTENCE_START, SENTENCE_END)
# log10 probability written for <s>, which is never predicted (the ARPA convention).
_NEVER = -99.0
# KenLM's `lmplz --discount_fallback` defaults, used when count-of-counts cannot define them.
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


class ArpaFormatError(SpeechLMError):
    """An ARPA file is malformed; the message starts with `file:line:`."""


@dataclass
class NgramStats:
    """What `build_arpa` estimated and wrote."""

    order: int
    sentences: int  # non-empty sentences used
    words: int  # running words, </s> not counted
    vocab_size: int  # unigram entries, <s> </s> <unk> included
    oov_words: int  # running words mapped to <unk> by `vocab_limit`
    ngrams: list[int]  # entries per order, 1-grams first
    discounts: list[tuple[float, float, float]]  # (D1, D2, D3+) per order
    fallback_orders: list[int] = field(default_factory=list)  # orders that used FALLBACK_DISCOUNTS
    out_path: Path | None = None

    def summary(self) -> str:
        counts = ", ".join(f"{n + 1}-grams {c}" for n, c in enumerate(self.ngrams))
        text = (f"{self.order}-gram Kneser-Ney LM from {self.sentences} sentences, {self.words} "
                f"words; vocabulary {self.vocab_size} ({self.oov_words} running words mapped to "
                f"{UNKNOWN_WORD}); {counts}")
        if self.fallback_orders:
            text += (f"; orders {self.fallback_orders} had too little data for modified KN "
                     f"discounts and used {FALLBACK_DISCOUNTS}")
        if self.out_path is not None:
            text += f"\nwritten to {self.out_path}"
        return text


# ---------------------------------------------------------------------------
# Input text

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
EMBEDDED_PREFIX = "embedded:"


def iter_text(source: str | os.PathLike, *, field: str = "text") -> Iterator[str]:
    """Sentences of a text file (one per line, `.gz` too), of a JSONL file's `field`
    (records without it are skipped), of the embedded Bible corpus side
    ("embedded:en" / "embedded:es"), or of an embedded speech split's manifest
    ("embedded:es/dev"). Lazy: one line in memory at a time.
    """
    import gzip
    import io

    from speechlm.jsonl import iter_jsonl

    text = str(source)
    if text.startswith(EMBEDDED_PREFIX) and "/" in text:
        from speechlm.recipes.sources import resolve_manifest

        source = text = str(resolve_manifest(text))
    if text.startswith(EMBEDDED_PREFIX):
        from speechlm.paths import resource

        side = text[len(EMBEDDED_PREFIX):]
        if side not in ("en", "es"):
            raise SpeechLMError(f"unknown embedded corpus {text!r}; use embedded:en or embedded:es")
        for _, record in iter_jsonl(resource("bible_en_es.jsonl.gz")):
            yield record[side]
        return
    path = Path(source)
    if not path.is_file():
        raise SpeechLMError(f"{path}: text file not found")
    if path.name.lower().endswith(_JSONL_SUFFIXES):
        seen_field = False
        for lineno, record in iter_jsonl(path):
            value = record.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise SpeechLMError(f"{path}:{lineno}: field {field!r} is "
                                    f"{type(value).__name__}, not text")
            seen_field = True
            yield value
        if not seen_field:
            raise SpeechLMError(f"{path}: no record has a {field!r} field; pick the text field "
                                "with --field")
        return
    opener = (lambda: io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")) \
        if path.suffix == ".gz" else (lambda: open(path, encoding="utf-8"))
    with opener() as f:
        for line in f:
            yield line.rstrip("\r\n")


# ---------------------------------------------------------------------------
# Building


def build_word_lm(texts: Sequence[str], out_path: str | os.PathLike, *, order: int = 4,
                  lang: str | None = None, normalize: bool = True,
                  exclude: Sequence[str] = (), field: str = "text",
                  vocab_limit: int | None = None) -> tuple[NgramStats, int]:
    """A word n-gram LM (ARPA at `out_path`) of the sentences of `texts` (anything
    `iter_text` reads), normalised like CTC transcripts of `lang` unless `normalize` is
    false; sentences that also occur in an `exclude` source (dev and test sets) are left
    out. Returns the statistics and how many sentences were excluded."""
    if normalize:
        from speechlm.text.normalize import normalize_transcript

        def clean(sentence: str) -> str:
            return normalize_transcript(sentence, lang)
    else:
        def clean(sentence: str) -> str:
            return " ".join(sentence.split())

    excluded = {clean(t) for source in exclude for t in iter_text(source, field=field)}
    excluded.discard("")
    dropped = 0

    def sentences():
        nonlocal dropped
        for source in texts:
            for raw in iter_text(source, field=field):
                sentence = clean(raw)
                if sentence in excluded:
                    dropped += 1
                    continue
                yield sentence

    stats = build_arpa(sentences(), order, out_path=out_path, vocab_limit=vocab_limit)
    return stats, dropped


def _discounts(adjusted: Iterable[int]) -> tuple[tuple[float, float, float], bool]:
    """(D1, D2, D3+) from count-of-counts; (FALLBACK_DISCOUNTS, True) when undefined."""
    t = Counter(c for c in adjusted if c <= 4)
    t1, t2, t3, t4 = (t.get(k, 0) for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) == 0:
        return FALLBACK_DISCOUNTS, True
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if not all(0 < dk < k + 1 for k, dk in enumerate(d)):
        return FALLBACK_DISCOUNTS, True
    return d, False


def _count_ngrams(sentences: list[tuple[int, ...]], order: int, bos: int, eos: int):
    """Per order n (1-based list index n-1): {ngram: adjusted count}.

    Each padded position i >= 1 contributes the n-gram of length min(order, i+1)
    ending there; shorter ones start with <s>. Lower orders get continuation
    counts from the distinct (n+1)-grams that end with them.
    """
    recorded: list[Counter] = [Counter() for _ in range(order)]
    for words in sentences:
        padded = (bos, *words, eos)
        for i in range(1, len(padded)):
            n = min(order, i + 1)
            recorded[n - 1][padded[i + 1 - n:i + 1]] += 1
    adjusted: list[dict] = [dict() for _ in range(order)]
    adjusted[order - 1] = dict(recorded[order - 1])
    for n in range(order - 1, 0, -1):  # n-grams of length n, from the (n+1)-grams above
        # Each distinct (n+1)-gram x+g adds one to the continuation count of g.
        level = adjusted[n - 1]
        level.update(Counter(gram[1:] for gram in adjusted[n]))
        for gram, c in recorded[n - 1].items():  # those starting with <s>: raw counts
            level[gram] = c
    return adjusted


def build_arpa(
    sentences: Iterable[str],
    order: int = 3,
    *,
    out_path: str | os.PathLike | None,
    vocab_limit: int | None = None,
) -> NgramStats:
    """Estimate an interpolated modified Kneser-Ney `order`-gram model and write it as ARPA.

    `sentences` are already normalised text (one sentence each; words are
    split on whitespace; empty ones are skipped). `vocab_limit` keeps the
    most frequent words (ties by first appearance) and maps the rest to
    `<unk>`. `out_path=None` estimates without writing (the stats only).
    Raises SpeechLMError when there is no text or `order` < 1.
    """
    if order < 1:
        raise SpeechLMError(f"n-gram order must be at least 1, got {order}")
    token_lists = [s.split() for s in sentences]
    token_lists = [t for t in token_lists if t]
    if not token_lists:
        raise SpeechLMError("no text to build the language model from (every sentence is empty); "
                            "check the input file and the --field name")
    for tokens in token_lists:
        bad = [w for w in tokens if w in (SENTENCE_START, SENTENCE_END)]
        if bad:
            raise SpeechLMError(f"the text contains the reserved word {bad[0]!r} in "
                                f"{' '.join(tokens)[:80]!r}; remove sentence markers from the text")

    word_counts = Counter(w for tokens in token_lists for w in tokens)
    kept = [w for w, _ in word_counts.most_common()]  # stable: ties keep first appearance
    if vocab_limit is not None:
        kept = [w for w in kept if w != UNKNOWN_WORD][:max(0, vocab_limit)]
    vocab = list(SPECIAL_WORDS) + [w for w in kept if w not in SPECIAL_WORDS]
    index = {w: i for i, w in enumerate(vocab)}
    unk, bos, eos = index[UNKNOWN_WORD], index[SENTENCE_START], index[SENTENCE_END]
    encoded = [tuple(index.get(w, unk) for w in tokens) for tokens in token_lists]
    del token_lists  # the strings are no longer needed; counting works on ids
    oov = sum(c for w, c in word_counts.items() if w not in index or w == UNKNOWN_WORD) \
        if vocab_limit is not None else 0

    adjusted = _count_ngrams(encoded, order, bos, eos)
    adjusted[0].pop((bos,), None)  # <s> is never predicted
    predicted = [i for i in range(len(vocab)) if i != bos]

    discounts, fallback = [], []
    probs: list[dict] = []  # per order: {ngram: log10 p}
    backoffs: list[dict] = [dict() for _ in range(order)]  # per order: {context: log10 gamma}
    for n in range(1, order + 1):
        counts = adjusted[n - 1]
        d, used_fallback = _discounts(counts.values())
        discounts.append(d)
        if used_fallback:
            fallback.append(n)

        def discount(c, d=d):
            return d[min(c, 3) - 1]

        # Totals and per-bucket type counts per context.
        totals: dict = defaultdict(int)
        buckets: dict = defaultdict(lambda: [0, 0, 0])
        for gram, c in counts.items():
            h = gram[:-1]
            totals[h] += c
            buckets[h][min(c, 3) - 1] += 1
        gamma = {h: (d[0] * b[0] + d[1] * b[1] + d[2] * b[2]) / totals[h] for h, b in buckets.items()}
        level: dict = {}
        if n == 1:
            uniform = gamma[()] / len(predicted)
            for w in predicted:
                c = counts.get((w,), 0)
                p = (c - discount(c)) / totals[()] if c else 0.0
                level[(w,)] = math.log10(p + uniform)
        else:
            lower = probs[n - 2]
            for gram, c in counts.items():
                p = (c - discount(c)) / totals[gram[:-1]] \
                    + gamma[gram[:-1]] * 10.0 ** lower[gram[1:]]
                level[gram] = math.log10(p)
            for h, g in gamma.items():
                backoffs[n - 2][h] = math.log10(g)
        probs.append(level)
    # <s> is a context (of "<s> w" bigrams) but never predicted.
    probs[0][(bos,)] = _NEVER

    stats = NgramStats(
        order=order, sentences=len(encoded), words=sum(len(t) for t in encoded),
        vocab_size=len(vocab), oov_words=oov, ngrams=[len(p) for p in probs],
        discounts=[tuple(round(x, 6) for x in d) for d in discounts], fallback_orders=fallback,
    )
    if out_path is not None:
        stats.out_path = Path(out_path)
        _write_arpa(stats.out_path, vocab, probs, backoffs)
    return stats


def _write_arpa(path: Path, vocab: Sequence[str] | None, probs: list[dict],
                backoffs: list[dict]) -> None:
    """Write ARPA atomically; n-grams are tuples of ids into `vocab`, or of words if None."""
    from speechlm.jsonl import atomic_write

    order = len(probs)
    with atomic_write(path) as f:
        f.write("\n\\data\\\n")
        for n, level in enumerate(probs, start=1):
            f.write(f"ngram {n}={len(level)}\n")
        for n, level in enumerate(probs, start=1):
            f.write(f"\n\\{n}-grams:\n")
            bo = backoffs[n - 1]
            for gram in sorted(level):
                words = " ".join(gram if vocab is None else (vocab[i] for i in gram))
                if n < order and gram in bo:
                    f.write(f"{level[gram]:.7f}\t{words}\t{bo[gram]:.7f}\n")
                else:
                    f.write(f"{level[gram]:.7f}\t{words}\n")
        f.write("\n\\end\\\n")


# ---------------------------------------------------------------------------
# Reading


def arpa_vocabulary(path: str | os.PathLike) -> list[str]:
    """The unigram words of an ARPA file, in file order, reading only the 1-gram section."""
    path = Path(path)
    if not path.is_file():
        raise SpeechLMError(f"{path}: language model file not found")
    words: list[str] = []
    in_unigrams = False
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif in_unigrams:
                if not line:
                    continue
                if line.startswith("\\"):
                    return words
                fields = line.split()
                if len(fields) not in (2, 3):
                    raise ArpaFormatError(f"{path}:{lineno}: a 1-gram line needs log10 prob, a "
                                          f"word and an optional backoff, got {line!r}")
                words.append(fields[1])
    if not in_unigrams:
        raise ArpaFormatError(f"{path}: no \\1-grams: section; is this an ARPA language model "
                              "(KenLM binary files cannot be read here)?")
    return words


class ArpaModel:
    """An ARPA back-off n-gram model in memory, scored the way KenLM scores it (log10)."""

    def __init__(self, order: int, probs: list[dict], backoffs: list[dict], path: Path | None = None):
        self.order = order
        self.path = path
        self._probs = probs  # per order: {tuple(words): log10 p}
        self._backoffs = backoffs  # per order: {tuple(words): log10 backoff}
        self.vocab = frozenset(g[0] for g in probs[0])

    @classmethod
    def load(cls, path: str | os.PathLike) -> ArpaModel:
        """Read an ARPA file (ours or KenLM's/SRILM's); ArpaFormatError names file:line."""
        path = Path(path)
        if not path.is_file():
            raise SpeechLMError(f"{path}: language model file not found")
        declared: dict[int, int] = {}
        probs: list[dict] = []
        backoffs: list[dict] = []
        section = None  # "data", an int order, or "end"
        with open(path, encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line:
                    continue

                def fail(msg, lineno=lineno):
                    raise ArpaFormatError(f"{path}:{lineno}: {msg}; is this an ARPA language model?")

                if line == "\\data\\":
                    section = "data"
                elif line == "\\end\\":
                    section = "end"
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    try:
                        n = int(line[1:-len("-grams:")])
                    except ValueError:
                        fail(f"bad section header {line!r}")
                    if n != len(probs) + 1:
                        fail(f"section {line!r} out of order (expected \\{len(probs) + 1}-grams:)")
                    probs.append({})
                    backoffs.append({})
                    section = n
                elif section == "data":
                    key, _, value = line.partition("=")
                    parts = key.split()
                    if len(parts) != 2 or parts[0] != "ngram" or not value.strip().isdigit():
                        fail(f"expected 'ngram N=COUNT' in \\data\\, got {line!r}")
                    declared[int(parts[1])] = int(value)
                elif isinstance(section, int):
                    fields = line.split()
                    n = section
                    if len(fields) not in (n + 1, n + 2):
                        fail(f"a {n}-gram line needs log10 prob, {n} words and an optional "
                             f"backoff, got {len(fields)} fields")
                    try:
                        logp = float(fields[0])
                        bo = float(fields[n + 1]) if len(fields) == n + 2 else None
                    except ValueError:
                        fail(f"not a number in {line!r}")
                    gram = tuple(fields[1:n + 1])
                    probs[n - 1][gram] = logp
                    if bo is not None:
                        backoffs[n - 1][gram] = bo
                elif section is None:
                    continue  # text before \data\ is allowed
                else:
                    fail(f"unexpected line {line!r}")
        if section != "end":
            raise ArpaFormatError(f"{path}: no \\end\\ marker; the file is truncated or not ARPA")
        if not probs:
            raise ArpaFormatError(f"{path}: no n-gram sections")
        for n, count in declared.items():
            got = len(probs[n - 1]) if n <= len(probs) else 0
            if got != count:
                raise ArpaFormatError(f"{path}: \\data\\ declares {count} {n}-grams but the file "
                                      f"has {got}; the file is truncated or was edited")
        model = cls(len(probs), probs, backoffs, path)
        if UNKNOWN_WORD not in model.vocab:
            raise ArpaFormatError(f"{path}: no {UNKNOWN_WORD} unigram; rebuild the model with "
                                  f"`speechlm build lm` (or lmplz, which always writes it)")
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as ARPA (atomically); `load(save(p))` gives back the same model."""
        path = Path(path)
        _write_arpa(path, None, self._probs, self._backoffs)
        return path

    def log10_prob(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context), context oldest word first; unknown words are <unk>."""
        w = word if word in self.vocab else UNKNOWN_WORD
        ctx = tuple(c if c in self.vocab else UNKNOWN_WORD for c in context)
        ctx = ctx[max(0, len(ctx) - (self.order - 1)):] if self.order > 1 else ()
        penalty = 0.0
        for start in range(len(ctx) + 1):
            h = ctx[start:]
            gram = (*h, w)
            logp = self._probs[len(gram) - 1].get(gram)
            if logp is not None:
                return logp + penalty
            if h:
                penalty += self._backoffs[len(h) - 1].get(h, 0.0)
        raise AssertionError("unreachable: every word has a unigram")  # pragma: no cover

    def score(self, sentence: str | Sequence[str], *, bos: bool = True, eos: bool = True) -> float:
        """Total log10 probability of a sentence (words split on whitespace), </s> included."""
        words = sentence.split() if isinstance(sentence, str) else list(sentence)
        context: list[str] = [SENTENCE_START] if bos else []
        total = 0.0
        for w in [*words, SENTENCE_END] if eos else words:
            total += self.log10_prob(w, context)
            context.append(w)
        return total

    def perplexity(self, sentences: Iterable[str]) -> float:
        """Per-word perplexity (</s> counted as a word, as KenLM's `query` reports it)."""
        total, count = 0.0, 0
        for sentence in sentences:
            words = sentence.split()
            total += self.score(words)
            count += len(words) + 1
        if count == 0:
            raise SpeechLMError("perplexity of no text is undefined; pass at least one sentence")
        return 10.0 ** (-total / count)

    def ngrams(self, n: int) -> dict:
        """{words tuple: log10 p} of order n (a read-only view for inspection and tests)."""
        return self._probs[n - 1]

    def backoff(self, context: Sequence[str]) -> float:
        """log10 backoff weight of `context` (0.0 when the file has none)."""
        h = tuple(context)
        return self._backoffs[len(h) - 1].get(h, 0.0) if h and len(h) <= self.order else 0.0
