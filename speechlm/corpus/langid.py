"""Language identification as a datatrove filter, with py3langid (it ships its model).

datatrove's own LanguageFilter downloads a fastText model at run time; our
machines (and many clusters) have no network, and py3langid's bundled model
covers 97 languages. Each document gets `metadata["language"]` and
`metadata["language_score"]`; it is kept when the language is in `keep` and
the score (py3langid's normalised probability) is at least `min_score`.
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

__all__ = ["LangIdFilter"]


class LangIdFilter(BaseFilter):
    name = "🌍 py3langid"
    _requires_dependencies = ["py3langid"]

    def __init__(self, keep: list[str], min_score: float = 0.5, max_chars: int = 20_000,
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep = frozenset(keep)
        self.min_score = min_score
        self.max_chars = max_chars
        self._identifier = None  # loaded in the worker, not pickled with the pipeline

    def classify(self, text: str) -> tuple[str, float]:
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(text[: self.max_chars])
        return lang, float(score)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        self.stat_update(f"lang_{lang}")
        if lang not in self.keep:
            return False, f"language_{lang}"
        if score < self.min_score:
            return False, "language_score"
        return True
