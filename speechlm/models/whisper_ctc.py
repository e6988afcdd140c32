"""A CTC model on a pretrained Whisper encoder: `WhisperEncoderForCTC`.

Whisper is multilingual and pretrained on 680k hours, but it has no CTC
head and transformers has no `WhisperForCTC`. This model is the Whisper
encoder (run on each clip's own length, `WhisperSpeechEncoder`), optionally
a few fresh transformer layers (`head_layers`, Whisper's own layer type),
and a linear output layer over a character vocabulary (`speechlm.models.ctc`'s
layout: blank 0, `|` the word delimiter). It speaks the wav2vec2 CTC
interface the rest of speechlm uses: `model(waveform, attention_mask).logits`
and `model._get_feat_extract_output_lengths(samples)`; the waveform is raw
16 kHz audio (not normalised: Whisper's log-mel features carry the level).

Importing this module registers the model with `AutoConfig` /
`AutoModelForCTC` (model_type "speechlm_whisper_ctc"), so a saved directory
loads with `AutoModelForCTC.from_pretrained(dir)` and `speechlm infer/eval`.

Freezing is by layer: `bottom_layer_names(model, n)` are the parameters below
the top `n` encoder layers. When they stay frozen for the whole run their
output never changes, so it can be cached on disk once
(`speechlm.pipelines.encoder_cache`, the hidden state `cache_layer`), and
training runs only the top layers and the head: `logits_from_hidden`.

`encoder_layer=k` keeps the first k encoder layers and drops the rest (cheaper;
the middle layers of a speech encoder often carry more of the sounds than its
last, which Whisper tuned for its decoder).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCTC, PreTrainedModel, WhisperConfig
from transformers.modeling_outputs import CausalLMOutput

from ..errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_TYPE = "speechlm_whisper_ctc"


class WhisperCTCConfig(WhisperConfig):
    """A WhisperConfig (the encoder fields are used) plus the CTC head's.

    vocab_size is the CTC vocabulary; source_encoder_layers the checkpoint's
    encoder depth before `encoder_layer` cut it (its last hidden state is
    layer-normed, the others are not).
    """

    model_type = MODEL_TYPE

    def __init__(self, head_layers: int = 0, ctc_dropout: float = 0.0,
                 source_encoder_layers: int | None = None, ctc_zero_infinity: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.head_layers = int(head_layers)
        self.ctc_dropout = float(ctc_dropout)
        self.source_encoder_layers = int(source_encoder_layers or self.encoder_layers)
        self.ctc_zero_infinity = bool(ctc_zero_infinity)


class WhisperEncoderForCTC(PreTrainedModel):
    """Whisper encoder + optional transformer layers + linear CTC output (see module doc)."""

    config_class = WhisperCTCConfig
    base_model_prefix = "encoder"
    main_input_name = "input_values"
    _no_split_modules = ["WhisperEncoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: WhisperCTCConfig):
        super().__init__(config)
        from transformers.models.whisper.modeling_whisper import (
            WhisperEncoder,
            WhisperEncoderLayer,
        )

        from .encoders import WhisperSpeechEncoder

        self.encoder = WhisperSpeechEncoder(WhisperEncoder(config), frozen=False)
        self.head = nn.ModuleList(WhisperEncoderLayer(config) for _ in range(config.head_layers))
        self.head_norm = nn.LayerNorm(config.d_model) if config.head_layers else None
        self.dropout = nn.Dropout(config.ctc_dropout)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

        if isinstance(module, WhisperEncoder):
            with torch.no_grad():
                module.embed_positions.weight.copy_(sinusoids(*module.embed_positions.weight.shape))
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- the wav2vec2 CTC interface ------------------------------------------------------

    def _get_feat_extract_output_lengths(self, input_lengths) -> torch.Tensor:
        """Output frames for input lengths in samples (50 per second)."""
        return self.encoder.output_lengths(torch.as_tensor(input_lengths).cpu()).to(
            torch.as_tensor(input_lengths).device)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_) -> CausalLMOutput:
        """logits [B, frames, vocab] of raw 16 kHz waveforms [B, T] (mask: valid samples)."""
        if attention_mask is None:
            lengths = torch.full((input_values.shape[0],), input_values.shape[1],
                                 dtype=torch.long, device=input_values.device)
        else:
            lengths = attention_mask.sum(-1).long()
        hidden, frames = self.encoder(input_values, lengths)
        logits = self._head(hidden, frames)
        loss = None
        if labels is not None:
            loss = self._ctc_loss(logits, frames, labels)
        return CausalLMOutput(loss=loss, logits=logits)

    # -- training on cached encoder frames -------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.encoder.backbone.layers)

    def cache_layer(self, trainable_top: int) -> int:
        """The checkpoint's hidden-state index below the top `trainable_top` layers: the one
        to cache (index 0 = the embeddings, i = layer i's output)."""
        if not 0 <= trainable_top <= self.num_layers:
            raise ConfigError(f"model.unfreeze_top_layers={trainable_top}: this encoder has "
                              f"{self.num_layers} layers")
        return self.num_layers - trainable_top

    def logits_from_hidden(self, hidden: torch.Tensor, frames: torch.Tensor,
                           start_layer: int) -> torch.Tensor:
        """logits from the checkpoint's hidden state `start_layer` (cached frames [B, F, D],
        valid `frames` [B]): the encoder layers from there up, its final norm, the head."""
        backbone = self.encoder.backbone
        x = hidden.to(self.lm_head.weight.dtype)
        mask = _padding_mask(frames, x.shape[1], x.dtype)
        # Frozen layers build no graph by themselves: no input or weight needs a gradient.
        for layer in backbone.layers[start_layer:]:
            x = layer(x, mask)
        if start_layer < self.config.source_encoder_layers:  # the checkpoint's last is normed
            x = backbone.layer_norm(x)
        keep = torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None].to(x.device)
        return self._head(x * keep[..., None].to(x.dtype), frames)

    # -- internals -------------------------------------------------------------------------

    def _head(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = hidden
        if len(self.head):
            mask = _padding_mask(frames, x.shape[1], x.dtype)
            for layer in self.head:
                x = layer(x, mask)
            x = self.head_norm(x)
        return self.lm_head(self.dropout(x))

    def _ctc_loss(self, logits, frames, labels):
        log_probs = nn.functional.log_softmax(logits.float(), dim=-1).transpose(0, 1)
        lengths = (labels >= 0).sum(-1)
        return nn.functional.ctc_loss(log_probs, labels[labels >= 0], frames, lengths,
                                      blank=self.config.pad_token_id, reduction="mean",
                                      zero_infinity=self.config.ctc_zero_infinity)


def _padding_mask(frames: torch.Tensor, width: int, dtype) -> torch.Tensor | None:
    """Additive attention mask [B, 1, 1, F] that hides frames at or after `frames`."""
    if bool((frames >= width).all()):
        return None
    keep = torch.arange(width, device=frames.device)[None, :] < frames[:, None]
    mask = torch.zeros(keep.shape, dtype=dtype, device=frames.device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :]


AutoConfig.register(MODEL_TYPE, WhisperCTCConfig, exist_ok=True)
AutoModelForCTC.register(WhisperCTCConfig, WhisperEncoderForCTC, exist_ok=True)


# -- building one from a Whisper checkpoint ------------------------------------------------


def _model_type(directory) -> str | None:
    import json

    config = Path(directory) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None


def is_whisper_checkpoint(directory) -> bool:
    """True for a Whisper checkpoint directory (model_type whisper) or a saved
    WhisperEncoderForCTC."""
    return _model_type(directory) in ("whisper", MODEL_TYPE)


def load_whisper_ctc(directory, vocab, *, encoder_layer: int | None = None, head_layers: int = 0,
                     dropout: float = 0.0) -> WhisperEncoderForCTC:
    """A WhisperEncoderForCTC for `vocab` from a Whisper checkpoint (encoder weights read,
    decoder never loaded) or from a saved WhisperEncoderForCTC (its encoder and, when the
    vocabulary is the same, its head; a new output layer otherwise). Seed torch first: the
    new head comes from its RNG."""
    from .ctc import _ctc_config_fields
    from .encoders import _load_whisper_encoder, quiet_transformers

    directory = Path(directory)
    saved_ctc = _model_type(directory) == MODEL_TYPE
    base = (WhisperCTCConfig if saved_ctc else WhisperConfig).from_pretrained(
        directory, local_files_only=True).to_dict()
    depth = int(base["encoder_layers"])
    if encoder_layer is not None and not 1 <= encoder_layer <= depth:
        raise ConfigError(f"model.encoder_layer={encoder_layer}: {directory} has {depth} encoder "
                          f"layers; give 1..{depth} (or null for all)")
    for key in ("model_type", "architectures", "transformers_version", "head_layers",
                "ctc_dropout", "source_encoder_layers", "vocab_size"):
        base.pop(key, None)
    fields = {**base, **_ctc_config_fields(vocab, {}), "head_layers": head_layers,
              "decoder_start_token_id": 1,  # no decoder; keep the id inside the vocabulary
              "ctc_dropout": dropout,
              # the hidden states a cache filled from `directory` holds: its last is normed
              "source_encoder_layers": depth,
              "encoder_layers": encoder_layer or depth}
    config = WhisperCTCConfig(**fields)
    config.architectures = ["WhisperEncoderForCTC"]
    with quiet_transformers():
        model = WhisperEncoderForCTC(config)
    if saved_ctc:
        _copy_saved_ctc(model, directory, vocab)
    else:
        encoder = _load_whisper_encoder(directory, None)
        state = {k: v for k, v in encoder.state_dict().items()
                 if not k.startswith("layers.") or int(k.split(".")[1]) < config.encoder_layers}
        model.encoder.backbone.load_state_dict(state)
    return model


def _copy_saved_ctc(model: WhisperEncoderForCTC, directory: Path, vocab) -> None:
    from .ctc import _checkpoint_vocab

    saved = WhisperEncoderForCTC.from_pretrained(directory, local_files_only=True)
    state = {k: v for k, v in saved.state_dict().items()
             if k.startswith("encoder.") and (not k.startswith("encoder.backbone.layers.")
                                               or int(k.split(".")[3]) < model.num_layers)}
    model.load_state_dict(state, strict=False)
    if _checkpoint_vocab(directory) == vocab.tokens and len(saved.head) == len(model.head):
        model.lm_head.load_state_dict(saved.lm_head.state_dict())
        model.head.load_state_dict(saved.head.state_dict())
        if model.head_norm is not None:
            model.head_norm.load_state_dict(saved.head_norm.state_dict())
    else:
        logger.info("%s: new CTC output layer for %d tokens", directory, len(vocab))


def bottom_parameter_prefixes(model: WhisperEncoderForCTC, trainable_top: int) -> list[str]:
    """Parameter-name prefixes of everything below the top `trainable_top` encoder layers
    (the convolutions, the layers underneath, and the final norm when no layer trains)."""
    prefix = "encoder.backbone"
    names = [f"{prefix}.conv1", f"{prefix}.conv2"]
    names += [f"{prefix}.layers.{i}" for i in range(model.num_layers - trainable_top)]
    if trainable_top == 0:
        names.append(f"{prefix}.layer_norm")
    return names
