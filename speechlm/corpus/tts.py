"""TTS readiness as a datatrove step: text written out for speaking, cut into sentences.

Adds `metadata["sentences"]`: the document's sentences with numbers, symbols
and abbreviations written out in the document's language
(`speechlm.text.verbalize`, built on the transcript normaliser's Unicode
steps), split by datatrove's sentence splitter for that language (spaCy's
rule-based sentencizer; a punctuation regex for languages without one).
A sentence longer than `max_sentence_chars` is cut at its last comma, semicolon
or space before the limit: TTS engines lose prosody or fail on very long input.
The document's `text` is left as it is, for text-only training.
"""

from __future__ import annotations

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

__all__ = ["TTSReadiness", "cut_long_sentence"]

_OPENING_MARKS = "¿¡"


def cut_long_sentence(sentence: str, max_chars: int) -> list[str]:
    """`sentence` in pieces of at most `max_chars`, cut after a comma/semicolon or at a space."""
    pieces = []
    while len(sentence) > max_chars:
        window = sentence[:max_chars]
        cut = max(window.rfind(", "), window.rfind("; "))
        cut = cut + 1 if cut > max_chars // 3 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    if sentence:
        pieces.append(sentence)
    return pieces


class TTSReadiness(PipelineStep):
    type = "🗣 - TTS"
    name = "sentences for synthesis"

    def __init__(self, default_language: str = "en", verbalize: bool = True,
                 max_sentence_chars: int = 400):
        super().__init__()
        self.default_language = default_language
        self.verbalize = verbalize
        self.max_sentence_chars = max_sentence_chars
        self._splitters: dict = {}

    def _splitter(self, lang: str):
        if lang not in self._splitters:
            from datatrove.utils.word_tokenizers import WhitespaceTokenizer, load_word_tokenizer

            try:
                self._splitters[lang] = load_word_tokenizer(lang)
            except ValueError:  # datatrove has no tokenizer for this language
                self._splitters[lang] = WhitespaceTokenizer()
        return self._splitters[lang]

    def sentences(self, text: str, lang: str) -> list[str]:
        if self.verbalize:
            from speechlm.text.verbalize import verbalize

            text = verbalize(text, lang)
        out: list[str] = []
        carry = ""  # spaCy leaves Spanish "¿" / "¡" at the end of the sentence before
        for sentence in self._splitter(lang).sent_tokenize(text):
            sentence = carry + " ".join(sentence.split())
            carry = ""
            while sentence and sentence[-1] in _OPENING_MARKS:
                carry, sentence = sentence[-1] + carry, sentence[:-1].rstrip()
            if sentence:
                out.extend(cut_long_sentence(sentence, self.max_sentence_chars))
        if carry:
            out.append(carry)
        return out

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                lang = doc.metadata.get("language") or self.default_language
                doc.metadata["sentences"] = self.sentences(doc.text, lang)
            self.stat_update("sentences", value=len(doc.metadata["sentences"]))
            yield doc
