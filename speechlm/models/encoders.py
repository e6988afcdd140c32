"""Frozen speech encoders behind one interface: 16 kHz audio in, frames out, exact lengths.

    encoder = load_encoder("auto", "path/to/whisper-small")     # or "wav2vec2", "hubert", ...
    out = encoder(batch["audio"], batch["audio_lengths"])        # EncoderOutput(hidden, lengths)
    out.hidden   # [B, F, encoder.output_dim]; frames at or after out.lengths[i] are 0
    out.lengths  # [B] valid frames per item (Whisper's 30 s padding already cut off)

Implementations (all loaded from a local transformers-format directory, or a
hub id present in the local HF cache; nothing is ever downloaded):

- `SSLEncoder` ("wav2vec2", "hubert", "wavlm", "data2vec-audio"): the base
  model of a *Model / *ForPreTraining / *ForCTC directory (heads such as a CTC
  `lm_head` or the pre-training quantizer are ignored). The waveform is
  normalised when the feature extractor says `do_normalize`; an attention mask
  is passed only when the feature extractor returns one (layer-norm conv
  stacks). Models trained without a mask (wav2vec2-base, HuBERT) see the zero
  padding of a batch, so a short item's frames depend slightly on the longest
  item; `unpadded=True` runs every item on its own to avoid that.
- `WhisperSpeechEncoder` ("whisper"): the encoder of a WhisperModel /
  WhisperForConditionalGeneration directory (the decoder is never loaded).
  Features are our `log_mel_spectrogram` with the checkpoint's mel bins.
  By default each clip is encoded at its own length (the encoder's layers
  called with the position table cut to the clip, padding masked out of
  attention, as SLAM-LLM does): a 5 s clip costs a sixth of a 30 s window.
  `pad_to_window=True` pads every clip to the 30 s window Whisper was trained
  on instead (transformers' own path; slower, and the outputs differ a little:
  docs/results/whisper_encoder.md measures how much). Either way outputs are
  cut to the true length ceil(mel_frames / 2), longer audio runs in 30 s
  windows whose frames are concatenated, and an item's frames do not depend on
  the rest of the batch. `full_window=True` (implies pad_to_window) keeps every
  frame of the window instead (1500 per 30 s, the padding's included): what
  Whisper's own decoder cross-attends to (speechlm.recipes.whisper_lora caches
  them).

Common options: `layer` (None = the model's last hidden state, an int = index
into the model's `hidden_states` tuple (0 = input embeddings), "weighted" =
a learned softmax-weighted sum of all hidden states, the only trainable part
then) and `frozen` (default True: parameters without grad, the backbone kept
in eval mode even when a parent module calls `.train()`, and run under
no_grad). `max_window_s` (SSL models) splits long audio into windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import Registry
from ..errors import AudioTooShortError, ConfigError, SpeechLMError
from ..pretrained.resolve import resolve_model_dir

__all__ = [
    "ENCODERS", "EncoderOutput", "SpeechEncoder", "SSLEncoder", "WhisperSpeechEncoder",
    "config_sha256", "detect_encoder_kind", "load_encoder", "quiet_transformers",
]

ENCODERS: Registry[type[SpeechEncoder]] = Registry("speech encoder")
logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WHISPER_WINDOW_SAMPLES = 30 * SAMPLE_RATE

# model_type in config.json -> registered encoder kind
_SSL_MODEL_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio")
# (speechlm_whisper_ctc: a saved WhisperEncoderForCTC, whose encoder is a Whisper encoder)
_MODEL_TYPE_TO_KIND = {**{t: t for t in _SSL_MODEL_TYPES}, "whisper": "whisper",
                       "speechlm_whisper_ctc": "whisper"}


class EncoderOutput(NamedTuple):
    """Encoder frames: `hidden` [B, F, D] (zero at or after `lengths`), `lengths` [B] int64."""

    hidden: torch.Tensor
    lengths: torch.Tensor


# -- loading helpers -------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars (expected unused heads, etc.)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def config_sha256(model_dir: str | os.PathLike) -> str:
    """Hash of a model's config.json that ignores fields re-saving may change
    (transformers_version, _name_or_path, dtype), so a copied or re-saved
    checkpoint keeps its hash."""
    data = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    volatile = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash"}
    data = {k: v for k, v in data.items() if k not in volatile}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def warn_missing_weights(info: dict, model_dir, what: str, ignore: Sequence[str] = ()) -> None:
    """Log a warning when from_pretrained left parameters randomly initialised (transformers'
    own report is silenced by quiet_transformers, since unused heads are expected)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if k not in ignore)
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        logger.warning("%s %s: %d weight(s) missing and %d with the wrong shape were randomly "
                       "initialised (e.g. %s); check that the directory holds the intended "
                       "checkpoint", what, model_dir, len(missing), len(mismatched),
                       ", ".join((missing + mismatched)[:3]))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None


def detect_encoder_kind(model_dir: str | os.PathLike) -> str:
    """The registered encoder kind for a model directory, from config.json's model_type."""
    model_dir = Path(model_dir)
    model_type = _read_json(model_dir / "config.json").get("model_type")
    if model_type not in _MODEL_TYPE_TO_KIND:
        raise ConfigError(
            f"{model_dir / 'config.json'}: model_type {model_type!r} is not a supported speech "
            f"encoder (supported: {', '.join(sorted(_MODEL_TYPE_TO_KIND))})")
    return _MODEL_TYPE_TO_KIND[model_type]


def load_encoder(kind: str, path: str | os.PathLike, *, layer: int | str | None = None,
                 frozen: bool = True, dtype: torch.dtype | str | None = None,
                 **options: Any) -> SpeechEncoder:
    """Load a speech encoder of `kind` ("auto" = from config.json) from a local directory.

    layer: None / "last" (last hidden state), an int index into hidden_states,
    or "weighted". frozen: see the module docstring. dtype: backbone weights
    dtype (e.g. torch.bfloat16); default float32. options: per kind, e.g.
    `max_window_s`, `unpadded` for SSL encoders.
    """
    model_dir = resolve_model_dir(path, what="speech encoder")
    detected = detect_encoder_kind(model_dir)
    if kind == "auto":
        kind = detected
    cls = ENCODERS.get(kind)
    if detected not in cls.model_types:
        raise ConfigError(f"encoder kind '{kind}' does not fit {model_dir} (its config.json "
                          f"says model_type '{detected}'); use kind 'auto' or '{detected}'")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    encoder = cls.from_dir(model_dir, layer=layer, frozen=frozen, dtype=dtype, **options)
    encoder.source_path = str(path)
    return encoder


# -- common interface ------------------------------------------------------------------


class SpeechEncoder(nn.Module):
    """Common interface: `forward(audio [B, T] float 16 kHz, audio_lengths [B]) -> EncoderOutput`.

    Subclasses implement `_hidden_states` (backbone run on a padded batch) and
    `_window_lengths` (frames of one backbone pass), and set `backbone`, `output_dim`, `frame_rate`,
    `num_hidden_states`.
    """

    kind: str = ""
    model_types: tuple[str, ...] = ()
    sample_rate: int = SAMPLE_RATE

    def __init__(self, backbone: nn.Module, *, output_dim: int, frame_rate: float,
                 num_hidden_states: int, layer: int | str | None = None, frozen: bool = True,
                 window_samples: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.output_dim = int(output_dim)
        self.frame_rate = float(frame_rate)
        self.num_hidden_states = int(num_hidden_states)
        self.window_samples = window_samples
        self.source_path: str | None = None
        if layer == "last":
            layer = None
        if isinstance(layer, str) and layer != "weighted":
            raise ConfigError(f"encoder layer must be an int, 'last' or 'weighted', got {layer!r}")
        if isinstance(layer, int) and not -num_hidden_states <= layer < num_hidden_states:
            raise ConfigError(f"encoder layer {layer} is out of range: this {self.kind} model has "
                              f"{num_hidden_states} hidden states (0 = embeddings .. "
                              f"{num_hidden_states - 1} = last layer)")
        self.layer = layer
        if layer == "weighted":
            # zeros -> uniform softmax weights at the start
            self.layer_weights = nn.Parameter(torch.zeros(num_hidden_states))
        self.set_frozen(frozen)

    # - freezing -

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (no grad, eval mode, no_grad forward) or unfreeze the backbone."""
        self.frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def _backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        # A frozen backbone stays in eval mode (no dropout / SpecAugment), unless some of
        # its parameters train (e.g. LoRA injected into it).
        self.backbone.train(mode and self._backbone_trainable())
        return self

    # - interface -

    def output_lengths(self, audio_lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Exact number of output frames for `audio_lengths` samples (int64 tensor),
        counting the windows long audio is cut into."""
        lengths = torch.as_tensor(audio_lengths, dtype=torch.long)
        window = self.window_samples
        if window is None:
            return self._window_lengths(lengths)
        full = torch.div(lengths, window, rounding_mode="floor")
        single = lengths <= window  # not windowed at all
        windowed = full * self._window_lengths(torch.full_like(lengths, window)) \
            + self._window_lengths(lengths % window)
        return torch.where(single, self._window_lengths(lengths.clamp(max=window)), windowed)

    def _hidden_states(self, audio: torch.Tensor, lengths: torch.Tensor,
                       all_layers: bool) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Backbone on a zero-padded batch: last hidden state, or all hidden states."""
        raise NotImplementedError

    def _window_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames of one backbone pass over `lengths` samples (at most one window)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(self, audio: torch.Tensor, audio_lengths: torch.Tensor | Sequence[int] | None = None
                ) -> EncoderOutput:
        from ..audio.features import as_padded_batch

        audio, lengths = as_padded_batch(audio, audio_lengths)
        audio, lengths = audio.to(self.device), lengths.to(self.device)
        if audio.shape[0] == 0:
            return EncoderOutput(audio.new_zeros((0, 0, self.output_dim)), lengths.new_zeros(0))
        window = self.window_samples
        if window is None or int(lengths.max()) <= window:
            hidden, out_lengths = self._run(audio, lengths)
        else:
            hidden, out_lengths = self._run_windowed(audio, lengths, window)
        return EncoderOutput(hidden, out_lengths)

    # - internals -

    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lengths = self._window_lengths(lengths).to(torch.long)
        if int(out_lengths.max()) <= 0:
            raise AudioTooShortError(
                "<batch>", f"longest item {int(lengths.max())} samples gives no {self.kind} frames",
                "give at least 25 ms of audio")
        grad = torch.is_grad_enabled() and self._backbone_trainable()
        with torch.set_grad_enabled(grad):
            states = self._hidden_states(audio, lengths, all_layers=self.layer is not None)
        hidden = self._select(states)[:, : int(out_lengths.max())]
        keep = torch.arange(hidden.shape[1], device=hidden.device) < out_lengths[:, None]
        return hidden * keep[..., None].to(hidden.dtype), out_lengths

    def _select(self, states) -> torch.Tensor:
        if self.layer is None:
            return states
        if self.layer == "weighted":
            weights = torch.softmax(self.layer_weights, dim=0)
            stacked = torch.stack(list(states), dim=0)
            return torch.einsum("l,lbfd->bfd", weights.to(stacked.dtype), stacked)
        return states[self.layer]

    def _run_windowed(self, audio: torch.Tensor, lengths: torch.Tensor, window: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut each item into `window`-sample pieces, encode them in groups, concatenate frames."""
        pieces: list[tuple[int, int, int]] = []  # (item, start, length)
        for item, n in enumerate(lengths.tolist()):
            for start in range(0, max(n, 1), window):
                pieces.append((item, start, min(window, n - start)))
        outputs: list[list[torch.Tensor]] = [[] for _ in range(audio.shape[0])]
        group = max(audio.shape[0], 1)
        for g in range(0, len(pieces), group):
            chunk = pieces[g : g + group]
            width = max(length for _, _, length in chunk)
            width = max(width, min(window, int(lengths.max())))  # keep tiny tails encodable
            batch = audio.new_zeros((len(chunk), width))
            for row, (item, start, length) in enumerate(chunk):
                batch[row, :length] = audio[item, start : start + length]
            chunk_lengths = torch.tensor([c[2] for c in chunk], device=audio.device)
            hidden, out_lengths = self._run(batch, chunk_lengths)
            for row, (item, _, _) in enumerate(chunk):
                outputs[item].append(hidden[row, : int(out_lengths[row])])
        frames = [torch.cat(parts, dim=0) for parts in outputs]
        out_lengths = torch.tensor([f.shape[0] for f in frames], device=audio.device)
        hidden = frames[0].new_zeros((len(frames), int(out_lengths.max()), frames[0].shape[-1]))
        for i, f in enumerate(frames):
            hidden[i, : f.shape[0]] = f
        return hidden, out_lengths

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, output_dim={self.output_dim}, frame_rate={self.frame_rate}, "
                f"layer={self.layer!r}, frozen={self.frozen}")


# -- wav2vec2 / HuBERT / WavLM ---------------------------------------------------------


@ENCODERS.register("wav2vec2")
@ENCODERS.register("hubert")
@ENCODERS.register("wavlm")
@ENCODERS.register("data2vec-audio")
class SSLEncoder(SpeechEncoder):
    """Self-supervised waveform encoders (wav2vec2 family) via AutoModel (heads dropped)."""

    kind = "wav2vec2"
    model_types = _SSL_MODEL_TYPES

    def __init__(self, backbone: nn.Module, *, do_normalize: bool, use_attention_mask: bool,
                 layer: int | str | None = None, frozen: bool = True,
                 max_window_s: float | None = None, unpadded: bool = False):
        config = backbone.config
        self.kind = config.model_type
        stride = math.prod(config.conv_stride)
        window = None
        if max_window_s is not None:
            if max_window_s <= 0:
                raise ConfigError(f"max_window_s must be > 0, got {max_window_s}")
            window = int(round(max_window_s * SAMPLE_RATE))
        super().__init__(backbone, output_dim=config.hidden_size, frame_rate=SAMPLE_RATE / stride,
                         num_hidden_states=config.num_hidden_layers + 1, layer=layer,
                         frozen=frozen, window_samples=window)
        self.do_normalize = bool(do_normalize)
        self.use_attention_mask = bool(use_attention_mask)
        self.unpadded = bool(unpadded)

    @classmethod
    def from_dir(cls, model_dir: Path, *, layer=None, frozen=True, dtype=None,
                 max_window_s: float | None = None, unpadded: bool = False) -> SSLEncoder:
        from transformers import AutoModel

        config = _read_json(model_dir / "config.json")
        extractor = _read_json(model_dir / "preprocessor_config.json")
        # Without a feature extractor file, follow the convention of the released
        # checkpoints: layer-norm conv stacks take a mask and normalised input.
        layer_norm = config.get("feat_extract_norm", "layer") == "layer"
        do_normalize = extractor.get("do_normalize", layer_norm)
        use_mask = extractor.get("return_attention_mask", layer_norm)
        rate = extractor.get("sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ConfigError(f"{model_dir}: the feature extractor expects {rate} Hz audio; "
                              f"speechlm encoders take {SAMPLE_RATE} Hz")
        with quiet_transformers():
            backbone, info = AutoModel.from_pretrained(
                model_dir, local_files_only=True, output_loading_info=True,
                **({"dtype": dtype} if dtype else {}))
        warn_missing_weights(info, model_dir, "speech encoder", ignore=("masked_spec_embed",))
        return cls(backbone, do_normalize=do_normalize, use_attention_mask=use_mask, layer=layer,
                   frozen=frozen, max_window_s=max_window_s, unpadded=unpadded)

    def _window_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        return self.backbone._get_feat_extract_output_lengths(lengths).clamp(min=0).to(torch.long)

    def _hidden_states(self, audio, lengths, all_layers):
        from ..audio.features import normalize_waveform

        if self.unpadded and not self.use_attention_mask and audio.shape[0] > 1:
            return self._hidden_states_unpadded(audio, lengths, all_layers)
        x = normalize_waveform(audio, lengths) if self.do_normalize else audio
        mask = None
        if self.use_attention_mask:
            mask = (torch.arange(x.shape[1], device=x.device) < lengths[:, None]).long()
        out = self.backbone(x.to(self.dtype), attention_mask=mask,
                            output_hidden_states=all_layers)
        return out.hidden_states if all_layers else out.last_hidden_state

    def _hidden_states_unpadded(self, audio, lengths, all_layers):
        """Each item alone (no padding seen), padded back into one batch of frames."""
        per_item = [self._hidden_states(audio[i : i + 1, : int(n)], lengths[i : i + 1], all_layers)
                    for i, n in enumerate(lengths.tolist())]
        width = max(self._frames(s) for s in per_item)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(t, (0, 0, 0, width - t.shape[1]))

        if not all_layers:
            return torch.cat([pad(s) for s in per_item], dim=0)
        return tuple(torch.cat([pad(s[k]) for s in per_item], dim=0)
                     for k in range(len(per_item[0])))

    @staticmethod
    def _frames(states) -> int:
        return (states if isinstance(states, torch.Tensor) else states[0]).shape[1]


# -- Whisper ---------------------------------------------------------------------------


@ENCODERS.register("whisper")
class WhisperSpeechEncoder(SpeechEncoder):
    """The Whisper encoder on each clip's own length (default) or on padded 30 s windows."""

    kind = "whisper"
    model_types = ("whisper", "speechlm_whisper_ctc")

    def __init__(self, backbone: nn.Module, *, layer: int | str | None = None, frozen: bool = True,
                 pad_to_window: bool = False, full_window: bool = False):
        config = backbone.config
        self.n_mels = config.num_mel_bins
        # mel frames per window (3000) and the encoder's stride over them (2)
        self.mel_frames = config.max_source_positions * 2
        window = self.mel_frames * 160
        super().__init__(backbone, output_dim=config.d_model,
                         frame_rate=SAMPLE_RATE / 160 / 2,
                         num_hidden_states=config.encoder_layers + 1, layer=layer, frozen=frozen,
                         window_samples=window)
        self.full_window = bool(full_window)
        self.pad_to_window = bool(pad_to_window) or self.full_window

    @classmethod
    def from_dir(cls, model_dir: Path, *, layer=None, frozen=True, dtype=None,
                 pad_to_window: bool = False, full_window: bool = False) -> WhisperSpeechEncoder:
        return cls(_load_whisper_encoder(model_dir, dtype), layer=layer, frozen=frozen,
                   pad_to_window=pad_to_window, full_window=full_window)

    def _window_lengths(self, lengths):
        """ceil(mel_frames / 2): the encoder's stride-2 conv over ceil(samples / 160) mel frames
        (full_window: every window's 1500 frames)."""
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        if self.full_window:
            return torch.where(lengths > 0, self.mel_frames // 2, 0)
        mel = torch.div(lengths.clamp(max=self.window_samples) + 159, 160, rounding_mode="floor")
        return torch.div(mel + 1, 2, rounding_mode="floor")

    def _hidden_states(self, audio, lengths, all_layers):
        from ..audio.features import log_mel_spectrogram

        if self.pad_to_window:
            mel = log_mel_spectrogram(audio, self.n_mels, lengths=lengths,
                                      pad_to=self.window_samples)
            out = self.backbone(mel.to(self.dtype), output_hidden_states=all_layers)
            return out.hidden_states if all_layers else out.last_hidden_state
        mel_lengths = torch.div(lengths + 159, 160, rounding_mode="floor")
        width = int(mel_lengths.max()) + int(mel_lengths.max()) % 2  # even: stride-2 conv
        mel = log_mel_spectrogram(audio, self.n_mels, lengths=lengths, pad_to=width * 160)
        return self._encode_unpadded(mel.to(self.dtype), mel_lengths, all_layers)

    def _encode_unpadded(self, mel: torch.Tensor, mel_lengths: torch.Tensor, all_layers: bool):
        """WhisperEncoder.forward without the 3000-frame check: positions cut to the clip,
        the batch's padding zeroed before each conv (as the conv's own zero padding is for
        a clip alone) and masked out of attention, so an item's frames ignore the batch."""
        encoder = self.backbone
        gelu = nn.functional.gelu
        frames = torch.arange(mel.shape[-1], device=mel.device)
        mel = mel * (frames < mel_lengths[:, None])[:, None, :].to(mel.dtype)
        x = gelu(encoder.conv1(mel))
        x = x * (frames < mel_lengths[:, None])[:, None, :].to(x.dtype)
        x = gelu(encoder.conv2(x)).transpose(1, 2)
        out_lengths = torch.div(mel_lengths + 1, 2, rounding_mode="floor")
        x = x + encoder.embed_positions.weight[: x.shape[1]].to(x.dtype)
        mask = None
        if bool((out_lengths < x.shape[1]).any()):
            keep = torch.arange(x.shape[1], device=x.device)[None, :] < out_lengths[:, None]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
        states = [x]
        for layer in encoder.layers:
            x = layer(x, mask)
            states.append(x)
        states[-1] = encoder.layer_norm(x)  # as transformers: the last state is normed
        return tuple(states) if all_layers else states[-1]


def _load_whisper_encoder(model_dir: Path, dtype: torch.dtype | None) -> nn.Module:
    """WhisperEncoder with only the encoder's weights read from the checkpoint."""
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig.from_pretrained(model_dir, local_files_only=True)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:  # e.g. an old pytorch_model.bin checkpoint: let transformers load it safely
        with quiet_transformers():
            model, info = WhisperModel.from_pretrained(
                model_dir, local_files_only=True, output_loading_info=True,
                **({"dtype": dtype} if dtype else {}))
        warn_missing_weights(info, model_dir, "speech encoder")
        return model.encoder
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                # Whisper checkpoints, WhisperModel / WhisperEncoder ones, and a saved
                # WhisperEncoderForCTC (speechlm.models.whisper_ctc)
                for prefix in ("model.encoder.", "encoder.backbone.", "encoder."):
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
                        break
    if not state:
        raise SpeechLMError(f"{model_dir}: no Whisper encoder weights (model.encoder.* or "
                            "encoder.*) in its safetensors files")
    with quiet_transformers():
        encoder = WhisperEncoder._from_config(config, **({"dtype": dtype} if dtype else {}))
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "embed_positions.weight"]  # fixed sinusoids
    if missing or unexpected:
        raise SpeechLMError(f"{model_dir}: Whisper encoder weights do not fit its config "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return encoder.eval()
