"""TTS with transformers models from local directories: SpeechT5 and VITS (MMS-TTS).

    from speechlm.tts import get_backend
    tts = get_backend("vits:/models/mms-tts-eng")                # one language per checkpoint
    wave = tts.synthesize("Hello world.", rate=120)            # 16 kHz float32, 20% faster
    tts = get_backend("speecht5:/models/speecht5_tts:seed=7")  # vocoder from .../vocoder
    tts = get_backend("speecht5:/models/speecht5_tts:awb.npy", vocoder="/models/speecht5_hifigan")

Voices name a model directory, then optionally a speaker after the last ":":
- `speecht5:MODEL[:SPEAKER]`: MODEL holds a SpeechT5ForTextToSpeech checkpoint
  and its tokenizer (microsoft/speecht5_tts layout). SPEAKER is a `.npy` or
  `.pt` file of 512 floats (an x-vector; a relative path is looked up from
  the working directory, then inside MODEL) or `seed=N` (also plain `N`): a
  deterministic pseudo-speaker, 512 standard-normal values drawn from
  `torch.Generator().manual_seed(N)` and L2-normalised. It is not a recorded
  speaker: with a real checkpoint some seeds sound better than others; use an
  x-vector file for a real voice. The default speaker is `seed=0`. The
  vocoder (SpeechT5HifiGan) is the `vocoder=` option, else `MODEL/vocoder`,
  else microsoft/speecht5_hifigan from the local Hugging Face cache.
- `vits:MODEL[:SPEAKER_ID]`: MODEL holds a VitsModel + VitsTokenizer
  (facebook/mms-tts-* layout, one language per checkpoint); SPEAKER_ID only
  for multi-speaker checkpoints (default 0).
MODEL may also be a hub id already in the local HF cache; nothing is ever
downloaded and no remote code runs. `list_voices()` shows the voices of the
default model (SpeechT5: seed=0 and the `.npy`/`.pt` files in MODEL and
MODEL/speakers).

Options (keyword arguments of `get_backend`): `sample_rate` (output rate;
resampled with torchaudio when it differs from the model's), `seed` (noise
seed, default 0), `speaking_rate` (1.0 = as trained; VITS's own knob, for
SpeechT5 the mel spectrogram is stretched in time), `peak` (every utterance
is scaled to this peak, default 0.95; None only clips to [-1, 1]), `lang`
(language code reported for the voices; default: the tokenizer's `language`
for VITS, "en" for SpeechT5), `device`. SpeechT5 also takes `vocoder`,
`threshold`, `minlenratio` and `maxlenratio` (see
`SpeechT5ForTextToSpeech.generate_speech`); VITS `noise_scale` and
`noise_scale_duration`. Per call, `rate` is a percentage of the speaking
rate (100 = unchanged, 50-300); `pitch` is not supported (TTSError).

Determinism: SpeechT5 applies dropout at inference and VITS samples noise;
both draw from torch's generator seeded with (seed, text) for every
utterance, so the same text, voice and seed give the same samples in any
order and any process (on the same hardware).

What counts as a text a model cannot say (TTSError, so a data job skips and
reports it): no letters or digits; more than half of its letters unknown to
the tokenizer (VITS drops them, SpeechT5 reads them as <unk>); text longer
than SpeechT5's position table; SpeechT5 never predicting the end of speech
within `maxlenratio`; non-finite or (near) silent output. A checkpoint that
cannot be loaded is a ConfigError instead: no item could be spoken with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm.errors import ConfigError, TTSError

from .base import VoiceInfo

RATE_LIMITS = (50, 300)  # per-call `rate`, percent of the speaking rate
SPEAKING_RATE_LIMITS = (0.25, 4.0)
SPEAKER_EMBEDDING_SUFFIXES = (".npy", ".pt")
DEFAULT_VOCODER = "microsoft/speecht5_hifigan"
DEFAULT_PEAK = 0.95
_AUDIBLE_LEVEL = 0.01  # -40 dBFS, as for eSpeak
_MIN_AUDIBLE_SECONDS = 0.05

# torch's global generator is shared: one utterance at a time seeds and uses it.
_LOCK = threading.RLock()


@dataclass(frozen=True)
class _Voice:
    canonical: str  # what resolve_voice returns
    model_key: str  # the model part of `canonical`: an absolute path or a cached hub id
    model_dir: Path
    speaker: str | int | None  # SpeechT5: "seed=N" or an embedding file; VITS: speaker id


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _letters(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c)[0] in "LN"]


def _utterance_seed(seed: int, text: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TTSError(f"{path}: cannot read the model config ({e}); point the voice at a "
                       "complete transformers checkpoint directory") from None


class _TransformersTTS:
    """What SpeechT5 and VITS share: voices naming model directories, loading on first use,
    seeding, rate, resampling and peak normalisation. Subclasses set the class attributes
    below and implement `_load`, `_speak` and the speaker parsing."""

    name = ""
    title = ""  # for messages, e.g. "SpeechT5"
    model_type = ""  # config.json model_type this backend accepts
    download_hint = ""  # how to get a checkpoint, for "not found" messages

    def __init__(self, voice: str | None = None, *, sample_rate: int = 16000, seed: int = 0,
                 speaking_rate: float | None = None, peak: float | None = DEFAULT_PEAK,
                 lang: str | None = None, device: str = "cpu") -> None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
                or sample_rate <= 0:
            raise TTSError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TTSError(f"{self.title} seed must be an integer, got {seed!r}")
        if speaking_rate is not None:
            lo, hi = SPEAKING_RATE_LIMITS
            if isinstance(speaking_rate, bool) or not isinstance(speaking_rate, (int, float)) \
                    or not lo <= speaking_rate <= hi:
                raise TTSError(f"{self.title} speaking_rate must be a number in {lo}-{hi} "
                               f"(1.0 = as trained), got {speaking_rate!r}")
        if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float))
                                 or not 0 < peak <= 1):
            raise TTSError(f"peak must be in (0, 1] or None, got {peak!r}")
        self._sample_rate = int(sample_rate)
        self.seed = int(seed)
        self.speaking_rate = speaking_rate
        self.peak = peak
        self.lang = lang
        self.device = device
        self._voices: dict[str, _Voice] = {}
        self._models: dict[Path, object] = {}
        self.default_voice = self.resolve_voice(voice) if voice else ""

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(voice={self.default_voice!r}, "
                f"sample_rate={self._sample_rate})")

    # -- voices ------------------------------------------------------------------------

    def resolve_voice(self, voice: str) -> str:
        return self._voice(voice).canonical

    def _voice(self, voice: str | None) -> _Voice:
        if voice is None or (isinstance(voice, str) and not voice.strip()):
            if self.default_voice:
                return self._voices[self.default_voice]
            raise TTSError(f"no {self.title} model given: write the voice as "
                           f"{self.name}:MODEL_DIR{self._speaker_syntax()}, e.g. "
                           f"{self.name}:/models/{self._example_dir()}")
        if not isinstance(voice, str):
            raise TTSError(f"{self.title} voice must be a string, got {type(voice).__name__}")
        if voice not in self._voices:
            with _LOCK:
                resolved = self._parse_voice(voice)
                self._voices[voice] = resolved
                self._voices.setdefault(resolved.canonical, resolved)
        return self._voices[voice]

    def _parse_voice(self, voice: str) -> _Voice:
        text = voice.strip()
        if text.lower().startswith(self.name + ":"):  # a backend spec, as get_backend takes
            text = text[len(self.name) + 1:]
        model, speaker = text, None
        if not Path(text).expanduser().is_dir() and ":" in text:
            model, _, speaker = text.rpartition(":")
            speaker = speaker.strip() or None
        model_dir, model_key = self._model_dir(model.strip(), voice)
        speaker, speaker_key = self._parse_speaker(model_dir, speaker, voice)
        canonical = model_key if speaker_key is None else f"{model_key}:{speaker_key}"
        return _Voice(canonical, model_key, model_dir, speaker)

    def _model_dir(self, model: str, voice: str) -> tuple[Path, str]:
        """The checkpoint directory, and how the canonical voice names it (an absolute path,
        or the hub id for a model from the HF cache)."""
        from speechlm.pretrained.resolve import resolve_model_dir

        if not model:
            raise TTSError(f"no model directory in {self.title} voice {voice!r}; write "
                           f"MODEL_DIR{self._speaker_syntax()}")
        try:
            model_dir = resolve_model_dir(model, what=f"{self.title} model",
                                               hint=self.download_hint)
        except ConfigError as e:
            raise TTSError(str(e)) from None
        local = Path(model).expanduser()
        key = str(local.resolve()) if local.is_dir() else model
        model_type = _read_config(model_dir).get("model_type")
        if model_type != self.model_type:
            fix = (f"use the {model_type} backend ({model_type}:{model})"
                   if model_type in ("speecht5", "vits") else f"give a {self.title} checkpoint")
            raise TTSError(f"{model_dir / 'config.json'}: model_type {model_type!r} is not a "
                           f"{self.title} model; {fix}")
        return model_dir, key

    def _speaker_syntax(self) -> str:
        return ""

    def _example_dir(self) -> str:
        return ""

    def _parse_speaker(self, model_dir: Path, speaker: str | None, voice: str
                       ) -> tuple[object, str | None]:
        raise NotImplementedError

    def language_of(self, voice: str | None = None) -> str:
        return self.lang or self._model_language(self._voice(voice).model_dir)

    def _model_language(self, model_dir: Path) -> str:
        raise NotImplementedError

    # -- options -----------------------------------------------------------------------

    def check_options(self, *, rate: int | None = None, pitch: int | None = None) -> None:
        """TTSError if `rate` or `pitch` cannot be used (for checking before a job)."""
        self._speed(rate)
        if pitch is not None:
            raise TTSError(f"the {self.name} backend has no pitch control; leave pitch unset "
                           f"(got {pitch!r})")

    def _speed(self, rate: int | None) -> float:
        """The multiplier a call's `rate` (percent) puts on the speaking rate."""
        if rate is None:
            return 1.0
        if isinstance(rate, float) and rate.is_integer():
            rate = int(rate)
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
            raise TTSError(f"{self.title} rate (percent of the speaking rate) must be an "
                           f"integer, got {rate!r}")
        lo, hi = RATE_LIMITS
        if not lo <= rate <= hi:
            raise TTSError(f"{self.title} rate {rate} is out of range; use {lo}-{hi} "
                           "(percent of the speaking rate, 100 = unchanged)")
        return int(rate) / 100.0

    # -- speaking ----------------------------------------------------------------------

    def synthesize(self, text: str, *, voice: str | None = None, rate: int | None = None,
                   pitch: int | None = None) -> np.ndarray:
        """Speak `text`: 1-D float32 in [-1, 1] at `sample_rate`. TTSError if it cannot."""
        if not isinstance(text, str):
            raise TTSError(f"text must be a string, got {type(text).__name__}")
        entry = self._voice(voice)
        self.check_options(rate=rate, pitch=pitch)
        speed = self._speed(rate)
        if not _letters(text):
            raise TTSError(f"nothing to say in text {_clip(text)!r} (voice {entry.canonical}): "
                           "it has no letters or digits; drop the item or fix the text")
        import torch

        device = torch.device(self.device)
        devices = [] if device.type != "cuda" else \
            [device.index if device.index is not None else torch.cuda.current_device()]
        # fork_rng: neither loading nor speaking moves the caller's RNG.
        with _LOCK, torch.random.fork_rng(devices=devices):
            model = self._model(entry.model_dir)
            with torch.inference_mode():
                torch.manual_seed(_utterance_seed(self.seed, text))
                wave, native_rate = self._speak(model, entry, text, speed)
        wave = wave.detach().float().reshape(-1).cpu()
        return self._finish(wave, native_rate, text, entry.canonical)

    def _model(self, model_dir: Path):
        if model_dir not in self._models:
            self._models[model_dir] = self._load(model_dir)
        return self._models[model_dir]

    def _load(self, model_dir: Path):
        raise NotImplementedError

    def _speak(self, model, entry: _Voice, text: str, speed: float):
        """(waveform tensor, its sample rate) for one utterance at `speed` x the speaking rate;
        runs seeded, under no-grad."""
        raise NotImplementedError

    def _finish(self, wave, native_rate: int, text: str, voice: str) -> np.ndarray:
        import torch

        if not torch.isfinite(wave).all():
            raise TTSError(f"{self.title} produced non-finite samples for text {_clip(text)!r} "
                           f"with voice {voice}; check the checkpoint (and its dtype)")
        audible = int((wave.abs() > _AUDIBLE_LEVEL).sum())
        if audible < _MIN_AUDIBLE_SECONDS * native_rate:
            raise TTSError(f"{self.title} produced no audible speech for text {_clip(text)!r} "
                           f"with voice {voice} ({audible / native_rate:.3f} s above -40 dBFS); "
                           "check the text is in the checkpoint's language")
        if native_rate != self._sample_rate:
            from speechlm.audio.io import resample

            wave = resample(wave, native_rate, self._sample_rate)
        peak = float(wave.abs().max())
        if self.peak is not None and peak > 0:
            wave = wave * (self.peak / peak)
        return wave.clamp(-1.0, 1.0).numpy().astype(np.float32, copy=False)

    def _loading(self, what: str, model_dir: Path, load):
        """Run `load()` quietly. Unreadable files are a ConfigError naming the directory: a
        broken checkpoint stops a data job instead of failing every item one by one."""
        from speechlm.models.encoders import quiet_transformers

        try:
            with quiet_transformers():
                return load()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"cannot load the {what} from {model_dir}: {type(e).__name__}: "
                           f"{_clip(str(e), 200)}; check the directory holds a complete "
                           f"checkpoint{'; ' + self.download_hint if self.download_hint else ''}"
                           ) from e

    def list_voices(self, lang: str | None = None) -> list[VoiceInfo]:
        if not self.default_voice:
            return []
        entry = self._voice(self.default_voice)
        language = self.language_of(self.default_voice)
        if lang and not (language == lang.lower() or language.startswith(lang.lower() + "-")):
            return []
        return [VoiceInfo(name=name, languages=(language,), description=description)
                for name, description in self._voices_of(entry)]

    def _voices_of(self, entry: _Voice) -> list[tuple[str, str]]:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# SpeechT5


@dataclass
class _SpeechT5Model:
    model: object
    vocoder: object
    tokenizer: object
    vocab: frozenset[str]


class SpeechT5TTS(_TransformersTTS):
    """SpeechT5ForTextToSpeech + SpeechT5HifiGan as a `TTSBackend` (see the module doc)."""

    name = "speecht5"
    title = "SpeechT5"
    model_type = "speecht5"
    download_hint = ("get one with `huggingface-cli download microsoft/speecht5_tts --local-dir "
                     "DIR` (and microsoft/speecht5_hifigan into DIR/vocoder) on a machine with "
                     "network")

    def __init__(self, voice: str | None = None, *, vocoder: str | os.PathLike | None = None,
                 threshold: float = 0.5, minlenratio: float = 0.0, maxlenratio: float = 20.0,
                 **options) -> None:
        if not 0 <= minlenratio <= maxlenratio or maxlenratio <= 0:
            raise TTSError(f"SpeechT5 needs 0 <= minlenratio <= maxlenratio and maxlenratio > 0, "
                           f"got minlenratio={minlenratio!r}, maxlenratio={maxlenratio!r}")
        self.vocoder = vocoder
        self.threshold = float(threshold)
        self.minlenratio = float(minlenratio)
        self.maxlenratio = float(maxlenratio)
        self._speakers: dict[str, object] = {}
        super().__init__(voice, **options)

    def _speaker_syntax(self) -> str:
        return "[:SPEAKER] (SPEAKER: seed=N or an x-vector .npy/.pt file)"

    def _example_dir(self) -> str:
        return "speecht5_tts:seed=0"

    def _model_language(self, model_dir: Path) -> str:
        return "en"  # microsoft/speecht5_tts and its tokenizer's number normaliser are English

    def _parse_speaker(self, model_dir: Path, speaker: str | None, voice: str):
        if speaker is None:
            speaker = "seed=0"
        text = speaker[len("seed="):] if speaker.startswith("seed=") else speaker
        if text.isdigit():
            return f"seed={int(text)}", f"seed={int(text)}"
        if speaker.startswith("seed="):
            raise TTSError(f"SpeechT5 speaker {speaker!r} in voice {voice!r}: the seed must be "
                           "a non-negative integer, e.g. seed=7")
        path = Path(speaker).expanduser()
        candidates = [path] if path.is_absolute() else [path, model_dir / path]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise TTSError(
                f"SpeechT5 speaker embedding not found: {speaker!r} (voice {voice!r}; looked at "
                f"{', '.join(str(p) for p in candidates)}); give a .npy/.pt file of "
                f"{self._embedding_dim(model_dir)} floats (an x-vector) or seed=N")
        found = found.resolve()
        self._speaker_embedding(str(found), model_dir)  # check it now, not mid-job
        return str(found), str(found)

    def _embedding_dim(self, model_dir: Path) -> int:
        return int(_read_config(model_dir).get("speaker_embedding_dim", 512))

    def _speaker_embedding(self, speaker: str, model_dir: Path):
        """A [1, dim] float tensor for "seed=N" or an embedding file (cached)."""
        import torch

        dim = self._embedding_dim(model_dir)
        key = f"{speaker}\0{dim}"
        if key in self._speakers:
            return self._speakers[key]
        if speaker.startswith("seed="):
            generator = torch.Generator().manual_seed(int(speaker[len("seed="):]))
            values = torch.randn(dim, generator=generator)
            values = values / values.norm()
        else:
            path = Path(speaker)
            if path.suffix.lower() not in SPEAKER_EMBEDDING_SUFFIXES:
                raise TTSError(f"{path}: a speaker embedding must be a .npy or .pt file of "
                               f"{dim} floats")
            try:
                if path.suffix.lower() == ".npy":
                    values = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
                else:
                    values = torch.load(path, map_location="cpu", weights_only=True)
                    if isinstance(values, np.ndarray):
                        values = torch.from_numpy(values)
            except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
                raise TTSError(f"{path}: cannot read the speaker embedding ({type(e).__name__}: "
                               f"{_clip(str(e), 120)}); save {dim} floats with numpy.save or "
                               "torch.save") from None
            if not isinstance(values, torch.Tensor) or values.numel() != dim:
                shape = tuple(values.shape) if isinstance(values, torch.Tensor) else \
                    type(values).__name__
                raise TTSError(f"{path}: a speaker embedding must hold {dim} floats (the model's "
                               f"speaker_embedding_dim), got {shape}")
            values = values.reshape(dim).float()
            if not torch.isfinite(values).all() or not values.abs().sum() > 0:
                raise TTSError(f"{path}: the speaker embedding is all zero or not finite")
        self._speakers[key] = values.reshape(1, dim)
        return self._speakers[key]

    def _vocoder_dir(self, model_dir: Path) -> Path:
        from speechlm.pretrained.resolve import resolve_model_dir

        if self.vocoder is not None:
            try:
                return resolve_model_dir(self.vocoder, what="SpeechT5 vocoder",
                                              hint="give a SpeechT5HifiGan checkpoint directory")
            except ConfigError as e:
                raise TTSError(str(e)) from None
        if (model_dir / "vocoder" / "config.json").is_file():
            return model_dir / "vocoder"
        try:
            return resolve_model_dir(DEFAULT_VOCODER, what="SpeechT5 vocoder")
        except ConfigError:
            raise TTSError(
                f"no SpeechT5 vocoder for {model_dir}: looked for {model_dir / 'vocoder'} and "
                f"{DEFAULT_VOCODER} in the local Hugging Face cache; put a SpeechT5HifiGan "
                f"checkpoint in {model_dir / 'vocoder'} (`huggingface-cli download "
                f"{DEFAULT_VOCODER} --local-dir {model_dir / 'vocoder'}`) or pass vocoder=DIR"
            ) from None

    def _parse_voice(self, voice: str) -> _Voice:
        entry = super()._parse_voice(voice)
        self._vocoder_dir(entry.model_dir)  # a missing vocoder fails now, not at the first item
        return entry

    def _load(self, model_dir: Path) -> _SpeechT5Model:
        from transformers import SpeechT5ForTextToSpeech, SpeechT5HifiGan, SpeechT5Tokenizer

        from speechlm.models.encoders import warn_missing_weights

        vocoder_dir = self._vocoder_dir(model_dir)
        tokenizer = self._loading("SpeechT5 tokenizer", model_dir, lambda: (
            SpeechT5Tokenizer.from_pretrained(model_dir, local_files_only=True)))
        model, info = self._loading("SpeechT5 model", model_dir, lambda: (
            SpeechT5ForTextToSpeech.from_pretrained(model_dir, local_files_only=True,
                                                    output_loading_info=True)))
        warn_missing_weights(info, model_dir, "SpeechT5 model")
        vocoder, info = self._loading("SpeechT5 vocoder", vocoder_dir, lambda: (
            SpeechT5HifiGan.from_pretrained(vocoder_dir, local_files_only=True,
                                            output_loading_info=True)))
        warn_missing_weights(info, vocoder_dir, "SpeechT5 vocoder")
        vocab = frozenset(p for p in tokenizer.get_vocab() if len(p) == 1)
        return _SpeechT5Model(model.to(self.device).eval(), vocoder.to(self.device).eval(),
                              tokenizer, vocab)

    def _speak(self, loaded: _SpeechT5Model, entry: _Voice, text: str, speed: float):
        import torch

        letters = _letters(text)
        unknown = [c for c in letters if c not in loaded.vocab]
        if len(unknown) * 2 > len(letters):
            shown = ", ".join(sorted(set(unknown))[:8])
            raise TTSError(f"voice {entry.canonical} cannot read text {_clip(text)!r}: "
                           f"{len(unknown)} of {len(letters)} letters are not in the SpeechT5 "
                           f"tokenizer's vocabulary ({shown}); use text in the checkpoint's "
                           "language and script")
        config = loaded.model.config
        ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        n = ids.shape[1]
        if n > config.max_text_positions:
            raise TTSError(f"text {_clip(text)!r} is too long for SpeechT5: {n} tokens, at most "
                           f"{config.max_text_positions}; split it into sentences")
        # The decoder's position table bounds the number of steps (one per reduction_factor frames).
        rf = config.reduction_factor
        maxlenratio = min(self.maxlenratio, (config.max_speech_positions - 1) * rf / n)
        minlenratio = min(self.minlenratio, maxlenratio)
        max_steps = int(n * maxlenratio / rf)
        speaker = self._speaker_embedding(str(entry.speaker), entry.model_dir).to(self.device)
        spectrogram = loaded.model.generate_speech(
            ids, speaker, threshold=self.threshold, minlenratio=minlenratio,
            maxlenratio=maxlenratio)
        if spectrogram.shape[0] >= max_steps * rf and self.threshold > 0:
            raise TTSError(f"SpeechT5 did not finish speaking text {_clip(text)!r} with voice "
                           f"{entry.canonical} within {maxlenratio:g} x its length (the stop "
                           "predictor never fired); check the text, or raise maxlenratio")
        speed *= self.speaking_rate if self.speaking_rate is not None else 1.0
        if speed != 1.0:  # stretch the spectrogram in time: same pitch, other tempo
            frames = max(1, round(spectrogram.shape[0] / speed))
            spectrogram = torch.nn.functional.interpolate(
                spectrogram.T.unsqueeze(0), size=frames, mode="linear", align_corners=True
            ).squeeze(0).T
        wave = loaded.vocoder(spectrogram)
        return wave, int(loaded.vocoder.config.sampling_rate)

    def _voices_of(self, entry: _Voice) -> list[tuple[str, str]]:
        model_key = entry.model_key
        voices = [(f"{model_key}:seed=0", "pseudo-speaker from seed 0 (the default)")]
        for folder in (entry.model_dir, entry.model_dir / "speakers"):
            if folder.is_dir():
                for path in sorted(folder.iterdir()):
                    if path.is_file() and path.suffix.lower() in SPEAKER_EMBEDDING_SUFFIXES:
                        voices.append((f"{model_key}:{path.resolve()}",
                                       f"x-vector {path.name}"))
        return voices


# ---------------------------------------------------------------------------
# VITS (MMS-TTS)


@dataclass
class _VitsModel:
    model: object
    tokenizer: object


class VitsTTS(_TransformersTTS):
    """VitsModel (MMS-TTS) as a `TTSBackend` (see the module doc)."""

    name = "vits"
    title = "VITS"
    model_type = "vits"
    download_hint = ("get one with `huggingface-cli download facebook/mms-tts-LANG --local-dir "
                     "DIR` (LANG an ISO 639-3 code, e.g. eng) on a machine with network")

    def __init__(self, voice: str | None = None, *, noise_scale: float | None = None,
                 noise_scale_duration: float | None = None, **options) -> None:
        for what, value in (("noise_scale", noise_scale),
                            ("noise_scale_duration", noise_scale_duration)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or value < 0):
                raise TTSError(f"VITS {what} must be a non-negative number, got {value!r}")
        self.noise_scale = noise_scale
        self.noise_scale_duration = noise_scale_duration
        super().__init__(voice, **options)

    def _speaker_syntax(self) -> str:
        return "[:SPEAKER_ID] (multi-speaker checkpoints only)"

    def _example_dir(self) -> str:
        return "mms-tts-eng"

    def _model_language(self, model_dir: Path) -> str:
        try:
            config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            config = {}
        return str(config.get("language") or "und")

    def _parse_speaker(self, model_dir: Path, speaker: str | None, voice: str):
        speakers = int(_read_config(model_dir).get("num_speakers", 1))
        if speaker is None:
            return (0, "0") if speakers > 1 else (None, None)
        if speakers <= 1:
            raise TTSError(f"VITS voice {voice!r}: {model_dir} has a single speaker, so there is "
                           f"no speaker {speaker!r} to choose; write the voice as the directory "
                           "alone")
        if not speaker.isdigit() or not int(speaker) < speakers:
            raise TTSError(f"VITS voice {voice!r}: speaker must be an integer id 0-"
                           f"{speakers - 1} for {model_dir}, got {speaker!r}")
        return int(speaker), str(int(speaker))

    def _load(self, model_dir: Path) -> _VitsModel:
        from transformers import VitsModel, VitsTokenizer

        from speechlm.models.encoders import warn_missing_weights

        tokenizer = self._loading("VITS tokenizer", model_dir, lambda: (
            VitsTokenizer.from_pretrained(model_dir, local_files_only=True)))
        if tokenizer.phonemize:
            from transformers.utils import is_phonemizer_available

            if not is_phonemizer_available():
                raise ConfigError(f"the VITS tokenizer in {model_dir} phonemizes its input, which "
                               "needs the `phonemizer` package and eSpeak; install them or use an "
                               "MMS-TTS checkpoint (characters, no phonemizer)")
        model, info = self._loading("VITS model", model_dir, lambda: (
            VitsModel.from_pretrained(model_dir, local_files_only=True,
                                      output_loading_info=True)))
        warn_missing_weights(info, model_dir, "VITS model")
        model = model.to(self.device).eval()
        if self.noise_scale is not None:
            model.noise_scale = float(self.noise_scale)
        if self.noise_scale_duration is not None:
            model.noise_scale_duration = float(self.noise_scale_duration)
        return _VitsModel(model, tokenizer)

    def _kept_text(self, tokenizer, text: str, entry: _Voice) -> str:
        """The text as the tokenizer will read it; TTSError when most letters would be lost."""
        from transformers.utils import is_uroman_available

        if tokenizer.is_uroman and any(ord(c) > 127 for c in text) and not is_uroman_available():
            raise TTSError(f"{entry.model_dir} reads romanized text (is_uroman) and text "
                           f"{_clip(text)!r} is not: install `uroman` (pip install uroman) or "
                           "romanize the text first")
        kept, _ = tokenizer.prepare_for_tokenization(text)
        letters = _letters(tokenizer.normalize_text(text) if tokenizer.normalize else text)
        kept_letters = _letters(kept)
        # Phonemes or a romanization are not letter for letter: then only "nothing left" counts.
        rewritten = tokenizer.phonemize or (tokenizer.is_uroman and any(ord(c) > 127 for c in text))
        if not kept_letters or (not rewritten and len(kept_letters) * 2 < len(letters)):
            vocab = tokenizer.get_vocab()
            dropped = sorted({c for c in letters if c not in vocab})
            raise TTSError(f"voice {entry.canonical} cannot read text {_clip(text)!r}: the VITS "
                           f"tokenizer drops {len(letters) - len(kept_letters)} of {len(letters)} "
                           f"letters ({', '.join(dropped[:8])}), as they are not in its "
                           "vocabulary; use text in the checkpoint's language and script "
                           f"({self._model_language(entry.model_dir)})")
        return kept

    def _speak(self, loaded: _VitsModel, entry: _Voice, text: str, speed: float):
        self._kept_text(loaded.tokenizer, text, entry)
        inputs = loaded.tokenizer(text, return_tensors="pt").to(self.device)
        base = self.speaking_rate if self.speaking_rate is not None else \
            loaded.model.config.speaking_rate  # the checkpoint's own rate, 1.0 for MMS-TTS
        out = loaded.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                           speaker_id=entry.speaker, speaking_rate=float(base) * speed)
        return out.waveform[0], int(loaded.model.config.sampling_rate)

    def _voices_of(self, entry: _Voice) -> list[tuple[str, str]]:
        model_key = entry.model_key
        speakers = int(_read_config(entry.model_dir).get("num_speakers", 1))
        if speakers <= 1:
            return [(model_key, "single-speaker checkpoint")]
        return [(f"{model_key}:{i}", f"speaker {i}") for i in range(speakers)]
