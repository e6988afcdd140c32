"""The embedded public-domain text corpus: 31k Bible verses, English and Spanish.

Both sides are public-domain translations aligned verse by verse (World English
Bible / Reina-Valera 1909), so the corpus serves as LM text, as transcripts to
synthesize, and as a speech-translation target.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache

from ..paths import resource

CORPUS_FILE = "bible_en_es.jsonl.gz"


@dataclass(frozen=True)
class Verse:
    ref: str  # e.g. "Genesis 1:1"
    en: str
    es: str

    @property
    def book(self) -> str:
        return self.ref.rsplit(" ", 1)[0]

    def text(self, lang: str) -> str:
        if lang not in ("en", "es"):
            raise ValueError(f"the embedded corpus has 'en' and 'es', not {lang!r}")
        return self.en if lang == "en" else self.es


@lru_cache(maxsize=1)
def load_verses() -> tuple[Verse, ...]:
    """All verses in canonical order (loaded once per process)."""
    with gzip.open(resource(CORPUS_FILE), "rt", encoding="utf-8") as f:
        return tuple(Verse(r["ref"], r["en"].strip(), r["es"].strip()) for r in map(json.loads, f))


def normalized_key(text: str) -> str:
    """Case- and punctuation-insensitive key used to keep split texts disjoint."""
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())
