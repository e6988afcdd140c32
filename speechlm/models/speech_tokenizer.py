"""Supervised speech tokenizer (GLM-4-Voice style): a Whisper encoder cut in two by a VQ.

    tok = SpeechTokenizer.build("scratch", vocab, TokenizerSettings(vq_layer=2, num_codes=512),
                                scratch_config={"d_model": 128, "encoder_layers": 4, ...})
    out = tok(audio, lengths)             # training: CTC log-probs over characters + VQOutput
    loss = ctc_loss(out.log_probs, ...) + out.vq.commit_loss
    units = tok.encode(audio, lengths)    # inference: list of code lists, 12.5 per second
    save_speech_tokenizer(tok, "runs/tok/final"); tok = load_speech_tokenizer("runs/tok/final")

Layout, after the paper: Whisper's conv front end and its first `vq_layer`
transformer layers run at 50 Hz; an average pool (kernel `pool`, 4 -> 12.5 Hz)
and a nearest-neighbour VQ with an EMA codebook (speechlm.models.vq) follow;
at inference that is all (`encode`: the layers above the VQ are dropped).
During training the codes go on through the remaining encoder layers to an
ASR head, so the codes have to carry what the transcript needs.

The ASR head is character CTC, not Whisper's attention decoder (GLM-4-Voice
fine-tunes whisper-large-v3 with its own decoder). CTC trains a from-scratch
encoder on a CPU in minutes and gives the units-to-text check a transcript
straight from the codes. CTC needs at least one output frame per character,
more than 12.5 Hz gives, so each code is turned back into `pool` frames at 50 Hz
by a learned upsampler (with Whisper's position table added again: quantized
vectors lose where they were) before the upper layers.

Options the issue names: `causal_conv` (Whisper's two convolutions padded on
the left only, same weights) and `attention_block` (block-causal attention,
frames attend within their block and to earlier blocks; the released model
uses 200 frames). Without `pad_to_window` every item is masked to its own
length, so an item's codes never depend on the batch it is in; with it every
input is padded to 30 s as Whisper was trained (use it with pretrained Whisper
weights).

`head: whisper_decoder` trains as GLM-4-Voice does instead: Whisper's own
attention decoder reads the layers above the VQ, trained with its own loss
(teacher-forced cross-entropy on `<|startoftranscript|> <|lang|> <|transcribe|>
<|notimestamps|> text`). Whisper cross-attends to a whole 30 s window, and what
the decoder sees must depend on the codes alone (the units-to-text check), so
the window is filled without the audio: with `repeat_units` each code is
repeated `pool` times at 50 Hz and followed by `silence`, what the layers below
the VQ give for a silent window (the layout Whisper's pretrained layers know);
without it the layers above run at 12.5 Hz on 375 positions, the codes first
and a learned padding vector after them, positions from the first rows of
Whisper's table (the release's layout). Built from a
WhisperForConditionalGeneration directory (`build`), it carries the decoder,
the generation config and the text tokenizer, and saves them.

`position_mean`: the VQ quantizes each pooled state minus the mean state at its unit
position (a buffer fitted by `fit_codebook` on training audio, with the codebook's k-means
start) and the mean is added back after it, so the codes do not spend on where in the
window a frame is.

Identity: `identity` hashes the settings and the codebook (and the position means).
Unit files record it, and whatever reads units (text-to-token training, interleaving) checks it,
so units from two tokenizers are never mixed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SpeechLMError
from .adapters import AdapterOutput, lengths_mask
from .ctc import CharVocab
from .vq import AvgPoolDownsample, CausalConv1d, VectorQuantizer, VQOutput, bits_per_second

__all__ = [
    "SETTINGS_FILE", "SpeechTokenizer", "TokenizerOutput", "TokenizerSettings",
    "load_speech_tokenizer", "save_speech_tokenizer", "unit_statistics",
]

SETTINGS_FILE = "speech_tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
SAMPLE_RATE = 16000
HOP = 160                        # Whisper's mel hop: 100 mel frames per second
WINDOW_SECONDS = 30.0            # Whisper's window; longer audio is cut into windows
HEADS = ("ctc", "whisper_decoder")
SILENCE_MEL = -0.75              # log-mel of a window's padded tail (see fill_silence)
TIED_OUTPUT = "whisper.proj_out.weight"  # = the decoder's token table; not saved twice


@dataclass
class TokenizerSettings:
    """What the tokenizer is, beyond the Whisper encoder's own config."""

    vq_layer: int                        # the VQ sits after this many encoder layers (k)
    pool: int = 4                        # average-pool kernel: 50 Hz / 4 = 12.5 Hz
    num_codes: int = 16384
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0     # EMA frames per batch under which a code restarts
    kmeans_init: bool = True
    causal_conv: bool = False
    attention_block: int | None = None   # block-causal attention, in 50 Hz frames (GLM: 200)
    pad_to_window: bool = False          # pad inputs to 30 s (pretrained Whisper expects it)
    head: str = "ctc"                    # ctc | whisper_decoder (Whisper's own, from init)
    language: str | None = None          # whisper_decoder: the prompt's language token
    # whisper_decoder: the layers above the VQ at 50 Hz (each unit repeated `pool` times, in
    # Whisper's 1500-frame window with silence's frames after the speech), or at 12.5 Hz as
    # the GLM-4-Voice release (375 positions, a learned padding vector)
    repeat_units: bool = False
    # quantize the pooled states minus their mean at each unit position (`position_mean`,
    # fitted on training audio by `fit_codebook`), the mean added back after the VQ: Whisper's
    # states carry where in the window a frame is (42% of their variance at layer 3 of
    # Whisper base), which the unit's index already tells, so the codes need not spend on it
    position_mean: bool = False

    def __post_init__(self):
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r}: give one of {', '.join(HEADS)}")
        if self.vq_layer < 1:
            raise ConfigError(f"vq_layer must be >= 1 (the VQ follows that many encoder "
                              f"layers), got {self.vq_layer}")
        if self.pool < 1 or self.num_codes < 2:
            raise ConfigError(f"pool must be >= 1 and num_codes >= 2, got {self.pool} and "
                              f"{self.num_codes}")
        if self.attention_block is not None and self.attention_block < 1:
            raise ConfigError(f"attention_block must be >= 1 frame or null, got "
                              f"{self.attention_block}")

    @property
    def frame_rate(self) -> float:
        """Units per second: 100 mel frames/s, conv stride 2, then the pool."""
        return SAMPLE_RATE / HOP / 2 / self.pool

    @property
    def samples_per_unit(self) -> int:
        return HOP * 2 * self.pool


class TokenizerOutput(NamedTuple):
    log_probs: torch.Tensor   # [B, T50, V] float32 CTC log-probs of the characters
    frames: torch.Tensor      # [B] valid 50 Hz frames
    vq: VQOutput | None       # None when the VQ was bypassed
    unit_lengths: torch.Tensor  # [B] valid units


class SpeechTokenizer(nn.Module):
    """Whisper encoder layers + pool + VQ (+ upper layers and a CTC head for training)."""

    def __init__(self, encoder: nn.Module, vocab: CharVocab | None, settings: TokenizerSettings,
                 *, whisper: nn.Module | None = None, text_tokenizer=None):
        super().__init__()
        config = encoder.config
        layers = len(encoder.layers)
        if not settings.vq_layer < layers:
            raise ConfigError(f"vq_layer={settings.vq_layer}: the encoder has {layers} layers; "
                              "the VQ must leave at least one layer above it for the ASR head")
        if settings.causal_conv:
            encoder.conv1 = _causal_copy(encoder.conv1)
            encoder.conv2 = _causal_copy(encoder.conv2)
        self.encoder = encoder
        self.settings = settings
        self.vocab = vocab
        self.pool = AvgPoolDownsample(settings.pool)
        self.vq = VectorQuantizer(settings.num_codes, config.d_model,
                                  commitment=settings.commitment, ema_decay=settings.ema_decay,
                                  dead_code_threshold=settings.dead_code_threshold,
                                  kmeans_init=settings.kmeans_init)
        if settings.position_mean:
            units = int(config.max_source_positions) // settings.pool
            self.register_buffer("position_mean", torch.zeros(units, config.d_model))
        if settings.head == "ctc":
            if vocab is None:
                raise ConfigError("head ctc needs a character vocabulary")
            # each unit becomes `pool` different 50 Hz frames (a learned upsampler, a
            # transposed convolution of stride and kernel `pool`): one unit often spans a
            # consonant and a vowel, which repeated copies of one vector could not tell apart
            self.upsample = nn.Linear(config.d_model, config.d_model * settings.pool)
            self.head = nn.Linear(config.d_model, len(vocab))
            return
        if whisper is None or text_tokenizer is None:
            raise ConfigError("head whisper_decoder needs Whisper's decoder and its tokenizer: "
                              "model.init must be a WhisperForConditionalGeneration directory, "
                              "e.g. models:whisper-base")
        from .whisper_lora import asr_prompt

        # the decoder and its output layer; the encoder lives in self.encoder only (the
        # decoder is always called with encoder_outputs)
        whisper.model.encoder = nn.Identity()
        self.whisper = whisper
        self.text_tokenizer = text_tokenizer
        self.prompt = asr_prompt(whisper.generation_config, settings.language,
                                 getattr(config, "_name_or_path", "model.init"),
                                 field="model.language",
                                 max_positions=int(config.max_target_positions))
        # the token table (tied to the output layer) stays as pretrained: an hour of speech
        # cannot improve 52k rows, and freezing it halves what the optimizer holds
        whisper.model.decoder.embed_tokens.weight.requires_grad_(False)
        if settings.repeat_units:
            # what the layers below the VQ give for silence at each of the window's frames
            # (`fill_silence`; saved with the weights): the decoder reads the speech's units
            # followed by these, as Whisper reads speech followed by its padded tail
            self.register_buffer("silence", torch.zeros(int(config.max_source_positions),
                                                        config.d_model))
        else:
            self.pad_unit = nn.Parameter(torch.zeros(config.d_model))

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def build(cls, init: str | os.PathLike, vocab: CharVocab, settings: TokenizerSettings, *,
              scratch_config: dict[str, Any] | None = None) -> SpeechTokenizer:
        """From a Whisper checkpoint directory (the encoder's weights only; with head
        whisper_decoder the decoder's too) or "scratch" + config."""
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        from ..pretrained.resolve import resolve_model_dir
        from .encoders import _load_whisper_encoder, quiet_transformers

        if settings.head == "whisper_decoder":
            from .whisper_lora import load_whisper

            if str(init) == "scratch":
                raise ConfigError("head whisper_decoder trains Whisper's own decoder: model.init "
                                  "must be a WhisperForConditionalGeneration directory (e.g. "
                                  "models:whisper-base), not scratch")
            whisper, text_tokenizer = load_whisper(resolve_model_dir(init, what="Whisper model"))
            model = cls(whisper.model.encoder.train(), vocab, settings, whisper=whisper.train(),
                        text_tokenizer=text_tokenizer)
            if settings.repeat_units:
                model.fill_silence()
            return model
        if str(init) == "scratch":
            try:
                config = WhisperConfig(**dict(scratch_config or {}))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.scratch: not a valid WhisperConfig: {e}") from None
            with quiet_transformers():
                encoder = WhisperEncoder(config)
        else:
            encoder = _load_whisper_encoder(resolve_model_dir(init, what="Whisper model"),
                                            None)
        return cls(encoder.train(), vocab, settings)

    # -- sizes ----------------------------------------------------------------------------

    @property
    def frame_rate(self) -> float:
        return self.settings.frame_rate

    @property
    def max_samples(self) -> int:
        return int(WINDOW_SECONDS * SAMPLE_RATE)

    def mel_frames(self, samples):
        """Log-mel frames of audio lengths in samples: floor(n / 160) (Whisper's 3000 for
        30 s); with head whisper_decoder ceil(n / 160), as speechlm's Whisper encoder counts
        them, so that the encoder-output cache of the layers below the VQ holds exactly what
        `_lower` computes."""
        samples = torch.as_tensor(samples, dtype=torch.long)
        extra = HOP - 1 if self.settings.head == "whisper_decoder" else 0
        return torch.div(samples + extra, HOP, rounding_mode="floor")

    def frames_for_samples(self, samples):
        """50 Hz encoder frames for audio lengths in samples: ceil(mel frames / 2)."""
        return torch.div(self.mel_frames(samples) + 1, 2, rounding_mode="floor")

    def units_for_samples(self, samples):
        frames = self.frames_for_samples(samples)
        return torch.div(frames + self.settings.pool - 1, self.settings.pool, rounding_mode="floor")

    @property
    def identity(self) -> str:
        """A short hash of the settings and the codebook: what makes units comparable."""
        settings = dataclasses.asdict(self.settings)
        if settings["head"] == "ctc":  # as before the decoder head existed: same identities
            del settings["head"], settings["language"], settings["repeat_units"]
        if not settings["position_mean"]:  # as before the option existed
            del settings["position_mean"]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(self.vq.codebook.detach().float().cpu().contiguous().numpy().tobytes())
        if self.settings.position_mean:
            digest.update(self.position_mean.detach().float().cpu().contiguous().numpy()
                          .tobytes())
        return digest.hexdigest()[:16]

    # -- what the VQ quantizes ------------------------------------------------------------

    def _position_offset(self, count: int, dtype) -> torch.Tensor | float:
        """The mean of the pooled states at unit positions 0..count-1 ([count, D]), or 0."""
        if not self.settings.position_mean:
            return 0.0
        if count > self.position_mean.shape[0]:
            raise SpeechLMError(f"SpeechTokenizer: {count} units in one window; the position "
                                f"means cover {self.position_mean.shape[0]}")
        return self.position_mean[:count].to(dtype)

    def _quantize(self, pooled: AdapterOutput, *, quantize: bool = True
                  ) -> tuple[torch.Tensor, VQOutput | None]:
        """(the vectors the layers above the VQ read [B, T', D], the VQ's output or None)."""
        if not quantize:
            return pooled.hidden, None
        offset = self._position_offset(pooled.hidden.shape[1], pooled.hidden.dtype)
        vq = self.vq(pooled.hidden - offset, pooled.lengths)
        return vq.quantized + offset, vq

    @torch.no_grad()
    def fit_codebook(self, batches, *, frames_per_batch: float | None = None,
                     iters: int = 10, shrink: float = 8.0) -> dict:
        """Initialise the codebook by k-means on the pooled states of many utterances
        (`batches` of (audio [B, T], lengths [B])), instead of on the first training batch
        (at most 4 x num_codes frames: fewer than the codes when a batch holds a minute of
        speech). With `position_mean`, first the mean state at each unit position (shrunk
        towards the overall mean by `shrink` frames' weight where few utterances reach, the
        overall mean where none does).
        frames_per_batch: training frames per update, the scale of the EMA cluster sizes
        (default: the mean of `batches`). Every rank must call it; rank 0's fit is kept."""
        from .vq import _broadcast_, kmeans

        frames, positions, batch_sizes = [], [], []
        for audio, lengths in batches:
            hidden, valid = self._lower(audio, lengths)
            pooled = self.pool(hidden, valid)
            for row, n in zip(pooled.hidden, pooled.lengths.tolist(), strict=True):
                frames.append(row[:n].float())
                positions.append(torch.arange(n, device=row.device))
            batch_sizes.append(int(pooled.lengths.sum()))
        if not frames or not sum(batch_sizes):
            raise SpeechLMError("fit_codebook: no audio frames to fit the codebook on")
        x, where = torch.cat(frames), torch.cat(positions)
        variance = x.var(0).sum()
        if self.settings.position_mean:
            width = self.position_mean.shape[0]
            sums = x.new_zeros(width, x.shape[1]).index_add_(0, where, x)
            counts = torch.bincount(where, minlength=width).to(x.dtype)
            weight = counts + shrink
            mean = (sums + shrink * x.mean(0)) / weight.clamp(min=1e-9)[:, None]
            mean[weight == 0] = x.mean(0)  # positions no utterance reaches
            self.position_mean.copy_(_broadcast_(mean.to(self.position_mean.dtype)))
            x = x - self.position_mean[where].float()
        vq = self.vq
        centres, sizes = kmeans(x, vq.num_codes, iters, vq.chunk_frames)
        per_batch = frames_per_batch or sum(batch_sizes) / len(batch_sizes)
        sizes = sizes * (per_batch / x.shape[0])  # frames per batch, like the EMA
        vq.codebook.copy_(_broadcast_(centres.to(vq.codebook.dtype)))
        vq.ema_cluster_size.copy_(_broadcast_(sizes.to(vq.ema_cluster_size.dtype)))
        vq.ema_embed_sum.copy_(vq.codebook * vq.ema_cluster_size[:, None])
        vq.initialized.fill_(True)
        return {"frames": int(x.shape[0]), "codes_used": int((sizes > 0).sum()),
                "variance_kept": float(x.var(0).sum() / variance)}

    # -- the encoder, in two halves ---------------------------------------------------------

    def _lower(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """50 Hz hidden states after `vq_layer` layers [B, T, D] and valid frames [B]."""
        from ..audio.features import log_mel_spectrogram

        if audio.shape[-1] > self.max_samples:
            raise SpeechLMError(f"SpeechTokenizer: {audio.shape[-1] / SAMPLE_RATE:.1f} s of audio in "
                                f"one item; the encoder takes at most {WINDOW_SECONDS:.0f} s "
                                "(encode() cuts long audio into windows)")
        enc = self.encoder
        window = self.settings.pad_to_window
        longest = int(self.mel_frames(lengths.max())) if len(lengths) else 0
        width = (longest + longest % 2) * HOP  # every valid mel frame, an even count of them
        mel = log_mel_spectrogram(audio, enc.config.num_mel_bins, lengths=lengths,
                                  pad_to=self.max_samples if window else max(width, 401))
        weight = enc.conv1.weight
        mel_frames = self.mel_frames(lengths).to(mel.device)
        if not window:
            # Zero what lies past an item's end, before and after the first convolution, as
            # the convolutions' own zero padding would: an item's frames then do not depend
            # on the batch it is in.
            mel = mel * lengths_mask(mel_frames, mel.shape[-1])[:, None, :].to(mel.dtype)
        x = F.gelu(enc.conv1(mel.to(weight.dtype)))
        if not window:
            x = x * lengths_mask(mel_frames, x.shape[-1])[:, None, :].to(x.dtype)
        x = F.gelu(enc.conv2(x)).transpose(1, 2)
        frames = torch.div(mel_frames + 1, 2, rounding_mode="floor").clamp(max=x.shape[1])
        x = x + enc.embed_positions.weight[: x.shape[1]]
        x = F.dropout(x, p=enc.dropout, training=self.training)
        mask = self._attention_mask(frames, x.shape[1], x.dtype)
        for layer in enc.layers[: self.settings.vq_layer]:
            x = self._run_layer(layer, x, mask)
        return x, frames

    def _upper(self, units: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """CTC log-probs [B, T50, V] from quantized units [B, T', D] and 50 Hz lengths [B]."""
        enc = self.encoder
        batch, count, dim = units.shape
        x = self.upsample(units).reshape(batch, count * self.settings.pool, dim)
        width = int(frames.max()) if frames.numel() else 0
        x = x[:, :width] + enc.embed_positions.weight[:width]
        mask = self._attention_mask(frames, width, x.dtype)
        for layer in enc.layers[self.settings.vq_layer:]:
            x = self._run_layer(layer, x, mask)
        x = enc.layer_norm(x)
        return F.log_softmax(self.head(x).float(), dim=-1)

    def _run_layer(self, layer, x, mask):
        if self.training and self.encoder.layerdrop > 0 and \
                float(torch.rand([])) < self.encoder.layerdrop:
            return x
        out = layer(x, mask)
        return out[0] if isinstance(out, tuple) else out

    def _attention_mask(self, frames: torch.Tensor, width: int, dtype) -> torch.Tensor | None:
        """Additive [B, 1, T, T] mask: padding keys hidden (unless inputs are padded to 30 s as
        Whisper was trained) and, with attention_block, later blocks hidden."""
        from .vq import block_causal_mask

        block = self.settings.attention_block
        if block is not None:
            allowed = block_causal_mask(width, block, None if self.settings.pad_to_window
                                        else frames)
            if allowed.dim() == 2:
                allowed = allowed[None, None]
        elif self.settings.pad_to_window:
            return None
        else:
            allowed = lengths_mask(frames, width)[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=frames.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    # -- training and inference -----------------------------------------------------------

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, *,
                quantize: bool = True) -> TokenizerOutput:
        """Training / scoring pass (head ctc). quantize=False bypasses the VQ (a warm-up
        before the codebook is initialised by k-means on features worth clustering)."""
        hidden, frames = self._lower(audio, lengths)
        pooled = self.pool(hidden, frames)
        units, vq = self._quantize(pooled, quantize=quantize)
        return TokenizerOutput(self._upper(units, frames), frames, vq, pooled.lengths)

    # -- head whisper_decoder ---------------------------------------------------------------

    @property
    def window_units(self) -> int:
        """Units in one 30 s window (375 at 12.5 Hz)."""
        return int(self.encoder.config.max_source_positions) // self.settings.pool

    def decoder_states_from_lower(self, hidden: torch.Tensor, frames: torch.Tensor, *,
                                  quantize: bool = True) -> tuple[torch.Tensor, VQOutput | None]:
        """(what the decoder cross-attends to [B, 1500 or 375, D], the VQ's output) from the
        50 Hz states below the VQ [B, T, D] (`_lower`, or the encoder-output cache of those
        layers) and their valid frames [B]."""
        pooled = self.pool(hidden.to(self.vq.codebook.dtype), frames)
        units, vq = self._quantize(pooled, quantize=quantize)
        return self._decoder_states(units, pooled.lengths), vq

    def decoder_states(self, audio: torch.Tensor, lengths: torch.Tensor, *,
                       quantize: bool = True) -> tuple[torch.Tensor, VQOutput | None]:
        """`decoder_states_from_lower` from 16 kHz audio [B, T]."""
        hidden, frames = self._lower(audio, lengths)
        return self.decoder_states_from_lower(hidden, frames, quantize=quantize)

    @torch.no_grad()
    def fill_silence(self, level: float = SILENCE_MEL) -> None:
        """`silence`: the layers below the VQ on a window of constant log-mel `level`, the
        value of a 30 s window's padded tail after speech normalised as Whisper's
        features are (log-mel clamped at its maximum - 8, then (x + 4) / 4: -0.75 for a
        clip whose loudest bin is about 1.0; the embedded corpus's tails measure -0.70 to
        -0.81)."""
        enc = self.encoder
        mel = torch.full((1, enc.config.num_mel_bins, 2 * self.silence.shape[0]), level,
                         dtype=enc.conv1.weight.dtype, device=enc.conv1.weight.device)
        x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        for layer in enc.layers[: self.settings.vq_layer]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
        self.silence.copy_(x[0])

    def _decoder_states(self, units: torch.Tensor, unit_lengths: torch.Tensor) -> torch.Tensor:
        """What the decoder cross-attends to, from units [B, T', D]. repeat_units: each unit
        `pool` times at 50 Hz, `silence` after them, Whisper's 1500 frames; otherwise the
        units in the first of 375 positions, the padding vector after them, Whisper's
        position table (its first 375 rows). Then the layers above the VQ, the final norm."""
        if self.settings.repeat_units:
            return self._decoder_states_50hz(units, unit_lengths)
        from .vq import block_causal_mask

        enc = self.encoder
        width = self.window_units
        batch, count, dim = units.shape
        if count > width:
            raise SpeechLMError(f"SpeechTokenizer: {count} units in one item; the decoder "
                                f"attends to one window of {width}")
        units = F.pad(units, (0, 0, 0, width - count))
        keep = lengths_mask(unit_lengths.to(units.device), width)[..., None]
        x = torch.where(keep, units, self.pad_unit.to(units.dtype))
        x = x + enc.embed_positions.weight[:width].to(x.dtype)
        mask = None
        if self.settings.attention_block is not None:  # the same blocks, counted in units
            block = max(1, self.settings.attention_block // self.settings.pool)
            allowed = block_causal_mask(width, block, None)[None, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed.to(x.device), torch.finfo(x.dtype).min)
        for layer in enc.layers[self.settings.vq_layer:]:
            x = self._run_layer(layer, x, mask)
        return enc.layer_norm(x)

    def _decoder_states_50hz(self, units: torch.Tensor, unit_lengths: torch.Tensor
                             ) -> torch.Tensor:
        from .vq import block_causal_mask

        enc = self.encoder
        width = self.silence.shape[0]
        pool = self.settings.pool
        x = units.repeat_interleave(pool, dim=1)[:, :width]
        frames = (unit_lengths.to(units.device) * pool).clamp(max=width)
        x = F.pad(x, (0, 0, 0, width - x.shape[1]))
        keep = lengths_mask(frames, width)[..., None]
        x = torch.where(keep, x, self.silence.to(x.dtype))
        mask = None
        if self.settings.attention_block is not None:
            allowed = block_causal_mask(width, self.settings.attention_block, None)[None, None]
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed.to(x.device), torch.finfo(x.dtype).min)
        for layer in enc.layers[self.settings.vq_layer:]:
            x = self._run_layer(layer, x, mask)
        return enc.layer_norm(x)

    def _units_to_vectors(self, units: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([len(u) for u in units], dtype=torch.long)
        codes = torch.full((len(units), int(lengths.max()) if len(units) else 0), -1,
                           dtype=torch.long)
        for i, u in enumerate(units):
            codes[i, : len(u)] = torch.as_tensor(list(u), dtype=torch.long)
        device = self.vq.codebook.device
        vectors = self.vq.decode(codes.to(device))
        return vectors + self._position_offset(vectors.shape[1], vectors.dtype), lengths.to(device)

    def log_probs_from_units(self, units: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC log-probs of the characters from unit sequences alone (the units-to-text check;
        head ctc)."""
        vectors, lengths = self._units_to_vectors(units)
        frames = lengths * self.settings.pool
        return self._upper(vectors.to(self.head.weight.dtype), frames), frames

    @torch.no_grad()
    def transcribe_units(self, units: Sequence[Sequence[int]], *,
                         batch_size: int = 32, max_new_tokens: int = 200) -> list[str]:
        """Text the ASR head reads from unit sequences alone (greedy CTC, or Whisper's decoder
        greedy without timestamps): how much of the content units carry, whether they come
        from audio or from a text-to-token model. Longer than a window: its first window."""
        texts: list[str] = []
        if self.settings.head == "whisper_decoder":
            from .whisper_lora import greedy_decode

            for start in range(0, len(units), batch_size):
                chunk = [list(u)[: self.window_units] for u in units[start: start + batch_size]]
                vectors, lengths = self._units_to_vectors(chunk)
                states = self._decoder_states(vectors, lengths)
                ids = greedy_decode(self.whisper, states, self.prompt, max_new_tokens)
                texts.extend(" ".join(t.split()) for t in self.text_tokenizer.batch_decode(
                    ids, skip_special_tokens=True))
            return texts
        from ..inference.ctc import GreedyCTCDecoder

        decoder = GreedyCTCDecoder(self.vocab.tokens)
        for start in range(0, len(units), batch_size):
            chunk = [list(u) if len(u) else [0] for u in units[start: start + batch_size]]
            log_probs, frames = self.log_probs_from_units(chunk)
            texts.extend(decoder.decode(log_probs, frames))
        return texts

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Units of each item (windows of 30 s for longer audio); only the layers below the
        VQ run. The model should be in eval mode (train mode would update the codebook)."""
        if self.training:
            raise SpeechLMError("SpeechTokenizer.encode: call .eval() first; in training mode "
                                "the codebook would learn from the audio being tokenized")
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        window = self.max_samples
        pieces: list[list[list[int]]] = [[] for _ in range(audio.shape[0])]
        for start in range(0, max(int(lengths.max()), 1) if len(lengths) else 0, window):
            chunk_lengths = (lengths - start).clamp(min=0, max=window)
            rows = torch.nonzero(chunk_lengths > 0).flatten()
            if not len(rows):
                break
            chunk = audio[rows, start: start + window]
            hidden, frames = self._lower(chunk, chunk_lengths[rows].to(audio.device))
            pooled = self.pool(hidden, frames)
            offset = self._position_offset(pooled.hidden.shape[1], pooled.hidden.dtype)
            codes = self.vq.encode(pooled.hidden - offset, pooled.lengths)
            for row, item_codes, n in zip(rows.tolist(), codes.cpu(), pooled.lengths.cpu(),
                                          strict=True):
                pieces[row].append(item_codes[: int(n)].tolist())
        return [[c for piece in item for c in piece] for item in pieces]


def _causal_copy(conv: nn.Conv1d) -> CausalConv1d:
    """The same convolution, padded on the left only (GLM-4-Voice's causal encoder)."""
    causal = CausalConv1d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                          stride=conv.stride[0], dilation=conv.dilation[0])
    causal.load_state_dict(conv.state_dict())
    return causal


# -- statistics ---------------------------------------------------------------------------


def unit_statistics(units: Sequence[Sequence[int]], num_codes: int, frame_rate: float,
                    dead: int | None = None) -> dict:
    """Codebook usage of unit sequences: perplexity (exp entropy of the code histogram),
    used / unused codes, the bitrate the codes could carry (log2 K x rate) and the entropy
    rate they do carry (log2 perplexity x rate)."""
    counts = torch.zeros(num_codes)
    for seq in units:
        if len(seq):
            counts += torch.bincount(torch.as_tensor(list(seq), dtype=torch.long),
                                     minlength=num_codes).float()[:num_codes]
    total = float(counts.sum())
    if total:
        p = counts / total
        entropy = float(-(p * torch.log(p.clamp(min=1e-12))).sum())
    else:
        entropy = 0.0
    stats = {"units": int(total), "perplexity": math.exp(entropy),
             "used_codes": int((counts > 0).sum()), "unused_codes": int((counts == 0).sum()),
             "used_fraction": float((counts > 0).float().mean()),
             "bits_per_second": bits_per_second(num_codes, frame_rate),
             "entropy_bits_per_second": entropy / math.log(2) * frame_rate}
    if dead is not None:
        stats["dead_codes"] = int(dead)
    return stats


# -- saving and loading -------------------------------------------------------------------


def save_speech_tokenizer(model: SpeechTokenizer, out_dir, *,
                          metadata: dict[str, Any] | None = None) -> Path:
    """Write config.json (the Whisper encoder's), model.safetensors, vocab.json (head ctc) or
    the decoder's generation config and tokenizer files (head whisper_decoder), and
    speech_tokenizer.json to `out_dir.tmp`, then rename: `out_dir` is always complete."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.encoder.config.save_pretrained(tmp)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k != TIED_OUTPUT}  # the decoder's output layer is its token table
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if model.vocab is not None:
        model.vocab.save(tmp)
    if model.settings.head == "whisper_decoder":
        model.whisper.generation_config.save_pretrained(tmp)
        model.text_tokenizer.save_pretrained(tmp)
    info = {"kind": "speech_tokenizer", "identity": model.identity,
            "settings": dataclasses.asdict(model.settings), "frame_rate": model.frame_rate,
            "num_codes": model.settings.num_codes,
            "bits_per_second": bits_per_second(model.settings.num_codes, model.frame_rate),
            **dict(metadata or {})}
    (tmp / SETTINGS_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_tokenizer_info(model_dir) -> dict:
    """speech_tokenizer.json of a saved tokenizer, with a clear error for other directories."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir}: not a speech tokenizer directory (no {SETTINGS_FILE}); "
                          "train one with `speechlm train recipes/tiny/speech_tokenizer.yaml`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_speech_tokenizer(model_dir, *, device: str | torch.device = "cpu") -> SpeechTokenizer:
    """A saved tokenizer, in eval mode; its identity is checked against the one it was saved
    with (a changed codebook would silently make other units)."""
    from safetensors.torch import load_file
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from .encoders import quiet_transformers

    model_dir = Path(model_dir)
    info = read_tokenizer_info(model_dir)
    settings = TokenizerSettings(**info["settings"])
    config = WhisperConfig.from_pretrained(model_dir, local_files_only=True)
    if settings.head == "whisper_decoder":
        from transformers import (
            GenerationConfig,
            WhisperForConditionalGeneration,
            WhisperTokenizerFast,
        )

        with quiet_transformers():
            whisper = WhisperForConditionalGeneration(config)
            whisper.generation_config = GenerationConfig.from_pretrained(model_dir)
            text_tokenizer = WhisperTokenizerFast.from_pretrained(model_dir, local_files_only=True)
        model = SpeechTokenizer(whisper.model.encoder, None, settings, whisper=whisper,
                                text_tokenizer=text_tokenizer)
    else:
        with quiet_transformers():
            encoder = WhisperEncoder(config)
        model = SpeechTokenizer(encoder, CharVocab.load(model_dir), settings)
    state = load_file(str(model_dir / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing
               if not k.endswith("embed_positions.weight") and k != TIED_OUTPUT]
    if missing or unexpected:
        raise SpeechLMError(f"{model_dir}: weights do not fit the tokenizer (missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]})")
    if model.identity != info["identity"]:
        raise SpeechLMError(f"{model_dir}: the codebook does not match the identity saved in "
                            f"{SETTINGS_FILE} ({info['identity']}); the weights were changed "
                            "after saving; retrain or restore them")
    return model.to(device).eval()
