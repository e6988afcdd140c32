"""wav2vec 2.0 self-supervised (continued) pre-training with transformers' Wav2Vec2ForPreTraining.

The objective of wav2vec 2.0 (Baevski et al. 2020) as fairseq trains it:
spans of the feature-encoder frames are masked (`mask_prob` 0.65 of the
frames start a span of `mask_length` 10), the transformer must pick the
quantized target of each masked frame among `num_negatives` distractors
drawn from other masked frames of the same utterance (contrastive loss),
and a diversity loss (weight 0.1) keeps the codebooks in use. The Gumbel
softmax temperature of the quantizer decays as max(2 · 0.999995^step, 0.1).

The model computes the losses itself (`Wav2Vec2ForPreTraining.forward` with
`mask_time_indices` and `sampled_negative_indices`); this objective draws
the masks and negatives, keeps them off padding, and normalises the loss
per masked frame (transformers returns sums over the masked frames, so the
raw loss would scale with the batch and the learning rate with it).

Masks and negatives come from numpy's global RNG (transformers' helpers use
it); the trainer saves and restores that RNG, so a resumed run draws the same
masks. The Gumbel temperature is a function of the update count, which the
objective reads from the trainer (`attach(trainer)`), so it is exact after a
resume too. `evaluate` draws its masks from a fixed seed and puts the global
RNG back, so evaluation neither changes training nor varies between calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...audio.features import normalize_waveform
from ...errors import ConfigError

logger = logging.getLogger(__name__)

# The pre-training heads a Wav2Vec2ForPreTraining adds to the encoder.
PRETRAINING_HEADS = ("quantizer", "project_hid", "project_q")


@dataclass(frozen=True)
class GumbelSchedule:
    """Quantizer temperature per update: max(start · decay^step, end) (fairseq's latent_temp)."""

    start: float = 2.0
    end: float = 0.1
    decay: float = 0.999995

    def __post_init__(self):
        if not (self.start > 0 and self.end > 0 and 0 < self.decay <= 1):
            raise ConfigError(f"gumbel schedule needs start > 0, end > 0 and 0 < decay <= 1, got "
                              f"start={self.start}, end={self.end}, decay={self.decay}")

    def temperature(self, step: int) -> float:
        return max(self.start * self.decay ** int(step), self.end)


def load_pretraining_model(init, *, config_overrides: dict | None = None):
    """Wav2Vec2ForPreTraining and its input settings from a local HF directory or a hub id
    already in the local HF cache (nothing is downloaded).

    Returns (model, settings) where settings has `do_normalize` and
    `return_attention_mask` from the directory's feature extractor (defaults
    when it has none: normalise; attention mask only for layer-norm conv
    stacks, as the released checkpoints do). `config_overrides` are config
    fields set on top of the checkpoint's (dropouts, layerdrop, ...). A
    checkpoint without the pre-training heads (e.g. a CTC model) gets freshly
    initialised heads, with a warning.
    """
    from transformers import AutoConfig, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining
    from transformers.utils import logging as hf_logging

    from ...pretrained.resolve import resolve_model_dir

    path = resolve_model_dir(init, what=f"model.init={init}")
    overrides = dict(config_overrides or {})
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the model config: {e}") from None
    if config.model_type != "wav2vec2":
        raise ConfigError(f"model.init={init}: model_type '{config.model_type}' is not "
                          "wav2vec2; continued pre-training needs a wav2vec2 checkpoint (with "
                          "its quantizer, e.g. facebook/wav2vec2-large-xlsr-53)")
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        raise ConfigError(f"model.config: Wav2Vec2Config has no field(s) {', '.join(unknown)}")
    for key, value in overrides.items():
        setattr(config, key, value)
    _check_maskable(config, f"model.init={init}")
    config.architectures = ["Wav2Vec2ForPreTraining"]
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own warning says which heads are new
    try:
        model, info = Wav2Vec2ForPreTraining.from_pretrained(
            path, config=config, local_files_only=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    fresh = sorted({key.split(".")[0] for key in info.get("missing_keys", [])}
                   & set(PRETRAINING_HEADS))
    if fresh:
        logger.warning("%s has no %s weights (saved without its pre-training heads?): they "
                       "start from random values", path, ", ".join(fresh))
    if (path / "preprocessor_config.json").is_file():
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True)
        settings = {"do_normalize": bool(extractor.do_normalize),
                    "return_attention_mask": bool(extractor.return_attention_mask)}
    else:
        settings = default_input_settings(config)
    return model, settings


# Quantizer and masking defaults of a scratch model, on top of the CTC zoo's architecture.
SCRATCH_PRETRAIN_DEFAULTS = dict(
    num_codevector_groups=2, num_codevectors_per_group=64, codevector_dim=64,
    proj_codevector_dim=64, num_negatives=50, diversity_loss_weight=0.1, mask_time_prob=0.05,
)


def scratch_model(config: dict | None = None):
    """A randomly initialised Wav2Vec2ForPreTraining: the small architecture of the embedded
    zoo (`speechlm.models.ctc.SCRATCH_DEFAULTS`) with a quantizer, updated with `config`
    (Wav2Vec2Config fields). Seed torch first. Returns (model, input settings)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    from ...models.ctc import SCRATCH_DEFAULTS

    config = dict(config or {})
    unknown = [key for key in config if not hasattr(Wav2Vec2Config(), key)]
    if unknown:
        raise ConfigError(f"model.config: Wav2Vec2Config has no field(s) {', '.join(unknown)}")
    try:
        cfg = Wav2Vec2Config(**{**SCRATCH_DEFAULTS, **SCRATCH_PRETRAIN_DEFAULTS, **config})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config: invalid wav2vec2 config ({e})") from None
    _check_maskable(cfg, "model.config")
    cfg.architectures = ["Wav2Vec2ForPreTraining"]
    return Wav2Vec2ForPreTraining(cfg), default_input_settings(cfg)


def save_pretraining_model(model, settings: dict, out_dir, *, sampling_rate: int = 16000,
                           metadata: dict | None = None) -> Path:
    """Save a Wav2Vec2ForPreTraining as a normal HF directory (config, safetensors weights
    with the quantizer, feature extractor) that `Wav2Vec2ForPreTraining` / `Wav2Vec2ForCTC`
    load with from_pretrained. Written to `out_dir.tmp` and renamed, so `out_dir` is always
    complete."""
    from transformers import Wav2Vec2FeatureExtractor

    from ...models.ctc import write_model_dir

    def extractor(tmp: Path) -> None:
        Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=sampling_rate, padding_value=0.0,
            do_normalize=bool(settings["do_normalize"]),
            return_attention_mask=bool(settings["return_attention_mask"])).save_pretrained(tmp)

    return write_model_dir(out_dir, model, {"kind": "wav2vec2_pretrain", **dict(metadata or {})},
                           extractor)


def default_input_settings(config) -> dict:
    """Feature-extractor settings of the released checkpoints for this kind of conv stack."""
    return {"do_normalize": True, "return_attention_mask": config.feat_extract_norm == "layer"}


def _check_maskable(config, where: str) -> None:
    # Wav2Vec2Model only creates the mask embedding when some SpecAugment probability is > 0.
    if not (config.mask_time_prob > 0 or config.mask_feature_prob > 0):
        raise ConfigError(f"{where}: mask_time_prob is 0, so the model has no mask embedding to "
                          "pre-train with; set mask_time_prob (e.g. 0.05) in the model config")


class Wav2Vec2PretrainObjective:
    """Contrastive + diversity loss of wav2vec 2.0 for the Trainer.

    model: a Wav2Vec2ForPreTraining.
    mask_prob / mask_length / min_masks: span masking of the feature frames
        (fairseq: 0.65 / 10 / 2), drawn within each utterance's real frames.
    num_negatives / diversity_weight: default to the model config's
        (num_negatives, diversity_loss_weight); set them to override it.
    gumbel: quantizer temperature schedule, set before every update.
    normalize_input / use_attention_mask: from the checkpoint's feature
        extractor (`load_pretraining_model` settings): wav2vec2 input
        normalisation, and an attention mask only for layer-norm models
        (group-norm models are trained on zero-padded input without one).
    max_crop_samples: utterances longer than this are cropped at a random
        offset during training (fairseq's max_sample_size); None keeps them.
        Evaluation scores whole utterances.
    eval_dataset: held-out AudioDataset for `evaluate` (None: no evaluation),
        batched under `eval_batch_duration` seconds of padded audio, at most
        `eval_max_items` utterances, masks from `eval_seed`.
    """

    def __init__(self, model, *, mask_prob: float = 0.65, mask_length: int = 10,
                 min_masks: int = 2, num_negatives: int | None = None,
                 diversity_weight: float | None = None, gumbel: GumbelSchedule | None = None,
                 normalize_input: bool = True, use_attention_mask: bool = True,
                 max_crop_samples: int | None = None, freeze_feature_encoder: bool = False,
                 eval_dataset=None, eval_batch_duration: float = 60.0,
                 eval_max_items: int | None = 200, eval_seed: int = 1234):
        if not 0 < mask_prob <= 1:
            raise ConfigError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if mask_length < 1 or min_masks < 0:
            raise ConfigError(f"mask_length must be >= 1 and min_masks >= 0, got {mask_length}, "
                              f"{min_masks}")
        if max_crop_samples is not None and max_crop_samples < 400:
            raise ConfigError(f"max_crop_samples={max_crop_samples} is too short for wav2vec2 "
                              "(under 25 ms); use seconds of audio, e.g. max_crop_s: 15")
        _check_maskable(model.config, "model")
        self.model = model
        config = model.config
        # The model must apply the masks it is given (some fine-tuned configs turn SpecAugment off).
        config.apply_spec_augment = True
        if num_negatives is not None:
            if num_negatives < 1:
                raise ConfigError(f"num_negatives must be >= 1, got {num_negatives}")
            config.num_negatives = int(num_negatives)
        if diversity_weight is not None:
            if diversity_weight < 0:
                raise ConfigError(f"diversity_weight must be >= 0, got {diversity_weight}")
            config.diversity_loss_weight = float(diversity_weight)
        self.mask_prob = float(mask_prob)
        self.mask_length = int(mask_length)
        self.min_masks = int(min_masks)
        self.gumbel = gumbel or GumbelSchedule()
        self.normalize_input = normalize_input
        self.use_attention_mask = use_attention_mask
        self.max_crop_samples = max_crop_samples
        if freeze_feature_encoder:
            model.freeze_feature_encoder()
        self.eval_dataset = eval_dataset
        self.eval_batch_duration = float(eval_batch_duration)
        self.eval_max_items = eval_max_items
        self.eval_seed = int(eval_seed)
        self._step_fn: Callable[[], int] | None = None
        self._calls = 0

    # -- the update count ---------------------------------------------------------

    def attach(self, trainer) -> None:
        """Read the update count from `trainer.step` (restored on resume) for the schedule."""
        self._step_fn = lambda: trainer.step

    @property
    def step(self) -> int:
        """Updates done so far: the trainer's step when attached, else loss() calls made."""
        return int(self._step_fn()) if self._step_fn is not None else self._calls

    # -- training -----------------------------------------------------------------

    def loss(self, batch: dict):
        """Pre-training loss per masked frame and metrics; None when nothing can be masked."""
        model = self.model
        temperature = self.gumbel.temperature(self.step)
        model.set_gumbel_temperature(temperature)
        self._calls += 1
        inputs = self.model_inputs(batch, model, crop="random" if model.training else "start")
        if inputs is None:
            return None
        num_frames = inputs.pop("num_frames")
        out = model(**inputs)
        num_masked = inputs["mask_time_indices"].sum()
        loss = out.loss / num_masked
        correct, total = _positive_is_best(out, inputs["sampled_negative_indices"],
                                           inputs["mask_time_indices"])
        metrics = {
            "contrastive_loss": out.contrastive_loss.detach() / num_masked,
            "diversity_loss": out.diversity_loss.detach() / num_masked,
            "codevector_perplexity": out.codevector_perplexity.detach(),
            "accuracy": correct / max(total, 1),
            "gumbel_temperature": temperature,
            "masked_fraction": float(num_masked) / max(num_frames, 1),
            "skipped_items": len(batch.get("skipped") or ()),
        }
        return loss, metrics

    def model_inputs(self, batch: dict, model=None, *, crop: str = "random") -> dict | None:
        """Keyword arguments of the model for a collated batch (`audio`, `audio_lengths`):
        input_values (cropped per `crop`: "random" offset, "start" or "none"; normalised if
        the checkpoint's feature extractor does), attention_mask (layer-norm models only),
        mask_time_indices and sampled_negative_indices, plus `num_frames` (real feature
        frames; pop it before calling the model). None when no frame can be masked."""
        from transformers.models.wav2vec2.modeling_wav2vec2 import (
            _compute_mask_indices,
            _sample_negative_indices,
        )

        model = model if model is not None else self.model
        audio, lengths = batch["audio"], batch["audio_lengths"]
        if audio.shape[0] == 0:
            return None
        device = audio.device
        if crop != "none":
            audio, lengths = crop_batch(audio, lengths.to(device), self.max_crop_samples,
                                        mode=crop)
        if self.normalize_input:
            audio = normalize_waveform(audio, lengths)
        frames = model._get_feat_extract_output_lengths(lengths, add_adapter=False).cpu().long()
        frames = frames.clamp_min(0)
        width = int(model._get_feat_extract_output_lengths(audio.shape[1], add_adapter=False))
        if width < self.mask_length or int(frames.max()) < self.mask_length:
            return None  # every utterance is shorter than one mask span
        real = torch.arange(width)[None, :] < frames[:, None]
        mask = _compute_mask_indices((audio.shape[0], width), self.mask_prob, self.mask_length,
                                     attention_mask=real.long(), min_masks=self.min_masks)
        # transformers pads rows that got fewer spans with a dummy index, which is the last
        # (padding) frame when a row got none: masks must stay on real frames.
        mask &= real.numpy()
        # A negative comes from another masked frame of the same row: needs >= 2 of them.
        mask[mask.sum(axis=1) < 2] = False
        if not mask.any():
            return None
        negatives = _sample_negative_indices((audio.shape[0], width),
                                             model.config.num_negatives, mask_time_indices=mask)
        inputs = {
            "input_values": audio,
            "mask_time_indices": torch.from_numpy(mask).to(device),
            "sampled_negative_indices": torch.from_numpy(negatives).long().to(device),
            "num_frames": int(frames.sum()),
        }
        if self.use_attention_mask:
            inputs["attention_mask"] = (torch.arange(audio.shape[1], device=device)[None, :]
                                        < lengths[:, None]).long()
        return inputs

    # -- evaluation ---------------------------------------------------------------

    @property
    def evaluate(self):
        """`evaluate(model) -> metrics` on the held-out set; absent (AttributeError, so the
        Trainer does not evaluate) when the objective has no eval_dataset."""
        if self.eval_dataset is None:
            raise AttributeError("evaluate: this objective has no eval_dataset")
        return self._evaluate

    def _evaluate(self, model=None) -> dict[str, float]:
        """On the held-out set: loss, contrastive/diversity loss per masked frame, codevector
        perplexity and `accuracy`, how often the positive scores above every negative (rises
        as the model learns). Masks and negatives come from `eval_seed`: every call scores the
        same task; the global numpy RNG is left as it was."""
        model = model if model is not None else self.model
        modes = {module: module.training for module in model.modules()}
        model.eval()
        rng_state = np.random.get_state()
        np.random.seed(self.eval_seed)
        sums = {"contrastive": 0.0, "diversity": 0.0, "perplexity": 0.0, "correct": 0,
                "total": 0, "masked": 0}
        try:
            with torch.no_grad():
                for batch in self._eval_batches(model):
                    inputs = self.model_inputs(batch, model, crop="none")
                    if inputs is None:
                        continue
                    inputs.pop("num_frames")
                    out = model(**inputs)
                    masked = int(inputs["mask_time_indices"].sum())
                    correct, total = _positive_is_best(out, inputs["sampled_negative_indices"],
                                                       inputs["mask_time_indices"])
                    sums["contrastive"] += float(out.contrastive_loss)
                    sums["diversity"] += float(out.diversity_loss)
                    sums["perplexity"] += float(out.codevector_perplexity) * masked
                    sums["correct"] += correct
                    sums["total"] += total
                    sums["masked"] += masked
        finally:
            np.random.set_state(rng_state)
            for module, training in modes.items():
                module.training = training
        n = sums["masked"]
        if n == 0:
            return {"loss": math.nan, "contrastive_loss": math.nan, "diversity_loss": math.nan,
                    "codevector_perplexity": math.nan, "accuracy": math.nan, "masked_frames": 0}
        weight = model.config.diversity_loss_weight
        return {
            "loss": (sums["contrastive"] + weight * sums["diversity"]) / n,
            "contrastive_loss": sums["contrastive"] / n,
            "diversity_loss": sums["diversity"] / n,
            "codevector_perplexity": sums["perplexity"] / n,
            "accuracy": sums["correct"] / max(sums["total"], 1),
            "masked_frames": float(n),
        }

    def _eval_batches(self, model):
        from ...data.collate import AudioCollator
        from ...data.sampler import DurationBucketSampler

        dataset = self.eval_dataset
        durations = np.asarray(dataset.durations, dtype=np.float64)
        sampler = DurationBucketSampler(durations, max_batch_duration=max(
            self.eval_batch_duration, float(durations.max(initial=0.0))),
            num_buckets=1, shuffle=False)
        collate = AudioCollator()
        device = next(model.parameters()).device
        budget = self.eval_max_items
        for indices in sampler:
            if budget is not None:
                indices = indices[:budget]
                budget -= len(indices)
            if not indices:
                break
            batch = collate([dataset[i] for i in indices])
            yield {"audio": batch["audio"].to(device),
                   "audio_lengths": batch["audio_lengths"].to(device)}


def crop_batch(audio: torch.Tensor, lengths: torch.Tensor, max_samples: int | None, *,
               mode: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """Crop rows longer than `max_samples` (random offset from numpy's global RNG, or from the
    start) and re-pad to the longest remaining row."""
    if max_samples is None or audio.shape[1] <= max_samples:
        return audio, lengths
    new_lengths = lengths.clamp(max=max_samples)
    out = audio.new_zeros(audio.shape[0], int(new_lengths.max()))
    for row, length in enumerate(lengths.tolist()):
        start = 0
        if length > max_samples and mode == "random":
            start = int(np.random.randint(0, length - max_samples + 1))
        keep = min(length, max_samples)
        out[row, :keep] = audio[row, start:start + keep]
    return out, new_lengths


def _positive_is_best(out, negative_indices: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(masked frames whose positive scores above every negative, masked frames scored), from
    the cosine logits transformers builds. Negatives equal to the positive are left out, as in
    the loss; a frame whose negatives all equal it (a collapsed codebook) is not scored: it
    poses no choice, and counting it as a win would reward the collapse."""
    with torch.no_grad():
        predicted = out.projected_states.float()
        targets = out.projected_quantized_states.float()
        batch, frames, dim = targets.shape
        negatives = targets.reshape(-1, dim)[negative_indices.reshape(-1)]
        negatives = negatives.reshape(batch, frames, -1, dim)
        positive = torch.cosine_similarity(predicted, targets, dim=-1)  # [B, T]
        others = torch.cosine_similarity(predicted[:, :, None], negatives, dim=-1)  # [B, T, K]
        same = (targets[:, :, None] == negatives).all(-1)
        others = others.masked_fill(same, float("-inf"))
        scored = mask.bool() & ~same.all(-1)
        wins = (positive > others.max(-1).values) & scored
        return int(wins.sum()), int(scored.sum())


def feature_frames(model, lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Feature-encoder frames for input lengths in samples (50 per second for wav2vec2)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    return model._get_feat_extract_output_lengths(lengths, add_adapter=False).long()
