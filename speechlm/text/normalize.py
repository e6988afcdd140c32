"""Transcript normalisation for character CTC training and WER/CER scoring, per language.

`normalize_transcript(text, lang)` applies, in this order:

1. Unicode normal form: NFKC for Latin-script languages and Japanese (folds
   full-width letters, ligatures such as "ﬁ", superscript digits, half-width
   katakana into their plain forms), NFC for Indic scripts (composes
   characters without touching compatibility forms). Both keep combining
   marks, so Devanagari/Tamil vowel signs and viramas survive as characters.
2. Typographic marks: curly and modifier apostrophes (’ ‘ ʼ ` ´ ′) become "'",
   curly and angle quotes become '"' (then dropped as punctuation), and
   dashes/hyphens (- ‐ ‒ – — ― −) and the ellipsis separate words (a space):
   "well-known" -> "well known".
3. Invisible format characters (zero-width space/joiners, BOM, soft hyphen,
   bidi marks) are removed.
4. Lower case where the script has case (`lowercase`; caseless scripts such
   as Devanagari, Tamil or Japanese are unaffected by it).
5. `strip_accents` (English only): diacritics on Latin letters are removed
   ("café" -> "cafe"), so loanwords do not add rare characters. Spanish keeps
   á é í ó ú ñ ü.
6. Punctuation and symbols (Unicode categories P* and S*, including ¿ ¡, the
   danda "।" and "。、") become a space, except the characters in
   `keep_inside_words` when they sit between two letters or digits (English:
   the apostrophe of "don't", "o'clock"; a leading or trailing apostrophe, a
   quote mark, is dropped). Letters, digits and combining marks are kept;
   numbers stay as digits (no number-to-words conversion), so "3:25" becomes
   "3 25".
7. Whitespace (any kind) collapsed to single spaces, ends stripped.

`normalize_transcript(text, lang, spell_out=True)` first writes numbers,
symbols and abbreviations out as words (`speechlm.text.verbalize`), for
character models and TTS text that must not contain digits. Steps 1-3 alone
are `clean_unicode(text, lang)`: text for synthesis keeps its case and
punctuation but needs the same Unicode clean-up.

Rules are a small registry keyed by language code ("en", "es", "hi", ...);
"en-US" and "es_419" use their base language, and unknown languages get the
default rules (NFC, lower case, apostrophe inside words kept). Add one with
`register_language("xx", LanguageRules(...))`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

__all__ = ["LANGUAGE_RULES", "LanguageRules", "clean_unicode", "normalize_transcript",
           "register_language", "rules_for"]


@dataclass(frozen=True)
class LanguageRules:
    """How to normalise transcripts of one language (see the module doc for each step)."""

    unicode_form: Literal["NFC", "NFKC"] = "NFC"
    lowercase: bool = True
    strip_accents: bool = False
    keep_inside_words: str = "'"  # punctuation kept between two letters/digits


# Apostrophe look-alikes -> ASCII apostrophe; quote marks -> '"'; word-separating dashes.
_APOSTROPHES = "\u2019\u2018\u02bc\u0060\u00b4\u2032\u02b9\uff07"
_QUOTES = "\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a\u300c\u300d\u300e\u300f"
_DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2026\ufe58\ufe63\uff0d"
_TYPOGRAPHY = str.maketrans({**{c: "'" for c in _APOSTROPHES}, **{c: '"' for c in _QUOTES},
                             **{c: " " for c in _DASHES}})
_SPACES = re.compile(r"\s+")

_LATIN_NFKC = LanguageRules(unicode_form="NFKC")
_INDIC = LanguageRules(unicode_form="NFC", keep_inside_words="")

LANGUAGE_RULES: dict[str, LanguageRules] = {
    "default": LanguageRules(),
    "en": LanguageRules(unicode_form="NFKC", strip_accents=True, keep_inside_words="'"),
    "es": LanguageRules(unicode_form="NFKC", keep_inside_words=""),
    "fr": _LATIN_NFKC,
    "de": _LATIN_NFKC,
    "it": _LATIN_NFKC,
    "pt": _LATIN_NFKC,
    "ain": _LATIN_NFKC,  # Ainu in Latin transcription (the Ainu paper's setting)
    "ja": LanguageRules(unicode_form="NFKC", keep_inside_words=""),
    **{code: _INDIC for code in ("hi", "mr", "ne", "sa", "bn", "as", "or", "pa", "gu",
                                 "ta", "te", "kn", "ml", "si")},
}


def register_language(code: str, rules: LanguageRules) -> None:
    """Use `rules` for language `code` (replacing any existing entry)."""
    LANGUAGE_RULES[code.lower()] = rules


def rules_for(lang: str | None) -> LanguageRules:
    """The rules of `lang` ("en", "en-US", "es_419" -> "es"); default rules if unknown/None."""
    if not lang:
        return LANGUAGE_RULES["default"]
    code = lang.lower()
    if code in LANGUAGE_RULES:
        return LANGUAGE_RULES[code]
    base = re.split(r"[-_]", code, maxsplit=1)[0]
    return LANGUAGE_RULES.get(base, LANGUAGE_RULES["default"])


def clean_unicode(text: str, lang: str | None = None) -> str:
    """Steps 1-3 of the module doc: Unicode normal form of `lang`, typographic marks folded,
    invisible format characters removed. Case, punctuation and digits are kept."""
    text = unicodedata.normalize(rules_for(lang).unicode_form, text)
    text = text.translate(_TYPOGRAPHY)
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def normalize_transcript(text: str, lang: str | None = None, *, spell_out: bool = False) -> str:
    """`text` normalised for character CTC / scoring under the rules of `lang` (module doc);
    with `spell_out`, numbers, symbols and abbreviations are written out as words first."""
    rules = rules_for(lang)
    if spell_out:
        from .verbalize import verbalize  # verbalize imports this module

        text = verbalize(text, lang)
    text = clean_unicode(text, lang)
    if rules.lowercase:
        text = text.lower()
    if rules.strip_accents:
        text = _strip_latin_accents(text)
    text = _drop_punctuation(text, rules.keep_inside_words)
    return _SPACES.sub(" ", text).strip()


def _strip_latin_accents(text: str) -> str:
    """Remove combining marks that follow a Latin letter (other scripts keep theirs)."""
    out: list[str] = []
    base_is_latin = False
    for c in unicodedata.normalize("NFD", text):
        if unicodedata.category(c).startswith("M"):
            if base_is_latin:
                continue
        else:
            base_is_latin = c.isascii() or "LATIN" in unicodedata.name(c, "")
        out.append(c)
    return unicodedata.normalize("NFC", "".join(out))


def _is_word_char(c: str) -> bool:
    return unicodedata.category(c)[0] in "LNM"


def _drop_punctuation(text: str, keep_inside_words: str) -> str:
    out: list[str] = []
    n = len(text)
    for i, c in enumerate(text):
        category = unicodedata.category(c)
        if category[0] in "PS" or category in ("Cc", "Co", "Cn", "Cs"):
            if (c in keep_inside_words and 0 < i < n - 1 and _is_word_char(text[i - 1])
                    and _is_word_char(text[i + 1])):
                out.append(c)
            else:
                out.append(" ")
        else:
            out.append(c)
    return "".join(out)
