"""Recipe `task: inserter`: InSerter, speech-text interleaved pre-training (arXiv 2503.02769).

    task: inserter
    model: {encoder_path: zoo:ctc_en, llm_path: zoo:llm_en_es, adapter: blsp, template: blsp}
    init_from: null                  # or a trained SpeechLM (e.g. zoo:blsp_en): BLSP + InSerter
    data:
      train: auto                    # build the samples per data.build, or an InSerter directory
      build: {corpus: embedded:en, voices: [en-us+m1, ...], rate: [150, 190], num_samples: 3000}
    loss: {kind: ce}                 # ce on the text after the speech; kd / ce+kd as in BLSP
    eval: {transfer: embedded:en/test, speech_instruct: embedded:en/test}

`run(config)`:
1. the InSerter samples (`speechlm build inserter`, resumable, cached by their
   settings when `data.train: auto`): text of the corpus cut into
   [text] <speech> text; the last `data.dev_items` samples are held out;
2. the frozen encoder's outputs go to the encoder-output cache (as in BLSP);
3. trains the adapter (+ LoRA / PLoRA when the model section asks) on plain
   interleaved text: BOS, the text before, the speech, then the text after,
   the loss on the text after (template "interleaved"); every evaluation
   reports how closely the LLM continues the speech as it continues the
   spoken words in text (the BLSP alignment metrics, on held-out samples);
4. saves `output_dir/final`: a SpeechLM that answers in `model.template`
   (the instruction format the LLM was tuned on);
5. evaluates it, the untrained adapter, `eval.compare` checkpoints and the
   cascade on the instructions the LLM learned in text: with the instruction
   in text and the input spoken (the transfer table), and with the whole
   instruction spoken (`recipes.speech_instruct`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..models.speech_lm import SpeechLMConfig
from ..training.trainer import TrainConfig
from .blsp import LossConfig

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
TRAIN_TEMPLATE = "interleaved"


@dataclass
class BuildConfig:
    """`speechlm build inserter` settings, used when `data.train` is "auto"."""

    corpus: str = "embedded:en"
    voices: list[str] = field(default_factory=lambda: [
        "en-us+m1", "en-us+f1", "en-us+m3", "en-us+f3", "en+m2", "en+f2"])
    rate: list[int] | None = field(default_factory=lambda: [140, 200])
    pitch: list[int] | None = field(default_factory=lambda: [35, 65])
    num_samples: int | None = 3000
    speech_words: list[int] = field(default_factory=lambda: [3, 12])
    min_after_words: int = 2
    max_after_words: int = 40
    text_first_share: float = 0.25
    seed: int = 0
    jobs: int = 1

    def settings(self):
        from ..pipelines.inserter import PlanSettings

        return PlanSettings(num_samples=self.num_samples, speech_words=tuple(self.speech_words),
                            min_after_words=self.min_after_words,
                            max_after_words=self.max_after_words,
                            text_first_share=self.text_first_share, seed=self.seed)


@dataclass
class DataConfig:
    train: str = "auto"                       # "auto" (built per `build`) or an InSerter dir
    build: BuildConfig = field(default_factory=BuildConfig)
    dev_items: int = 64                       # the last N samples: held out for the metric
    max_batch_duration: float = 60.0
    max_batch_size: int | None = None
    num_buckets: int = 10
    encoder_cache: str | None = "auto"
    noise_snr_db: float | None = None         # BLSP's augmentation; turns the cache off

    def __post_init__(self):
        if self.dev_items < 0:
            raise ConfigError("data.dev_items must be >= 0")


@dataclass
class EvalConfig:
    generate_items: int = 16
    max_new_tokens: int = 48
    transfer: str | None = "embedded:en/test"  # text instruction, spoken input
    transfer_tasks: list[str] = field(default_factory=lambda: ["repeat", "translate_es"])
    transfer_items: int = 100
    speech_instruct: str | None = "embedded:en/test"  # the whole instruction spoken
    speech_instruct_tasks: list[str] = field(default_factory=lambda: [
        "repeat", "translate_es", "last_word", "mentions_god"])
    speech_instruct_items: int = 50           # per task
    compare: dict[str, str] = field(default_factory=dict)  # name -> SpeechLM dir / zoo:NAME
    batch_size: int = 32


def _default_model() -> SpeechLMConfig:
    return SpeechLMConfig(encoder_path="zoo:ctc_en", llm_path="zoo:llm_en_es", adapter="blsp",
                          template="blsp")


@dataclass
class Config:
    task: str = "inserter"
    threads: int | None = None
    model: SpeechLMConfig = field(default_factory=_default_model)
    init_from: str | None = None              # a trained SpeechLM whose weights start this run
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-3, warmup_steps=50, weight_decay=0.05, save_every=None, best_metric="align_kl"))
    eval: EvalConfig = field(default_factory=EvalConfig)


# -- the parts --------------------------------------------------------------------------------


def samples_dir(cfg: Config, say, *, build: bool = True) -> Path:
    """The InSerter samples of this run: built (or resumed) in the cache when "auto" (only
    where `build`, i.e. on the main process; the others read what it built)."""
    from ..paths import cache_dir
    from ..pipelines.inserter import build_inserter, sample_shards

    if cfg.data.train != "auto":
        path = Path(cfg.data.train)
        sample_shards(path)  # a clear error when it holds none
        return path
    b = cfg.data.build
    key = hashlib.sha256(json.dumps(asdict(b), sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "inserter" / f"{b.corpus.replace(':', '_').replace('/', '_')}-{key}"
    if not build:
        return out
    summary = build_inserter(b.corpus, out, voices=b.voices, rate=_range(b.rate),
                             pitch=_range(b.pitch), settings=b.settings(), jobs=b.jobs,
                             progress=cfg.train.progress)
    say(f"InSerter samples ({out}):\n{summary.summary()}")
    return out


def _range(value):
    return tuple(value) if isinstance(value, list) else value


# -- the runner -------------------------------------------------------------------------------


def run(config: Config) -> dict:
    """Run InSerter per `config` (see the module doc); returns the results dict."""
    from ..jsonl import atomic_write, write_jsonl
    from ..pipelines.inserter import read_samples
    from ..pretrained.resolve import resolve_model_dir
    from ..training import distributed
    from ..training.objectives.blsp import BlspObjective
    from . import start_run
    from .blsp import (
        _jsonable,
        _manifest_records,
        build_model,
        cached_training_data,
        fit,
        load_trained_weights,
        resolve_models,
    )
    from .blsp_eval import alignment_metrics
    from .sources import resolve_manifest
    from .speech_instruct import evaluate_systems, format_results, spoken_instructions

    dist, out, say = start_run(config.train, config.threads)
    started = time.perf_counter()
    cfg = resolve_models(config, say)

    # 1. samples
    build_start = time.perf_counter()
    samples = samples_dir(cfg, say, build=dist.is_main)
    distributed.barrier()
    records = read_samples(samples)
    for r in records:
        r["instruction"] = r["before"]  # the text before the speech, per item
    n_dev = min(cfg.data.dev_items, len(records) // 10)
    train_records, dev_records = records[:len(records) - n_dev], records[len(records) - n_dev:]
    build_seconds = time.perf_counter() - build_start
    transfer_records = _manifest_records(resolve_manifest(cfg.eval.transfer),
                                         cfg.eval.transfer_items) if cfg.eval.transfer else []
    instruct_records = spoken_instructions(cfg.eval.speech_instruct, cfg.eval.speech_instruct_tasks,
                                           cfg.eval.speech_instruct_items,
                                           progress=cfg.train.progress, say=say) \
        if cfg.eval.speech_instruct and dist.is_main else []

    # 2. model and cache
    model = build_model(cfg, seed=cfg.train.seed)
    if cfg.init_from:
        load_trained_weights(model, cfg.init_from, say)
    say(f"SpeechLM: encoder {model.encoder.kind}, LLM {cfg.model.llm_path}; trainable "
        f"{model.num_parameters(True) / 1e6:.3f}M of {model.num_parameters() / 1e6:.2f}M "
        f"parameters; {len(train_records)} train / {len(dev_records)} dev samples")
    dataset, collate, durations, source, cache_seconds = cached_training_data(
        cfg, model, train_records, [dev_records, transfer_records, instruct_records], say)

    # 3. training
    def evaluate(m) -> dict:
        if not dev_records:
            return {}
        with m.with_template(TRAIN_TEMPLATE):
            return alignment_metrics(m, source, dev_records, "",
                                     generate_items=cfg.eval.generate_items,
                                     max_new_tokens=cfg.eval.max_new_tokens,
                                     batch_size=cfg.eval.batch_size)

    objective = BlspObjective(model, loss=cfg.loss.kind, temperature=cfg.loss.temperature,
                              ce_weight=cfg.loss.ce_weight, kd_weight=cfg.loss.kd_weight,
                              count_weight=cfg.loss.count_weight,
                              embed_weight=cfg.loss.embed_weight,
                              embed_loss=cfg.loss.embed_loss,
                              ctc_weight=cfg.loss.ctc_weight, template=TRAIN_TEMPLATE,
                              evaluate_fn=evaluate)
    result, train_summary = fit(cfg, objective, dataset, collate, durations, dist,
                                ("model", "loss", "init_from"), say)

    results: dict = {}
    if dist.is_main:
        # 4. save
        final_dir = model.save_pretrained(out / FINAL_DIR)
        # 5. evaluation
        systems = {"untrained adapter": build_model(cfg, seed=cfg.train.seed).eval()}
        for name, spec in cfg.eval.compare.items():
            from ..models.speech_lm import SpeechLM

            systems[name] = SpeechLM.from_pretrained(resolve_model_dir(spec, expect=None, say=say)).eval()
        systems[f"InSerter ({cfg.loss.kind})" if not cfg.init_from
                else f"{cfg.init_from} + InSerter"] = model.eval()
        rows: list[dict] = []
        tables = evaluate_systems(systems, source, transfer_records, cfg.eval.transfer_tasks,
                                  instruct_records, batch_size=cfg.eval.batch_size,
                                  hyps_out=rows, say=say)
        write_jsonl(out / "eval_hyps.jsonl", rows)
        results = {
            **tables,
            "alignment": result.eval_metrics,
            "train": {**train_summary, "build_seconds": build_seconds,
                      "cache_seconds": cache_seconds,
                      "wall_seconds": time.perf_counter() - started},
            "data": {"samples": str(samples), "train_items": len(train_records),
                     "dev_items": len(dev_records), "transfer_items": len(transfer_records),
                     "speech_instruct_items": len(instruct_records),
                     "train_audio_hours": sum(durations) / 3600},
            "final_dir": str(final_dir),
        }
        with atomic_write(out / RESULTS_FILE) as f:
            json.dump(results, f, indent=2, ensure_ascii=False, default=_jsonable)
        say(format_results(results))
        say(f"trained {result.step} steps in {train_summary['train_seconds']:.0f} s; saved to "
            f"{final_dir}")
    distributed.barrier()
    return results
