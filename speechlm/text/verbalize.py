"""Numbers, symbols and abbreviations written out as words, per language (text for TTS).

`verbalize(text, lang)` first applies `clean_unicode` (the transcript
normaliser's Unicode steps, so full-width digits and curly quotes are folded
the same way), then, in this order:

1. abbreviations of the language ("Dr." -> "Doctor", "e.g." -> "for example");
2. currency amounts ("$5" -> "five dollars", "3,50 €" -> "tres coma cinco euros")
   and percentages ("12%" -> "twelve percent");
3. ordinals written with digits (en "21st", es "1º", fr "2e");
4. dotted identifiers, read group by group with the language's word for the
   dot: versions and addresses with two or more dots ("3.11.2" -> "three dot
   eleven dot two", "192.168.0.0/16" -> "... dot zero slash sixteen") and a
   name before digits ("X.509" -> "X dot five hundred and nine"); one dot
   between digits stays a decimal ("10.2" -> "ten point two"), and a
   thousands number of a language that groups with dots ("1.234.567" in
   Spanish) stays a number;
5. numbers: thousands separators and the decimal mark of the language,
   four-digit years 1100-2099 read as years in English ("1999" ->
   "nineteen ninety-nine");
6. a few free-standing symbols ("&" -> "and", "+" -> "plus", "=" -> "equals").

Case and sentence punctuation are kept: TTS engines use them for prosody.
Numbers are spoken by `num2words` (PyPI, LGPL-2.1, in the `corpus` extra); a
language it does not know keeps its digits (eSpeak NG reads digits itself).
Add or change a language with `register_verbalizer("xx", VerbalizerRules(...))`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

from .normalize import clean_unicode

__all__ = ["VERBALIZER_RULES", "VerbalizerRules", "register_verbalizer", "verbalize"]


@dataclass(frozen=True)
class VerbalizerRules:
    """How one language writes numbers and says symbols (see the module doc)."""

    thousands: str = ","  # thousands separator in numbers ("1,000")
    decimal: str = "."  # decimal mark ("3.5")
    abbreviations: dict[str, str] = field(default_factory=dict)
    currencies: dict[str, tuple[str, str]] = field(default_factory=dict)  # symbol: (one, many)
    percent: str = "percent"
    symbols: dict[str, str] = field(default_factory=dict)  # free-standing symbol: word
    ordinal_suffix: str = ""  # regex of the suffix after the digits of an ordinal
    years: bool = False  # read 1100-2099 as a year (English)
    dot: str = "dot"  # the dot of a version or an address ("3.11.2")
    slash: str = "slash"  # the slash of an address range ("10.0.0.0/8")


VERBALIZER_RULES: dict[str, VerbalizerRules] = {
    "en": VerbalizerRules(
        abbreviations={"Dr.": "Doctor", "Mr.": "Mister", "Mrs.": "Missus", "Ms.": "Miz",
                       "Prof.": "Professor", "St.": "Saint", "e.g.": "for example",
                       "i.e.": "that is", "etc.": "et cetera", "vs.": "versus",
                       "approx.": "approximately", "Fig.": "Figure", "No.": "number"},
        currencies={"$": ("dollar", "dollars"), "€": ("euro", "euros"),
                    "£": ("pound", "pounds"), "¥": ("yen", "yen")},
        symbols={"&": "and", "+": "plus", "=": "equals", "@": "at", "°": "degrees"},
        ordinal_suffix="st|nd|rd|th", years=True),
    "es": VerbalizerRules(
        thousands=".", decimal=",",
        abbreviations={"Sr.": "señor", "Sra.": "señora", "Dr.": "doctor", "Dra.": "doctora",
                       "etc.": "etcétera", "p. ej.": "por ejemplo", "Ud.": "usted"},
        currencies={"$": ("dólar", "dólares"), "€": ("euro", "euros"), "£": ("libra", "libras")},
        percent="por ciento",
        symbols={"&": "y", "+": "más", "=": "igual a", "@": "arroba", "°": "grados"},
        ordinal_suffix="º|ª|o|a", dot="punto", slash="barra"),
    "de": VerbalizerRules(
        thousands=".", decimal=",",
        abbreviations={"z.B.": "zum Beispiel", "z. B.": "zum Beispiel", "usw.": "und so weiter",
                       "bzw.": "beziehungsweise", "Dr.": "Doktor", "Nr.": "Nummer",
                       "ca.": "circa", "d.h.": "das heißt", "d. h.": "das heißt"},
        currencies={"$": ("Dollar", "Dollar"), "€": ("Euro", "Euro"), "£": ("Pfund", "Pfund")},
        percent="Prozent",
        symbols={"&": "und", "+": "plus", "=": "gleich", "@": "at", "°": "Grad"},
        dot="Punkt", slash="Schrägstrich"),
    "fr": VerbalizerRules(
        thousands=" ", decimal=",",
        abbreviations={"M.": "Monsieur", "Mme": "Madame", "Dr": "Docteur", "etc.": "et cetera",
                       "p. ex.": "par exemple"},
        currencies={"$": ("dollar", "dollars"), "€": ("euro", "euros"), "£": ("livre", "livres")},
        percent="pour cent",
        symbols={"&": "et", "+": "plus", "=": "égale", "@": "arobase", "°": "degrés"},
        ordinal_suffix="e|er|re|ème", dot="point", slash="barre oblique"),
    "it": VerbalizerRules(
        thousands=".", decimal=",", currencies={"€": ("euro", "euro"), "$": ("dollaro", "dollari")},
        percent="per cento", symbols={"&": "e", "+": "più", "=": "uguale"}, dot="punto",
        slash="barra"),
    "pt": VerbalizerRules(
        thousands=".", decimal=",", currencies={"€": ("euro", "euros"), "$": ("dólar", "dólares")},
        percent="por cento", symbols={"&": "e", "+": "mais", "=": "igual a"}, dot="ponto",
        slash="barra"),
}


def register_verbalizer(code: str, rules: VerbalizerRules) -> None:
    """Use `rules` for language `code` (replacing any existing entry)."""
    VERBALIZER_RULES[code.lower()] = rules
    _compiled.cache_clear()


def _base(lang: str | None) -> str:
    return re.split(r"[-_]", (lang or "en").lower(), maxsplit=1)[0]


@cache
def _number_language(lang: str) -> str | None:
    """The num2words code for `lang`, or None when num2words cannot say its numbers."""
    from num2words import CONVERTER_CLASSES

    return lang if lang in CONVERTER_CLASSES else None


@cache
def _compiled(lang: str):
    rules = VERBALIZER_RULES.get(lang, VerbalizerRules(symbols={}))
    th, dec = re.escape(rules.thousands), re.escape(rules.decimal)
    # "1,234,567.89": groups of three after the thousands separator, then decimals
    number = rf"\d{{1,3}}(?:{th}\d{{3}})+(?:{dec}\d+)?|\d+(?:{dec}\d+)?"
    abbreviations = None
    if rules.abbreviations:
        keys = sorted(rules.abbreviations, key=len, reverse=True)
        abbreviations = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, keys)) + r")(?!\w)")
    currency = None
    if rules.currencies:
        symbols = "".join(re.escape(c) for c in rules.currencies)
        currency = re.compile(rf"([{symbols}])\s?({number})|({number})\s?([{symbols}])")
    ordinal = (re.compile(rf"\b(\d+)({rules.ordinal_suffix})\b") if rules.ordinal_suffix
               else None)
    return (rules, re.compile(number), abbreviations, currency, re.compile(rf"({number})\s?%"),
            ordinal)


def _to_number(digits: str, rules: VerbalizerRules) -> int | float:
    plain = digits.replace(rules.thousands, "") if rules.thousands in digits else digits
    if rules.decimal in plain:
        whole, frac = plain.split(rules.decimal, 1)
        return float(f"{whole}.{frac}")
    return int(plain)


def _say(value: int | float, lang: str, to: str = "cardinal") -> str | None:
    code = _number_language(lang)
    if code is None:
        return None
    from num2words import num2words

    try:
        return num2words(value, lang=code, to=to)
    except (NotImplementedError, OverflowError, ValueError, TypeError):
        return None


def _say_digits(digits: str, lang: str, rules: VerbalizerRules, *, year_ok: bool = False) -> str:
    value = _to_number(digits, rules)
    if (year_ok and rules.years and isinstance(value, int) and digits.isdigit() and len(digits) == 4
            and 1100 <= value <= 2099):
        return _say(value, lang, "year") or digits
    return _say(value, lang) or digits


# "3.11.2", "192.168.0.0/16" (two or more dots) or "X.509" (a name, then digits)
_DOTTED = re.compile(r"(?<![\w.])(?:(?P<name>[A-Za-z]+)\.(?P<first>\d+)|\d+(?:\.\d+){2,})"
                     r"(?:/(?P<range>\d+))?(?![\w]|\.\d)")


def _say_dotted(m: re.Match, lang: str, rules: VerbalizerRules) -> str:
    whole = m.group(0)
    if rules.thousands == "." and re.fullmatch(r"\d{1,3}(?:\.\d{3})+", whole):
        return whole  # a thousands number of this language: the number step reads it
    address, _, prefix = whole.partition("/")
    parts = address.split(".")
    words = [parts[0] if m.group("name") else _say(int(parts[0]), lang) or parts[0]]
    words += [_say(int(p), lang) or p for p in parts[1:]]
    said = f" {rules.dot} ".join(words)
    return f"{said} {rules.slash} {_say(int(prefix), lang) or prefix}" if prefix else said


def verbalize(text: str, lang: str | None = "en") -> str:
    """`text` with numbers, symbols and abbreviations of `lang` written out (module doc)."""
    lang = _base(lang)
    rules, number, abbreviations, currency, percent, ordinal = _compiled(lang)
    text = clean_unicode(text, lang)
    if abbreviations is not None:
        text = abbreviations.sub(lambda m: rules.abbreviations[m.group(1)], text)
    if currency is not None:
        def say_amount(m: re.Match) -> str:
            symbol, digits = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            one, many = rules.currencies[symbol]
            value = _to_number(digits, rules)
            return f"{_say_digits(digits, lang, rules)} {one if value == 1 else many}"
        text = currency.sub(say_amount, text)
    text = percent.sub(lambda m: f"{_say_digits(m.group(1), lang, rules)} {rules.percent}", text)
    if ordinal is not None:
        text = ordinal.sub(lambda m: _say(int(m.group(1)), lang, "ordinal") or m.group(0), text)
    text = _DOTTED.sub(lambda m: _say_dotted(m, lang, rules), text)
    text = number.sub(lambda m: _say_digits(m.group(0), lang, rules, year_ok=True), text)
    for symbol, word in rules.symbols.items():
        text = text.replace(symbol, f" {word} ")
    return re.sub(r"[ \t]{2,}", " ", text).strip()
