"""The training loop every objective shares (CTC, wav2vec2 pre-training, adapters, ...).

An *objective* is any object with

    model: torch.nn.Module
    loss(batch) -> (loss: scalar Tensor, metrics: dict[str, float | Tensor])
                   or None for a batch with nothing to learn from (e.g. every
                   item skipped): it counts as a zero loss
    evaluate(model) -> dict[str, float]      optional; called every `eval_every`
                                             updates and at the end, in eval mode,
                                             under no_grad, on every rank (shard
                                             and reduce inside if you like; rank
                                             0's numbers are used)
    to(device)                               optional, for tensors the objective keeps
                                             besides `model` (the trainer moves `model`)
    sample_losses(batch) -> SampleLosses     optional: per-sample losses (or None, as
                                             `loss`), needed by `train.sample_weighting`
                                             (see speechlm.training.sample_weighting)

The data is a dataset plus a *batch sampler* with `set_epoch(e)`,
`state_dict()` (ideally `state_dict(num_consumed=...)`) and
`load_state_dict()`; under torchrun build it with `rank=distributed.rank(),
world_size=distributed.world_size()` after `distributed.init_distributed()`.
The global batch is per-rank batch x world size x grad_accum.

`mixture_schedule` (optional): a `speechlm.training.skill_it.SkillItSchedule`
over the batch sampler (the Skill-It online mixture). The skills' validation
losses are measured before the first update and whenever a round is used up;
the next round's mixture and those losses are logged as split "mixture" and
kept in the checkpoints.

One update: `grad_accum` micro-batches forward + backward (DDP, or FSDP under
`sharding: fsdp` (speechlm.training.fsdp), syncs only on the last), unscale
(fp16), clip, skip if the loss or gradient is not finite,
optimizer step, scheduler step. Then log, evaluate, save as due.

`fit()` calls `model.train()` first (a submodule that must stay in eval mode,
e.g. a frozen encoder, overrides `train()`). Seed before building the model
(`seed_everything(cfg.seed)`) so every run starts from the same weights.
Resuming gives bit-identical weights on the same hardware and thread count,
provided the dataset's randomness comes from the global RNGs in the main
process (num_workers=0) or is derived per item from (seed, epoch, index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..config import config_to_dict, save_config
from ..errors import ConfigError, SpeechLMError
from . import checkpoint, distributed, fsdp, sharded_checkpoint
from .memory import release_freed_heap, resident_anonymous_mb
from .metrics_log import METRICS_FILE, MetricsLogger, read_metrics
from .sample_weighting import (
    SUPPORTED_OBJECTIVES,
    SampleLosses,
    SampleWeightingConfig,
    weighted_loss,
)
from .schedules import build_scheduler, tri_stage_phases

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything about *how* to train; the recipe's `train:` section."""

    max_steps: int = 1000                 # optimizer updates
    # the number of updates the lr schedule spans when the run stops earlier (fairseq's
    # --total-num-update): a point partway down a long schedule, continued later elsewhere
    schedule_steps: int | None = None
    grad_accum: int = 1                   # micro-batches per update
    lr: float = 1e-4                      # peak learning rate
    weight_decay: float = 0.01            # AdamW; never applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0     # None: no clipping (the norm is still logged)
    schedule: Literal["constant", "linear", "cosine", "tri_stage"] = "cosine"
    warmup_steps: int = 0                 # constant/linear/cosine; tri_stage uses its ratios
    tri_stage_ratios: tuple[float, float, float] = (0.1, 0.4, 0.5)
    init_lr_scale: float = 0.01           # tri_stage start, as a fraction of lr
    final_lr_scale: float = 0.05          # end of linear/cosine/tri_stage decay
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    eval_every: int | None = None         # updates; None: only at the end
    save_every: int | None = 1000         # updates; None: only at the end
    keep_last: int | None = 3             # step checkpoints kept; None keeps all
    log_every: int = 10
    output_dir: str = "runs/default"
    resume: str = "auto"                  # "auto" | "never" | path of a checkpoint or run dir
    freeze: list[str] = field(default_factory=list)            # name prefixes, whole run
    freeze_initially: list[str] = field(default_factory=list)  # ... for the first updates
    freeze_for_steps: int = 0             # how many updates freeze_initially lasts
    best_metric: str = "loss"             # evaluate() key deciding output_dir/best
    best_mode: Literal["min", "max"] = "min"
    max_consecutive_nonfinite: int = 10   # skipped updates in a row before giving up
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 0
    find_unused_parameters: bool = False  # DDP: set if some parameters get no gradient
    # under torchrun: "none" keeps a whole model per process (DDP); "fsdp" shards parameters,
    # gradients and optimizer state over the processes (FSDP2), for a model trained whole that
    # does not fit one device; checkpoints are then sharded (speechlm convert fsdp gathers them)
    sharding: Literal["none", "fsdp"] = "none"
    progress: bool = True
    tensorboard: bool = True
    # loss-based sample reweighting (arXiv 2502.06733); None: the plain loss
    sample_weighting: SampleWeightingConfig | None = None

    def __post_init__(self):
        if isinstance(self.sample_weighting, dict):
            self.sample_weighting = SampleWeightingConfig(**self.sample_weighting)
        positive = {"max_steps": self.max_steps, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "max_consecutive_nonfinite":
                    self.max_consecutive_nonfinite}
        optional_positive = {"eval_every": self.eval_every, "save_every": self.save_every,
                             "keep_last": self.keep_last}
        for name, value in {**positive, **optional_positive}.items():
            if value is not None and value < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {value}")
        if self.schedule_steps is not None and self.schedule_steps < self.max_steps:
            raise ConfigError(f"train.schedule_steps ({self.schedule_steps}) must be >= "
                              f"max_steps ({self.max_steps}), or null to end the schedule "
                              "at max_steps")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.num_workers < 0 \
                or self.freeze_for_steps < 0:
            raise ConfigError("train.weight_decay, warmup_steps, num_workers and "
                              "freeze_for_steps must be >= 0")
        if not 0 < self.final_lr_scale <= 1 or not 0 <= self.init_lr_scale <= 1:
            raise ConfigError("train.final_lr_scale must be in (0, 1] and init_lr_scale in [0, 1]")
        if self.schedule == "tri_stage":
            ratios = self.tri_stage_ratios
            if any(r < 0 for r in ratios) or sum(ratios) > 1 + 1e-6:
                raise ConfigError(f"train.tri_stage_ratios must be >= 0 and sum to <= 1 "
                                  f"(warmup, hold, decay), got {list(ratios)}")
            if self.warmup_steps:
                raise ConfigError("train.warmup_steps is not used by schedule=tri_stage (its "
                                  "warmup is tri_stage_ratios[0] of max_steps); set it to 0")
        if bool(self.freeze_initially) != bool(self.freeze_for_steps):
            raise ConfigError("train.freeze_initially and train.freeze_for_steps go together: "
                              "list the modules to freeze and for how many updates")
        if self.resume in ("", None):
            raise ConfigError("train.resume must be 'auto', 'never' or a checkpoint path")
        if self.sharding not in ("none", "fsdp"):
            raise ConfigError(f"train.sharding must be 'none' (DDP) or 'fsdp', got "
                              f"{self.sharding!r}")
        if self.sharding == "fsdp" and self.precision == "fp16":
            raise ConfigError("train.sharding=fsdp does not support precision=fp16 (its "
                              "gradient scaler is not shard-aware); use precision=bf16 or fp32")
        if self.sharding == "fsdp" and self.freeze_initially:
            raise ConfigError("train.sharding=fsdp does not support train.freeze_initially "
                              "(the sharded trainable set is fixed when the model is sharded); "
                              "use train.freeze, or train.sharding=none")


@dataclass
class TrainResult:
    step: int
    epoch: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_value: float | None
    skipped_nonfinite: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    # wall seconds of the training loop over every session of this run (a resumed run keeps
    # counting from its checkpoint), evaluations included
    train_seconds: float = 0.0


class NonFiniteLossError(SpeechLMError):
    """Too many consecutive updates had a NaN/inf loss or gradient."""


class Trainer:
    """Train `objective.model` on batches from (dataset, batch_sampler); see the module doc.

    `run_config`: the whole recipe (dataclass or dict), snapshotted into each
    checkpoint; on resume its `identity_keys` sections (model-defining fields)
    must equal the checkpoint's.
    """

    def __init__(self, config: TrainConfig, objective, dataset, batch_sampler, *,
                 collate_fn=None, run_config: Any = None,
                 identity_keys: Sequence[str] = ("model",), mixture_schedule=None,
                 step_hooks: Sequence[Callable[[int], None]] = ()):
        self.config = cfg = config
        self.objective = objective
        self.model: nn.Module = objective.model
        self.dataset, self.batch_sampler, self.collate_fn = dataset, batch_sampler, collate_fn
        self.dist = distributed.init_distributed(cfg.device)
        self.device = distributed.resolve_device(cfg.device)
        self.output_dir = Path(cfg.output_dir)
        self.identity_keys = tuple(identity_keys)
        self.run_snapshot = _snapshot(run_config, cfg)
        self._run_config = run_config
        _check_batch_sampler(batch_sampler, self.dist)
        seed_everything(cfg.seed + self.dist.rank)

        if hasattr(objective, "to"):
            objective.to(self.device)
        self.model.to(self.device)
        self.named_params, self.initially_frozen = self._apply_freezing()
        self.amp_dtype = _autocast_dtype(cfg.precision, self.device)
        self.sharded = cfg.sharding == "fsdp"
        if self.sharded:
            self.named_params = self._shard()
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.named_params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        # DDP wraps a module whose forward *is* objective.loss, so the objective
        # keeps calling its own model and gradients are still all-reduced. The
        # wrapper is (re)built in _set_freeze_phase when the trainable set changes.
        if cfg.sample_weighting is not None and not callable(
                getattr(objective, "sample_losses", None)):
            raise ConfigError(
                f"train.sample_weighting needs per-sample losses, which "
                f"{type(objective).__name__} does not give (it has no sample_losses method); "
                f"objectives that do: {', '.join(SUPPORTED_OBJECTIVES)}. Set "
                "train.sample_weighting=null for this recipe")
        self._loss_module = _LossModule(objective, per_sample=cfg.sample_weighting is not None)
        self.forward: nn.Module = self._loss_module

        self.step = self.epoch = self.batches_in_epoch = 0
        self.train_seconds = 0.0
        self._empty_streak = 0  # updates in a row whose batches had no usable item
        self.skipped_nonfinite = self._nonfinite_streak = 0
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.last_checkpoint: Path | None = None
        self._frozen_now: bool | None = None
        self.last_lr = cfg.lr
        self._sampler_takes_count = "num_consumed" in inspect.signature(
            batch_sampler.state_dict).parameters
        # Skill-It (speechlm.training.skill_it): the mixture changes at every round's end.
        self.mixture_schedule = mixture_schedule
        # called with the update count before every update (e.g. SPDF's switch to dense); a
        # resumed run calls them at its first update, so they must key on the count alone
        self.step_hooks = tuple(step_hooks)
        if mixture_schedule is not None and mixture_schedule.sampler is not batch_sampler:
            raise ValueError("mixture_schedule must drive this trainer's batch sampler")

    # -- the loop ---------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to `max_steps` updates (resuming per `config.resume`); returns a summary."""
        cfg = self.config
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ConfigError(f"train.output_dir={self.output_dir}: is a file, not a directory; "
                              "point train.output_dir at a directory (it is created if missing)")
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_stale(self.output_dir)
        distributed.barrier()
        self._resume()
        if self.dist.is_main and self._run_config is not None and self.step == 0:
            self._write_run_config()
        log = MetricsLogger(self.output_dir, enabled=self.dist.is_main,
                            tensorboard=cfg.tensorboard, resume_step=self.step)
        from ..progress import progress_bar

        bar = progress_bar(total=cfg.max_steps, initial=self.step, desc="train",
                           dynamic_ncols=True, disable=not (cfg.progress and self.dist.is_main))
        if self.mixture_schedule is not None and not self.mixture_schedule.started:
            log.log("mixture", self.step, self.mixture_schedule.start(self._skill_losses()))
        batches = self._batches()
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.perf_counter()
        session_start, seconds_before = window_start, self.train_seconds
        train_metrics: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                for hook in self.step_hooks:
                    hook(self.step)
                self._set_freeze_phase()
                loss, metrics = self._forward_backward(batches)
                self._check_not_all_empty(metrics.get("empty_batch_frac", 0.0))
                grad_norm = self._update(loss)
                release_freed_heap()  # batches of new shapes fragment the heap otherwise
                if grad_norm is None:
                    self._end_mixture_round(log)
                    continue
                self.step += 1
                bar.update(1)
                for key, value in {**metrics, "loss": loss, "grad_norm": grad_norm}.items():
                    window[key] = window.get(key, 0.0) + float(value)
                window_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    train_metrics = {k: v / window_steps for k, v in window.items()}
                    train_metrics = distributed.reduce_metrics(train_metrics)
                    train_metrics["loss"] = window["loss"] / window_steps  # already global
                    train_metrics.update(
                        lr=self.last_lr, epoch=self.epoch,
                        skipped_nonfinite=self.skipped_nonfinite,
                        sec_per_step=(time.perf_counter() - window_start) / window_steps)
                    if (resident := resident_anonymous_mb()) is not None:
                        train_metrics["resident_mb"] = resident  # flat when memory is reused
                    if (pace := self._curriculum_p()) is not None:
                        train_metrics["curriculum_p"] = pace  # data.curriculum's p(t)
                    log.log("train", self.step, train_metrics)
                    bar.set_postfix(loss=f"{train_metrics['loss']:.4g}",
                                    lr=f"{train_metrics['lr']:.3g}")
                    window, window_steps, window_start = {}, 0, time.perf_counter()
                last = self.step == cfg.max_steps
                if hasattr(self.objective, "evaluate") and (
                        last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    eval_metrics = self.evaluate()
                    log.log("eval", self.step, eval_metrics)
                self._end_mixture_round(log)  # before saving: the checkpoint holds the new p
                self.train_seconds = seconds_before + time.perf_counter() - session_start
                if last or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save()
        finally:
            bar.close()
            log.close()
        if self.dist.is_main and not (train_metrics and eval_metrics):
            # resumed at its last step: this session logged nothing, the run's log has it
            train_metrics = train_metrics or _last_logged(self.output_dir, "train", self.step)
            eval_metrics = eval_metrics or _last_logged(self.output_dir, "eval", self.step)
        best = self.output_dir / checkpoint.BEST_DIR
        return TrainResult(self.step, self.epoch, self.last_checkpoint,
                           best if checkpoint.is_complete(best) else None, self.best_value,
                           self.skipped_nonfinite, train_metrics, eval_metrics,
                           self.train_seconds)

    def _forward_backward(self, batches) -> tuple[torch.Tensor, dict[str, float]]:
        """grad_accum micro-batches; returns the update's mean loss (over ranks) and metrics."""
        k = self.config.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, Any] = {}
        for micro in range(k):
            batch = _to_device(next(batches), self.device)
            sync = micro == k - 1 or not self.dist.enabled
            with self._gradient_sync(sync):
                with self._autocast():
                    out = self.forward(batch)
                loss, metrics = self._reweighted(out) if self._loss_module.per_sample else out
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                    raise TypeError("objective.loss(batch) must return (scalar tensor, dict)")
                if not loss.requires_grad:
                    raise SpeechLMError(
                        "the loss does not depend on any trainable parameter (is everything "
                        "frozen? check train.freeze / freeze_initially)")
                self.scaler.scale(loss.float() / k).backward()
            loss_sum += loss.detach().float()
            for key, value in (metrics or {}).items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                metric_sums[key] = metric_sums.get(key, 0.0) + value
        loss_mean = distributed.all_reduce_mean(loss_sum / k)
        return loss_mean, {key: float(value) / k for key, value in metric_sums.items()}

    def _check_not_all_empty(self, empty_frac: float) -> None:
        """Stop a run that has seen a whole epoch of batches without one usable item (every
        item skipped: unreadable audio, empty transcripts, ...): it would 'train' on nothing."""
        empty = torch.tensor(1.0 if empty_frac >= 1.0 else 0.0, device=self.device)
        all_ranks_empty = float(distributed.all_reduce_mean(empty)) >= 1.0
        self._empty_streak = self._empty_streak + 1 if all_ranks_empty else 0
        if not self._empty_streak:
            return  # the usual case: no need to size an epoch (a sampler may rebuild it)
        batches = len(self.batch_sampler) if hasattr(self.batch_sampler, "__len__") else 1000
        if self._empty_streak >= max(math.ceil(batches / self.config.grad_accum), 1):
            raise SpeechLMError(
                f"{self._empty_streak} update(s) in a row had no usable training item (a whole "
                "epoch): every item was skipped; the objective's skip counts in the log say why "
                "(unreadable audio, too long, empty transcript). Check the training manifests "
                "with `speechlm data validate --check-readable MANIFEST`")

    def _reweighted(self, out) -> tuple[torch.Tensor, dict]:
        """The sample-weighted loss of a micro-batch (weights over the global micro-batch)."""
        losses, coef, metrics = out
        cfg = self.config.sample_weighting
        loss, stats = weighted_loss(SampleLosses(losses, metrics, coef), cfg,
                                    uniform=self.step < cfg.warmup_steps)
        return loss, {**metrics, **stats}

    def _update(self, loss: torch.Tensor) -> float | None:
        """Clip and step; None (and no change to the weights) if the update is not finite."""
        cfg = self.config
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm else math.inf
        if self.sharded:
            grad_norm = fsdp.clip_grad_norm(self.params, max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # With fp16 the scaler itself skips steps with inf gradients and lowers its scale.
        finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | self.scaler.is_enabled())
        if not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            self.skipped_nonfinite += 1
            self._nonfinite_streak += 1
            if self.dist.is_main:
                logger.warning("step %d: non-finite loss %s / grad norm %s; update skipped "
                               "(%d in a row)", self.step + 1, float(loss), float(grad_norm),
                               self._nonfinite_streak)
            if self._nonfinite_streak >= cfg.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.output_dir}: the loss or gradient was NaN/inf for "
                    f"{self._nonfinite_streak} consecutive updates at step {self.step + 1} "
                    f"({self.skipped_nonfinite} skipped in all); lower train.lr, use "
                    "precision=bf16 or fp32 instead of fp16, and check the data for empty or "
                    "corrupt items. The last good checkpoint is kept for resuming")
            return None
        self._nonfinite_streak = 0
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this update used
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def evaluate(self) -> dict[str, float]:
        """Run objective.evaluate in eval mode; keep output_dir/best when the metric improves."""
        cfg = self.config
        with self._eval_mode():
            results = self.objective.evaluate(self.model)
        results = distributed.broadcast_object(
            {key: float(value) for key, value in (results or {}).items()})
        if not results:
            return results  # an objective with nothing to evaluate: no best checkpoint
        if cfg.best_metric not in results:
            raise ConfigError(
                f"train.best_metric '{cfg.best_metric}' is not among the evaluation results "
                f"({', '.join(results) or 'none'}); set train.best_metric to one of them")
        value = results[cfg.best_metric]
        better = self.best_value is None or (
            value < self.best_value if cfg.best_mode == "min" else value > self.best_value)
        if math.isfinite(value) and better:
            self.best_value, self.best_step = value, self.step
            # best/ holds plain weights, gathered from the shards under sharding
            model_state = fsdp.full_model_state(self.model) if self.sharded \
                else self.model_state()
            if self.dist.is_main:
                checkpoint.save_checkpoint(
                    self.output_dir / checkpoint.BEST_DIR, model_state=model_state,
                    trainer_state={"step": self.step, "metric": cfg.best_metric,
                                   "value": value, "eval": results},
                    config=self.run_snapshot)
        return results

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode under no_grad (and autocast); every module's own mode restored after."""
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            for module, training in modes.items():
                module.training = training

    def _skill_losses(self) -> dict[str, float]:
        """The Skill-It validation loss of every skill (rank 0's numbers on every rank)."""
        with self._eval_mode():
            losses = self.mixture_schedule.measure(self.model)
        return distributed.broadcast_object({k: float(v) for k, v in losses.items()})

    def _end_mixture_round(self, log: MetricsLogger) -> None:
        """At the end of a Skill-It round: measure, set the next round's mixture, log it."""
        schedule = self.mixture_schedule
        if schedule is None or not schedule.due(self.epoch, self.batches_in_epoch):
            return
        log.log("mixture", self.step, schedule.end_round(self.epoch, self._skill_losses()))

    # -- data -------------------------------------------------------------------

    def _curriculum_p(self) -> float | None:
        """The admissible difficulty percentile of a curriculum sampler (None without one)."""
        get = getattr(self.batch_sampler, "curriculum_p", None)
        return get() if callable(get) else None

    def _batches(self):
        """Endless batches over epochs, tracking (epoch, batches consumed) for checkpoints."""
        from torch.utils.data import DataLoader

        while True:
            self.batch_sampler.set_epoch(self.epoch)
            # A private generator per (seed, epoch, rank) seeds the workers, so making
            # the iterator never draws from the global RNG (which resume restores).
            generator = torch.Generator()
            generator.manual_seed(int(np.random.SeedSequence(
                [self.config.seed, self.epoch, self.dist.rank]).generate_state(1)[0]))
            loader = DataLoader(self.dataset, batch_sampler=self.batch_sampler,
                                collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                                pin_memory=self.device.type == "cuda", generator=generator)
            started_at = self.batches_in_epoch
            for batch in loader:
                self.batches_in_epoch += 1
                yield batch
            if self.batches_in_epoch == 0 and started_at == 0:
                raise SpeechLMError("the batch sampler produced no batches: the training data "
                                    "is empty or every item was filtered out")
            self.epoch += 1
            self.batches_in_epoch = 0

    # -- parameters -------------------------------------------------------------

    def _apply_freezing(self):
        """Freeze `freeze` prefixes for good; return (trainable named params, initially frozen)."""
        cfg = self.config
        names = [name for name, _ in self.model.named_parameters()]
        for prefix in [*cfg.freeze, *cfg.freeze_initially]:
            if not any(_under(name, prefix) for name in names):
                tops = sorted({name.split(".")[0] for name in names})
                raise ConfigError(f"train.freeze/freeze_initially prefix '{prefix}' matches no "
                                  f"parameter of the model; top-level modules: {', '.join(tops)}")
        for name, param in self.model.named_parameters():
            if any(_under(name, prefix) for prefix in cfg.freeze):
                param.requires_grad_(False)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("no trainable parameters: every parameter is frozen")
        initially = [p for n, p in trainable
                     if any(_under(n, prefix) for prefix in cfg.freeze_initially)]
        return trainable, initially

    def _set_freeze_phase(self) -> None:
        """Freeze/unfreeze `freeze_initially` at the right update; rebuild DDP to match."""
        frozen = self.step < self.config.freeze_for_steps
        if frozen == self._frozen_now:
            return
        for param in self.initially_frozen:
            param.requires_grad_(not frozen)
        if self._frozen_now is not None:
            logger.info("step %d: unfroze %s", self.step, ", ".join(self.config.freeze_initially))
        self._frozen_now = frozen
        if self.dist.enabled and not self.sharded:
            # DDP buckets exactly the parameters that require grad when it is built, so
            # frozen ones cost no communication and need no find_unused_parameters.
            from torch.nn.parallel import DistributedDataParallel

            self.forward = self._loss_module
            gc.collect()  # drop the old wrapper and its gradient hooks before adding new ones
            self.forward = DistributedDataParallel(
                self._loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.config.find_unused_parameters)

    def _shard(self) -> list[tuple[str, nn.Parameter]]:
        """Shard the model with FSDP2 (train.sharding=fsdp); its parameters become shards, so
        the trainable list is taken again (the optimizer must see the shards)."""
        if not self.dist.enabled:
            raise ConfigError(
                "train.sharding=fsdp shards the model over torchrun processes, but this is a "
                "single process; run under `torchrun --nproc_per_node N` (N >= 2), or set "
                "train.sharding=none")
        blocks = fsdp.shard_model(self.model, self.amp_dtype)
        if self.dist.is_main:
            logger.info("FSDP: sharded %d transformer blocks and the root over %d processes",
                        blocks, self.dist.world_size)
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _gradient_sync(self, sync: bool):
        """Gradients are reduced across processes in this backward only if `sync`."""
        if self.sharded:
            return fsdp.gradient_sync(self.model, sync)
        return contextlib.nullcontext() if sync else self.forward.no_sync()

    def unsharded_model(self, build) -> nn.Module | None:
        """The trained model as a plain module on the main process, None on the others: the
        model itself, or under train.sharding=fsdp a new `build()` holding the gathered
        weights (collective: call it on every rank)."""
        if not self.sharded:
            return self.model if self.dist.is_main else None
        state = fsdp.full_model_state(self.model)
        if not self.dist.is_main:
            return None
        model = build()
        missing = model.load_state_dict(state, strict=False).missing_keys
        if missing and set(missing) - _tied_keys(model):
            raise SpeechLMError(f"the gathered weights lack {', '.join(missing[:5])} (parameters "
                                "frozen for the whole run are not gathered)")
        return model.to(self.device)

    def model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: state_dict minus parameters frozen for the whole run."""
        trainable = {id(p) for p in self.params}
        frozen = {name for name, p in self.model.named_parameters(remove_duplicate=False)
                  if id(p) not in trainable}
        return {k: v for k, v in self.model.state_dict().items() if k not in frozen}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # -- checkpoints ------------------------------------------------------------

    def save(self) -> Path:
        """Write output_dir/step_NNNNNN atomically (rank 0) and rotate old ones."""
        rng = distributed.all_gather_object(capture_rng_state(self.device))
        sampler_state = (self.batch_sampler.state_dict(num_consumed=self.batches_in_epoch)
                         if self._sampler_takes_count else self.batch_sampler.state_dict())
        state = {
            "format": 1, "step": self.step, "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch, "sampler": sampler_state,
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rng, "world_size": self.dist.world_size,
            "skipped_nonfinite": self.skipped_nonfinite,
            "nonfinite_streak": self._nonfinite_streak,
            "best_value": self.best_value, "best_step": self.best_step,
            "train_seconds": self.train_seconds,
            "param_groups": [group["param_names"] for group in self.optimizer.param_groups],
        }
        if self.mixture_schedule is not None:
            state["mixture"] = self.mixture_schedule.state_dict()
        path = self.output_dir / checkpoint.step_dir_name(self.step)
        distributed.barrier()
        if self.sharded:
            sharded_checkpoint.save_sharded(
                path, model=self.model, optimizer=self.optimizer, trainer_state=state,
                config=self.run_snapshot, hf_model=self.model if _is_transformers(self.model)
                else None)
            if self.dist.is_main:
                checkpoint.rotate_checkpoints(self.output_dir, self.config.keep_last)
        elif self.dist.is_main:
            checkpoint.save_checkpoint(path, model_state=self.model_state(), trainer_state=state,
                                       optimizer_state=self.optimizer.state_dict(),
                                       config=self.run_snapshot)
            checkpoint.rotate_checkpoints(self.output_dir, self.config.keep_last)
        distributed.barrier()
        self.last_checkpoint = path
        return path

    def will_resume(self) -> bool:
        """Whether `fit` continues from a checkpoint (per train.resume and the output dir)."""
        return self._resume_path() is not None

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume == "never":
            latest = checkpoint.latest_checkpoint(self.output_dir)
            if latest is not None:
                raise ConfigError(
                    f"{self.output_dir} already holds checkpoints (latest: {latest.name}); set "
                    "train.resume=auto to continue that run or choose a new train.output_dir")
            return None
        if resume == "auto":
            return checkpoint.latest_checkpoint(self.output_dir)
        path = Path(resume)
        if checkpoint.is_complete(path):
            return path
        latest = checkpoint.latest_checkpoint(path)
        if latest is None:
            raise ConfigError(f"train.resume={resume}: no complete checkpoint there (expected "
                              "a step_NNNNNN directory or a run directory holding them)")
        return latest

    def _resume(self) -> None:
        path = self._resume_path()
        if path is None:
            return
        state = self._load_sharded(path) if self.sharded else self._load_plain(path)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.batch_sampler.load_state_dict(state["sampler"])
            if self.mixture_schedule is not None:
                if "mixture" not in state:
                    raise ValueError("the checkpoint was written without the Skill-It mixture "
                                     "(data.mixture.strategy changed?); resume with the same "
                                     "data.mixture or start a new train.output_dir")
                self.mixture_schedule.load_state_dict(state["mixture"])
        except (ValueError, KeyError) as e:
            raise checkpoint.CheckpointMismatchError(f"{path}: {e}") from None
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self._nonfinite_streak = int(state["nonfinite_streak"])
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.train_seconds = float(state["train_seconds"]) if "train_seconds" in state \
            else _logged_train_seconds(self.output_dir, self.step)
        self.last_checkpoint = path
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank], self.device)
        else:
            logger.warning("checkpoint was written with %d processes, now %d: RNG streams are "
                           "reseeded, so the run is not bit-identical", len(rng),
                           self.dist.world_size)
            seed_everything(self.config.seed + self.dist.rank + self.step)
        logger.info("resumed from %s (step %d, epoch %d)", path, self.step, self.epoch)

    def _load_plain(self, path: Path) -> dict:
        """Load model and optimizer of a DDP/single-process checkpoint; its trainer state."""
        if checkpoint.is_sharded(path):
            raise checkpoint.CheckpointError(
                f"{path}: a sharded checkpoint (written with train.sharding=fsdp); resume it "
                "with train.sharding=fsdp under torchrun with as many processes as wrote it, or "
                f"gather its weights with `speechlm convert fsdp {path} OUT_DIR`")
        ckpt = checkpoint.load_checkpoint(path, map_location="cpu")
        state = ckpt.trainer_state
        self._check_resumable(path, state, ckpt.config, ckpt.optimizer_state is not None)
        checkpoint.check_weights_compatible(
            path, ckpt.model_state, {k: tuple(v.shape) for k, v in self.model_state().items()})
        self._check_same_optimizer(path, state)
        self.model.load_state_dict(ckpt.model_state, strict=False)
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        return state

    def _load_sharded(self, path: Path) -> dict:
        """Load the shards of a sharded checkpoint (collective); its trainer state."""
        state = sharded_checkpoint.read_trainer_state(path)
        sharded_checkpoint.check_resumable(path, state, self.dist.world_size)
        saved_config = json.loads((path / checkpoint.CONFIG_FILE).read_text(encoding="utf-8"))
        self._check_resumable(path, state, saved_config, True)
        self._check_same_optimizer(path, state)
        sharded_checkpoint.load_sharded(path, model=self.model, optimizer=self.optimizer)
        return state

    def _check_resumable(self, path: Path, state: dict, saved_config, has_optimizer: bool):
        """A step checkpoint (not weights only) of this recipe's model."""
        if "sampler" not in state or not has_optimizer:
            raise checkpoint.CheckpointError(
                f"{path}: holds model weights only (e.g. a best/ snapshot); resume from a "
                "step_NNNNNN checkpoint")
        checkpoint.check_config_compatible(path, saved_config, self.run_snapshot,
                                           self.identity_keys)

    def _check_same_optimizer(self, path: Path, state: dict) -> None:
        ours = [group["param_names"] for group in self.optimizer.param_groups]
        if state.get("param_groups") != ours:
            raise checkpoint.CheckpointMismatchError(
                f"{path}: the optimizer in the checkpoint trains other parameters than this run "
                "(train.freeze / freeze_initially changed?); point train.output_dir at a new "
                "directory")

    def _write_run_config(self) -> None:
        if dataclasses.is_dataclass(self._run_config):
            save_config(self._run_config, self.output_dir / "config.yaml")


# -- building blocks --------------------------------------------------------------


class _LossModule(nn.Module):
    """nn.Module whose forward is objective.loss(batch): what DDP wraps.

    per_sample: forward is objective.sample_losses(batch) instead, as a tuple
    (losses [B], coef [B] or None, metrics).
    """

    def __init__(self, objective, *, per_sample: bool = False):
        super().__init__()
        self.model = objective.model
        self.per_sample = per_sample
        self.__dict__["_objective"] = objective  # not a submodule (may itself be a Module)

    def forward(self, batch):
        if self.per_sample:
            out = self._objective.sample_losses(batch)
            if out is None:
                # No samples: an empty loss vector that still touches every parameter.
                return self._zero().reshape(1)[:0], None, {"empty_batch_frac": 1.0}
            if not (isinstance(out, SampleLosses) and out.losses.ndim == 1):
                raise TypeError("objective.sample_losses(batch) must return a SampleLosses "
                                "with 1-D losses, or None")
            return out.losses, out.coef, out.metrics or {}
        out = self._objective.loss(batch)
        if out is None:
            # Nothing to learn from (e.g. every item was skipped). A zero loss that touches
            # every trainable parameter keeps the DDP ranks in step.
            return self._zero(), {"empty_batch_frac": 1.0}
        return out

    def _zero(self) -> torch.Tensor:
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)


def build_optimizer(named_params: Sequence[tuple[str, nn.Parameter]], cfg: TrainConfig):
    """AdamW with two groups: weight decay for matrices, none for biases and norm weights."""
    decay = [(n, p) for n, p in named_params if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named_params if p.ndim < 2]
    groups = [
        {"params": [p for _, p in decay], "param_names": [n for n, _ in decay],
         "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state(device: torch.device) -> dict:
    """RNG states as plain containers and tensors (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _autocast_dtype(precision: str, device: torch.device):
    """Autocast dtype for `precision` on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            logger.warning("this GPU has no bf16 support: training in fp32 (use precision=fp16 "
                           "for mixed precision on it)")
            return None
        return torch.bfloat16
    if device.type != "cuda":
        logger.warning("precision=fp16 needs a CUDA device: training in fp32 on %s "
                       "(precision=bf16 works on CPU)", device)
        return None
    return torch.float16


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: _to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


def _is_transformers(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (its config can rebuild it)."""
    config = getattr(model, "config", None)
    return hasattr(config, "save_pretrained") and hasattr(model, "save_pretrained")


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys a transformers model ties to another weight (rebuilt by tying)."""
    tied = getattr(model, "_tied_weights_keys", None) or ()
    return set(tied)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _snapshot(run_config, train_config: TrainConfig) -> dict:
    if run_config is None:
        return {"train": config_to_dict(train_config)}
    if dataclasses.is_dataclass(run_config) or isinstance(run_config, dict):
        return config_to_dict(run_config)
    raise TypeError("run_config must be a dataclass or a dict")


def _check_batch_sampler(sampler, info: distributed.DistInfo) -> None:
    missing = [m for m in ("set_epoch", "state_dict", "load_state_dict", "__iter__")
               if not hasattr(sampler, m)]
    if missing:
        raise TypeError(f"the batch sampler lacks {', '.join(missing)}: the trainer needs a "
                        "resumable batch sampler (see speechlm.data.sampler)")
    ws = getattr(sampler, "world_size", info.world_size)
    rank = getattr(sampler, "rank", info.rank)
    if (ws, rank) != (info.world_size, info.rank):
        raise ConfigError(
            f"the batch sampler is sharded for rank {rank} of {ws} but this process is rank "
            f"{info.rank} of {info.world_size}; build it with rank=distributed.rank(), "
            "world_size=distributed.world_size() after distributed.init_distributed()")


# Re-exported for recipes that want to show the tri-stage phase lengths.
__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "build_optimizer",
           "capture_rng_state", "restore_rng_state", "seed_everything", "tri_stage_phases"]


def _logged_train_seconds(output_dir: Path, step: int) -> float:
    """Training time up to `step` from metrics.jsonl (each train record's sec_per_step times the
    steps since the one before): for checkpoints written before they recorded it."""
    total, previous = 0.0, 0
    if not (output_dir / METRICS_FILE).is_file():
        return total
    for record in read_metrics(output_dir, split="train"):
        if isinstance(record.get("step"), int) and record["step"] <= step \
                and record.get("sec_per_step") is not None:
            total += record["sec_per_step"] * (record["step"] - previous)
            previous = record["step"]
    return total


def _last_logged(output_dir: Path, split: str, step: int) -> dict[str, float]:
    """The metrics of the last `split` record at or before `step` (without its bookkeeping)."""
    if not (output_dir / METRICS_FILE).is_file():
        return {}
    records = [r for r in read_metrics(output_dir, split=split)
               if isinstance(r.get("step"), int) and r["step"] <= step]
    if not records:
        return {}
    return {k: v for k, v in records[-1].items() if k not in ("split", "step", "time")}
