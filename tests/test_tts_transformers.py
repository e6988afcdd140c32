"""SpeechT5 and VITS (MMS-TTS) backends on tiny random checkpoints: the real loading and
generation code, deterministic output, speakers, rates, and clear errors."""

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.errors import ConfigError, TTSError
from speechlm.jsonl import read_jsonl
from speechlm.tts import get_backend
from speechlm.tts.base import TTSBackend, parse_backend_spec

SHORT = "Hello world."
LONG = "Hello world, this sentence is a good deal longer than the first one."
HOP = 256  # samples per mel frame of both tiny checkpoints (as in the real ones) at 16 kHz
# SpeechT5 on a random model: the stop predictor is meaningless, so stop exactly at minlenratio.
EXACT_LENGTH = dict(threshold=0.0, minlenratio=2.0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 shared cores run many times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def speecht5_dir(tiny_ckpt):
    return tiny_ckpt("speecht5")


@pytest.fixture(scope="module")
def vits_dir(tiny_ckpt):
    return tiny_ckpt("vits")


@pytest.fixture(scope="module")
def speecht5(speecht5_dir):
    return get_backend(f"speecht5:{speecht5_dir}", **EXACT_LENGTH)


@pytest.fixture(scope="module")
def vits(vits_dir):
    return get_backend(f"vits:{vits_dir}")


def _check_wave(wave, peak=0.95):
    assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) > 0 and np.isfinite(wave).all()
    assert np.abs(wave).max() == pytest.approx(peak, abs=1e-6)  # normalised peaks


def _pseudo_speaker(seed: int) -> np.ndarray:
    """The documented default speaker: 512 normals from a seeded generator, L2-normalised."""
    values = torch.randn(512, generator=torch.Generator().manual_seed(seed))
    return (values / values.norm()).numpy()


# --- the checkpoints ------------------------------------------------------------------


def test_tiny_checkpoints_have_the_real_layout(speecht5_dir, vits_dir):
    from transformers import AutoConfig, SpeechT5Processor, VitsTokenizer

    assert {p.name for p in speecht5_dir.iterdir()} >= {
        "config.json", "model.safetensors", "spm_char.model", "tokenizer_config.json", "vocoder"}
    processor = SpeechT5Processor.from_pretrained(speecht5_dir, local_files_only=True)
    assert processor.tokenizer("ab").input_ids[-1] == processor.tokenizer.eos_token_id == 2
    vocoder = AutoConfig.from_pretrained(speecht5_dir / "vocoder")
    assert (vocoder.model_type, vocoder.sampling_rate, math.prod(vocoder.upsample_rates)) == (
        "speecht5_hifigan", 16000, HOP)
    config = AutoConfig.from_pretrained(speecht5_dir)
    assert (config.architectures, config.speaker_embedding_dim) == (["SpeechT5ForTextToSpeech"], 512)
    tokenizer = VitsTokenizer.from_pretrained(vits_dir, local_files_only=True)
    assert (tokenizer.language, tokenizer.pad_token, tokenizer.add_blank) == ("eng", "k", True)
    assert AutoConfig.from_pretrained(vits_dir).architectures == ["VitsModel"]


# --- VITS -----------------------------------------------------------------------------


def test_vits_speaks_deterministically(vits, vits_dir):
    assert isinstance(vits, TTSBackend) and vits.sample_rate == 16000
    rng = torch.random.get_rng_state()
    short, long = vits.synthesize(SHORT), vits.synthesize(LONG)
    assert torch.equal(torch.random.get_rng_state(), rng), "the caller's RNG must not move"
    _check_wave(short)
    _check_wave(long)
    assert len(long) > len(short) and len(short) % HOP == 0
    # Same text + voice + seed: the same samples, from a fresh backend and in any order.
    fresh = get_backend(f"vits:{vits_dir}")
    assert np.array_equal(fresh.synthesize(LONG), long)
    assert np.array_equal(fresh.synthesize(SHORT), short)
    other_seed = get_backend(f"vits:{vits_dir}", seed=1).synthesize(SHORT)
    assert not np.array_equal(other_seed, short)


def test_vits_rate_noise_and_output_rate(vits, vits_dir):
    normal = vits.synthesize(LONG)
    assert len(vits.synthesize(LONG, rate=200)) < len(normal) < len(vits.synthesize(LONG, rate=50))
    slower = get_backend(f"vits:{vits_dir}", speaking_rate=0.5).synthesize(LONG)
    assert np.array_equal(slower, vits.synthesize(LONG, rate=50))
    quiet = get_backend(f"vits:{vits_dir}", noise_scale=0.0, noise_scale_duration=0.0)
    assert not np.array_equal(quiet.synthesize(LONG), normal)
    at_8k = get_backend(f"vits:{vits_dir}", sample_rate=8000)
    wave = at_8k.synthesize(LONG)
    assert at_8k.sample_rate == 8000 and len(wave) == math.ceil(len(normal) / 2)
    _check_wave(wave)
    unscaled = get_backend(f"vits:{vits_dir}", peak=None).synthesize(LONG)
    assert np.abs(unscaled).max() <= 1.0 and not np.array_equal(unscaled, normal)


def test_vits_multi_speaker_voices(tmp_path):
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    model = write_tiny_checkpoint("vits", tmp_path / "multi", num_speakers=3,
                                  speaker_embedding_size=8)
    tts = get_backend(f"vits:{model}")
    assert tts.default_voice == f"{model}:0"
    assert [v.name for v in tts.list_voices()] == [f"{model}:{i}" for i in range(3)]
    assert [v.name for v in tts.list_voices("eng")] == [f"{model}:{i}" for i in range(3)]
    assert tts.list_voices("fra") == []
    zero, two = tts.synthesize(SHORT), tts.synthesize(SHORT, voice=f"{model}:2")
    assert np.array_equal(zero, tts.synthesize(SHORT, voice=str(model)))
    assert not np.array_equal(zero, two)
    with pytest.raises(TTSError, match=r"speaker must be an integer id 0-2 .*got '3'"):
        tts.synthesize(SHORT, voice=f"{model}:3")


def test_vits_voice_names_and_language(vits, vits_dir, monkeypatch):
    assert vits.default_voice == str(vits_dir.resolve())
    monkeypatch.chdir(vits_dir.parent)
    assert vits.resolve_voice(f"vits:{vits_dir.name}") == str(vits_dir.resolve())
    assert vits.language_of() == "eng"  # MMS-TTS names its language in ISO 639-3
    assert get_backend(f"vits:{vits_dir}", lang="en").language_of() == "en"
    with pytest.raises(TTSError, match="has a single speaker"):
        vits.resolve_voice(f"{vits_dir}:1")


# --- SpeechT5 -------------------------------------------------------------------------


def _steps(tts, text):
    """Decoder steps SpeechT5 takes when it stops at minlenratio (2 frames a step)."""
    from transformers import SpeechT5Tokenizer

    tokens = len(SpeechT5Tokenizer.from_pretrained(tts._voice(None).model_dir)(text).input_ids)
    return int(tokens * EXACT_LENGTH["minlenratio"] / 2)


def test_speecht5_speaks_deterministically(speecht5, speecht5_dir):
    assert isinstance(speecht5, TTSBackend)
    assert speecht5.default_voice == f"{speecht5_dir.resolve()}:seed=0"
    short, long = speecht5.synthesize(SHORT), speecht5.synthesize(LONG)
    _check_wave(short)
    _check_wave(long)
    assert len(short) == _steps(speecht5, SHORT) * 2 * HOP
    assert len(long) == _steps(speecht5, LONG) * 2 * HOP
    fresh = get_backend(f"speecht5:{speecht5_dir}", **EXACT_LENGTH)
    assert np.array_equal(fresh.synthesize(LONG), long)
    assert np.array_equal(fresh.synthesize(SHORT), short)
    assert not np.array_equal(get_backend(f"speecht5:{speecht5_dir}", seed=5, **EXACT_LENGTH)
                              .synthesize(SHORT), short)
    # Twice the rate: the spectrogram is squeezed to half the frames.
    assert len(speecht5.synthesize(SHORT, rate=200)) == _steps(speecht5, SHORT) * HOP


def test_speecht5_speakers_from_seeds_and_files(speecht5, speecht5_dir, tmp_path):
    seed3 = speecht5.synthesize(SHORT, voice=f"{speecht5_dir}:seed=3")
    assert np.array_equal(seed3, speecht5.synthesize(SHORT, voice=f"{speecht5_dir}:3"))
    assert not np.array_equal(seed3, speecht5.synthesize(SHORT))
    # A saved embedding speaks exactly like the seed it was drawn from (.npy and .pt alike).
    np.save(tmp_path / "spk3.npy", _pseudo_speaker(3))
    torch.save(torch.from_numpy(_pseudo_speaker(3)).reshape(1, 512), tmp_path / "spk3.pt")
    for name in ("spk3.npy", "spk3.pt"):
        voice = f"{speecht5_dir}:{tmp_path / name}"
        assert speecht5.resolve_voice(voice) == f"{speecht5_dir.resolve()}:{tmp_path / name}"
        assert np.array_equal(speecht5.synthesize(SHORT, voice=voice), seed3)
    np.save(tmp_path / "short.npy", np.ones(100, dtype=np.float32))
    with pytest.raises(TTSError, match=r"short.npy: a speaker embedding must hold 512 floats"):
        speecht5.resolve_voice(f"{speecht5_dir}:{tmp_path / 'short.npy'}")
    with pytest.raises(TTSError, match=r"speaker embedding not found: 'nobody.npy'.*seed=N"):
        speecht5.resolve_voice(f"{speecht5_dir}:nobody.npy")


def test_speecht5_vocoder_and_speakers_beside_the_model(speecht5, speecht5_dir, tmp_path):
    model = tmp_path / "speecht5_tts"
    shutil.copytree(speecht5_dir, model, ignore=shutil.ignore_patterns("vocoder"))
    shutil.copytree(speecht5_dir / "vocoder", tmp_path / "hifigan")
    with pytest.raises(TTSError, match=rf"no SpeechT5 vocoder for {model}: looked for "
                                       rf"{model}/vocoder.*or pass vocoder=DIR"):
        get_backend(f"speecht5:{model}")
    separate = get_backend(f"speecht5:{model}", vocoder=tmp_path / "hifigan", **EXACT_LENGTH)
    assert np.array_equal(separate.synthesize(SHORT), speecht5.synthesize(SHORT))
    # Speaker files inside the model directory are listed, and found by their relative name.
    (model / "speakers").mkdir()
    np.save(model / "speakers" / "awb.npy", _pseudo_speaker(3))
    assert [v.name for v in separate.list_voices("en")] == [
        f"{model}:seed=0", f"{model}:{model / 'speakers' / 'awb.npy'}"]
    assert np.array_equal(separate.synthesize(SHORT, voice=f"{model}:speakers/awb.npy"),
                          speecht5.synthesize(SHORT, voice=f"{speecht5_dir}:seed=3"))


def test_speecht5_that_never_stops_is_an_error(speecht5_dir):
    # threshold > 1: the stop probability (a sum over 2 frames) is never reached in time.
    tts = get_backend(f"speecht5:{speecht5_dir}", threshold=2.5, maxlenratio=1.0)
    with pytest.raises(TTSError, match=r"SpeechT5 did not finish speaking text 'Hello world\.'"):
        tts.synthesize(SHORT)


# --- what cannot be said, and bad configuration ---------------------------------------


@pytest.mark.parametrize("backend", ["speecht5", "vits"])
@pytest.mark.parametrize("text", ["", "   ", "!?!", "\U0001F642"])
def test_text_with_nothing_to_say_is_rejected(request, backend, text):
    tts = request.getfixturevalue(backend)
    with pytest.raises(TTSError, match="nothing to say in text .* no letters or digits"):
        tts.synthesize(text)


@pytest.mark.parametrize("backend", ["speecht5", "vits"])
def test_text_in_a_script_the_model_cannot_read_is_rejected(request, backend):
    tts = request.getfixturevalue(backend)
    with pytest.raises(TTSError, match=r"cannot read text 'Привет, мир': .*9 .*letters"):
        tts.synthesize("Привет, мир")
    _check_wave(tts.synthesize("Hello, мир"))  # a minority of unknown letters is tolerated


def test_missing_directories_name_the_path_and_the_fix(tmp_path, speecht5_dir):
    missing = tmp_path / "no" / "mms-tts-eng"
    with pytest.raises(TTSError, match=rf"VITS model directory not found: {missing}; .*"
                                       r"huggingface-cli download facebook/mms-tts-LANG"):
        get_backend(f"vits:{missing}")
    with pytest.raises(TTSError, match=r"SpeechT5 model directory not found: .*speecht5_tts; "
                                       r".*huggingface-cli download microsoft/speecht5_tts"):
        get_backend(f"speecht5:{tmp_path / 'speecht5_tts'}:seed=1")
    with pytest.raises(TTSError, match=r"SpeechT5 vocoder directory not found: .*hifigan"):
        get_backend(f"speecht5:{speecht5_dir}", vocoder=tmp_path / "hifigan")
    with pytest.raises(TTSError, match=r"model_type 'speecht5' is not a VITS model; use the "
                                       r"speecht5 backend"):
        get_backend(f"vits:{speecht5_dir}")
    with pytest.raises(TTSError, match=r"no VITS model given: write the voice as "
                                       r"vits:MODEL_DIR"):
        get_backend("vits").synthesize(SHORT)
    # A directory that looks right but cannot be loaded stops a job: no item could be spoken.
    broken = tmp_path / "broken"
    shutil.copytree(speecht5_dir, broken, ignore=shutil.ignore_patterns("model.safetensors"))
    tts = get_backend(f"speecht5:{broken}")
    with pytest.raises(ConfigError, match=rf"cannot load the SpeechT5 model from {broken}: "):
        tts.synthesize(SHORT)


def test_unknown_backend_lists_the_known_ones(vits_dir):
    with pytest.raises(TTSError, match=r"unknown TTS backend 'tacotron' .*available: espeak, "
                                       r"piper, speecht5, vits"):
        get_backend(f"tacotron:{vits_dir}")
    assert parse_backend_spec("speecht5:/m/tts:seed=3") == ("speecht5", "/m/tts:seed=3")


def test_unsupported_prosody_is_rejected(vits, speecht5):
    for tts in (vits, speecht5):
        with pytest.raises(TTSError, match="has no pitch control"):
            tts.synthesize(SHORT, pitch=50)
        with pytest.raises(TTSError, match=r"rate 400 is out of range; use 50-300"):
            tts.check_options(rate=400)
    with pytest.raises(TTSError, match="speaking_rate must be a number in 0.25-4.0"):
        get_backend("vits", speaking_rate=0)


# --- through the synthesis pipeline ---------------------------------------------------


def test_synth_pipeline_with_vits(tmp_path, vits_dir):
    from speechlm.pipelines.synth import synthesize_corpus

    items = [{"id": "a", "text": SHORT}, {"id": "b", "text": "!!!"},
             {"id": "c", "text": LONG, "rate": 150}]
    out = tmp_path / "synth"
    report = synthesize_corpus(items, out, backend="vits", voices=[f"vits:{vits_dir}"],
                               progress=False)
    assert (report.done, report.failed, report.total) == (2, 1, 3)
    assert report.failures[0]["id"] == "b" and "nothing to say" in report.failures[0]["reason"]
    records = read_jsonl(out / "manifest.jsonl")
    assert [r["id"] for r in records] == ["a", "c"]
    voice = str(vits_dir.resolve())
    tts = get_backend(f"vits:{vits_dir}")
    for rec, expected in zip(records, (tts.synthesize(SHORT), tts.synthesize(LONG, rate=150)),
                             strict=True):
        assert (rec["voice"], rec["speaker"], rec["lang"]) == (voice, f"vits:{voice}", "eng")
        data, sr = sf.read(out / rec["audio"], dtype="float32")
        assert sr == 16000 and len(data) == len(expected)
        assert rec["duration"] == round(len(expected) / 16000, 4)
        assert np.abs(data - expected).max() < 1e-4  # 16-bit PCM of the same samples
    again = synthesize_corpus(items, out, backend="vits", voices=[str(vits_dir)], progress=False)
    assert (again.skipped, again.done, again.failed) == (2, 0, 1)


@pytest.mark.parametrize("jobs", [1, 2])
def test_synth_passes_backend_options_to_every_worker(tmp_path, speecht5_dir, jobs):
    from speechlm.pipelines.synth import synthesize_corpus

    items = [{"id": "a", "text": SHORT}, {"id": "b", "text": LONG}]
    # the tiny random SpeechT5 stops at once unless told not to: the options must arrive
    options = {"threshold": 0.0, "minlenratio": 2.0}
    report = synthesize_corpus(items, tmp_path / "s", backend="speecht5",
                               voices=[f"speecht5:{speecht5_dir}"], backend_options=options,
                               jobs=jobs, progress=False)
    assert (report.done, report.failed) == (2, 0), report.failures
    tts = get_backend(f"speecht5:{speecht5_dir}", **options)
    records = read_jsonl(tmp_path / "s" / "manifest.jsonl")
    for rec, text in zip(records, (SHORT, LONG), strict=True):
        data, _ = sf.read(tmp_path / "s" / rec["audio"], dtype="float32")
        assert len(data) == len(tts.synthesize(text))
    saved = json.loads((tmp_path / "s" / "synth_report.json").read_text())
    assert saved["backend_options"] == options


def test_build_synth_cli_takes_a_backend_and_its_options(tmp_path, vits_dir, capsys):
    from speechlm.cli import main

    texts = tmp_path / "t.txt"
    texts.write_text(f"{SHORT}\n{LONG}\n")
    out = tmp_path / "cli"
    assert main(["build", "synth", str(texts), "--out", str(out), "--backend", "vits",
                 "--voice", str(vits_dir), "--backend-option", "noise_scale=0.3",
                 "--no-progress"]) == 0
    records = read_jsonl(out / "manifest.jsonl")
    assert len(records) == 2 and records[0]["speaker"].startswith("vits:")
    saved = json.loads((out / "synth_report.json").read_text())
    assert saved["backend"] == "vits" and saved["backend_options"] == {"noise_scale": 0.3}
    assert main(["build", "synth", str(texts), "--out", str(tmp_path / "x"),
                 "--backend", "vits"]) == 2
    assert "--backend vits needs --voice MODEL_DIR" in capsys.readouterr().err
