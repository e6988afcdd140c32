"""Scores for transcripts, translations and answers: WER/CER (jiwer), BLEU/chrF (sacrebleu),
exact match and accuracy; and `score_manifest` to score a hypothesis JSONL against a manifest.

WER and CER are corpus-level: total edits / total reference words (characters,
spaces included). An empty reference is allowed (its hypothesis words count
as insertions); when every reference is empty the rate is 0.0 if every
hypothesis is empty too, else 1.0. With `lang`, both sides are first passed
through `speechlm.text.normalize_transcript(text, lang)` (lower case, no
punctuation, ...), the same rules CTC training uses; without it only runs of
whitespace are collapsed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError, SpeechLMError

__all__ = ["METRICS", "ScoreResult", "accuracy", "bleu", "cer", "chrf", "edit_counts",
           "exact_match", "score_manifest", "wer", "word_recall"]

_SPACES = re.compile(r"\s+")


def _prepare(texts: Sequence[str | None], lang: str | None,
             normalize: bool = True) -> list[str]:
    from ..text.normalize import normalize_transcript

    out = []
    for text in texts:
        text = "" if text is None else str(text)
        if normalize and lang is not None:
            out.append(normalize_transcript(text, lang))
        else:
            out.append(_SPACES.sub(" ", text).strip())
    return out


def _check_pairs(refs, hyps) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses; "
                         "score aligned lists (score_manifest aligns by id)")


def edit_counts(refs: Sequence[str], hyps: Sequence[str], *, unit: str = "word",
                lang: str | None = None) -> dict[str, int]:
    """Corpus totals of substitutions, deletions, insertions, hits and reference length."""
    import jiwer

    _check_pairs(refs, hyps)
    refs, hyps = _prepare(refs, lang), _prepare(hyps, lang)
    if not refs:
        return {"substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0, "ref_len": 0}
    out = (jiwer.process_words if unit == "word" else jiwer.process_characters)(refs, hyps)
    counts = {"substitutions": out.substitutions, "deletions": out.deletions,
              "insertions": out.insertions, "hits": out.hits}
    counts["ref_len"] = out.hits + out.substitutions + out.deletions
    return counts


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance between two sequences of any hashable items (words, characters,
    speech units)."""
    try:
        from rapidfuzz.distance import Levenshtein  # comes with jiwer; C speed
    except ImportError:  # pragma: no cover
        Levenshtein = None
    if Levenshtein is not None:
        return int(Levenshtein.distance(list(ref), list(hyp)))
    row = list(range(len(hyp) + 1))  # pragma: no cover
    for i, r in enumerate(ref, 1):  # pragma: no cover
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]  # pragma: no cover


def _rate(counts: dict[str, int]) -> float:
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    if counts["ref_len"] == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / counts["ref_len"]


def wer(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None) -> float:
    """Word error rate (a fraction: 0.25 = 25 %), corpus level."""
    return _rate(edit_counts(refs, hyps, unit="word", lang=lang))


def cer(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None) -> float:
    """Character error rate (a fraction), corpus level; spaces count as characters."""
    return _rate(edit_counts(refs, hyps, unit="char", lang=lang))


def word_recall(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None) -> float:
    """The fraction of reference words the hypotheses contain, in any order (each hypothesis
    word counts once), corpus level. A diagnostic beside WER: it tells whether the words came
    through at all when an answer also says much else (insertions make WER pass 100%)."""
    from collections import Counter

    _check_pairs(refs, hyps)
    hits = total = 0
    for ref, hyp in zip(_prepare(refs, lang), _prepare(hyps, lang), strict=True):
        want, have = Counter(ref.split()), Counter(hyp.split())
        hits += sum(min(n, have[word]) for word, n in want.items())
        total += sum(want.values())
    return hits / total if total else 0.0


def bleu(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None,
         tokenize: str | None = None) -> float:
    """Corpus BLEU (0-100, sacrebleu; one reference per hypothesis). Text is scored as
    written unless `lang` is given; tokenize defaults to "13a" ("ja-mecab"-free "char" for
    ja/zh)."""
    import sacrebleu

    _check_pairs(refs, hyps)
    refs, hyps = _prepare(refs, lang), _prepare(hyps, lang)
    if tokenize is None:
        tokenize = "char" if (lang or "").split("-")[0] in ("ja", "zh") else "13a"
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score) if refs else 0.0


def chrf(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None) -> float:
    """Corpus chrF (0-100, sacrebleu)."""
    import sacrebleu

    _check_pairs(refs, hyps)
    refs, hyps = _prepare(refs, lang), _prepare(hyps, lang)
    return float(sacrebleu.corpus_chrf(hyps, [refs]).score) if refs else 0.0


def _squad_normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lower case, no punctuation/articles, single spaces."""
    text = "" if text is None else str(text).lower()
    text = "".join(" " if c in string.punctuation else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return _SPACES.sub(" ", text).strip()


def exact_match(refs: Sequence[str], hyps: Sequence[str], *, lang: str | None = None) -> float:
    """Fraction of hypotheses equal to their reference after normalisation (with `lang`: the
    transcript rules; without: SQuAD's lower case / no punctuation / no articles)."""
    _check_pairs(refs, hyps)
    if not refs:
        return 0.0
    if lang is not None:
        refs, hyps = _prepare(refs, lang), _prepare(hyps, lang)
    else:
        refs, hyps = [_squad_normalize(r) for r in refs], [_squad_normalize(h) for h in hyps]
    return sum(r == h for r, h in zip(refs, hyps, strict=True)) / len(refs)


def accuracy(refs: Sequence, hyps: Sequence) -> float:
    """Fraction of exactly equal labels (strings compared after stripping outer whitespace)."""
    _check_pairs(refs, hyps)
    if not refs:
        return 0.0

    def key(value):
        return value.strip() if isinstance(value, str) else value

    return sum(key(r) == key(h) for r, h in zip(refs, hyps, strict=True)) / len(refs)


# name -> (function, scored on normalised text, higher is better)
METRICS = {
    "wer": (wer, True, False),
    "cer": (cer, True, False),
    "bleu": (bleu, False, True),  # translations: cased, punctuated text as written
    "chrf": (chrf, False, True),
    "exact_match": (exact_match, True, True),
    "accuracy": (accuracy, False, True),
}


@dataclass
class ScoreResult:
    """What `score_manifest` found: the scores plus how the ids lined up."""

    scores: dict[str, float]
    num_scored: int
    missing: list[str] = field(default_factory=list)  # in the reference, no hypothesis
    extra: list[str] = field(default_factory=list)  # hypotheses with an id not in the reference
    empty_hypotheses: int = 0
    lang: str | None = None

    def to_dict(self) -> dict:
        return {"scores": self.scores, "num_scored": self.num_scored,
                "num_missing": len(self.missing), "num_extra": len(self.extra),
                "missing": self.missing, "extra": self.extra,
                "empty_hypotheses": self.empty_hypotheses, "lang": self.lang}


def score_manifest(hyp_jsonl, ref_manifest, metrics: Sequence[str] = ("wer", "cer"), *,
                   lang: str | None = None, ref_field: str = "text", hyp_field: str = "text",
                   missing: str = "empty", normalize: bool = True) -> ScoreResult:
    """Score hypotheses (JSONL with `id` and `text`) against a reference manifest, by id.

    `missing`: "empty" scores a reference without a hypothesis as an empty
    hypothesis (all deletions; the honest default), "skip" leaves it out.
    `lang`: normalisation language; default each reference's `lang` field
    (references without one are scored with the default rules). With
    `normalize=False` texts are compared as written (whitespace collapsed).
    WER, CER and exact match use the normalised text; BLEU, chrF and accuracy
    the text as written (translations are scored cased and punctuated).
    """
    from ..jsonl import iter_jsonl

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise SpeechLMError(f"unknown metric(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(METRICS)}")
    if missing not in ("empty", "skip"):
        raise ValueError("missing must be 'empty' or 'skip'")
    hyps: dict[str, str] = {}
    hyp_path = Path(hyp_jsonl)
    if not hyp_path.is_file():
        raise SpeechLMError(f"{hyp_path}: hypothesis file not found")
    for line, rec in iter_jsonl(hyp_path):
        if "id" not in rec:
            raise ManifestError(f"{hyp_path}:{line}: id: missing (each hypothesis line needs "
                                "an 'id' matching the reference manifest)")
        text = rec.get(hyp_field)
        if text is not None and not isinstance(text, str):
            raise ManifestError(f"{hyp_path}:{line}: {hyp_field}: expected a string, got "
                                f"{type(text).__name__}")
        hyps[str(rec["id"])] = text or ""  # a later line for the same id wins (resumed runs)
    ref_path = Path(ref_manifest)
    if not ref_path.is_file():
        raise SpeechLMError(f"{ref_path}: reference manifest not found")
    refs: list[tuple[str, str, str | None]] = []
    seen: set[str] = set()
    for line, rec in iter_jsonl(ref_path):
        if "id" not in rec:
            raise ManifestError(f"{ref_path}:{line}: id: missing")
        rid = str(rec["id"])
        if rid in seen:
            raise ManifestError(f"{ref_path}:{line}: id: duplicate id {rid!r}")
        seen.add(rid)
        text = rec.get(ref_field)
        if text is None:
            raise ManifestError(f"{ref_path}:{line}: {ref_field}: missing (the reference needs "
                                f"a '{ref_field}' to score against)")
        refs.append((rid, str(text), rec.get("lang")))
    missing_ids = [rid for rid, _, _ in refs if rid not in hyps]
    extra_ids = sorted(set(hyps) - seen)
    pairs = [(text, hyps.get(rid, ""), lang or rec_lang) for rid, text, rec_lang in refs
             if rid in hyps or missing == "empty"]
    raw_refs = [_prepare([r], None)[0] for r, _, _ in pairs]
    raw_hyps = [_prepare([h], None)[0] for _, h, _ in pairs]
    norm_refs = [_prepare([r], lg or "default", normalize)[0] for r, _, lg in pairs]
    norm_hyps = [_prepare([h], lg or "default", normalize)[0] for _, h, lg in pairs]
    scores = {}
    for name in metrics:
        fn, normalised, _ = METRICS[name]
        scores[name] = float(fn(norm_refs, norm_hyps) if normalised else fn(raw_refs, raw_hyps))
    return ScoreResult(scores=scores, num_scored=len(pairs), missing=missing_ids,
                       extra=extra_ids, empty_hypotheses=sum(1 for h in raw_hyps if not h),
                       lang=lang)
