"""Recipe `task: whisper_lora`: a pretrained Whisper, its own decoder and all, fine-tuned for a
language with little labelled speech by LoRA (issue 23, recipe (b)).

    task: whisper_lora
    model:
      init: models:whisper-base     # a WhisperForConditionalGeneration directory, a hub id
                                    # in the local HF cache, or a registry model
      language: es                  # the language token the decoder follows (Whisper's own)
      new_language: null            # or {code: ain, init_from: ja}: a token of its own
    lora:
      r: 16
      alpha: 32
      dropout: 0.05
      target_modules: [q_proj, k_proj, v_proj, out_proj, fc1, fc2]
      encoder_top_layers: 0         # LoRA on the top N encoder layers too (0: decoder only)
    data:
      train:
        - {manifest: "embedded:es/train", lang: es, max_hours: null}
      dev: "embedded:es/dev"
      test: "embedded:es/test"
      encoder_cache: auto

The loss is Whisper's own: teacher-forced cross-entropy on `<|startoftranscript|><|es|>
<|transcribe|><|notimestamps|> text <|endoftext|>` with labels on the text and the end token
only (speechlm.training.objectives.whisper_asr). Only the LoRA matrices train, and with
`model.new_language` the new token's embedding (`<|code|>` added to the tokenizer and the
generation config, starting as a related language's token or the mean of all; the saved
model answers to `--lang code`). The encoder
layers below the LoRA ones never change, so with `data.encoder_cache` their output is
computed once per utterance, on Whisper's 30 s window as it was trained (all 1500 frames),
and stored on disk (speechlm.pipelines.encoder_cache, shared by every run of the same
checkpoint and layer); every update then runs the LoRA encoder layers (if any) and the
decoder only.

`run(config)`:
1. tokenizes the transcripts with the checkpoint's tokenizer; utterances that do not fit
   (empty, longer than 30 s, prompt + transcript over the decoder's 448 positions) are
   skipped and counted in `output_dir/data_report.json` (`data.strict`: refused with file
   and line);
2. trains with the shared Trainer (checkpoints of the LoRA weights, exact resume),
   evaluating dev CER/WER of greedy transcripts every `train.eval_every` updates;
3. loads the best dev checkpoint, folds LoRA into the weights and saves
   `output_dir/final/`: a plain WhisperForConditionalGeneration directory (tokenizer and
   feature extractor beside it) that `speechlm infer --model DIR --lang es` and
   `speechlm eval` use like any Whisper;
4. transcribes dev and test from their audio through that directory (WhisperTranscriber,
   the same code and defaults as `speechlm infer`), writes `output_dir/{dev,test}_hyps.jsonl`
   ({id, text, ref} normalised for scoring as a CTC run's, and `raw`: the model's own
   text) and `results.json`, and prints a short table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models.lora import LoraSettings
from ..models.whisper_lora import DECODER_TARGETS
from ..training.trainer import TrainConfig
from .ctc import TrainSource

FINAL_DIR = "final"
RESULTS_FILE = "results.json"
WINDOW_S = 30.0
SAMPLE_RATE = 16000                       # what Whisper's feature extractor takes


@dataclass
class NewLanguage:
    """A language token of its own instead of one of Whisper's (add_language_token)."""
    code: str                             # <|code|>: the token the saved model answers to
    init_from: str | None = None          # a related language's token to start from; null:
                                          # the mean of all of Whisper's language tokens


@dataclass
class ModelConfig:
    init: str = "models:whisper-base"     # WhisperForConditionalGeneration dir / hub id / models:
    language: str | None = None           # Whisper language code; required for multilingual
    new_language: NewLanguage | None = None   # add a token (language = its code) and train it

    def __post_init__(self):
        if isinstance(self.new_language, dict):
            self.new_language = NewLanguage(**self.new_language)
        if self.new_language is not None:
            if self.language not in (None, self.new_language.code):
                raise ConfigError(f"model.language={self.language} and model.new_language."
                                  f"code={self.new_language.code}: the new token is the "
                                  "language trained; leave model.language out or make them equal")
            self.language = self.new_language.code


@dataclass
class LoraConfig(LoraSettings):
    """LoRA (peft) on the decoder, and on the top `encoder_top_layers` encoder layers."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | None = field(default_factory=lambda: list(DECODER_TARGETS))
    encoder_top_layers: int = 0

    def __post_init__(self):
        self.validate("lora")
        if self.encoder_top_layers < 0:
            raise ConfigError(f"lora.encoder_top_layers must be >= 0, got "
                              f"{self.encoder_top_layers}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("lora.target_modules is empty; list the projections to adapt, "
                              f"e.g. {DECODER_TARGETS}, or null for those")


@dataclass
class DataConfig:
    train: list[TrainSource] = field(default_factory=list)
    dev: str | None = None                # picks the best checkpoint
    test: str | None = None               # scored once at the end
    lang: str | None = None               # normalisation language of the scores (None: model's)
    max_batch_duration: float = 20.0      # seconds of audio per batch (not the 30 s windows)
    max_batch_size: int | None = None
    num_buckets: int = 10
    min_duration: float | None = 0.1
    max_duration: float = WINDOW_S        # Whisper's decoder sees one 30 s window
    strict: bool = False                  # refuse (file:line) instead of skipping bad items
    # cache the output of the encoder layers that never train ("auto": the speechlm cache
    # dir; a directory; null: run the encoder on the audio at every update)
    encoder_cache: str | None = "auto"

    def __post_init__(self):
        if self.max_batch_duration <= 0:
            raise ConfigError(f"data.max_batch_duration must be > 0, got "
                              f"{self.max_batch_duration}")
        if not 0 < self.max_duration <= WINDOW_S:
            raise ConfigError(f"data.max_duration={self.max_duration}: Whisper's decoder sees "
                              f"one {WINDOW_S:g} s window; give a value in (0, {WINDOW_S:g}] "
                              "and cut longer recordings first (speechlm build segment)")


@dataclass
class EvalConfig:
    max_dev_items: int | None = None      # dev subset for the evaluations during training
    batch_size: int = 16                  # utterances per decoding batch
    max_new_tokens: int = 200             # decoding cap per utterance (dev evaluations; the
                                          # final scores decode as `speechlm infer` does)
    examples: int = 3                     # dev hypotheses shown at each evaluation
    use_best: bool = True                 # final model = best dev checkpoint (train.best_metric)


@dataclass
class Config:
    task: str = "whisper_lora"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(best_metric="cer"))
    eval: EvalConfig = field(default_factory=EvalConfig)


def run(config: Config) -> dict:
    """Train per `config` (see the module doc); returns the results dict."""
    from ..models import whisper_lora
    from ..pretrained.resolve import resolve_model_dir
    from ..training import checkpoint, distributed
    from ..training.objectives.whisper_asr import WhisperASRCollator, WhisperASRObjective
    from ..training.trainer import Trainer, seed_everything
    from . import start_run
    from .ctc import _write_json, check_labelled_data

    cfg, data = config, config.data
    check_labelled_data(data)
    directory = resolve_model_dir(cfg.model.init, what=f"model.init={cfg.model.init}",
                                  hint="a WhisperForConditionalGeneration directory, e.g. "
                                       "models:whisper-base")
    dist, out, say = start_run(cfg.train)
    seed_everything(cfg.train.seed)
    model, tokenizer = whisper_lora.load_whisper(directory)
    new = cfg.model.new_language
    if new is not None:
        token_id = whisper_lora.add_language_token(model, tokenizer, new.code, new.init_from)
        say(f"new language token <|{new.code}|> (id {token_id}), starting as "
            + (f"<|{new.init_from}|>" if new.init_from else "the mean of Whisper's languages"))
    prompt = whisper_lora.asr_prompt(model.generation_config, cfg.model.language, directory,
                                     max_positions=int(model.config.max_target_positions))
    language = prompt.language or "en"
    # a new token's code need not be the text's language (<|es-cl|> over Spanish text): the
    # sources then only have to agree, and their language normalises the scores
    text_lang = check_one_language(data, language, cfg.model.language, new_token=new is not None)
    lang = data.lang or text_lang
    top = cfg.lora.encoder_top_layers
    adapted = whisper_lora.apply_whisper_lora(model, cfg.lora, top)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"whisper_lora: {directory.name}, language {prompt.language or 'en (English-only)'}; "
        f"LoRA r={cfg.lora.r} on {len(adapted)} projections (decoder"
        + (f" + top {top} encoder layers" if top else "") + f"): {trainable / 1e6:.2f}M of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters train")

    # 1. data
    records, eval_records, paths, reports = prepare_data(data, tokenizer, prompt, lang, dist,
                                                         out, cfg.train.progress, say)

    cached_layer = whisper_lora.cache_layer(model, top)
    filler = open_cache(data.encoder_cache, directory, cfg.train.progress, say,
                        layer=cached_layer, full_window=True)
    train_set, dev_set, sampler = training_sets(data, records, eval_records, filler,
                                                cfg.train.seed, dist)

    # 2. train
    objective = WhisperASRObjective(
        model, tokenizer, prompt, dev=dev_set, lang=lang, cached_layer=cached_layer,
        eval_batch_size=cfg.eval.batch_size, max_eval_items=cfg.eval.max_dev_items,
        max_new_tokens=cfg.eval.max_new_tokens, examples=cfg.eval.examples,
        examples_path=out / "dev_examples.jsonl" if dist.is_main else None)
    trainer = Trainer(cfg.train, objective, train_set, sampler,
                      collate_fn=WhisperASRCollator(prompt.eot), run_config=cfg,
                      identity_keys=("model", "lora"))
    objective.attach(trainer)
    result = trainer.fit()

    # 3. the best weights, merged, saved as a plain Whisper
    used = "last"
    if cfg.eval.use_best and result.best_checkpoint is not None:
        best = checkpoint.load_checkpoint(result.best_checkpoint, load_optimizer=False)
        model.load_state_dict(best.model_state, strict=False)
        used = (f"best ({cfg.train.best_metric}={result.best_value:.4g} at step "
                f"{best.trainer_state.get('step')})")
    model = model.cpu()
    merged = whisper_lora.merge_lora(model)
    whisper_lora.fold_new_tokens(model)
    final = out / FINAL_DIR
    if dist.is_main:
        whisper_lora.save_whisper(model, tokenizer, final, source_dir=directory)
        _write_json(final / "speechlm_recipe.json",
                    {"recipe": "whisper_lora", "init": str(cfg.model.init),
                     "language": prompt.language, "step": result.step, "weights": used,
                     "lora_layers_merged": merged})
    distributed.barrier()

    # 4. scores from the audio, through the saved directory (as `speechlm infer` does)
    results: dict[str, Any] = {"step": result.step, "final_dir": str(final), "weights": used,
                               "train": result.train_metrics, "lang": lang,
                               "data": [rep.to_dict() for rep in reports]}
    if dist.is_main:
        for split, kept in eval_records.items():
            results[split] = _score_split(final, paths[split], kept, prompt.language, lang,
                                          out / f"{split}_hyps.jsonl", cfg)
        _write_json(out / RESULTS_FILE, results)
        say(results_table(results))
    return results


def check_one_language(data: DataConfig, language: str, model_language, *,
                       new_token: bool = False) -> str:
    """ConfigError when a training source is weighted or names another language: these
    recipes train one language token. Returns the text's language: `language`, or with a
    `new_token` the one the sources name (they must agree)."""
    langs = sorted({source.lang for source in data.train if source.lang is not None})
    if new_token and len(langs) > 1:
        raise ConfigError(f"data.train names languages {langs}: model.new_language trains one "
                          "language token; give every source the same lang")
    for pos, source in enumerate(data.train):
        if source.weight != 1.0:
            raise ConfigError(f"data.train[{pos}].weight={source.weight}: weights mix languages "
                              "in task: ctc; this recipe trains one language, remove it")
        if not new_token and source.lang is not None and source.lang != language:
            raise ConfigError(f"data.train[{pos}].lang={source.lang} but model.language="
                              f"{model_language}: this recipe trains one language token; "
                              "give every source the model's language (or leave lang out)")
    return langs[0] if new_token and langs else language


def prepare_data(data: DataConfig, tokenizer, prompt, lang: str, dist, out: Path,
                 progress: bool, say) -> tuple[list[dict], dict[str, list[dict]], dict, list]:
    """(training records, {dev/test: records}, manifest paths, data reports): transcripts
    tokenized with Whisper's prompt, what does not fit skipped and counted in
    `out/data_report.json`."""
    from ..training.objectives.ctc import count_sample_rates
    from ..training.objectives.whisper_asr import prepare_whisper_records
    from .ctc import _resolve_manifests, _write_json, hours_subset

    paths = _resolve_manifests(data, dist.is_main and progress, dist.is_main)
    records, reports = [], []
    for pos, (source, path) in enumerate(zip(data.train, paths["train"], strict=True)):
        kept, rep = prepare_whisper_records(
            path, tokenizer, prompt, lang=lang, min_duration=data.min_duration,
            max_duration=data.max_duration, strict=data.strict,
            name=f"train[{pos}] {source.manifest}")
        if source.max_hours is not None:
            kept = hours_subset(kept, source.max_hours, rep)
        rep.sample_rates = count_sample_rates(kept, SAMPLE_RATE)  # mixed rates: said, resampled
        records += kept
        reports.append(rep)
    eval_records = {}
    for split in ("dev", "test"):
        if paths.get(split):
            kept, rep = prepare_whisper_records(paths[split], tokenizer, prompt, lang=lang,
                                                training=False, name=split)
            rep.sample_rates = count_sample_rates(kept, SAMPLE_RATE)
            eval_records[split] = kept
            reports.append(rep)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "data_report.json", [rep.to_dict() for rep in reports])
        for rep in reports:
            say(rep.summary())
    return records, eval_records, paths, reports


def open_cache(encoder_cache: str | None, directory: Path, progress: bool, say, *,
               layer: int | None, full_window: bool = False, pad_to_window: bool = False):
    """The encoder-output cache filler of the never-trained encoder layers (`layer`: hidden
    state index, None: the normed output; on 30 s windows, all 1500 frames with full_window),
    or None when data.encoder_cache is null."""
    from ..models.encoders import load_encoder
    from ..paths import cache_dir
    from ..pipelines.encoder_cache import EncoderCache
    from .ctc_whisper import _CacheFiller

    if encoder_cache is None:
        return None
    encoder = load_encoder("whisper", directory, layer=layer, full_window=full_window,
                           pad_to_window=pad_to_window)
    encoder.source_path = str(directory)
    root = cache_dir() / "encoder_outputs" if encoder_cache == "auto" \
        else Path(encoder_cache).expanduser()
    cache = EncoderCache.for_encoder(root, encoder, directory)
    return _CacheFiller(cache, encoder, progress, say)


def training_sets(data: DataConfig, records: list[dict], eval_records: dict, filler, seed: int,
                  dist):
    """(train dataset, dev dataset, duration-bucket sampler): cached encoder frames when
    `filler` is given (the cache filled first), else audio."""
    from ..data.dataset import AudioDataset
    from ..data.sampler import DurationBucketSampler

    if filler is not None:
        train_set = filler.dataset(records, "train", silence_dbfs=-60.0)
        dev_set = filler.dataset(eval_records["dev"], "dev", silence_dbfs=None)
        filler.release()
    else:
        train_set = AudioDataset(records, sample_rate=SAMPLE_RATE, strict=data.strict)
        dev_set = AudioDataset(eval_records["dev"], sample_rate=SAMPLE_RATE, strict=data.strict,
                               silence_dbfs=None)
    sampler = DurationBucketSampler([float(r["duration"]) for r in records],
                                    max_batch_duration=data.max_batch_duration,
                                    max_batch_size=data.max_batch_size,
                                    num_buckets=data.num_buckets, seed=seed,
                                    rank=dist.rank, world_size=dist.world_size)
    return train_set, dev_set, sampler


def _score_split(final: Path, manifest, records: list[dict], language: str | None, lang: str,
                 hyps_path: Path, cfg: Config) -> dict:
    """Transcribe a split's audio with the saved model; CER/WER against its normalised refs.
    The transcripts go to `hyps_path` ({id, text, ref, raw}); a killed scoring resumes from
    its .partial.jsonl."""
    from ..eval.metrics import cer, wer
    from ..inference.whisper_asr import WhisperTranscriber
    from ..jsonl import atomic_write, iter_jsonl
    from ..text.normalize import normalize_transcript

    partial = hyps_path.with_name(hyps_path.stem + ".partial.jsonl")
    # decoded as `speechlm infer --model final --lang ...` does (its defaults), so the
    # recipe's scores are the ones a user gets from the saved directory
    transcriber = WhisperTranscriber(final, device=cfg.train.device, language=language)
    transcriber.transcribe_manifest(manifest, partial, progress=cfg.train.progress)
    texts = {str(row["id"]): row.get("text") or "" for _, row in iter_jsonl(partial)}
    # text and ref normalised alike (as a CTC run's hyps, so tools/asr_spread.py reads both
    # kinds without --ref); raw: what the model wrote
    rows = [{"id": r["id"], "text": normalize_transcript(texts.get(str(r["id"]), ""), lang),
             "ref": r["text_norm"], "raw": texts.get(str(r["id"]), "")} for r in records]
    with atomic_write(hyps_path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.unlink()
    refs, hyps = [r["ref"] for r in rows], [r["text"] for r in rows]
    return {"wer": wer(refs, hyps), "cer": cer(refs, hyps), "utterances": len(rows),
            "missing": sum(1 for r in rows if str(r["id"]) not in texts),
            "empty_frac": sum(1 for h in hyps if not h) / max(len(hyps), 1)}


def results_table(results: dict) -> str:
    lines = [f"{'split':<6} {'utts':>5} {'WER':>7} {'CER':>7}"]
    for split in ("dev", "test"):
        r = results.get(split)
        if r:
            lines.append(f"{split:<6} {r['utterances']:>5} {100 * r['wer']:>6.1f}% "
                         f"{100 * r['cer']:>6.1f}%")
    lines.append(f"model: {results['final_dir']} ({results['weights']} weights, step "
                 f"{results['step']}; LoRA merged: a plain Whisper directory for "
                 "`speechlm infer --model DIR --lang ...`)")
    return "\n".join(lines)
