"""Recipe `task: wav2vec2_pretrain`: continued (or from-scratch) wav2vec 2.0 pre-training.

The Ainu paper's most effective adaptation: take a multilingual wav2vec2
(facebook/wav2vec2-large-xlsr-53) and keep pre-training it on unlabelled
audio of the target language; IndicWav2Vec's: pre-train on several
languages at once, each batch from one language drawn with
p_l ∝ (n_l/N)^alpha. The result, `output_dir/final/`, is a normal HF
directory (Wav2Vec2ForPreTraining + feature extractor) that the CTC recipe
fine-tunes (`model.init: runs/x/final`).

    task: wav2vec2_pretrain
    model:
      init: facebook/wav2vec2-large-xlsr-53   # local dir, cached hub id, or scratch
    data:
      train:
        - {manifest: data/ain_unlabelled.jsonl, lang: ain}
      eval: data/ain_dev.jsonl
    train: {max_steps: 100000, lr: 5.0e-5, ...}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


@dataclass
class ModelConfig:
    """Which model, and how its pre-training task is set up."""

    init: str                                   # local HF dir, hub id in the HF cache, "scratch"
    config: dict[str, Any] = field(default_factory=dict)  # Wav2Vec2Config fields (see below)
    mask_prob: float = 0.65                     # fraction of frames that start a masked span
    mask_length: int = 10                       # frames per span (20 ms each)
    min_masks: int = 2                          # spans per utterance at least
    num_negatives: int | None = None            # None: the model config's (100 for XLSR-53)
    diversity_weight: float | None = None       # None: the model config's (0.1)
    gumbel_start: float = 2.0                   # quantizer temperature max(start·decay^t, end)
    gumbel_end: float = 0.1
    gumbel_decay: float = 0.999995
    freeze_feature_encoder: bool = False        # keep the conv feature encoder fixed


@dataclass
class ManifestSource:
    """One unlabelled manifest (text fields are not needed) and its language."""

    manifest: str                               # JSONL path or embedded:LANG/SPLIT
    lang: str | None = None                     # None: the records' `lang` (must be one)
    weight: float = 1.0                         # multiplies its size in the language mixture


@dataclass
class DataConfig:
    train: list[ManifestSource] = field(default_factory=list)
    eval: str | None = None                     # held-out manifest for accuracy / loss
    alpha: float = 0.7                          # language sampling p_l ∝ (n_l/N)^alpha
    size_by: Literal["hours", "items"] = "hours"  # n_l: audio hours (the papers) or items
    max_batch_duration: float = 60.0            # seconds of padded audio per batch
    max_batch_size: int | None = None
    num_buckets: int = 10
    min_duration: float | None = 0.5            # shorter utterances are dropped
    max_duration: float | None = None           # longer ones are dropped (None: keep)
    max_crop_s: float | None = None             # crop longer ones at a random offset (fairseq)
    num_batches: int | None = None              # batches per epoch (None: all languages' once)
    eval_max_items: int | None = 200
    sample_rate: int = 16000
    strict: bool = False                        # raise on a bad audio file instead of skipping


@dataclass
class Config:
    task: str = "wav2vec2_pretrain"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(init="scratch"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def run(config: Config) -> dict:
    """Pre-train per `config`; saves output_dir/final/ and returns the final metrics."""
    from ..data.collate import AudioCollator
    from ..data.mixture import TemperatureMixtureSampler
    from ..data.sampler import DurationBucketSampler
    from ..training import distributed
    from ..training.objectives.wav2vec2_pretrain import save_pretraining_model
    from ..training.trainer import Trainer, seed_everything

    cfg = config
    data = cfg.data
    _check(cfg)
    dist = distributed.init_distributed(cfg.train.device)
    languages = load_languages(data, progress=cfg.train.progress and dist.is_main)
    held_out = eval_dataset(cfg, progress=cfg.train.progress and dist.is_main)

    seed_everything(cfg.train.seed)
    model, settings = build_model(cfg.model)
    objective = build_objective(cfg, model, settings, held_out)

    samplers, datasets, sizes = {}, {}, {}
    for i, (lang, group) in enumerate(languages.items()):
        durations = [float(r["duration"]) for r in group["records"]]
        if data.max_crop_s is not None:
            durations = [min(d, data.max_crop_s) for d in durations]
        samplers[lang] = DurationBucketSampler(
            durations, max_batch_duration=data.max_batch_duration,
            max_batch_size=data.max_batch_size, num_buckets=data.num_buckets,
            seed=cfg.train.seed + i, rank=dist.rank, world_size=dist.world_size)
        datasets[lang] = _dataset(group["records"], data)
        sizes[lang] = group["size"]
    mixture = TemperatureMixtureSampler(samplers, alpha=data.alpha, seed=cfg.train.seed,
                                        sizes=sizes, num_batches=data.num_batches)
    if dist.is_main:
        logger.info("languages: %s", ", ".join(
            f"{lang} ({languages[lang]['hours']:.2f} h, {len(languages[lang]['records'])} "
            f"utterances, p={p:.3f})" for lang, p in mixture.probabilities.items()))

    trainer = Trainer(cfg.train, objective, mixture.concat_datasets(datasets), mixture,
                      collate_fn=AudioCollator(), run_config=cfg)
    objective.attach(trainer)  # the Gumbel schedule follows trainer.step, also after resume
    result = trainer.fit()

    final = Path(cfg.train.output_dir) / FINAL_DIR
    if dist.is_main:
        save_pretraining_model(model, settings, final, sampling_rate=data.sample_rate,
                               metadata={"recipe": "wav2vec2_pretrain", "step": result.step,
                                         "languages": mixture.probabilities})
    distributed.barrier()
    return {"step": result.step, "final_dir": str(final), "train": result.train_metrics,
            "eval": result.eval_metrics, "languages": mixture.probabilities}


def build_objective(cfg: Config, model, settings: dict, eval_dataset=None):
    """The pre-training objective `run` trains with (also handy to score a model the same way:
    `build_objective(cfg, model, settings, eval_set).evaluate(model)`)."""
    from ..training.objectives.wav2vec2_pretrain import GumbelSchedule, Wav2Vec2PretrainObjective

    data = cfg.data
    max_crop = None if data.max_crop_s is None else int(round(data.max_crop_s * data.sample_rate))
    return Wav2Vec2PretrainObjective(
        model, mask_prob=cfg.model.mask_prob, mask_length=cfg.model.mask_length,
        min_masks=cfg.model.min_masks, num_negatives=cfg.model.num_negatives,
        diversity_weight=cfg.model.diversity_weight,
        gumbel=GumbelSchedule(cfg.model.gumbel_start, cfg.model.gumbel_end,
                              cfg.model.gumbel_decay),
        normalize_input=settings["do_normalize"],
        use_attention_mask=settings["return_attention_mask"], max_crop_samples=max_crop,
        freeze_feature_encoder=cfg.model.freeze_feature_encoder, eval_dataset=eval_dataset,
        eval_batch_duration=data.max_batch_duration, eval_max_items=data.eval_max_items,
        eval_seed=cfg.train.seed)


def eval_dataset(cfg: Config, *, progress: bool = False):
    """The held-out AudioDataset of `data.eval` (duration-filtered), or None."""
    if not cfg.data.eval:
        return None
    records = _filtered(_read(cfg.data.eval, progress), cfg.data, f"data.eval ({cfg.data.eval})")
    return _dataset(records, cfg.data)


def build_model(model_cfg: ModelConfig):
    """(Wav2Vec2ForPreTraining, input settings) per `model.init` (seed torch first)."""
    from ..training.objectives.wav2vec2_pretrain import load_pretraining_model, scratch_model

    if model_cfg.init == "scratch":
        return scratch_model(model_cfg.config)
    return load_pretraining_model(model_cfg.init, config_overrides=model_cfg.config)


def load_languages(data: DataConfig, *, progress: bool = True) -> dict[str, dict]:
    """Language -> {records, hours, size} from `data.train`, filtered by duration."""
    if not data.train:
        raise ConfigError("data.train: list at least one unlabelled manifest, e.g. "
                          "[{manifest: data/unlabelled.jsonl, lang: xx}]")
    languages: dict[str, dict] = {}
    for pos, source in enumerate(data.train):
        where = f"data.train[{pos}] ({source.manifest})"
        if not source.weight > 0:
            raise ConfigError(f"{where}: weight must be > 0, got {source.weight}")
        records = _filtered(_read(source.manifest, progress), data, where)
        lang = source.lang or _single_lang(records, where)
        hours = sum(float(r["duration"]) for r in records) / 3600
        size = (hours if data.size_by == "hours" else len(records)) * source.weight
        group = languages.setdefault(lang, {"records": [], "hours": 0.0, "size": 0.0})
        group["records"].extend(records)
        group["hours"] += hours
        group["size"] += size
    return languages


def _check(cfg: Config) -> None:
    data = cfg.data
    if data.max_batch_duration <= 0:
        raise ConfigError(f"data.max_batch_duration must be > 0, got {data.max_batch_duration}")
    if data.max_crop_s is not None:
        if data.max_crop_s <= 0:
            raise ConfigError(f"data.max_crop_s must be > 0, got {data.max_crop_s}")
        if data.max_crop_s > data.max_batch_duration:
            raise ConfigError(f"data.max_crop_s={data.max_crop_s} exceeds data."
                              f"max_batch_duration={data.max_batch_duration}: a cropped "
                              "utterance would not fit in a batch; lower max_crop_s")
    if data.alpha < 0:
        raise ConfigError(f"data.alpha must be >= 0, got {data.alpha}")
    if cfg.model.init != "scratch" and not str(cfg.model.init).strip():
        raise ConfigError("model.init: give a checkpoint directory, a cached hub id or scratch")


def _read(spec: str, progress: bool) -> list[dict]:
    from ..data.manifest import read_manifest
    from .sources import resolve_manifest

    return read_manifest(resolve_manifest(spec, progress=progress))


def _filtered(records: list[dict], data: DataConfig, where: str) -> list[dict]:
    """Records whose manifest duration is within [min_duration, max_duration]."""
    from ..data.manifest import manifest_durations

    durations = manifest_durations(records, source=where)
    low = data.min_duration if data.min_duration is not None else 0.0
    high = data.max_duration if data.max_duration is not None else float("inf")
    kept = [r for r, d in zip(records, durations, strict=True) if low <= d <= high]
    if len(kept) < len(records):
        logger.info("%s: %d of %d utterances outside [%s, %s] s dropped", where,
                    len(records) - len(kept), len(records), data.min_duration, data.max_duration)
    if not kept:
        raise ConfigError(f"{where}: no utterance left after the duration filter "
                          f"(data.min_duration={data.min_duration}, data.max_duration="
                          f"{data.max_duration}); check the manifest's durations or the limits")
    return kept


def _single_lang(records: list[dict], where: str) -> str:
    langs = sorted({str(r["lang"]) for r in records if r.get("lang")})
    if len(langs) != 1:
        found = ", ".join(langs) if langs else "none"
        raise ConfigError(f"{where}: set `lang:` for this manifest (its records' lang fields: "
                          f"{found})")
    return langs[0]


def _dataset(records: list[dict], data: DataConfig):
    from ..data.dataset import AudioDataset

    return AudioDataset(records, sample_rate=data.sample_rate, strict=data.strict)
