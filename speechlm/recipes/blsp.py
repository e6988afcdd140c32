"""Recipe `task: blsp`: BLSP behaviour alignment, end to end (arXiv 2309.00916, 2405.19041).

    task: blsp
    model: {encoder_path: zoo:ctc_en, llm_path: zoo:llm_en_es, adapter: blsp, template: blsp,
            instruction: "Continue the following text ..."}       # SpeechLMConfig fields
    data: {train: embedded:en/train, dev: embedded:en/dev, max_batch_duration: 60}
    loss: {kind: ce}                                              # ce | kd | ce+kd
    eval: {transfer: embedded:en/test, transfer_tasks: [repeat, translate_es]}
    train: {max_steps: 500, lr: 1e-3, ...}

`run(config)`:
1. stage 1, unless `data.train_continuations` names a file: the LLM writes a
   continuation of every train (and dev) transcript into
   `output_dir/continuations/` (`speechlm build continuations`, resumable);
   a given file is checked against the manifest it claims to continue;
2. the frozen encoder's outputs for every utterance go to the encoder-output
   cache (`data.encoder_cache`, keyed by audio and encoder identity), so the
   training steps never run the encoder; `data.noise_snr_db` (augmentation)
   changes the audio at every step and so turns the cache off;
3. trains the adapter (+ LoRA / PLoRA when the model section asks) with the
   shared Trainer on duration-bucketed batches; every evaluation reports the
   behaviour-alignment metrics on dev (`recipes.blsp_eval`);
4. saves `output_dir/final` (SpeechLM.save_pretrained: trained weights only);
5. the zero-shot transfer table on held-out speech: the trained adapter, the
   untrained one and the text cascade (results.json, transfer_hyps.jsonl).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ConfigError
from ..models.sparse_lowrank import (
    SparseLowRankConfig,
    check_not_sharded,
    prepare_for_training,
    to_plain_dense,
)
from ..models.speech_lm import SpeechLMConfig
from ..training.trainer import TrainConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
# what a shipped zoo build carries (speechlm.zoo): the trained weights and their config,
# whose base models are names (models:..., zoo:...) that resolve on any machine
SHIPPED_FILES = ("final/model.safetensors", "final/speechlm_config.json")
ADAPTER_TARGETS = [r".+"]  # sparse_lowrank's default on the adapter: every linear layer


@dataclass
class ContinuationConfig:
    """Stage-1 settings, used when the runner writes the continuations itself."""

    max_new_tokens: int = 64
    max_prompt_tokens: int = 192
    batch_size: int = 64
    precision: str = "fp32"                   # "bf16": autocast (greedy outputs may differ)

    def __post_init__(self):
        from ..pipelines.continuations import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ConfigError(f"continuations.precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {self.precision!r}")


@dataclass
class DataConfig:
    train: str = "embedded:en/train"          # ASR manifest (path or embedded:LANG/SPLIT)
    dev: str | None = "embedded:en/dev"       # held-out speech for the alignment metric
    # stage-1 output (a file, or zoo:NAME for a BLSP zoo member's own); None: written here
    train_continuations: str | None = None
    dev_continuations: str | None = None
    max_train_items: int | None = None        # the first N train records (None: all)
    # N more verses of the training books spoken by the training voices (built into the cache
    # once, continued in stage 1 into continuations/more_train.jsonl) trained on beside `train`;
    # needs `train` to be an embedded split (embedded:LANG/train)
    more_speech: int = 0
    max_batch_duration: float = 60.0          # seconds of padded audio per batch
    max_batch_size: int | None = None
    num_buckets: int = 10
    encoder_cache: str | None = "auto"        # "auto" (the speechlm cache), a dir, or null
    noise_snr_db: float | None = None         # additive-noise augmentation (disables the cache)

    def __post_init__(self):
        if self.max_batch_duration <= 0:
            raise ConfigError("data.max_batch_duration must be > 0 (seconds)")
        if self.max_train_items is not None and self.max_train_items < 1:
            raise ConfigError("data.max_train_items must be >= 1 or null")
        if self.more_speech < 0:
            raise ConfigError(f"data.more_speech must be >= 0 (verses), got {self.more_speech}")
        if self.more_speech and not str(self.train).startswith("embedded:"):
            raise ConfigError(f"data.more_speech speaks more verses of the embedded corpus, so "
                              f"data.train must be an embedded split such as embedded:en/train, "
                              f"not {self.train!r}; add your own speech to data.train instead")


@dataclass
class LossConfig:
    kind: str = "ce"                          # ce | kd | ce+kd
    temperature: float = 2.0                  # KD temperature (BLSP-KD: 2)
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    count_weight: float = 1.0                 # CIF adapter: L1 on its token count
    embed_weight: float = 0.0                 # CIF adapter: pull each output to its token's embedding
    embed_loss: str = "mse+ce"                # ... by mse, ce (cosine, whole vocabulary) or both
    ctc_weight: float = 0.0                   # CTC of the transcript's tokens over the adapter's frames

    def __post_init__(self):
        from ..training.objectives.blsp import LOSSES

        if self.kind not in LOSSES:
            raise ConfigError(f"loss.kind must be one of {', '.join(LOSSES)}, got {self.kind!r}")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class EvalConfig:
    dev_items: int = 64                       # alignment metric: teacher-forced items
    generate_items: int = 16                  # ... and items whose continuation is generated
    transfer: str | None = "embedded:en/test" # held-out speech for the transfer table
    transfer_tasks: list[str] = field(default_factory=lambda: ["repeat", "translate_es"])
    transfer_items: int = 100
    batch_size: int = 32
    # the transfer curve: these tasks asked of the first `curve_items` dev utterances at every
    # evaluation (dev_<task>_<metric> in the metrics log), so a run shows what each step buys
    curve_tasks: list[str] = field(default_factory=list)
    curve_items: int = 32

    def __post_init__(self):
        from ..data.instructions import TASKS

        for name in ("transfer_tasks", "curve_tasks"):
            unknown = [t for t in getattr(self, name) if t not in TASKS]
            if unknown:
                raise ConfigError(f"eval.{name}: unknown task(s) {', '.join(unknown)}; known: "
                                  f"{', '.join(TASKS)}")


def _default_model() -> SpeechLMConfig:
    from ..data.instructions import CONTINUE_INSTRUCTION

    return SpeechLMConfig(encoder_path="zoo:ctc_en", llm_path="zoo:llm_en_es", adapter="blsp",
                          template="blsp", instruction=CONTINUE_INSTRUCTION)


@dataclass
class Config:
    task: str = "blsp"
    threads: int | None = None
    model: SpeechLMConfig = field(default_factory=_default_model)
    init_from: str | None = None              # a trained SpeechLM whose weights start this run
    # SLTrain / SPDF on the adapter's linear layers while training (default: every one of
    # them); final/ holds the plain dense adapter
    sparse_lowrank: SparseLowRankConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    continuations: ContinuationConfig = field(default_factory=ContinuationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=50, weight_decay=0.05, save_every=None, best_metric="align_kl"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_not_sharded(self.sparse_lowrank, self.train.sharding, "sparse_lowrank")


# -- the parts --------------------------------------------------------------------------------


def _continuations(spec: str | None, manifest: Path, out: Path, cfg: Config, llm_dir: str,
                   say) -> Path:
    """The stage-1 file for `manifest`: checked when given, else written (or resumed) now."""
    from ..pipelines.continuations import build_continuations, check_continuations
    from ..pretrained.resolve import ZOO_PREFIX

    if spec is not None and spec.startswith(ZOO_PREFIX):
        spec = _zoo_continuations(spec[len(ZOO_PREFIX):], out.name, say)
    if spec is not None:
        path = Path(spec)
        check_continuations(path, manifest=manifest)
        return path
    c = cfg.continuations
    summary = build_continuations(llm_dir, manifest, out, instruction=cfg.model.instruction,
                                  template=cfg.model.template, max_new_tokens=c.max_new_tokens,
                                  max_prompt_tokens=c.max_prompt_tokens, batch_size=c.batch_size,
                                  precision=c.precision,
                                  device=cfg.train.device, progress=cfg.train.progress, say=say)
    say(f"stage 1 ({manifest.name} -> {out}): {summary.summary()}")
    return out


def _zoo_continuations(member_name: str, name: str, say) -> str | None:
    """`zoo:NAME`: that BLSP zoo member's own stage-1 file of the same split (`name`:
    train.jsonl or dev.jsonl), so a run that continues a member's training reads the
    continuations it trained on; None (write them here) when the member has none, as a
    build installed from the package's shipped copy does not."""
    from .. import zoo

    path = zoo.ensure(member_name, say=say).run_dir / "continuations" / name
    if path.is_file():
        return str(path)
    say(f"zoo:{member_name} has no stage-1 file {name} (a shipped build carries none): "
        "writing it here")
    return None


def more_speech_manifest(data: DataConfig, progress: bool) -> Path:
    """The manifest of data.more_speech more training-book verses in data.train's language."""
    from ..pipelines.embedded_corpus import build_more_training_speech
    from .sources import PREFIX

    lang = str(data.train)[len(PREFIX):].partition("/")[0]
    try:
        return build_more_training_speech(lang, data.more_speech, progress=progress)
    except ValueError as exc:
        raise ConfigError(f"data.more_speech: {exc}") from exc


def first_records(manifest: Path, n: int, out_dir: Path) -> Path:
    """A manifest of the first `n` records of `manifest` (audio paths made absolute), so
    stage 1 continues only the transcripts training will use."""
    from ..data.manifest import AUDIO_PATH_KEY, read_manifest, write_manifest

    records = read_manifest(manifest)
    if n >= len(records):
        return manifest
    path = out_dir / f"{manifest.parent.name}-first{n}.jsonl"
    if not path.is_file():
        write_manifest(path, [{**r, "audio": r[AUDIO_PATH_KEY]} for r in records[:n]])
    return path


def _manifest_records(path: Path, limit: int | None = None) -> list[dict]:
    """A manifest's records with absolute audio paths."""
    from ..data.manifest import AUDIO_PATH_KEY, read_manifest

    records = read_manifest(path)[:limit] if limit else read_manifest(path)
    for record in records:
        record["audio"] = record.pop(AUDIO_PATH_KEY)
    return records


class NoisyAudioDataset:
    """An AudioDataset whose items get white noise at `snr_db`. The noise of an item is drawn
    from (seed, index), so a resumed run adds exactly the noise an uninterrupted one would."""

    def __init__(self, dataset, snr_db: float, seed: int = 0):
        self.dataset, self.snr_db, self.seed = dataset, float(snr_db), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        item = self.dataset[index]
        if isinstance(item, dict):
            audio = item["audio"]
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            power = audio.pow(2).mean().clamp_min(1e-10)
            noise = torch.randn(audio.shape, generator=generator)
            item = {**item, "audio": audio + noise * (power / 10 ** (self.snr_db / 10)).sqrt()}
        return item


def _encoder_dir(model) -> Path:
    from ..pretrained.resolve import resolve_model_dir

    return resolve_model_dir(model.config.encoder_path)


def build_cache(cfg: Config, model, record_sets: list[list[dict]], say):
    """The encoder-output cache filled for every record (None when turned off)."""
    from ..paths import cache_dir
    from ..pipelines.encoder_cache import EncoderCache

    if cfg.data.encoder_cache is None:
        return None
    if cfg.data.noise_snr_db is not None:
        say("data.noise_snr_db changes the audio at every step, so cached encoder outputs "
            "would be stale: the encoder-output cache is off for this run (set "
            "data.noise_snr_db: null to use it)")
        return None
    root = cache_dir() / "encoder_outputs" if cfg.data.encoder_cache == "auto" \
        else Path(cfg.data.encoder_cache)
    cache = EncoderCache.for_encoder(root, model.encoder, _encoder_dir(model))
    records = [r for records in record_sets for r in records]
    summary = cache.fill(model.encoder, records, progress=cfg.train.progress)
    say(f"encoder-output cache {cache.root}: {summary.summary()}")
    return cache


def train_dataset(cfg: Config, records: list[dict], cache):
    """(dataset, collate_fn, durations) for the train records."""
    if cache is not None:
        from ..pipelines.encoder_cache import CachedEncoderDataset, collate_encoder_batch

        dataset = CachedEncoderDataset(records, cache)
        return dataset, collate_encoder_batch, dataset.durations
    from ..data.collate import AudioCollator
    from ..data.dataset import AudioDataset

    dataset = AudioDataset(records)
    durations = dataset.durations
    if cfg.data.noise_snr_db is not None:
        dataset = NoisyAudioDataset(dataset, cfg.data.noise_snr_db, cfg.train.seed)
    return dataset, AudioCollator(), durations


def build_model(cfg: Config, *, seed: int):
    """A fresh SpeechLM per `cfg.model` (the adapter initialised from `seed`)."""
    from ..models.speech_lm import SpeechLM
    from ..training.trainer import seed_everything

    seed_everything(seed)
    return SpeechLM.build(cfg.model)


def load_trained_weights(model, spec: str, say) -> None:
    """Start `model` from the trained weights of a SpeechLM checkpoint (same architecture)."""
    from safetensors.torch import load_file

    from ..models.speech_lm import WEIGHTS_FILE
    from ..pretrained.resolve import resolve_model_dir

    path = resolve_model_dir(spec, expect=None, say=say)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ConfigError(f"init_from: {path} is not a SpeechLM checkpoint (no {WEIGHTS_FILE}); "
                          "give the `final` directory a BLSP or InSerter run saved")
    state = load_file(weights)
    trainable = model.trainable_state_dict()
    missing = sorted(set(trainable) - set(state))
    shapes = [k for k in trainable if k in state and state[k].shape != trainable[k].shape]
    if missing or shapes:
        bad = (missing or shapes)[0]
        raise ConfigError(f"init_from: {path} does not fit this model ({len(missing)} trained "
                          f"weights missing, {len(shapes)} of another shape, e.g. {bad}); its "
                          "model section (adapter, options, LoRA) must match this recipe's")
    model.load_state_dict({k: state[k] for k in trainable}, strict=False)
    say(f"init_from {path}: {len(trainable)} trained tensors loaded")


def _bound_systems(cfg, trained, untrained, source, records):
    """The transfer-table systems: name -> respond(instruction, max_new_tokens)."""
    from .blsp_eval import cascade_texts, generate_from_speech, generate_from_text

    bs = cfg.eval.batch_size

    def speech(model):
        return lambda ins, n: generate_from_speech(model, source, records, ins,
                                                   max_new_tokens=n, batch_size=bs)

    def text(transcripts):
        return lambda ins, n: generate_from_text(trained, transcripts, ins, max_new_tokens=n,
                                                 batch_size=bs)

    systems = {"untrained adapter": speech(untrained), f"BLSP ({cfg.loss.kind})": speech(trained)}
    for name, texts in cascade_texts(trained, records, device=cfg.train.device).items():
        systems[name] = text(texts)
    return systems


def cached_training_data(cfg, model, train_records, other_records, say) -> tuple:
    """(dataset, collate_fn, durations, SpeechSource, cache seconds): the encoder-output cache
    filled for the train records and every evaluation set, and the train set read from it."""
    from .blsp_eval import SpeechSource

    start = time.perf_counter()
    cache = build_cache(cfg, model, [train_records, *other_records], say)
    seconds = time.perf_counter() - start
    dataset, collate, durations = train_dataset(cfg, train_records, cache)
    return dataset, collate, durations, SpeechSource(cache), seconds


def resolve_models(cfg, say):
    """`cfg` with its zoo:NAME encoder and LLM resolved to directories (trained if needed)."""
    from ..pretrained.resolve import resolve_model_dir

    return replace(cfg, model=replace(
        cfg.model, encoder_path=str(resolve_model_dir(cfg.model.encoder_path, say=say)),
        llm_path=str(resolve_model_dir(cfg.model.llm_path, say=say))))


def fit(cfg, objective, dataset, collate, durations, dist, identity_keys, say=logger.info,
        step_hooks=()) -> tuple:
    """Train `objective` on duration-bucketed batches with the shared Trainer (resumable);
    returns (TrainResult, the "train" section of results.json without wall time)."""
    from ..data.sampler import DurationBucketSampler
    from ..training.trainer import Trainer

    sampler = DurationBucketSampler(durations, max_batch_duration=cfg.data.max_batch_duration,
                                    max_batch_size=cfg.data.max_batch_size,
                                    num_buckets=cfg.data.num_buckets, shuffle=True,
                                    seed=cfg.train.seed, rank=dist.rank,
                                    world_size=dist.world_size)
    trainer = Trainer(cfg.train, objective, dataset, sampler, collate_fn=collate, run_config=cfg,
                      identity_keys=identity_keys, step_hooks=step_hooks)
    faster = objective.model.speed_up_frozen_llm(trainer.amp_dtype, trainer.device.type)
    if faster:
        say(f"frozen LLM: {', '.join(faster)} (training speed)")
    result = trainer.fit()
    # what is evaluated and saved from here on is the model as users load it
    objective.model.restore_frozen_llm()
    # the time of every session of the run (a resumed run counts from its checkpoint)
    seconds = result.train_seconds
    return result, {"steps": result.step, "final_train_loss": result.train_metrics.get("loss"),
                    "train_seconds": seconds,
                    "steps_per_second": result.step / max(seconds, 1e-9)}


# -- the runner -------------------------------------------------------------------------------


def run(config: Config) -> dict:
    """Run BLSP per `config` (see the module doc); returns the results dict."""

    from ..jsonl import atomic_write, write_jsonl
    from ..pipelines.continuations import read_continuations
    from ..training import distributed
    from ..training.objectives.blsp import BlspObjective
    from . import start_run
    from .blsp_eval import alignment_metrics, transfer_scores
    from .sources import resolve_manifest

    dist, out, say = start_run(config.train, config.threads)
    started = time.perf_counter()
    cfg = resolve_models(config, say)

    # 1. stage 1
    stage1 = time.perf_counter()
    train_manifest = resolve_manifest(cfg.data.train, progress=cfg.train.progress)
    if cfg.data.max_train_items is not None and cfg.data.train_continuations is None:
        train_manifest = first_records(train_manifest, cfg.data.max_train_items,
                                       out / "continuations")
    train_file = _continuations(cfg.data.train_continuations, train_manifest,
                                out / "continuations" / "train.jsonl", cfg, cfg.model.llm_path,
                                say)
    dev_records: list[dict] = []
    if cfg.data.dev is not None:
        dev_manifest = resolve_manifest(cfg.data.dev, progress=cfg.train.progress)
        dev_file = _continuations(cfg.data.dev_continuations, dev_manifest,
                                  out / "continuations" / "dev.jsonl", cfg, cfg.model.llm_path,
                                  say)
        dev_records = read_continuations(dev_file, limit=cfg.eval.dev_items)
    more_file = None
    if cfg.data.more_speech:
        more_file = _continuations(None, more_speech_manifest(cfg.data, cfg.train.progress),
                                   out / "continuations" / "more_train.jsonl", cfg,
                                   cfg.model.llm_path, say)
    stage1_seconds = time.perf_counter() - stage1
    train_records = read_continuations(train_file, limit=cfg.data.max_train_items)
    if more_file is not None:
        train_records += read_continuations(more_file)
    transfer_records: list[dict] = []
    if cfg.eval.transfer is not None:
        transfer_records = _manifest_records(resolve_manifest(cfg.eval.transfer),
                                             cfg.eval.transfer_items)

    # 2. model and cache
    model = build_model(cfg, seed=cfg.train.seed)
    if cfg.init_from:
        load_trained_weights(model, cfg.init_from, say)
    say(f"SpeechLM: encoder {model.encoder.kind} ({cfg.model.encoder_path}), LLM "
        f"{cfg.model.llm_path}; trainable {model.num_parameters(True) / 1e6:.3f}M of "
        f"{model.num_parameters() / 1e6:.2f}M parameters")
    step_hooks, sparse_report = ([], None) if cfg.sparse_lowrank is None else prepare_for_training(
        model.adapter, cfg.sparse_lowrank, say, default_targets=ADAPTER_TARGETS)
    dataset, collate, durations, source, cache_seconds = cached_training_data(
        cfg, model, train_records, [dev_records, transfer_records], say)

    # 3. training
    def evaluate(m) -> dict:
        if not dev_records:
            return {}
        metrics = alignment_metrics(m, source, dev_records, cfg.model.instruction,
                                    generate_items=cfg.eval.generate_items,
                                    max_new_tokens=cfg.continuations.max_new_tokens,
                                    batch_size=cfg.eval.batch_size)
        if cfg.eval.curve_tasks:
            metrics.update(transfer_curve(m, source, dev_records[: cfg.eval.curve_items],
                                          cfg.eval.curve_tasks, cfg.eval.batch_size))
        return metrics

    objective = BlspObjective(model, loss=cfg.loss.kind, temperature=cfg.loss.temperature,
                              ce_weight=cfg.loss.ce_weight, kd_weight=cfg.loss.kd_weight,
                              count_weight=cfg.loss.count_weight,
                              embed_weight=cfg.loss.embed_weight,
                              embed_loss=cfg.loss.embed_loss,
                              ctc_weight=cfg.loss.ctc_weight, evaluate_fn=evaluate)
    result, train_summary = fit(cfg, objective, dataset, collate, durations, dist,
                                ("model", "loss"), say, step_hooks)
    to_plain_dense(model.adapter)  # the adapter's plain nn.Linear layers, as saved and loaded

    results: dict = {}
    if dist.is_main:
        # 4. save, naming the base models portably (models:NAME, zoo:NAME stay names)
        from ..pretrained.resolve import portable_name

        model.config = replace(
            model.config,
            encoder_path=portable_name(config.model.encoder_path, cfg.model.encoder_path),
            llm_path=portable_name(config.model.llm_path, cfg.model.llm_path))
        final_dir = model.save_pretrained(out / FINAL_DIR)
        # 5. transfer table
        table, rows = {}, []
        if transfer_records:
            untrained = build_model(cfg, seed=cfg.train.seed)  # the adapter before training
            model.eval()
            systems = _bound_systems(cfg, model, untrained.eval(), source, transfer_records)
            say(f"transfer table: {len(systems)} systems x {len(cfg.eval.transfer_tasks)} "
                f"tasks on {len(transfer_records)} held-out utterances")
            table = transfer_scores(systems, transfer_records, cfg.eval.transfer_tasks,
                                    hyps_out=rows, say=say)
            write_jsonl(out / "transfer_hyps.jsonl", rows)
        results = {
            "transfer": table,
            "alignment": result.eval_metrics,
            "train": {**train_summary, "stage1_seconds": stage1_seconds,
                      "cache_seconds": cache_seconds,
                      "wall_seconds": time.perf_counter() - started},
            "data": {"train_items": len(train_records), "dev_items": len(dev_records),
                     "transfer_items": len(transfer_records),
                     "train_audio_hours": sum(durations) / 3600},
            "final_dir": str(final_dir),
            **({"sparse_lowrank": sparse_report} if sparse_report else {}),
        }
        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=2, ensure_ascii=False, default=_jsonable)
        if table:
            say(format_results(results))
        say(f"trained {result.step} steps in {train_summary['train_seconds']:.0f} s; adapter "
            f"saved to {final_dir}")
    distributed.barrier()
    return results


def transfer_curve(model, source, records: list[dict], tasks: list[str], batch_size: int
                   ) -> dict[str, float]:
    """{dev_<task>_<metric>: value}: the speech path's headline scores on `records`."""
    from ..data.instructions import TASKS
    from .blsp_eval import generate_from_speech, transfer_scores

    def speech(instruction: str, max_new_tokens: int) -> list[str]:
        return generate_from_speech(model, source, records, instruction,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)

    table = transfer_scores({"speech": speech}, records, tasks)["speech"]
    headline = {"wer": ("wer", "cer"), "bleu": ("bleu", "chrf"), "accuracy": ("accuracy",)}
    return {f"dev_{task}_{metric}": float(table[task][metric]) for task in tasks
            for metric in headline[TASKS[task].metric] + ("balanced_accuracy",)
            if metric in table[task]}


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def format_results(results: dict) -> str:
    """The transfer table plus the final alignment metrics, as text."""
    from .blsp_eval import format_transfer_table

    lines = [f"zero-shot transfer on {results['data']['transfer_items']} held-out utterances "
             "(WER/CER %, BLEU/chrF):", format_transfer_table(results["transfer"])]
    align = results.get("alignment") or {}
    if align:
        lines.append("behaviour alignment on dev (speech vs transcript): " + ", ".join(
            f"{k.removeprefix('align_')} {v:.3g}" for k, v in align.items()))
    return "\n".join(lines)
