"""Recipe `task: speech_tokenizer_whisper`: GLM-4-Voice's supervised speech tokenizer as the
paper builds it, on a pretrained Whisper with its own decoder (issue 18, item 2).

    task: speech_tokenizer_whisper
    model:
      init: models:whisper-base     # a WhisperForConditionalGeneration directory
      language: en                  # the decoder's language token
      vq_layer: 3                   # pool + VQ after layer 3 of 6 (large-v3: 16 of 32)
      pool: 4                       # 50 Hz -> 12.5 units per second
      num_codes: 1024
      freeze_lower: false           # the layers below the VQ train too, as the paper's
      kmeans_items: 300             # the codebook's k-means start on 300 utterances
      position_mean: true           # ... of the states minus each unit position's mean
    data:
      train: [{manifest: "embedded:en/train", lang: en}]
      dev: "embedded:en/dev"
      test: "embedded:en/test"
      encoder_cache: auto           # with freeze_lower: true, what the frozen layers give

Whisper's encoder gets an average pool and a VQ (EMA codebook, k-means start, dead codes
restarted) after layer `vq_layer`; the layers above read the codes and Whisper's own
decoder reads them, trained with Whisper's own loss (teacher-forced cross-entropy on the
transcript) plus the commitment loss (speechlm.models.speech_tokenizer, head
whisper_decoder). By default the layers above run at 50 Hz, each unit repeated `pool`
times in Whisper's 1500-frame window with silence's frames after the speech
(`model.repeat_units`; false: at 12.5 Hz on 375 positions, as the GLM-4-Voice release).
The decoder's token table stays frozen; everything else trains, the layers below the VQ
too (straight-through), as the paper's. With `model.freeze_lower` those (convolutions
included) keep their pretrained weights instead: the codebook then clusters what they
give, and with `data.encoder_cache` their output is computed once per utterance. The
layers below the VQ see each clip at its own length (`model.pad_to_window`: the 30 s
window instead, as Whisper was trained, at several times the cost). The codebook's start
decides whether the units carry the transcript (docs/results/speech_tokenizer_whisper.md):
`model.kmeans_items` clusters that many training utterances before the first update, and
`model.position_mean` removes each unit position's mean state before the VQ (Whisper's
states carry where in the window a frame is) and adds it back after.

`run(config)`:
1. transcripts tokenized with Whisper's prompt; what does not fit is skipped and counted
   (`data_report.json`), as `task: whisper_lora` does;
2. trains with the shared Trainer (checkpoints, exact resume); dev CER/WER of the decoder's
   greedy transcripts from the quantized units every `train.eval_every` updates;
3. saves `output_dir/final/` (a speech tokenizer directory: `speechlm build tokenize
   --tokenizer DIR` turns audio into units with the layers below the VQ only);
4. reloads it and, on dev and test, turns audio into units and the units alone back into
   text through the fine-tuned decoder: WER/CER, codebook usage (perplexity, used/dead
   codes), units per second of audio; with `eval.baseline` the same items transcribed by
   the unmodified Whisper (no bottleneck), for the comparison. `results.json`, a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..training.trainer import TrainConfig
from .whisper_lora import DataConfig

FINAL_DIR = "final"
RESULTS_FILE = "results.json"


@dataclass
class ModelConfig:
    init: str = "models:whisper-base"     # WhisperForConditionalGeneration dir / hub id / models:
    language: str | None = None           # Whisper language code; required for multilingual
    vq_layer: int = 3                     # VQ after this many encoder layers (base: 3 of 6)
    pool: int = 4                         # 50 Hz / 4 = 12.5 units per second
    num_codes: int = 1024
    commitment: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0      # EMA frames per batch under which a code restarts
    causal_conv: bool = False
    attention_block: int | None = None    # block-causal attention (50 Hz frames; release: 200)
    freeze_lower: bool = False            # true: the convolutions and layers below the VQ stay
                                          # fixed (and their output can be cached)
    # each clip at its own length (padding masked out of attention, as speechlm's Whisper
    # encoder does by default), or padded to the 30 s window Whisper was trained on (5x the
    # cost for a 6 s clip; what the decoder sees is a 375-unit window either way)
    pad_to_window: bool = False
    # the layers above the VQ at 50 Hz, each unit repeated 4 times in Whisper's own 1500-frame
    # window, silence's frames after the speech: the layout the pretrained layers and decoder
    # know (zero-shot they read pooled units at 50 Hz, not at 12.5 Hz: docs/results/
    # speech_tokenizer_whisper.md); false: at 12.5 Hz on 375 positions, as the GLM-4-Voice
    # release trains them
    repeat_units: bool = True
    vq_start_step: int = 0                # updates with the VQ bypassed
    # the codebook's k-means start on the pooled states of this many training utterances,
    # before the first update; 0: on the first training batch (at most 4 x num_codes frames,
    # fewer than the codes when a batch is a minute of speech at 12.5 Hz)
    kmeans_items: int = 0
    # quantize the pooled states minus their mean at each unit position, added back after the
    # VQ (fitted with the k-means start; needs kmeans_items): the codes need not carry where
    # in the window a frame is, which Whisper's states do and the unit's index already tells
    position_mean: bool = False

    def settings(self):
        from ..models.speech_tokenizer import TokenizerSettings

        return TokenizerSettings(
            vq_layer=self.vq_layer, pool=self.pool, num_codes=self.num_codes,
            commitment=self.commitment, ema_decay=self.ema_decay,
            dead_code_threshold=self.dead_code_threshold, causal_conv=self.causal_conv,
            attention_block=self.attention_block, pad_to_window=self.pad_to_window,
            head="whisper_decoder", language=self.language, repeat_units=self.repeat_units,
            position_mean=self.position_mean)


@dataclass
class EvalConfig:
    max_dev_items: int | None = None      # dev subset for the evaluations during training
    batch_size: int = 16                  # utterances per decoding batch
    max_new_tokens: int = 200
    examples: int = 3                     # dev transcripts shown at each evaluation
    use_best: bool = True                 # final model = best dev checkpoint (train.best_metric)
    batch_duration: float = 200.0         # seconds of audio per batch when making units
    baseline: bool = True                 # also score the unmodified Whisper on dev and test


@dataclass
class Config:
    task: str = "speech_tokenizer_whisper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="cer"))
    eval: EvalConfig = field(default_factory=EvalConfig)


def lower_parameter_names(model) -> list[str]:
    """Parameters below the VQ: the two convolutions and the first vq_layer layers."""
    k = model.settings.vq_layer
    prefixes = ("encoder.conv1.", "encoder.conv2.",
                *(f"encoder.layers.{i}." for i in range(k)))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def fit_codebook(model, records: list[dict], items: int, frames_per_batch: float, device,
                 say) -> None:
    """The codebook's k-means start (and position means) on `items` training utterances
    spread over `records`."""
    import time

    from ..data.dataset import AudioDataset
    from ..training.objectives.speech_tokenizer import duration_batches, spread_indices

    start = time.perf_counter()
    dataset = AudioDataset(records, sample_rate=16000, silence_dbfs=None)
    batches = ((b["audio"].to(device), b["audio_lengths"].to(device))
               for b in duration_batches(dataset, spread_indices(len(records), items), 120.0)
               if b["audio"].shape[0])
    mode = model.training
    model.eval()
    try:
        info = model.fit_codebook(batches, frames_per_batch=frames_per_batch)
    finally:
        model.train(mode)
    say(f"codebook: k-means on {info['frames']} pooled frames of {min(items, len(records))} "
        f"training utterances, {info['codes_used']} of {model.vq.num_codes} codes hold frames"
        + (f"; position means remove {1 - info['variance_kept']:.0%} of the variance"
           if model.settings.position_mean else "") + f" ({time.perf_counter() - start:.0f} s)")


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    from ..models.speech_tokenizer import SpeechTokenizer, save_speech_tokenizer
    from ..pretrained.resolve import resolve_model_dir
    from ..training import checkpoint, distributed
    from ..training.objectives.speech_tokenizer import TokenizerDecoderObjective
    from ..training.objectives.whisper_asr import WhisperASRCollator
    from ..training.trainer import Trainer, _under, seed_everything
    from . import start_run
    from .ctc import _write_json, check_labelled_data
    from .whisper_lora import check_one_language, open_cache, prepare_data, training_sets

    cfg, data, m = config, config.data, config.model
    check_labelled_data(data)
    if m.kmeans_items < 0:
        raise ConfigError(f"model.kmeans_items must be >= 0, got {m.kmeans_items}")
    if m.position_mean and m.kmeans_items < 1:
        raise ConfigError("model.position_mean needs model.kmeans_items >= 1: the position means "
                          "are fitted on that many training utterances with the codebook")
    if m.vq_start_step >= cfg.train.max_steps:
        raise ConfigError(f"model.vq_start_step={m.vq_start_step} >= train.max_steps="
                          f"{cfg.train.max_steps}: the VQ would never train")
    directory = resolve_model_dir(m.init, what=f"model.init={m.init}",
                                  hint="a WhisperForConditionalGeneration directory, e.g. "
                                       "models:whisper-base")
    dist, out, say = start_run(cfg.train)
    seed_everything(cfg.train.seed)
    model = SpeechTokenizer.build(directory, None, m.settings())
    prompt = model.prompt
    language = prompt.language or "en"
    check_one_language(data, language, m.language)
    lang = data.lang or language
    if m.freeze_lower:
        lower = set(lower_parameter_names(model))
        for name, p in model.named_parameters():
            if name in lower:
                p.requires_grad_(False)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad
                    and not any(_under(n, prefix) for prefix in cfg.train.freeze))
    say(f"speech_tokenizer_whisper: {directory.name}, VQ after layer {m.vq_layer} of "
        f"{len(model.encoder.layers)}, {m.num_codes} codes at {model.frame_rate:g} units/s; "
        f"layers below the VQ {'frozen' if m.freeze_lower else 'trained'}; "
        f"{trainable / 1e6:.1f}M of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        "parameters train")

    # 1. data; the frozen layers' output cached (only when nothing below the VQ changes)
    records, eval_records, paths, reports = prepare_data(data, model.text_tokenizer, prompt,
                                                         lang, dist, out, cfg.train.progress,
                                                         say)
    if "dev" not in eval_records:
        raise ConfigError("data.dev is required: it picks the checkpoint and shows progress")
    cacheable = m.freeze_lower and not m.causal_conv and m.attention_block is None
    if data.encoder_cache is not None and not cacheable:
        say("data.encoder_cache unused: the layers below the VQ "
            + ("train" if not m.freeze_lower else "are changed by causal_conv/attention_block")
            + ", so they run on the audio at every update")
    filler = open_cache(data.encoder_cache if cacheable else None, directory,
                        cfg.train.progress, say, layer=m.vq_layer,
                        pad_to_window=m.pad_to_window)
    train_set, dev_set, sampler = training_sets(data, records, eval_records, filler,
                                                cfg.train.seed, dist)

    # 2. train
    objective = TokenizerDecoderObjective(
        model, vq_start_step=m.vq_start_step, dev=dev_set, lang=lang,
        eval_batch_size=cfg.eval.batch_size, max_eval_items=cfg.eval.max_dev_items,
        max_new_tokens=cfg.eval.max_new_tokens, examples=cfg.eval.examples,
        examples_path=out / "dev_examples.jsonl" if dist.is_main else None)
    trainer = Trainer(cfg.train, objective, train_set, sampler,
                      collate_fn=WhisperASRCollator(prompt.eot), run_config=cfg,
                      identity_keys=("model",))
    objective.attach(trainer)
    if m.kmeans_items and not trainer.will_resume():
        fit_codebook(model, records, m.kmeans_items, data.max_batch_duration * model.frame_rate,
                     trainer.device, say)
    result = trainer.fit()

    # 3. the best weights, saved as a tokenizer directory
    used = "last"
    if cfg.eval.use_best and result.best_checkpoint is not None:
        best = checkpoint.load_checkpoint(result.best_checkpoint, load_optimizer=False)
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False)
                  if not p.requires_grad}
        missing, unexpected = model.load_state_dict(best.model_state, strict=False)
        if unexpected or set(missing) - frozen - {"encoder.embed_positions.weight"}:
            raise ConfigError(f"{result.best_checkpoint}: does not fit this tokenizer (missing "
                              f"{sorted(set(missing) - frozen)[:3]}, unexpected "
                              f"{unexpected[:3]})")
        used = (f"best ({cfg.train.best_metric}={result.best_value:.4g} at step "
                f"{best.trainer_state.get('step')})")
    final = out / FINAL_DIR
    if dist.is_main:
        save_speech_tokenizer(model.cpu(), final, metadata={
            "recipe": "speech_tokenizer_whisper", "init": str(m.init), "step": result.step,
            "weights": used, "normalize_lang": lang, "freeze_lower": m.freeze_lower})
    distributed.barrier()

    # 4. units from the audio, text from the units alone; the unmodified Whisper beside them
    results: dict[str, Any] = {"step": result.step, "final_dir": str(final), "weights": used,
                               "train": result.train_metrics, "lang": lang,
                               "data": [rep.to_dict() for rep in reports]}
    if dist.is_main:
        from ..data.dataset import AudioDataset
        from ..models.speech_tokenizer import load_speech_tokenizer
        from .speech_tokenizer import score_units

        tokenizer = load_speech_tokenizer(final, device=trainer.device)
        results["identity"] = tokenizer.identity
        results["frame_rate"] = tokenizer.frame_rate
        for split, kept in eval_records.items():
            say(f"scoring {split}: audio -> units -> text ({len(kept)} utterances)")
            results[split] = score_units(
                tokenizer, AudioDataset(kept, sample_rate=16000, silence_dbfs=None),
                cfg.eval.batch_duration, normalize_lang=lang,
                max_new_tokens=cfg.eval.max_new_tokens, hyps_path=out / f"{split}_hyps.jsonl")
            if cfg.eval.baseline:
                from .whisper_lora import _score_split

                say(f"scoring {split}: {directory.name} without the bottleneck")
                results[f"{split}_baseline"] = _score_split(
                    directory, paths[split], kept, prompt.language, lang,
                    out / f"{split}_baseline_hyps.jsonl", cfg)
        _write_json(out / RESULTS_FILE, results)
        say(results_table(results, directory.name))
    return results


def results_table(results: dict, baseline_name: str) -> str:
    lines = [f"{'split':<6} {'system':<28} {'utts':>5} {'WER':>7} {'CER':>7} {'perplexity':>10} "
             f"{'used':>11} {'dead':>5} {'units/s':>8}"]
    for split in ("dev", "test"):
        r = results.get(split)
        if not r:
            continue
        base = results.get(f"{split}_baseline")
        if base:
            lines.append(f"{split:<6} {baseline_name + ' (no bottleneck)':<28} "
                         f"{base['utterances']:>5} {100 * base['wer']:>6.1f}% "
                         f"{100 * base['cer']:>6.1f}%")
        u = r["usage"]
        used = f"{u['used_codes']}/{u['used_codes'] + u['unused_codes']}"
        lines.append(f"{split:<6} {'units -> decoder':<28} {r['utterances']:>5} "
                     f"{100 * r['wer']:>6.1f}% {100 * r['cer']:>6.1f}% {u['perplexity']:>10.1f} "
                     f"{used:>11} {u.get('dead_codes', 0):>5} {r['units_per_second']:>8.2f}")
    lines.append("units -> decoder: text the fine-tuned decoder reads from the units alone "
                 "(audio -> layers below the VQ -> codes -> codebook vectors -> layers above "
                 "-> decoder, greedy)")
    lines.append(f"tokenizer: {results['final_dir']} (identity {results.get('identity')}, "
                 f"{results['weights']} weights, step {results['step']})")
    return "\n".join(lines)
