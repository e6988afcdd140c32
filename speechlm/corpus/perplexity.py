"""CCNet-style quality buckets: each document's perplexity under a word n-gram LM of a
reference corpus, as a datatrove filter.

CCNet (Wenzek et al. 2019) scores web documents with a Kneser-Ney LM trained on
Wikipedia and splits them into head / middle / tail by perplexity: text that reads
like the reference is "head". Here the reference is any text the user trusts (the
embedded Bible corpus, their domain's transcripts) and the LM is the toolkit's own
Kneser-Ney builder (`speechlm.text.ngram`, ARPA, so a KenLM `lmplz` model works too).
The two cut-offs default to the terciles of the perplexity of held-out reference
lines (every 10th line is held out of the LM), so "head" means "as predictable as the
best third of the reference itself". Each document gets `ngram_perplexity` and
`ngram_bucket`; only buckets in `keep` pass (all three by default: annotate only).

Words are the transcript normaliser's (`normalize_transcript`), for the reference and
the documents alike, so the LM's vocabulary and the scored words match.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from ..errors import ConfigError

__all__ = ["BUCKETS", "NgramPerplexityFilter", "ReferenceLM", "prepare_reference_lm"]

BUCKETS = ("head", "middle", "tail")
_HELD_OUT_EVERY = 10


@dataclass(frozen=True)
class ReferenceLM:
    """The LM file and the perplexity cut-offs: head < head_max <= middle < middle_max."""

    path: str
    head_max: float
    middle_max: float


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalized_lines(text: str, lang: str) -> list[str]:
    """The normalised sentences of `text` (lines cut after . ! ?): documents are scored in
    the units the reference's lines are, each with its sentence start and end."""
    from ..text.normalize import normalize_transcript

    return [words for line in text.splitlines() for sentence in _SENTENCE_END.split(line)
            if (words := normalize_transcript(sentence, lang))]


def perplexity_of(model, lines: list[str], max_words: int | None = None) -> float:
    """Per-word perplexity (</s> counted) of normalised lines, the first `max_words` words;
    inf for a text without words."""
    total, count = 0.0, 0
    for line in lines:
        words = line.split()
        if max_words is not None:
            words = words[: max(0, max_words - count)]
            if not words:
                break
        total += model.score(words)
        count += len(words) + 1
    return 10.0 ** (-total / count) if count else math.inf


def _terciles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3]


def prepare_reference_lm(section, lang: str, work_dir: Path) -> ReferenceLM:
    """The LM and cut-offs of the `perplexity` config section: `lm` (an ARPA file) or
    `reference` (text to build one from), cut-offs given or from held-out reference lines.
    Built once per output directory (a rerun reuses it)."""
    from ..text.ngram import ArpaModel, build_arpa, iter_text

    if not section.lm and not section.reference:
        raise ConfigError("perplexity is enabled but names no LM: set perplexity.reference "
                          "(text to build one from, e.g. embedded:en) or perplexity.lm (ARPA)")
    given = section.head_max is not None and section.middle_max is not None
    if not given and not section.reference:
        raise ConfigError("perplexity.head_max and perplexity.middle_max: give both cut-offs, "
                          "or a perplexity.reference whose held-out lines set them")
    held_out: list[str] = []
    if section.reference:
        train: list[str] = []
        for i, line in enumerate(iter_text(section.reference)):
            words = normalized_lines(line, lang)
            (held_out if i % _HELD_OUT_EVERY == _HELD_OUT_EVERY - 1 else train).extend(words)
    if section.lm:
        path = Path(section.lm)
        if not path.is_file():
            raise ConfigError(f"perplexity.lm: {path} not found; give an ARPA file "
                              "(speechlm build lm, or KenLM's lmplz)")
    else:
        path = work_dir / "perplexity_lm.arpa"
        if not path.is_file():
            work_dir.mkdir(parents=True, exist_ok=True)
            build_arpa(train, section.order, out_path=path)
    if given:
        head_max, middle_max = float(section.head_max), float(section.middle_max)
    else:
        model = ArpaModel.load(path)
        head_max, middle_max = _terciles([perplexity_of(model, [line]) for line in held_out])
    if not head_max < middle_max:
        raise ConfigError(f"perplexity: head_max {head_max:g} must be below middle_max "
                          f"{middle_max:g}")
    return ReferenceLM(str(path), head_max, middle_max)


class NgramPerplexityFilter(BaseFilter):
    name = "📉 n-gram perplexity"

    def __init__(self, reference: ReferenceLM, lang: str, keep=BUCKETS,
                 max_words: int | None = 2000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.reference = reference
        self.lang = lang
        self.keep = frozenset(keep)
        self.max_words = max_words
        self._model = None  # loaded in the worker, not pickled with the pipeline

    def bucket(self, perplexity: float) -> str:
        if perplexity < self.reference.head_max:
            return "head"
        return "middle" if perplexity < self.reference.middle_max else "tail"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            from ..text.ngram import ArpaModel

            self._model = ArpaModel.load(self.reference.path)
        perplexity = perplexity_of(self._model, normalized_lines(doc.text, self.lang),
                                   self.max_words)
        bucket = self.bucket(perplexity)
        doc.metadata["ngram_perplexity"] = round(perplexity, 1) if math.isfinite(perplexity) \
            else None
        doc.metadata["ngram_bucket"] = bucket
        self.stat_update(f"bucket_{bucket}")
        return True if bucket in self.keep else (False, f"perplexity_{bucket}")
