"""eSpeak NG backend: real speech in several languages, determinism, prosody, clear errors."""

import threading

import numpy as np
import pytest

from speechlm.errors import TTSError
from speechlm.tts import get_backend
from speechlm.tts.base import TTSBackend, parse_backend_spec
from speechlm.tts.espeak import (
    NATIVE_SAMPLE_RATE,
    EspeakTTS,
    language_of,
    list_variants,
    list_voices,
    resolve_voice,
)

SENTENCES = {
    "en-us": "The quick brown fox jumps over the lazy dog.",
    "es": "El rápido zorro marrón salta sobre el perro.",
    "hi": "नमस्ते दुनिया, यह एक परीक्षण है।",
    "ta": "வணக்கம் உலகம், இது ஒரு சோதனை.",
    "ja": "こんにちは、げんきですか。",  # kana: eSpeak's ja voice does not read kanji
}
SENTENCE = "Hello world, this is a simple test of the speech synthesizer."


@pytest.fixture(scope="module")
def tts():
    return EspeakTTS(sample_rate=16000)


def _f0(wave: np.ndarray, sr: int = 16000) -> float:
    """Median autocorrelation pitch (Hz) over voiced 40 ms frames."""
    n, found = 640, []
    for i in range(0, len(wave) - n, n // 2):
        x = wave[i:i + n] - wave[i:i + n].mean()
        if np.sqrt((x ** 2).mean()) < 0.02:
            continue
        ac = np.correlate(x, x, "full")[n - 1:]
        lo, hi = sr // 400, sr // 60
        k = lo + int(np.argmax(ac[lo:hi]))
        if ac[k] > 0.3 * ac[0]:
            found.append(sr / k)
    return float(np.median(found))


@pytest.mark.parametrize("voice", sorted(SENTENCES))
def test_speaks_each_language(tts, voice):
    wave = tts.synthesize(SENTENCES[voice], voice=voice)
    assert wave.dtype == np.float32 and wave.ndim == 1
    seconds = len(wave) / tts.sample_rate
    assert 0.3 < seconds < 10.0
    assert np.isfinite(wave).all() and 0.05 < np.abs(wave).max() <= 1.0
    # speech, not a tone: loud and quiet stretches alternate
    frames = np.abs(wave[: len(wave) // 320 * 320]).reshape(-1, 320).max(axis=1)
    assert (frames > 0.1).mean() > 0.3 and (frames < 0.02).any()


def test_same_input_gives_identical_samples(tts):
    first = tts.synthesize(SENTENCE, voice="en-us+f3", rate=160, pitch=40)
    tts.synthesize("Something else entirely, to disturb any hidden state.", voice="es+m3")
    again = tts.synthesize(SENTENCE, voice="en-us+f3", rate=160, pitch=40)
    assert np.array_equal(first, again)


def test_threads_share_the_engine_safely(tts):
    expected = {v: tts.synthesize(SENTENCES[v], voice=v) for v in ("en-us", "es")}
    results, errors = {}, []

    def work(voice):
        try:
            for _ in range(3):
                results.setdefault(voice, []).append(tts.synthesize(SENTENCES[voice], voice=voice))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(v,)) for v in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for voice, waves in results.items():
        assert all(np.array_equal(w, expected[voice]) for w in waves)


def test_faster_rate_gives_shorter_audio(tts):
    slow = tts.synthesize(SENTENCE, rate=120)
    fast = tts.synthesize(SENTENCE, rate=260)
    assert len(fast) < 0.7 * len(slow)


def test_pitch_and_variant_change_the_voice(tts):
    low, high = _f0(tts.synthesize(SENTENCE, pitch=10)), _f0(tts.synthesize(SENTENCE, pitch=90))
    assert high > 1.4 * low
    male, female = _f0(tts.synthesize(SENTENCE, voice="en-us+m1")), _f0(
        tts.synthesize(SENTENCE, voice="en-us+f3"))
    assert female > 1.5 * male
    assert 60 < male < 160


def test_output_rate_is_configurable():
    native = EspeakTTS(sample_rate=NATIVE_SAMPLE_RATE).synthesize(SENTENCE)
    at_16k = EspeakTTS(sample_rate=16000).synthesize(SENTENCE)
    assert abs(len(at_16k) - len(native) * 16000 / NATIVE_SAMPLE_RATE) <= 1


def test_unknown_voice_suggests_close_matches(tts):
    with pytest.raises(TTSError) as e:
        tts.synthesize("hello", voice="en-uss")
    assert "'en-uss'" in str(e.value) and "en-us" in str(e.value)
    assert "--list-voices" in str(e.value)


def test_unknown_variant_is_named(tts):
    with pytest.raises(TTSError, match=r"variant 'f33'.*close matches: f3"):
        tts.synthesize("hello", voice="en-us+f33")


def test_voice_spelling_is_normalised():
    assert resolve_voice(" EN-US+F3 ") == "en-us+f3"
    assert resolve_voice("es+Alex") == "es+Alex"
    assert language_of("en-us+m1") == "en-us"
    assert language_of("zh") == "cmn"  # a language code picks its best voice


@pytest.mark.parametrize("text", ["", "   \n", "..., !? —", "😀😀"])
def test_text_with_nothing_to_say_is_rejected(tts, text):
    with pytest.raises(TTSError, match=r"nothing to say in text .*voice en-us"):
        tts.synthesize(text)


def test_unreadable_script_is_rejected_not_spelled_out(tts):
    # eSpeak would say "Japanese letter" for each kana with an English voice
    with pytest.raises(TTSError, match=r"en-us cannot read text 'こんにちは'.*HIRAGANA"):
        tts.synthesize("こんにちは", voice="en-us")
    # ... and "pe er i ve ..." for Russian
    with pytest.raises(TTSError, match=r"spell 9 of 9 letters"):
        tts.synthesize("Привет мир", voice="en-us")
    # the ja voice reads kana only: kanji would be announced as "Chinese letter"
    with pytest.raises(TTSError, match=r"世, 界.*kana"):
        tts.synthesize("こんにちは世界", voice="ja")


def test_scripts_espeak_switches_language_for_are_accepted(tts):
    # eSpeak reads Devanagari with its Hindi rules even when the voice is English
    hindi_in_en = tts.synthesize(SENTENCES["hi"], voice="en-us")
    assert len(hindi_in_en) / tts.sample_rate > 0.5
    # acronyms are meant to be spelled
    assert len(tts.synthesize("OK", voice="en-us")) > 0


def test_out_of_range_prosody_is_rejected(tts):
    with pytest.raises(TTSError, match="rate .*1000.*80-450"):
        tts.synthesize("hello", rate=1000)
    with pytest.raises(TTSError, match="pitch 101"):
        tts.synthesize("hello", pitch=101)


def test_voice_and_variant_lists():
    names = {v.name for v in list_voices()}
    assert {"en-us", "es", "hi", "ta", "ja"} <= names and len(names) > 100
    spanish = list_voices("es")
    assert {v.name for v in spanish} == {"es", "es-419"}
    assert {v.name for v in list_voices("spanish")} == {"es", "es-419"}
    assert {"f3", "m1", "klatt"} <= set(list_variants())


def test_get_backend_parses_specs():
    tts = get_backend("espeak:en-us+f3", sample_rate=22050)
    assert isinstance(tts, TTSBackend)
    assert tts.default_voice == "en-us+f3" and tts.sample_rate == 22050
    assert get_backend("espeak").default_voice == "en-us"
    assert parse_backend_spec("espeak") == ("espeak", None)
    with pytest.raises(TTSError, match="unknown TTS backend 'festival'.*espeak"):
        get_backend("festival:kal")
    with pytest.raises(TTSError, match="unknown eSpeak voice 'qq'"):
        get_backend("espeak:qq")
