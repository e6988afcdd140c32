"""Recipe `task: ctc`: character CTC fine-tuning (or training from scratch) of wav2vec2-style models.

The Ainu / IndicWav2Vec fine-tuning step: a pretrained encoder
(facebook/wav2vec2-large-xlsr-53, or the output of `task: wav2vec2_pretrain`)
gets a character CTC head and is trained on labelled audio with SpecAugment
style masking, layer-drop, the feature encoder frozen for the whole run and
the whole encoder for the first updates, under a tri-stage schedule. Several
training manifests of different languages share one vocabulary and are mixed
with temperature sampling (each batch from one language, p_l ∝ (n_l/N)^alpha),
or by Skill-It's online mixture, updated every round from per-language
validation losses (`data.mixture`, see `speechlm.recipes.ctc_skill_it`).

    task: ctc
    model:
      init: facebook/wav2vec2-large-xlsr-53   # local dir, cached hub id, or scratch
      freeze_encoder_steps: 1000
    data:
      train:
        - {manifest: data/ain/train.jsonl, lang: ain}
      dev: data/ain/dev.jsonl
      test: data/ain/test.jsonl
    train: {max_steps: 20000, lr: 1.0e-4, schedule: tri_stage, ...}

`model.init` may also name a Whisper checkpoint (models:whisper-base,
openai/whisper-small): its encoder then gets the CTC head, frozen for the
first updates and partly unfrozen after (`model.unfreeze_top_layers`), with
the outputs of its never-trained layers cached on disk (`data.encoder_cache`);
see `speechlm.recipes.ctc_whisper`. `data.train[].max_hours` trains on a fixed
random subset (10 min of 30 min of 1 h) for a data-size curve.

`run(config)`:
1. builds the character vocabulary from the training transcripts (or reloads
   it when resuming) and reports rare characters and dev/test characters it
   lacks (printed, and `output_dir/vocab_report.json`);
2. prepares the data, skipping (and reporting, `output_dir/data_report.json`)
   empty transcripts and audio too short for its transcript;
3. trains with the shared Trainer (checkpoints, exact resume, DDP via torchrun),
   evaluating dev WER/CER with greedy decoding (and the blank-collapse guard);
4. takes the best dev checkpoint (`eval.use_best`), saves `output_dir/final/`
   (an HF directory: Wav2Vec2ForCTC-style model + Wav2Vec2Processor), scores
   dev and test (hypotheses in `output_dir/{dev,test}_hyps.jsonl`) and writes
   `output_dir/results.json`; prints a short table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.curriculum import CurriculumConfig
from ..data.mixture import MixtureConfig
from ..errors import ConfigError
from ..training.tailr import TaiLrConfig
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RESULTS_FILE = "results.json"


@dataclass
class ModelConfig:
    """Which model to start from, and its regularisation while fine-tuning."""

    init: str = "scratch"                 # local HF dir, hub id in the local HF cache, "scratch"
    scratch: dict[str, Any] = field(default_factory=dict)  # Wav2Vec2Config fields (scratch only)
    config: dict[str, Any] = field(default_factory=dict)   # other config fields to override
    freeze_feature_encoder: bool = True   # conv feature encoder fixed for the whole run
    freeze_encoder_steps: int = 0         # whole encoder fixed for the first N updates
    mask_time_prob: float = 0.05          # SpecAugment on the encoder's frames (fairseq mask_prob)
    mask_time_length: int = 10
    mask_feature_prob: float = 0.0        # channel masking (fairseq mask_channel_prob)
    mask_feature_length: int = 10
    layerdrop: float = 0.0
    dropout: float | None = None          # hidden/attention/activation dropout; None: keep
    final_dropout: float | None = None    # before the CTC head; None: keep
    ctc_reduction: Literal["token_mean", "mean", "sum"] = "token_mean"
    # A Whisper checkpoint as model.init (see speechlm.recipes.ctc_whisper):
    encoder_layer: int | None = None      # keep the first N encoder layers (None: all)
    unfreeze_top_layers: int | None = None  # after freeze_encoder_steps the top N layers train
                                          # (0: none, frozen all run; None: the whole encoder)
    head_layers: int = 0                  # fresh transformer layers under the output layer

    def __post_init__(self):
        for name in ("mask_time_prob", "mask_feature_prob", "layerdrop"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ConfigError(f"model.{name} must be in [0, 1), got {value}")
        if self.mask_time_length < 1 or self.mask_feature_length < 1:
            raise ConfigError("model.mask_time_length and mask_feature_length must be >= 1")
        if self.freeze_encoder_steps < 0:
            raise ConfigError("model.freeze_encoder_steps must be >= 0")
        if self.head_layers < 0 or (self.unfreeze_top_layers or 0) < 0 \
                or (self.encoder_layer is not None and self.encoder_layer < 1):
            raise ConfigError("model.head_layers and unfreeze_top_layers must be >= 0, "
                              "model.encoder_layer >= 1")
        for name in ("dropout", "final_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ConfigError(f"model.{name} must be in [0, 1) or null, got {value}")

    def config_overrides(self) -> dict[str, Any]:
        """Model config fields this section sets."""
        fields = dict(mask_time_prob=self.mask_time_prob, mask_time_length=self.mask_time_length,
                      mask_feature_prob=self.mask_feature_prob,
                      mask_feature_length=self.mask_feature_length, layerdrop=self.layerdrop,
                      ctc_loss_reduction="sum" if self.ctc_reduction == "sum" else "mean")
        if self.dropout is not None:
            fields.update(hidden_dropout=self.dropout, attention_dropout=self.dropout,
                          activation_dropout=self.dropout)
        if self.final_dropout is not None:
            fields["final_dropout"] = self.final_dropout
        return {**fields, **self.config}


@dataclass
class TrainSource:
    """One labelled training manifest and its language."""

    manifest: str                         # JSONL path or embedded:LANG/SPLIT
    lang: str | None = None               # normalisation + mixture language (None: records')
    weight: float = 1.0                   # multiplies its size in the language mixture
    max_hours: float | None = None        # a fixed random subset of at most this much audio

    def __post_init__(self):
        if self.max_hours is not None and not self.max_hours > 0:
            raise ConfigError(f"data.train[].max_hours must be > 0 or null, got {self.max_hours}")


@dataclass
class DataConfig:
    train: list[TrainSource] = field(default_factory=list)
    dev: str | None = None                # scored during training and at the end
    test: str | None = None               # scored once at the end (never used for choices)
    lang: str | None = None               # normalisation language of dev/test (None: records')
    max_batch_duration: float = 100.0     # seconds of padded audio per batch (per process)
    max_batch_size: int | None = None
    bucketing: bool = True                # False: random batches at the same budget (benchmark)
    sortagrad_epochs: int = 0             # first epochs shortest-first (SortaGrad), then shuffled
    num_buckets: int = 10
    alpha: float = 0.7                    # language sampling p_l ∝ (n_l/N)^alpha
    # null: the temperature mixture (alpha); {strategy: skill_it, ...}: Skill-It's online
    # mixture (arXiv 2307.14430; see speechlm.recipes.ctc_skill_it)
    mixture: MixtureConfig | None = None
    size_by: Literal["hours", "items"] = "hours"
    min_duration: float | None = 0.5
    max_duration: float | None = 30.0
    vocab: str | None = None              # a vocab.json to use instead of building one
    vocab_min_count: int = 1              # rarer characters become <unk>
    rare_char_count: int = 5              # report characters seen fewer times than this
    unknown_chars: Literal["unk", "skip"] = "unk"  # training utterances with such characters
    sample_rate: int = 16000
    strict: bool = False                  # raise on unreadable audio instead of skipping it
    # Whisper encoders: cache the outputs of the layers that never train ("auto": the
    # speechlm cache dir; a directory; null: encode the audio at every step)
    encoder_cache: str | None = "auto"
    # CLIMB curriculum pacing (arXiv 2311.08886); None: every item from the first step
    curriculum: CurriculumConfig | None = None

    def __post_init__(self):
        if isinstance(self.curriculum, dict):
            self.curriculum = CurriculumConfig(**self.curriculum)
        if isinstance(self.mixture, dict):
            self.mixture = MixtureConfig(**self.mixture)
        if self.curriculum is not None and not self.bucketing:
            raise ConfigError("data.curriculum needs data.bucketing: true (it paces the "
                              "duration-bucketed sampler); set data.bucketing=true or "
                              "data.curriculum=null")
        if self.max_batch_duration <= 0:
            raise ConfigError(f"data.max_batch_duration must be > 0, got {self.max_batch_duration}")
        if self.alpha < 0:
            raise ConfigError(f"data.alpha must be >= 0, got {self.alpha}")
        if self.vocab_min_count < 1:
            raise ConfigError("data.vocab_min_count must be >= 1")
        if self.sortagrad_epochs < 0:
            raise ConfigError("data.sortagrad_epochs must be >= 0")
        if self.sortagrad_epochs and not self.bucketing:
            raise ConfigError("data.sortagrad_epochs needs data.bucketing: true (it orders the "
                              "duration buckets)")
        for pos, source in enumerate(self.train):
            if not source.weight > 0:
                raise ConfigError(f"data.train[{pos}].weight must be > 0, got {source.weight}")


@dataclass
class EvalConfig:
    batch_duration: float = 200.0         # padded seconds per evaluation batch
    max_dev_items: int | None = None      # dev subset for evaluations during training
    examples: int = 3                     # dev hypotheses shown at each evaluation
    collapse_threshold: float = 0.9       # empty-hypothesis fraction that means blank collapse
    collapse_check_after: float = 0.3     # fraction of train.max_steps before the guard arms
    use_best: bool = True                 # final model = best dev checkpoint (train.best_metric)


@dataclass
class LossConfig:
    # TaiLr: each training utterance's loss weighted by the model's length-normalised CTC
    # probability of its labels, for pseudo-labels (speechlm.training.tailr); null: plain
    tailr: TaiLrConfig | None = None

    def __post_init__(self):
        if isinstance(self.tailr, dict):
            self.tailr = TaiLrConfig(**self.tailr)


@dataclass
class Config:
    task: str = "ctc"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="cer"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    from ..data.dataset import SkipReport
    from ..models.ctc import (
        frames_for_samples,
        load_ctc_model,
        save_ctc_model,
    )
    from ..training import checkpoint, distributed
    from ..training.objectives.ctc import CTCCollator, CTCObjective, say
    from ..training.trainer import Trainer, seed_everything
    from . import ctc_skill_it, ctc_whisper

    cfg = config
    data = cfg.data
    check_labelled_data(data)
    if cfg.model.freeze_encoder_steps >= cfg.train.max_steps:
        raise ConfigError(f"model.freeze_encoder_steps={cfg.model.freeze_encoder_steps} >= "
                          f"train.max_steps={cfg.train.max_steps}: only the output layer would "
                          "ever train; freeze the encoder for a small part of the run")
    dist = distributed.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    show = dist.is_main and cfg.train.progress
    paths = _resolve_manifests(data, show, dist.is_main)
    train_langs = [source.lang for source in data.train]

    # 1. vocabulary
    vocab, report = training_vocab(data, cfg.train, paths, train_langs, dist.is_main, out)

    # 2. model
    seed_everything(cfg.train.seed)
    whisper_dir = ctc_whisper.init_dir(cfg.model.init)
    ctc_whisper.check_options(cfg.model, whisper_dir is not None)
    ctc_skill_it.check_options(data, whisper=whisper_dir is not None)
    sample_rate = data.sample_rate
    cache, cached_layer = None, None
    if whisper_dir is not None:
        if sample_rate != 16000:
            raise ConfigError(f"data.sample_rate={sample_rate}: a Whisper encoder takes 16 kHz "
                              "audio (audio at other rates is resampled when loaded); set 16000")
        model = ctc_whisper.build_model(cfg.model, whisper_dir, vocab)
        cache, cached_layer = ctc_whisper.open_cache(cfg, model, whisper_dir, say)

        def frames_for_duration(seconds: float) -> int:
            return int(model.encoder.output_lengths([int(round(seconds * sample_rate))])[0])

        min_duration = data.min_duration  # no time masks to fit
        train_cfg = ctc_whisper.train_config(cfg, model)
    else:
        if cfg.model.scratch and cfg.model.init != "scratch":
            logger.warning("model.scratch is ignored: model.init=%s is a pretrained model",
                           cfg.model.init)
        model = load_ctc_model(cfg.model.init, vocab, overrides=cfg.model.config_overrides(),
                               scratch_config=cfg.model.scratch if cfg.model.init == "scratch"
                               else None)
        if cfg.model.freeze_feature_encoder:
            model.freeze_feature_encoder()

        def frames_for_duration(seconds: float) -> int:
            return frames_for_samples(model.config, int(round(seconds * sample_rate)))

        min_duration = _min_duration_for_masking(cfg, frames_for_duration)
        train_cfg = _train_config(cfg, model)

    # 3. data
    dataset, sampler, probabilities, eval_sets, reports = prepare_audio_data(
        data, vocab, paths, frames_for_duration, min_duration, cfg.train.seed, dist, out,
        total_batches=cfg.train.max_steps * cfg.train.grad_accum,
        cached=cache.dataset if cache is not None else None,
        round_batches=data.mixture.round_steps * cfg.train.grad_accum
        if ctc_skill_it.enabled(data) else None)
    dev_set = eval_sets.get("dev")
    if cache is not None:
        if dev_set is not None:  # during training; the final scores below read the audio
            dev_set = cache.dataset(dev_set.records, "dev", silence_dbfs=None)
        cache.release()

    # 4. train
    guard_from = max(cfg.model.freeze_encoder_steps + 1,
                     int(cfg.eval.collapse_check_after * train_cfg.max_steps))
    unseen_dev = list(report.unseen.get("dev", {}))
    objective = CTCObjective(
        model, vocab, dev=dev_set, reduction=cfg.model.ctc_reduction,
        sample_rate=sample_rate, eval_batch_duration=cfg.eval.batch_duration,
        max_eval_items=cfg.eval.max_dev_items, examples=cfg.eval.examples,
        collapse_threshold=cfg.eval.collapse_threshold, guard_from_step=guard_from,
        unseen_dev_chars=unseen_dev,
        examples_path=out / "dev_examples.jsonl" if dist.is_main else None,
        tailr=cfg.loss.tailr)
    objective.cached_layer = cached_layer
    schedule = ctc_skill_it.build_schedule(cfg, model, objective, dataset, sampler, vocab, out,
                                           dist, say) if ctc_skill_it.enabled(data) else None
    trainer = Trainer(train_cfg, objective, dataset, sampler, collate_fn=CTCCollator(),
                      run_config=cfg, mixture_schedule=schedule)
    objective.attach(trainer)
    objective.warn_at_last_step = False  # the final scoring below warns instead
    runtime_skips = objective.skip_report = SkipReport()
    result = trainer.fit()

    # 5. final model, scores, results
    used = "last"
    if cfg.eval.use_best and result.best_checkpoint is not None:
        best = checkpoint.load_checkpoint(result.best_checkpoint, load_optimizer=False)
        model.load_state_dict(best.model_state, strict=False)
        used = f"best ({train_cfg.best_metric}={result.best_value:.4g} at step " \
               f"{best.trainer_state.get('step')})"
    final = out / FINAL_DIR
    if dist.is_main:
        save_ctc_model(model, vocab, final, sampling_rate=sample_rate,
                       metadata={"recipe": "ctc", "step": result.step, "weights": used,
                                 "normalize_lang": data.lang or (train_langs[0] or None)})
    distributed.barrier()

    import torch

    results: dict[str, Any] = {"step": result.step, "final_dir": str(final), "weights": used,
                               "vocab_size": len(vocab), "train": result.train_metrics,
                               "data": [rep.to_dict() for rep in reports],
                               "languages": probabilities}
    modes = model.training
    model.eval()
    try:
        with torch.no_grad():
            for split, dataset_ in eval_sets.items():
                scored = objective.score(model, dataset_)
                from ..training.objectives.ctc import collapse_warning, is_blank_collapse

                collapsed = is_blank_collapse([r["hyp"] for r in scored.rows], scored.wer,
                                              scored.cer, threshold=cfg.eval.collapse_threshold)
                results[split] = {**scored.metrics(), "utterances": len(scored.rows),
                                  "skipped": scored.skipped, "blank_collapse": collapsed}
                if dist.is_main:
                    from ..jsonl import write_jsonl

                    write_jsonl(out / f"{split}_hyps.jsonl",
                                ({"id": r["id"], "text": r["hyp"], "ref": r["ref"]}
                                 for r in scored.rows))
                    if collapsed:
                        say(collapse_warning(scored, step=result.step,
                                             unseen_chars=list(report.unseen.get(split, {}))))
    finally:
        model.train(modes)
    results["blank_collapse"] = any(results.get(s, {}).get("blank_collapse") for s in eval_sets)
    results["runtime_skipped"] = runtime_skips.to_dict()
    if schedule is not None and dist.is_main:
        plot = ctc_skill_it.write_plot(out)
        # results["languages"] is the uniform start; this is where the rounds took it
        results["mixture"] = {"graph": schedule.graph.tolist(),
                              "eval_skills": schedule.eval_skills,
                              "last_probabilities": schedule.probabilities,
                              "plot": str(plot) if plot else None}
    if dist.is_main:
        _write_json(out / RESULTS_FILE, results)
        say(results_table(results, eval_sets))
    return results


# -- helpers ---------------------------------------------------------------------------------


def check_labelled_data(data: DataConfig) -> None:
    if not data.train:
        raise ConfigError("data.train: list at least one labelled manifest, e.g. "
                          "[{manifest: data/train.jsonl, lang: en}]")
    if not data.dev:
        raise ConfigError("data.dev: give a held-out labelled manifest; it picks the best "
                          "checkpoint and guards against blank collapse (a few hundred "
                          "utterances are enough)")


def training_vocab(data: DataConfig, train: TrainConfig, paths: dict, train_langs: list,
                   is_main: bool, out: Path):
    """(character vocabulary, its report): the resumed run's own vocabulary (the head must
    match), data.vocab, or one built from the training transcripts. Rank 0 saves both."""
    from ..models.ctc import CharVocab, build_char_vocab, vocab_report
    from ..training.objectives.ctc import say

    resume_dir = _resume_run_dir(train)
    if resume_dir is not None and (resume_dir / "vocab.json").is_file():
        vocab = CharVocab.load(resume_dir)
    elif data.vocab:
        vocab = CharVocab.load(data.vocab)
    else:
        vocab = build_char_vocab(paths["train"], train_langs, min_count=data.vocab_min_count)
    eval_sources = {split: ([paths[split]], data.lang) for split in ("dev", "test")
                    if paths.get(split)}
    report = vocab_report(vocab, eval_sources, rare_below=data.rare_char_count)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        vocab.save(out)
        report.write(out / "vocab_report.json")
        say(report.summary())
    return vocab, report


def prepare_audio_data(data: DataConfig, vocab, paths: dict, frames_for_duration, min_duration,
                       seed: int, dist, out: Path, *, total_batches: int | None = None,
                       cached=None, round_batches: int | None = None):
    """(train dataset, batch sampler, language probabilities, {split: dev/test dataset},
    data reports) for labelled audio: transcripts encoded and checked up front, skipped items
    counted and written to out/data_report.json. `total_batches` (max_steps x grad_accum)
    paces `data.curriculum`. `cached(records, name)`: the training dataset of a language
    (e.g. with cached encoder frames) instead of an AudioDataset. `round_batches`: the
    batches of a Skill-It round (data.mixture.strategy=skill_it)."""
    from ..data.dataset import AudioDataset
    from ..training.objectives.ctc import count_sample_rates, prepare_ctc_records, say

    groups: dict[str, dict] = {}
    reports = []
    for pos, (source, path) in enumerate(zip(data.train, paths["train"], strict=True)):
        records, rep = prepare_ctc_records(
            path, vocab, lang=source.lang, frames_for_duration=frames_for_duration,
            unknown=data.unknown_chars, min_duration=min_duration,
            max_duration=data.max_duration, name=f"train[{pos}] {source.manifest}")
        if source.max_hours is not None:
            records = hours_subset(records, source.max_hours, rep)
        rep.sample_rates = count_sample_rates(records, data.sample_rate)
        reports.append(rep)
        lang = source.lang or _single_lang(records, f"data.train[{pos}] ({source.manifest})")
        hours = sum(float(r["duration"]) for r in records) / 3600
        group = groups.setdefault(lang, {"records": [], "hours": 0.0, "size": 0.0})
        group["records"].extend(records)
        group["hours"] += hours
        group["size"] += (hours if data.size_by == "hours" else len(records)) * source.weight
    eval_sets = {}
    for split in ("dev", "test"):
        if paths.get(split):
            records, rep = prepare_ctc_records(paths[split], vocab, lang=data.lang,
                                               training=False, name=split)
            rep.sample_rates = count_sample_rates(records, data.sample_rate)
            reports.append(rep)
            eval_sets[split] = AudioDataset(records, sample_rate=data.sample_rate,
                                            strict=data.strict, silence_dbfs=None)
    if dist.is_main:
        _write_json(out / "data_report.json", [rep.to_dict() for rep in reports])
        for rep in reports:
            say(rep.summary())
    dataset, sampler, probabilities = _build_sampler(groups, data, seed, dist, total_batches,
                                                     cached, round_batches)
    if dist.is_main and len(groups) > 1:
        online = data.mixture is not None and data.mixture.strategy == "skill_it"
        say("languages: " + ", ".join(
            f"{lang} ({groups[lang]['hours']:.2f} h" + (")" if online else f", p={p:.3f})")
            for lang, p in probabilities.items())
            + ("; Skill-It sets p at every round" if online else ""))
    return dataset, sampler, probabilities, eval_sets, reports



def _resolve_manifests(data: DataConfig, progress: bool, is_main: bool) -> dict:
    """Manifest paths (embedded splits are built on rank 0 first, then read everywhere)."""
    from ..training import distributed
    from .sources import resolve_manifest

    def resolve_all(show: bool) -> dict:
        return {"train": [resolve_manifest(s.manifest, progress=show) for s in data.train],
                "dev": resolve_manifest(data.dev, progress=show) if data.dev else None,
                "test": resolve_manifest(data.test, progress=show) if data.test else None}

    if is_main:
        paths = resolve_all(progress)
        distributed.barrier()
    else:
        distributed.barrier()
        paths = resolve_all(False)
    return paths


def _resume_run_dir(train: TrainConfig) -> Path | None:
    """The run directory whose checkpoint this run will resume from, if any."""
    from ..training import checkpoint

    out = Path(train.output_dir)
    if train.resume == "never":
        return None
    if train.resume == "auto":
        return out if checkpoint.latest_checkpoint(out) is not None else None
    path = Path(train.resume)
    if checkpoint.is_complete(path):
        return path.parent
    return path if checkpoint.latest_checkpoint(path) is not None else None


def _min_duration_for_masking(cfg: Config, frames_for_duration) -> float | None:
    """data.min_duration, raised if needed so time masks (mask_time_length frames) fit."""
    low = cfg.data.min_duration
    if cfg.model.mask_time_prob <= 0:
        return low
    needed = cfg.model.mask_time_length + 1
    seconds = 0.02
    while frames_for_duration(seconds) < needed and seconds < 60:
        seconds *= 1.25
    if low is None or low < seconds:
        if low is not None:
            logger.info("data.min_duration raised from %s to %.2f s so that time masks of %d "
                        "frames fit", low, seconds, cfg.model.mask_time_length)
        return round(seconds, 3)
    return low


def _single_lang(records: list[dict], where: str) -> str:
    langs = sorted({str(r["lang"]) for r in records if r.get("lang")})
    if len(langs) > 1:
        raise ConfigError(f"{where}: its records have several languages ({', '.join(langs)}); "
                          "set `lang:` or split the manifest per language")
    return langs[0] if langs else "default"


def hours_subset(records: list[dict], max_hours: float, report) -> list[dict]:
    """A fixed random subset of `records` of at most `max_hours` (the order comes from a
    fixed seed, so a smaller budget's subset lies inside a larger one's: 10 min of 30 min of
    1 h). The report's kept counts follow."""
    import random

    order = list(range(len(records)))
    random.Random(1234).shuffle(order)
    chosen, seconds = [], 0.0
    for i in order:
        duration = float(records[i]["duration"])
        if seconds + duration > max_hours * 3600:
            continue
        chosen.append(i)
        seconds += duration
    if not chosen:
        raise ConfigError(f"{report.name}: max_hours={max_hours} is shorter than every "
                          "utterance; raise it")
    report.subset = {"max_hours": max_hours, "from_utterances": len(records),
                     "utterances": len(chosen), "hours": round(seconds / 3600, 4)}
    report.kept, report.kept_hours = len(chosen), seconds / 3600
    return [records[i] for i in sorted(chosen)]


def _build_sampler(groups: dict[str, dict], data: DataConfig, seed: int, dist,
                   total_batches: int | None = None, cached=None,
                   round_batches: int | None = None):
    """(dataset, batch sampler, language probabilities) for one or several languages."""
    from ..data.curriculum import CurriculumBucketSampler, record_difficulties
    from ..data.dataset import AudioDataset
    from ..data.mixture import (
        SkillItMixtureSampler,
        TemperatureMixtureSampler,
        temperature_probabilities,
    )
    from ..data.sampler import DurationBucketSampler, RandomBatchSampler

    curriculum = data.curriculum
    if curriculum is not None:
        if total_batches is None:
            raise ConfigError("data.curriculum is not supported by this recipe (it does not "
                              "tell the sampler the run's length); set data.curriculum=null")
        if data.sortagrad_epochs:
            logger.warning("data.sortagrad_epochs=%d is ignored: data.curriculum orders the "
                           "data easy-first instead", data.sortagrad_epochs)
        # Inside a mixture a language's sampler paces by its expected share of the batches.
        shares = temperature_probabilities([g["size"] for g in groups.values()], data.alpha) \
            if len(groups) > 1 else [1.0]
    samplers, datasets = {}, {}
    for i, (lang, group) in enumerate(groups.items()):
        durations = [float(r["duration"]) for r in group["records"]]
        common = dict(max_batch_duration=data.max_batch_duration,
                      max_batch_size=data.max_batch_size, seed=seed + i, rank=dist.rank,
                      world_size=dist.world_size)
        if curriculum is not None:
            difficulties = (durations if curriculum.difficulty == "duration" else
                            record_difficulties(group["records"], curriculum.difficulty,
                                                where=f"the '{lang}' training manifests"))
            samplers[lang] = CurriculumBucketSampler(
                durations, difficulties, num_buckets=data.num_buckets,
                total_batches=max(1, round(total_batches * float(shares[i]))),
                pacing=curriculum.pacing, start=curriculum.start, ramp=curriculum.ramp,
                **common)
        elif not data.bucketing:
            samplers[lang] = RandomBatchSampler(durations, **common)
        elif data.sortagrad_epochs:
            samplers[lang] = SortaGradSampler(
                DurationBucketSampler(durations, num_buckets=data.num_buckets, shuffle=False,
                                      **common),
                DurationBucketSampler(durations, num_buckets=data.num_buckets, **common),
                sorted_epochs=data.sortagrad_epochs)
        else:
            samplers[lang] = DurationBucketSampler(durations, num_buckets=data.num_buckets,
                                                   **common)
        if cached is not None:
            datasets[lang] = cached(group["records"], f"train ({lang})")
        else:
            datasets[lang] = AudioDataset(group["records"], sample_rate=data.sample_rate,
                                          strict=data.strict)  # silent audio: skipped, counted
    if len(groups) == 1:
        lang = next(iter(groups))
        return datasets[lang], samplers[lang], {lang: 1.0}
    if data.mixture is not None and data.mixture.strategy == "skill_it":
        if round_batches is None:
            raise ConfigError("data.mixture.strategy=skill_it is not supported by this recipe "
                              "(it does not size the rounds); use strategy=temperature")
        mixture = SkillItMixtureSampler(samplers, round_batches=round_batches, seed=seed)
        return mixture.concat_datasets(datasets), mixture, mixture.probabilities
    mixture = TemperatureMixtureSampler(samplers, alpha=data.alpha, seed=seed,
                                        sizes={lang: g["size"] for lang, g in groups.items()})
    return mixture.concat_datasets(datasets), mixture, mixture.probabilities


class SortaGradSampler:
    """Shortest utterances first for the first `sorted_epochs` epochs, then shuffled batches.

    SortaGrad (Deep Speech 2): CTC leaves its all-blank plateau sooner when it first sees
    short utterances, whose alignments are easy. Wraps two batch samplers over the same
    durations, an unshuffled DurationBucketSampler (buckets in ascending duration) and a
    shuffled one, and resumes exactly like them.
    """

    def __init__(self, sorted_sampler, shuffled_sampler, *, sorted_epochs: int = 1):
        self.sorted, self.shuffled = sorted_sampler, shuffled_sampler
        self.sorted_epochs = int(sorted_epochs)
        self.durations = shuffled_sampler.durations
        self.rank, self.world_size = shuffled_sampler.rank, shuffled_sampler.world_size
        self.epoch = 0

    def _current(self):
        return self.sorted if self.epoch < self.sorted_epochs else self.shuffled

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._current().set_epoch(epoch)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        inner = self._current().state_dict(num_consumed=num_consumed)
        return {"kind": type(self).__name__, "sorted_epochs": self.sorted_epochs,
                "epoch": inner["epoch"], "position": inner["position"], "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__ or \
                state.get("sorted_epochs") != self.sorted_epochs:
            raise ValueError("sampler state does not match this sampler (data.sortagrad_epochs "
                             "changed?); resume with the same data settings")
        self.epoch = int(state["epoch"])
        target, inner = self._current(), dict(state["inner"])
        if inner.get("shuffle") != target.shuffle:
            # A mixture sampler moved this language on to the other phase: same data and
            # settings, that phase's own ordering.
            inner = {**inner, "shuffle": target.shuffle}
        inner.update(epoch=state["epoch"], position=state["position"])
        target.load_state_dict(inner)


def _train_config(cfg: Config, model) -> TrainConfig:
    """cfg.train plus the encoder freezing that model.freeze_encoder_steps asks for."""
    train = cfg.train
    steps = cfg.model.freeze_encoder_steps
    if not steps:
        return train
    if train.freeze_for_steps and train.freeze_for_steps != steps:
        raise ConfigError(f"model.freeze_encoder_steps={steps} and train.freeze_for_steps="
                          f"{train.freeze_for_steps} disagree; set one of them")
    if steps >= train.max_steps:
        raise ConfigError(f"model.freeze_encoder_steps={steps} >= train.max_steps="
                          f"{train.max_steps}: only the output layer would ever train")
    prefix = model.base_model_prefix
    initially = list(dict.fromkeys([*train.freeze_initially, prefix]))
    return dataclasses.replace(train, freeze_initially=initially, freeze_for_steps=steps)


def _write_json(path: Path, value) -> None:
    from ..jsonl import atomic_write

    with atomic_write(path) as f:
        json.dump(value, f, ensure_ascii=False, indent=1, default=str)
        f.write("\n")


def results_table(results: dict, splits) -> str:
    """A short text table of the final scores."""
    lines = [f"{'split':<6} {'utts':>5} {'WER':>7} {'CER':>7} {'empty':>6}"]
    for split in splits:
        r = results.get(split)
        if not r:
            continue
        lines.append(f"{split:<6} {r['utterances']:>5} {100 * r['wer']:>6.1f}% "
                     f"{100 * r['cer']:>6.1f}% {100 * r['empty_frac']:>5.0f}%")
    lines.append(f"model: {results['final_dir']} ({results['weights']} weights, step "
                 f"{results['step']})")
    if results.get("blank_collapse"):
        lines.append("WARNING: blank collapse: the model outputs (almost) only blanks; see the "
                     "advice printed above")
    return "\n".join(lines)
