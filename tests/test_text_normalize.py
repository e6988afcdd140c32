"""Transcript normalisation rules per language."""

import pytest

from speechlm.text.normalize import (
    LanguageRules,
    normalize_transcript,
    register_language,
    rules_for,
)


@pytest.mark.parametrize("text,expected", [
    # typographic quotes dropped, curly apostrophe kept inside the word, dash separates words
    ("“Don’t let your heart be troubled—believe.”", "don't let your heart be troubled believe"),
    # apostrophes at word edges are quote marks: dropped; inside words kept
    ("'Tis rock'n'roll, the Jesus' way", "tis rock'n'roll the jesus way"),
    # accents stripped on Latin letters (loanwords), NFKC folds ligatures and full-width forms
    ("Café naïve ﬁne Ｆｕｌｌ", "cafe naive fine full"),
    # numbers stay digits; the colon becomes a space
    ("Mark 3:25 (KJV)", "mark 3 25 kjv"),
    ("well-known  \t  spaced\nout", "well known spaced out"),
    ("zero\u200bwidth soft\u00adhyphen", "zerowidth softhyphen"),
    ("...", ""),
])
def test_english(text, expected):
    assert normalize_transcript(text, "en") == expected


def test_spanish_keeps_accents_enye_and_dieresis_and_drops_inverted_marks():
    assert normalize_transcript("¿Qué PASÓ, Ñandú? ¡Pingüino! Él", "es") == \
        "qué pasó ñandú pingüino él"
    # decomposed input (e + combining acute) is composed: one character per letter
    assert normalize_transcript("QUE\u0301", "es") == "qué"
    assert len(normalize_transcript("QUE\u0301", "es")) == 3


def test_spanish_apostrophe_is_punctuation():
    assert normalize_transcript("d'Artagnan", "es") == "d artagnan"


def test_devanagari_keeps_combining_marks_and_drops_danda():
    out = normalize_transcript("नमस्ते। दुनिया!", "hi")
    assert out == "नमस्ते दुनिया"
    assert "\u094d" in out  # virama kept
    assert "\u0947" in out  # vowel sign e kept


def test_tamil_and_japanese_keep_their_characters():
    assert normalize_transcript("வணக்கம், உலகம்.", "ta") == "வணக்கம் உலகம்"
    # NFKC: half-width katakana -> full width; ideographic punctuation dropped; ー kept
    assert normalize_transcript("こんにちは、世界。ｶﾀｶﾅ ラーメン", "ja") == "こんにちは 世界 カタカナ ラーメン"


def test_language_code_variants_and_unknown_languages():
    assert rules_for("en-US") is rules_for("en")
    assert rules_for("es_419") is rules_for("es")
    assert rules_for("xx") is rules_for(None) is rules_for("default")
    # default rules: lower case, punctuation out, apostrophe inside words kept, accents kept
    assert normalize_transcript("Ça VA, l'ami?", "xx") == "ça va l'ami"


def test_register_language(monkeypatch):
    from speechlm.text import normalize

    monkeypatch.setattr(normalize, "LANGUAGE_RULES", dict(normalize.LANGUAGE_RULES))
    register_language("ain-x", LanguageRules(lowercase=False, keep_inside_words="='"))
    assert normalize_transcript("A=kor Kotan.", "ain-x") == "A=kor Kotan"
    assert normalize_transcript("A=kor Kotan.", "ain") == "a kor kotan"
