"""Recipe `task: speech_tokenizer`: a supervised VQ speech tokenizer (GLM-4-Voice style).

A Whisper encoder (a local checkpoint, e.g. whisper-large-v3, or a small one
from a config) gets an average pool and a VQ bottleneck after layer
`model.vq_layer`, and learns, through the layers above, to transcribe with a
character CTC head plus the VQ commitment loss; the codebook follows the
encoder by EMA, starts from k-means and restarts dead codes
(speechlm.models.speech_tokenizer, speechlm.models.vq).

    task: speech_tokenizer
    model: {init: /models/whisper-large-v3, vq_layer: 16, pool: 4, num_codes: 16384}
    data:
      train: [{manifest: data/train.jsonl, lang: en}]
      dev: data/dev.jsonl
    train: {max_steps: 100000, lr: 1.0e-5, ...}

`run(config)`:
1. character vocabulary and data exactly as `task: ctc` (reports of rare and
   unseen characters, skipped items), audio shorter than one unit skipped;
2. trains with the shared Trainer (checkpoints, exact resume, DDP: the
   codebook stays identical on every rank); dev CER through the codes and the
   dev units' codebook usage at each evaluation;
3. saves `output_dir/final/` (speech_tokenizer.json with the identity,
   config.json, model.safetensors, vocab.json);
4. reloads it and, on dev and test, turns audio into units (`encode`, the
   layers above the VQ dropped) and units back into text with the ASR head:
   WER/CER from units alone, and codebook usage (perplexity, used/dead codes,
   bits per second); writes `results.json` and prints a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.sparse_lowrank import (
    SparseLowRankConfig,
    check_not_sharded,
    prepare_for_training,
    to_plain_dense,
)
from ..training.trainer import TrainConfig
from .ctc import DataConfig

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
# what sparse_lowrank changes unless told: the Whisper encoder layers' attention and MLP
# projections (not the upsampling or the CTC head)
TOKENIZER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class ModelConfig:
    init: str = "scratch"                 # Whisper checkpoint dir / cached hub id, or scratch
    scratch: dict[str, Any] = field(default_factory=dict)  # WhisperConfig fields (scratch only)
    vq_layer: int = 16                    # VQ after this many encoder layers (large-v3: 16 of 32)
    pool: int = 4                         # 50 Hz / 4 = 12.5 units per second
    num_codes: int = 16384
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0      # EMA frames per batch under which a code restarts
    causal_conv: bool = False
    attention_block: int | None = None    # block-causal attention (frames; the release: 200)
    pad_to_window: bool = False           # pad inputs to 30 s, as pretrained Whisper expects
    vq_start_step: int = 0                # updates with the VQ bypassed (from-scratch warm-up)

    def settings(self):
        from ..models.speech_tokenizer import TokenizerSettings

        return TokenizerSettings(
            vq_layer=self.vq_layer, pool=self.pool, num_codes=self.num_codes,
            commitment=self.commitment, ema_decay=self.ema_decay,
            dead_code_threshold=self.dead_code_threshold, causal_conv=self.causal_conv,
            attention_block=self.attention_block, pad_to_window=self.pad_to_window)


@dataclass
class EvalConfig:
    batch_duration: float = 200.0         # padded seconds per evaluation batch
    max_dev_items: int | None = None      # dev subset for evaluations during training
    usage_items: int | None = 100         # dev items whose units give the usage statistics
    examples: int = 3
    use_best: bool = True                 # final model = best dev checkpoint (train.best_metric)


@dataclass
class Config:
    task: str = "speech_tokenizer"
    model: ModelConfig = field(default_factory=ModelConfig)
    # SLTrain / SPDF on the encoder's attention and MLP projections while training (default
    # targets: TOKENIZER_TARGETS; meant for model.init: scratch); final/ is plain dense
    sparse_lowrank: SparseLowRankConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="cer"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_not_sharded(self.sparse_lowrank, self.train.sharding, "sparse_lowrank")


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    import torch

    from ..models.speech_tokenizer import (
        SpeechTokenizer,
        load_speech_tokenizer,
        save_speech_tokenizer,
    )
    from ..training import checkpoint, distributed
    from ..training.objectives.ctc import CTCCollator, say
    from ..training.objectives.speech_tokenizer import SpeechTokenizerObjective
    from ..training.trainer import Trainer, seed_everything
    from .ctc import (
        _resolve_manifests,
        _write_json,
        check_labelled_data,
        prepare_audio_data,
        training_vocab,
    )

    cfg = config
    data = cfg.data
    check_labelled_data(data)
    if cfg.model.vq_start_step >= cfg.train.max_steps:
        raise ConfigError(f"model.vq_start_step={cfg.model.vq_start_step} >= train.max_steps="
                          f"{cfg.train.max_steps}: the VQ would never train")
    if data.sample_rate != 16000:
        raise ConfigError(f"data.sample_rate must be 16000 for a Whisper encoder, got "
                          f"{data.sample_rate}")
    settings = cfg.model.settings()
    dist = distributed.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    paths = _resolve_manifests(data, dist.is_main and cfg.train.progress, dist.is_main)
    vocab, report = training_vocab(data, cfg.train, paths, [s.lang for s in data.train],
                                   dist.is_main, out)

    seed_everything(cfg.train.seed)
    if cfg.model.scratch and cfg.model.init != "scratch":
        logger.warning("model.scratch is ignored: model.init=%s is a pretrained model",
                       cfg.model.init)
    model = SpeechTokenizer.build(cfg.model.init, vocab, settings,
                                  scratch_config=cfg.model.scratch)

    step_hooks, sparse_report = [], None
    if cfg.sparse_lowrank is not None:
        step_hooks, sparse_report = prepare_for_training(model, cfg.sparse_lowrank, say,
                                                         default_targets=TOKENIZER_TARGETS)

    def frames_for_duration(seconds: float) -> int:
        return int(model.frames_for_samples(int(round(seconds * data.sample_rate))))

    # an item needs at least one unit; and at most one 30 s window in training
    one_unit = settings.samples_per_unit / data.sample_rate
    min_duration = max(data.min_duration or 0.0, one_unit)
    if data.max_duration is None or data.max_duration > 30.0:
        raise ConfigError("data.max_duration must be <= 30 (one Whisper window); cut longer "
                          "training audio with `speechlm build segment`")
    dataset, sampler, probabilities, eval_sets, reports = prepare_audio_data(
        data, vocab, paths, frames_for_duration, min_duration, cfg.train.seed, dist, out,
        total_batches=cfg.train.max_steps * cfg.train.grad_accum)  # paces data.curriculum

    objective = SpeechTokenizerObjective(
        model, vocab, dev=eval_sets.get("dev"), vq_start_step=cfg.model.vq_start_step,
        usage_items=cfg.eval.usage_items, sample_rate=data.sample_rate,
        eval_batch_duration=cfg.eval.batch_duration, max_eval_items=cfg.eval.max_dev_items,
        examples=cfg.eval.examples, guard_from_step=cfg.model.vq_start_step + 1,
        unseen_dev_chars=list(report.unseen.get("dev", {})),
        examples_path=out / "dev_examples.jsonl" if dist.is_main else None)
    trainer = Trainer(cfg.train, objective, dataset, sampler, collate_fn=CTCCollator(),
                      run_config=cfg, step_hooks=step_hooks)
    objective.attach(trainer)
    objective.warn_at_last_step = False
    result = trainer.fit()

    used = "last"
    if cfg.eval.use_best and result.best_checkpoint is not None:
        best = checkpoint.load_checkpoint(result.best_checkpoint, load_optimizer=False)
        # the checkpoint leaves out frozen weights (Whisper's fixed position table)
        missing, unexpected = model.load_state_dict(best.model_state, strict=False)
        if unexpected or any(not k.endswith("embed_positions.weight") for k in missing):
            raise ConfigError(f"{result.best_checkpoint}: does not fit this tokenizer (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
        used = f"best ({cfg.train.best_metric}={result.best_value:.4g} at step " \
               f"{best.trainer_state.get('step')})"
    to_plain_dense(model)  # nn.Linear layers again: what the saved tokenizer loads into
    final = out / FINAL_DIR
    if dist.is_main:
        save_speech_tokenizer(model, final, metadata={"recipe": "speech_tokenizer",
                                                      "step": result.step, "weights": used,
                                                      "normalize_lang": data.lang})
    distributed.barrier()

    results: dict[str, Any] = {"step": result.step, "final_dir": str(final), "weights": used,
                               "vocab_size": len(vocab), "train": result.train_metrics,
                               "data": [rep.to_dict() for rep in reports],
                               "languages": probabilities,
                               **({"sparse_lowrank": sparse_report} if sparse_report else {})}
    if dist.is_main:
        tokenizer = load_speech_tokenizer(final, device=next(model.parameters()).device)
        results["identity"] = tokenizer.identity
        results["frame_rate"] = tokenizer.frame_rate
        with torch.no_grad():
            for split, dataset_ in eval_sets.items():
                results[split] = score_units(tokenizer, dataset_, cfg.eval.batch_duration)
        _write_json(out / RESULTS_FILE, results)
        say(results_table(results, eval_sets))
    return results


def score_units(tokenizer, dataset, batch_duration: float = 200.0, *,
                normalize_lang: str | None = None, max_new_tokens: int = 200,
                hyps_path=None) -> dict:
    """Audio -> units (encode) -> text (the tokenizer's ASR head: greedy CTC, or Whisper's
    decoder) from the units alone: WER/CER, the units' codebook usage and units per second
    of audio. normalize_lang: normalise the transcripts as the references are (a decoder
    writes cased, punctuated text; CTC's characters already are). hyps_path: the
    transcripts as JSONL ({id, text, ref, raw, units})."""
    import json

    from ..eval.metrics import cer, wer
    from ..jsonl import atomic_write
    from ..models.speech_tokenizer import unit_statistics
    from ..text.normalize import normalize_transcript
    from ..training.objectives.speech_tokenizer import encode_dataset

    rows, skipped = encode_dataset(tokenizer, dataset, batch_duration=batch_duration)
    units = [r["units"] for r in rows]
    raw = tokenizer.transcribe_units(units, max_new_tokens=max_new_tokens)
    hyps = [normalize_transcript(t, normalize_lang) for t in raw] if normalize_lang else raw
    refs = [r["text"] for r in rows]
    if hyps_path is not None:
        with atomic_write(hyps_path) as f:
            for row, hyp, text, ref in zip(rows, hyps, raw, refs, strict=True):
                f.write(json.dumps({"id": row["id"], "text": hyp, "ref": ref, "raw": text,
                                    "units": len(row["units"])}, ensure_ascii=False) + "\n")
    duration = {str(r.get("id")): float(r.get("duration") or 0.0) for r in dataset.records}
    seconds = sum(duration.get(str(r["id"]), 0.0) for r in rows)
    vq = tokenizer.vq
    dead = int((vq.ema_cluster_size < vq.dead_code_threshold).sum())
    return {"utterances": len(rows), "skipped": skipped, "wer": wer(refs, hyps),
            "cer": cer(refs, hyps),
            "units_per_second": sum(map(len, units)) / seconds if seconds else None,
            "usage": unit_statistics(units, vq.num_codes, tokenizer.frame_rate, dead=dead),
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:3]]}


def results_table(results: dict, splits) -> str:
    lines = [f"{'split':<6} {'utts':>5} {'WER':>7} {'CER':>7} {'perplexity':>10} "
             f"{'used':>11} {'dead':>5} {'bits/s':>12}"]
    for split in splits:
        r = results.get(split)
        if not r:
            continue
        u = r["usage"]
        used = f"{u['used_codes']}/{u['used_codes'] + u['unused_codes']}"
        bits = f"{u['entropy_bits_per_second']:.0f}/{u['bits_per_second']:.0f}"
        lines.append(f"{split:<6} {r['utterances']:>5} {100 * r['wer']:>6.1f}% "
                     f"{100 * r['cer']:>6.1f}% {u['perplexity']:>10.1f} {used:>11} "
                     f"{u.get('dead_codes', 0):>5} {bits:>12}")
    lines.append("WER/CER: text recovered from the units alone by the ASR head; bits/s: "
                 "entropy of the codes used / log2(codes) x units per second")
    lines.append(f"tokenizer: {results['final_dir']} (identity {results.get('identity')}, "
                 f"{results.get('frame_rate')} units/s, {results['weights']} weights, step "
                 f"{results['step']})")
    return "\n".join(lines)
