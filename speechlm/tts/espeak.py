"""Offline TTS with eSpeak NG (100+ languages), driven through ctypes.

The library and its voice data come from the PyPI package `espeakng-loader`.
Voices are written `LANGUAGE[+VARIANT]`: "en-us", "es", "hi", "en-us+f3"
(variant f3 from the data's `voices/!v` folder), or an eSpeak voice file
("gmw/en-US") or name ("English (America)"). List them with `list_voices()`,
`list_variants()` or `speechlm build synth --list-voices [LANG]`.

Determinism. libespeak-ng keeps hidden state between utterances (pitch
flutter position, gain control, random noise), so the same text spoken twice
by one loaded library differs slightly. We load a private image of the
library afresh for every utterance (dlopen of an in-memory copy, ~1 ms) and
unload it afterwards, so the same (text, voice, rate, pitch) always gives the
same samples, in any process, in any order. The library has global state and
is not thread-safe: one module-level lock serialises every call.

What counts as a text eSpeak cannot say (raised as TTSError, so a data job
skips and reports the item):
- no letters or digits at all (empty, whitespace, punctuation, emoji only);
- the synthesized audio is (near) silent;
- any letter eSpeak would *announce* instead of reading: for a script the
  voice cannot read and cannot switch to another language for, eSpeak says
  the script's name ("Japanese letter", "Arabic alif", ...). Notably the
  `ja` voice reads kana only and announces every kanji as "Chinese letter":
  give it kana text;
- more than half of the letters in words eSpeak would spell letter by letter
  (e.g. Cyrillic with an English voice: "pe er i ve ..."; English with the
  Japanese voice). A word counts as spelled when eSpeak makes each of its
  letters a word of its own; acronyms ("USA") are read as one word and
  pass. Not caught: the English voices spell Greek as one run of letter
  names ("epsilon lambda ..."), which passes.
Scripts a voice cannot read but eSpeak can switch language for (Devanagari
or Tamil with an English voice, say) are read in that language and accepted.
Pass `check_script=False` to keep eSpeak's output whatever it is.
"""

from __future__ import annotations

import _ctypes
import atexit
import contextlib
import ctypes
import difflib
import os
import re
import shutil
import sys
import tempfile
import threading
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm.errors import TTSError

from .base import VoiceInfo

NATIVE_SAMPLE_RATE = 22050  # what libespeak-ng produces
DEFAULT_VOICE = "en-us"
DEFAULT_RATE = 175  # eSpeak's default, words per minute
DEFAULT_PITCH = 50  # eSpeak's default, 0-100
RATE_LIMITS = (80, 450)
PITCH_LIMITS = (0, 100)

# Constants from espeak-ng/speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_PHONEMES_IPA = 0x02

_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _VoiceStruct(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated code)*, then a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_LOCK = threading.RLock()
_IMAGE: _LibraryImage | None = None
_CATALOGUE: _Catalogue | None = None

# Script checks are a property of (voice, text) only, so their results are cached across calls.
_ANNOUNCED: dict[tuple[str, str], bool] = {}
_SPELLED: dict[tuple[str, str], bool] = {}
_SPELLED_CACHE_MAX = 200_000

_SYLLABIC_SCRIPTS = {"HIRAGANA", "KATAKANA", "CJK", "HANGUL", "YI", "KANGXI", "IDEOGRAPHIC"}
_ANNOUNCE_MIN_PREFIX = 5  # phoneme characters two letters' readings share when eSpeak names the script
_AUDIBLE_LEVEL = 328  # 1% of int16 full scale (-40 dBFS)
_MIN_AUDIBLE_SECONDS = 0.05
_SWITCH_MARK = re.compile(r"\([a-z0-9-]+\)")


# ---------------------------------------------------------------------------
# The library: a private image, loaded fresh per utterance


class _LibraryImage:
    """A private copy of libespeak-ng that is loaded for one session and unloaded after it.

    Loading from our own copy (an anonymous in-memory file on Linux, a temporary
    file elsewhere) guarantees nobody else holds the library open, so unloading
    really drops its hidden state.
    """

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - it is a dependency
            raise TTSError("eSpeak NG is not installed; run `pip install espeakng-loader`") from e
        source = Path(espeakng_loader.get_library_path())
        self.data_path = str(espeakng_loader.get_data_path())
        if not source.exists():
            raise TTSError(f"{source}: libespeak-ng not found; reinstall espeakng-loader")
        self.path = self._in_memory_copy(source) or self._temporary_copy(source)

    @staticmethod
    def _in_memory_copy(source: Path) -> str | None:
        """Linux: an anonymous file, nothing left on disk. None where unsupported."""
        if not (sys.platform.startswith("linux") and hasattr(os, "memfd_create")):
            return None
        try:
            fd = os.memfd_create("speechlm-libespeak-ng")
            with open(source, "rb") as f:
                os.write(fd, f.read())
            path = f"/proc/self/fd/{fd}"
            _unload(ctypes.CDLL(path))  # /proc may be missing in some sandboxes
            return path
        except OSError:
            return None

    @staticmethod
    def _temporary_copy(source: Path) -> str:
        tmpdir = tempfile.mkdtemp(prefix="speechlm-espeak-")
        atexit.register(shutil.rmtree, tmpdir, True)
        path = str(Path(tmpdir) / source.name)
        shutil.copy(source, path)
        return path

    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        lib = ctypes.CDLL(self.path)
        try:
            _declare(lib)
            rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 500, self.data_path.encode(),
                                         _INITIALIZE_DONT_EXIT)
            if rate <= 0:
                raise TTSError(f"eSpeak NG failed to initialise with its data in {self.data_path}; "
                               "reinstall espeakng-loader")
            session = _Session(lib, rate)
            try:
                yield session
            finally:
                lib.espeak_Terminate()
        finally:
            _unload(lib)


def _unload(lib: ctypes.CDLL) -> None:
    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    if close is not None:
        close(lib._handle)


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_char_p, c_void_p = ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p
    lib.espeak_Initialize.argtypes = [c_int, c_int, c_char_p, c_int]
    lib.espeak_Initialize.restype = c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [c_char_p]
    lib.espeak_SetVoiceByName.restype = c_int
    lib.espeak_SetParameter.argtypes = [c_int, c_int, c_int]
    lib.espeak_SetParameter.restype = c_int
    lib.espeak_Synth.argtypes = [c_void_p, ctypes.c_size_t, ctypes.c_uint, c_int, ctypes.c_uint,
                                 ctypes.c_uint, c_void_p, c_void_p]
    lib.espeak_Synth.restype = c_int
    lib.espeak_Synchronize.restype = c_int
    lib.espeak_ListVoices.argtypes = [c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_VoiceStruct))
    lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(c_void_p), c_int, c_int]
    lib.espeak_TextToPhonemes.restype = c_char_p
    lib.espeak_Terminate.restype = c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    lib.espeak_Info.argtypes = [c_void_p]
    lib.espeak_Info.restype = c_char_p


class _Session:
    """One initialised library image: set a voice, speak, phonemize, list voices."""

    def __init__(self, lib: ctypes.CDLL, rate: int) -> None:
        self.lib = lib
        self.sample_rate = rate
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0 and wav:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0  # 0 = continue

        self._callback = _SynthCallback(collect)  # keep a reference while the library may call it
        lib.espeak_SetSynthCallback(self._callback)

    def version(self) -> str:
        return self.lib.espeak_Info(None).decode()

    def set_voice(self, identifier: str, variant: str | None) -> int:
        name = identifier if variant is None else f"{identifier}+{variant}"
        return self.lib.espeak_SetVoiceByName(name.encode())

    def set_prosody(self, rate: int | None, pitch: int | None) -> None:
        if rate is not None:
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        if pitch is not None:
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)

    def speak(self, text: str) -> np.ndarray:
        """int16 samples at `sample_rate` for `text` (spoken synchronously)."""
        self._chunks.clear()
        data = text.encode("utf-8") + b"\0"
        self.lib.espeak_ng_SetRandSeed(0)
        err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise TTSError(f"eSpeak NG failed (error {err}) on text {_clip(text)!r}")
        self.lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks.clear()
        return samples

    def phonemes(self, text: str) -> str:
        """IPA for `text` in the current voice's language, clauses joined by spaces."""
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        ptr = ctypes.c_void_p(ctypes.addressof(buf))
        parts = []
        for _ in range(10_000):  # one clause per call; the pointer becomes NULL at the end
            if not ptr.value:
                break
            out = self.lib.espeak_TextToPhonemes(ctypes.byref(ptr), _CHARS_UTF8, _PHONEMES_IPA)
            if out:
                parts.append(out.decode("utf-8", "replace"))
        return " ".join(parts)

    def voices(self) -> list[tuple[str, str, list[tuple[int, str]], int]]:
        """(name, identifier, [(priority, language)], gender) of every voice (not variants)."""
        array = self.lib.espeak_ListVoices(None)
        out = []
        i = 0
        while array[i]:
            v = array[i].contents
            langs, p = [], v.languages
            while True:
                priority = ctypes.string_at(p, 1)[0]
                if priority == 0:
                    break
                code = ctypes.string_at(p + 1)
                langs.append((priority, code.decode()))
                p += 2 + len(code)
            out.append((v.name.decode(), v.identifier.decode(), langs, int(v.gender)))
            i += 1
        return out


def _image() -> _LibraryImage:
    global _IMAGE
    with _LOCK:
        if _IMAGE is None:
            _IMAGE = _LibraryImage()
        return _IMAGE


# ---------------------------------------------------------------------------
# Voices and variants


@dataclass(frozen=True)
class _Voice:
    identifier: str  # e.g. "gmw/en-US": what we hand to espeak_SetVoiceByName
    info: VoiceInfo


class _Catalogue:
    """Every voice and variant of the installed data, and how to look them up."""

    def __init__(self) -> None:
        image = _image()
        with _LOCK, image.session() as s:
            raw = s.voices()
            self.version = s.version()
        variant_dir = Path(image.data_path) / "voices" / "!v"
        self.variants = sorted((p.name for p in variant_dir.iterdir() if p.is_file()),
                               key=str.lower) if variant_dir.is_dir() else []
        self._variant_by_lower = {v.lower(): v for v in self.variants}
        genders = {1: "male", 2: "female"}
        self.voices: list[_Voice] = []
        for name, identifier, langs, gender in raw:
            codes = tuple(code for _, code in sorted(langs, key=lambda pl: pl[0]))
            short = identifier.rsplit("/", 1)[-1].lower()
            self.voices.append(_Voice(identifier, VoiceInfo(
                name=short, languages=codes, description=name, gender=genders.get(gender, ""))))
        # Lookup order: file name, voice name, then language code (best priority wins).
        self._by_key: dict[str, _Voice] = {}
        for v in self.voices:
            for key in (v.identifier.lower(), v.info.name, v.info.description.lower()):
                self._by_key.setdefault(key, v)
        ranked = sorted(((prio, code, i) for i, (_, _, langs, _) in enumerate(raw)
                         for prio, code in langs))
        for _prio, code, i in ranked:
            self._by_key.setdefault(code.lower(), self.voices[i])

    def lookup(self, base: str) -> _Voice | None:
        return self._by_key.get(base.strip().lower())

    def suggestions(self, base: str, n: int = 5) -> list[str]:
        names = sorted({v.info.name for v in self.voices} | {c for v in self.voices
                                                             for c in v.info.languages})
        close = difflib.get_close_matches(base.lower(), names, n=n, cutoff=0.5)
        prefix = base.lower().split("-")[0]
        same_lang = [x for x in names if x.split("-")[0] == prefix and x not in close]
        return (close + same_lang)[:n]

    def variant(self, name: str) -> str | None:
        return self._variant_by_lower.get(name.strip().lower())


def _catalogue() -> _Catalogue:
    global _CATALOGUE
    with _LOCK:
        if _CATALOGUE is None:
            _CATALOGUE = _Catalogue()
        return _CATALOGUE


def split_voice(spec: str) -> tuple[str, str | None]:
    """"en-us+f3" -> ("en-us", "f3"); "en-us" -> ("en-us", None)."""
    base, sep, variant = spec.strip().partition("+")
    return base.strip(), (variant.strip() if sep else None)


_LIST_HINT = "list voices with `speechlm build synth --list-voices [LANG]`"


def resolve_voice(spec: str) -> str:
    """Canonical "base[+variant]" for a voice spec; TTSError naming close matches if unknown."""
    return _resolve(spec)[0]


def _resolve(spec: str) -> tuple[str, _Voice, str | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise TTSError(f"empty eSpeak voice {spec!r}; give e.g. 'en-us' or 'en-us+f3'; {_LIST_HINT}")
    cat = _catalogue()
    if spec.strip().lower().startswith("espeak:"):  # a backend spec, as get_backend takes
        spec = spec.strip()[len("espeak:"):]
    base, variant = split_voice(spec)
    voice = cat.lookup(base)
    if voice is None:
        close = cat.suggestions(base)
        maybe = f"; close matches: {', '.join(close)}" if close else ""
        raise TTSError(f"unknown eSpeak voice {base!r} in {spec!r}{maybe}; {_LIST_HINT}")
    if variant is not None:
        canonical = cat.variant(variant)
        if canonical is None:
            close = difflib.get_close_matches(variant.lower(), list(cat._variant_by_lower), n=5,
                                              cutoff=0.4)
            maybe = f"; close matches: {', '.join(cat.variant(c) for c in close)}" if close else ""
            raise TTSError(
                f"unknown eSpeak voice variant {variant!r} in {spec!r}{maybe}; variants are files "
                f"in espeak-ng-data/voices/!v, e.g. m1-m8, f1-f5 ({len(cat.variants)} in all); "
                f"{_LIST_HINT}")
        variant = canonical
    name = base.lower() if variant is None else f"{base.lower()}+{variant}"
    return name, voice, variant


def list_voices(lang: str | None = None) -> list[VoiceInfo]:
    """eSpeak voices (without variants); with `lang`, those whose language code starts with it
    (e.g. "en" gives en, en-us, en-gb-scotland, ...) or whose name has a word starting with it
    (e.g. "spanish", "mandarin")."""
    voices = [v.info for v in _catalogue().voices]
    if lang:
        key = lang.strip().lower()

        def matches(v: VoiceInfo) -> bool:
            if any(c == key or c.startswith(key + "-") for c in (v.name, *v.languages)):
                return True
            words = re.findall(r"[^\W\d_]+", v.description.lower())
            return len(key) >= 4 and any(w.startswith(key) for w in words)

        voices = [v for v in voices if matches(v)]
    return sorted(voices, key=lambda v: v.name)


def list_variants() -> list[str]:
    """Voice variants (voices/!v), appended to a voice with "+": "en-us+f3"."""
    return list(_catalogue().variants)


def espeak_version() -> str:
    return _catalogue().version


def language_of(spec: str) -> str:
    """The main language code of a voice: "en-us+f3" -> "en-us", "gmw/en" -> "en-gb"."""
    _, voice, _ = _resolve(spec)
    return voice.info.languages[0] if voice.info.languages else voice.info.name


# ---------------------------------------------------------------------------
# The backend


def _check_range(what: str, value: int | None, limits: tuple[int, int]) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TTSError(f"eSpeak {what} must be an integer, got {value!r}")
    value = int(value)
    lo, hi = limits
    if not lo <= value <= hi:
        raise TTSError(f"eSpeak {what} {value} is out of range; use {lo}-{hi}")
    return value


class EspeakTTS:
    """eSpeak NG as a `TTSBackend`: float32 mono at `sample_rate` (default 16 kHz).

    `rate` is words per minute (80-450, eSpeak's default 175), `pitch` the
    base pitch 0-100 (default 50); both can be set per call. Output is
    resampled from eSpeak's 22050 Hz with torchaudio's sinc resampler.
    """

    name = "espeak"

    def __init__(self, voice: str = DEFAULT_VOICE, *, sample_rate: int = 16000,
                 rate: int | None = None, pitch: int | None = None,
                 check_script: bool = True) -> None:
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise TTSError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        self._sample_rate = int(sample_rate)
        self.default_voice = resolve_voice(voice)
        self.default_rate = _check_range("rate (words per minute)", rate, RATE_LIMITS)
        self.default_pitch = _check_range("pitch", pitch, PITCH_LIMITS)
        self.check_script = check_script

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def __repr__(self) -> str:
        return f"EspeakTTS(voice={self.default_voice!r}, sample_rate={self._sample_rate})"

    def resolve_voice(self, voice: str) -> str:
        return resolve_voice(voice)

    def check_options(self, *, rate: int | None = None, pitch: int | None = None) -> None:
        """TTSError if `rate` or `pitch` is out of eSpeak's range (for checking before a job)."""
        _check_range("rate (words per minute)", rate, RATE_LIMITS)
        _check_range("pitch", pitch, PITCH_LIMITS)

    def language_of(self, voice: str | None = None) -> str:
        return language_of(voice or self.default_voice)

    def list_voices(self, lang: str | None = None) -> list[VoiceInfo]:
        return list_voices(lang)

    def synthesize(self, text: str, *, voice: str | None = None, rate: int | None = None,
                   pitch: int | None = None) -> np.ndarray:
        """Speak `text`: 1-D float32 in [-1, 1] at `sample_rate`. TTSError if it cannot."""
        samples = self.synthesize_native(text, voice=voice, rate=rate, pitch=pitch)
        wave = samples.astype(np.float32) / 32768.0
        if self._sample_rate == NATIVE_SAMPLE_RATE:
            return wave
        import torch

        from speechlm.audio.io import resample

        out = resample(torch.from_numpy(wave), NATIVE_SAMPLE_RATE, self._sample_rate).numpy()
        return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)  # sinc ringing can overshoot

    def synthesize_native(self, text: str, *, voice: str | None = None, rate: int | None = None,
                          pitch: int | None = None) -> np.ndarray:
        """int16 samples at eSpeak's own rate (`NATIVE_SAMPLE_RATE`)."""
        if not isinstance(text, str):
            raise TTSError(f"text must be a string, got {type(text).__name__}")
        name, entry, variant = _resolve(voice or self.default_voice)
        rate = _check_range("rate (words per minute)", rate if rate is not None
                            else self.default_rate, RATE_LIMITS)
        pitch = _check_range("pitch", pitch if pitch is not None else self.default_pitch,
                             PITCH_LIMITS)
        text = text.replace("\0", " ")
        if not any(unicodedata.category(c)[0] in "LN" for c in text):
            raise TTSError(f"nothing to say in text {_clip(text)!r} (voice {name}): it has no "
                           "letters or digits; drop the item or fix the text")
        with _LOCK, _image().session() as s:
            if s.set_voice(entry.identifier, variant) != _EE_OK:
                raise TTSError(f"eSpeak NG could not load voice {name!r} ({entry.identifier}); "
                               f"{_LIST_HINT}")
            s.set_prosody(rate, pitch)
            samples = s.speak(text)
            # The checks run after speaking so that speech always starts from a fresh library.
            if self.check_script:
                _check_readable(s, text, name, entry.identifier)
        audible = int(np.count_nonzero(np.abs(samples.astype(np.int32)) > _AUDIBLE_LEVEL))
        if audible < _MIN_AUDIBLE_SECONDS * NATIVE_SAMPLE_RATE:
            raise TTSError(f"eSpeak produced no audible speech for text {_clip(text)!r} with voice "
                           f"{name} ({audible / NATIVE_SAMPLE_RATE:.3f} s above -40 dBFS); "
                           "check the text is in a language the voice speaks")
        return samples


# ---------------------------------------------------------------------------
# Can the voice read the text? (see the module docstring for the rule)


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


def _norm_phonemes(p: str) -> str:
    return re.sub(r"[ˈˌ\s_]", "", _SWITCH_MARK.sub("", p))


def _words(text: str) -> list[list[str]]:
    """Words as lists of letters (a letter with its combining marks, e.g. a Devanagari akshara).
    A change of script ends a word: "OKです" is "OK" + "です"."""
    words: list[list[str]] = []
    current: list[str] = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "L":
            if current and _script(ch) != _script(current[-1][0]):
                words.append(current)
                current = []
            current.append(ch)
        elif cat[0] == "M" and current:
            current[-1] += ch
        else:
            if current:
                words.append(current)
            current = []
    if current:
        words.append(current)
    return words


def _neighbour_letters(ch: str, n: int = 2) -> list[str]:
    """The `n` nearest other code points that are letters of the same script as `ch`."""
    script, found = _script(ch), []
    for step in range(1, 65):
        for code in (ord(ch) + step, ord(ch) - step):
            if 0 <= code < 0x110000:
                other = chr(code)
                if unicodedata.category(other)[0] == "L" and _script(other) == script:
                    found.append(other)
                    if len(found) == n:
                        return found
    return found


def _is_announced(s: _Session, voice_key: str, ch: str) -> bool:
    """Does eSpeak read `ch` as "<script name> letter ..."? Then its reading starts like its
    neighbours' readings do: the script name. (Two neighbours, as homophones exist.)"""
    key = (voice_key, ch)
    if key not in _ANNOUNCED:
        others = _neighbour_letters(ch)
        announced = False
        if len(others) == 2:
            readings = [_norm_phonemes(s.phonemes(c)) for c in (ch, *others)]
            announced = len(os.path.commonprefix(readings)) >= _ANNOUNCE_MIN_PREFIX
        _ANNOUNCED[key] = announced
    return _ANNOUNCED[key]


def _is_spelled(s: _Session, voice_key: str, word: list[str]) -> bool:
    """Does eSpeak spell `word` letter by letter? Then it treats each letter as a word of its
    own: the reading has a space-separated group per letter (a word read as a word is one
    group, acronyms like "USA" included)."""
    joined = "".join(word)
    key = (voice_key, joined)
    if key not in _SPELLED:
        if len(_SPELLED) >= _SPELLED_CACHE_MAX:
            _SPELLED.clear()
        _SPELLED[key] = len(s.phonemes(joined).split()) >= len(word)
    return _SPELLED[key]


def _check_readable(s: _Session, text: str, name: str, voice_key: str) -> None:
    words = _words(text)
    # Syllabic scripts are read one character at a time even when eSpeak knows them, so
    # only the announcement test tells; alphabets are judged by the spelling test below.
    syllabic = {letter[0] for word in words for letter in word
                if _script(letter[0]) in _SYLLABIC_SCRIPTS}
    announced = sorted(ch for ch in syllabic if _is_announced(s, voice_key, ch))
    if announced:
        shown = ", ".join(announced[:8]) + (", ..." if len(announced) > 8 else "")
        scripts = ", ".join(sorted({_script(c) for c in announced}))
        kana = " (eSpeak's ja voice reads kana only: write kanji in kana)" \
            if name.startswith("ja") else ""
        raise TTSError(
            f"voice {name} cannot read text {_clip(text)!r}: eSpeak would name the script "
            f"({scripts}) instead of reading {len(announced)} letter(s): {shown}. Use a voice for "
            f"that script or transliterate the text{kana}; {_LIST_HINT}")
    total = sum(len(w) for w in words)
    spelled = [w for w in words if len(w) >= 2 and _script(w[0][0]) not in _SYLLABIC_SCRIPTS
               and _is_spelled(s, voice_key, w)]
    n_spelled = sum(len(w) for w in spelled)
    if total and n_spelled * 2 > total:
        shown = ", ".join("".join(w) for w in spelled[:5]) + (", ..." if len(spelled) > 5 else "")
        raise TTSError(
            f"voice {name} cannot read text {_clip(text)!r}: eSpeak would spell {n_spelled} of "
            f"{total} letters one by one (words: {shown}). Use a voice for the text's language "
            f"or script; {_LIST_HINT}")


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
