"""The Whisper-encoder branch of `task: ctc`: model, freezing plan and encoder-output cache.

When `model.init` names a Whisper checkpoint (`models:whisper-base`,
openai/whisper-small in the HF cache, a local directory) the CTC recipe
trains a `WhisperEncoderForCTC` (speechlm.models.whisper_ctc) instead of a
wav2vec2-family `*ForCTC`:

    model:
      init: models:whisper-base
      encoder_layer: null          # keep the first N encoder layers (null: all)
      head_layers: 1               # fresh transformer layers before the output layer
      freeze_encoder_steps: 500    # the whole encoder frozen for the first updates ...
      unfreeze_top_layers: 2       # ... then its top 2 layers train (0: never; null: all)
    data:
      encoder_cache: auto          # cache what the never-trained bottom layers output

The layers below the top `unfreeze_top_layers` never train, so with
`data.encoder_cache` their output is computed once per utterance and stored
on disk; every update then runs only the top layers and the head (that is
what makes CPU training fast). With `unfreeze_top_layers: null` the whole
encoder trains after the frozen phase and nothing can be cached. The final
dev/test scores are computed on the audio, through the whole saved model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

# ModelConfig fields only a wav2vec2-family model uses, with their defaults.
# (SpecAugment's mask_time_prob is left at its default: the Whisper model does not mask.)
WAV2VEC2_ONLY = {"scratch": {}, "config": {}, "mask_feature_prob": 0.0, "layerdrop": 0.0,
                 "dropout": None}
WHISPER_ONLY = {"encoder_layer": None, "unfreeze_top_layers": None, "head_layers": 0}


def init_dir(init: str) -> Path | None:
    """The resolved directory of `model.init` when it is a Whisper checkpoint, else None."""
    from ..models.whisper_ctc import is_whisper_checkpoint

    if str(init) == "scratch":
        return None
    from ..pretrained.resolve import resolve_model_dir

    directory = resolve_model_dir(init, what=f"model.init={init}",
                                  hint="or model.init: scratch to train from scratch")
    return directory if is_whisper_checkpoint(directory) else None


def check_options(model_cfg, whisper: bool) -> None:
    """Options of the other model family are errors that say which family takes them."""
    if whisper:
        wrong = [k for k, default in WAV2VEC2_ONLY.items() if getattr(model_cfg, k) != default]
        if wrong:
            raise ConfigError(f"model.{wrong[0]} is for wav2vec2-family models; model.init="
                              f"{model_cfg.init} is a Whisper checkpoint: remove it")
        if model_cfg.unfreeze_top_layers == 0 and model_cfg.freeze_encoder_steps:
            raise ConfigError("model.unfreeze_top_layers=0 keeps the encoder frozen for the "
                              "whole run, so model.freeze_encoder_steps="
                              f"{model_cfg.freeze_encoder_steps} does nothing; set it to 0, or "
                              "unfreeze_top_layers to the number of top layers to train")
        return
    wrong = [k for k, default in WHISPER_ONLY.items() if getattr(model_cfg, k) != default]
    if wrong:
        raise ConfigError(f"model.{wrong[0]} is for a Whisper encoder (model.init a Whisper "
                          f"checkpoint such as models:whisper-base); model.init="
                          f"{model_cfg.init} is not one: remove it")


def build_model(model_cfg, directory: Path, vocab):
    """The WhisperEncoderForCTC of `model_cfg` (seed torch first: the head is new)."""
    from ..models.whisper_ctc import load_whisper_ctc

    model = load_whisper_ctc(directory, vocab, encoder_layer=model_cfg.encoder_layer,
                             head_layers=model_cfg.head_layers,
                             dropout=model_cfg.final_dropout or 0.0)
    top = model_cfg.unfreeze_top_layers
    if top is not None and not 0 <= top <= model.num_layers:
        raise ConfigError(f"model.unfreeze_top_layers={top}: the encoder has {model.num_layers} "
                          f"layers; give 0..{model.num_layers} (or null for all of them)")
    return model


def train_config(cfg, model):
    """cfg.train plus the freezing plan: the bottom below the top `unfreeze_top_layers` frozen
    for the whole run, the rest of the encoder for the first `freeze_encoder_steps`."""
    from ..models.whisper_ctc import bottom_parameter_prefixes

    train, top = cfg.train, cfg.model.unfreeze_top_layers
    steps = cfg.model.freeze_encoder_steps
    if (train.freeze_initially or train.freeze_for_steps) and steps:
        raise ConfigError("model.freeze_encoder_steps and train.freeze_initially / "
                          "freeze_for_steps both freeze the encoder; set only the model ones")
    freeze = list(train.freeze)
    if top is not None:
        freeze += bottom_parameter_prefixes(model, top)
    if steps >= train.max_steps:
        raise ConfigError(f"model.freeze_encoder_steps={steps} >= train.max_steps="
                          f"{train.max_steps}: the encoder would never unfreeze; for a frozen "
                          "encoder set unfreeze_top_layers: 0 and freeze_encoder_steps: 0")
    if not steps:
        return dataclasses.replace(train, freeze=freeze)
    return dataclasses.replace(train, freeze=freeze, freeze_initially=["encoder"],
                               freeze_for_steps=steps)


def open_cache(cfg, model, directory: Path, say):
    """(encoder-output cache, the hidden-state index it holds), or (None, None) when
    data.encoder_cache is off or the whole encoder trains at some point."""
    from ..models.encoders import load_encoder
    from ..paths import cache_dir
    from ..pipelines.encoder_cache import EncoderCache

    if cfg.data.encoder_cache is None:
        return None, None
    top = cfg.model.unfreeze_top_layers
    if top is None:
        say("data.encoder_cache is not used: with model.unfreeze_top_layers: null the whole "
            "encoder trains after the frozen phase, so its outputs change (set "
            "unfreeze_top_layers to the number of top layers to train to cache the rest)")
        return None, None
    layer = model.cache_layer(top)
    encoder = load_encoder("whisper", directory, layer=layer)
    encoder.source_path = str(directory)
    root = cache_dir() / "encoder_outputs" if cfg.data.encoder_cache == "auto" \
        else Path(cfg.data.encoder_cache).expanduser()
    cache = EncoderCache.for_encoder(root, encoder, directory)
    return _CacheFiller(cache, encoder, cfg.train.progress, say), layer


class _CacheFiller:
    """Fills the cache for a list of records on first use and wraps them as a dataset."""

    def __init__(self, cache, encoder, progress: bool, say):
        self.cache, self.encoder, self.progress, self.say = cache, encoder, progress, say

    def dataset(self, records: list[dict], name: str, *, silence_dbfs: float | None = -60.0):
        """The records with their cached frames (silence_dbfs: as the AudioDataset it
        replaces; quieter audio is skipped and counted)."""
        from ..pipelines.encoder_cache import CachedEncoderDataset

        summary = self.cache.fill(self.encoder, records, progress=self.progress,
                                  silence_dbfs=silence_dbfs)
        self.say(f"{name}: {summary.summary()} ({self.cache.directory})")
        return CachedEncoderDataset(records, self.cache)

    def release(self) -> None:
        """Drop the fill encoder (a second copy of the encoder's weights)."""
        self.encoder = None
