"""InSerter data: text corpora turned into speech-text interleaved samples with TTS
(InSerter, arXiv 2503.02769).

    summary = build_inserter("embedded:en", "data/inserter", voices=["en-us+f3"], num_samples=3000)

Each sample takes one text of the corpus (a line, a JSONL `text`, or a verse of
the embedded corpus's training books) and cuts it at word boundaries into up
to three parts: the words that are *spoken* (synthesized with TTS, several
voices, rates and pitches) and the text around them. Two orders:
- "speech_text": <speech of the first words> + the text that continues them;
- "text_speech_text" (share `text_first_share`): text, then <speech>, then the
  text that continues it.
The training loss is on the text after the speech, so the model learns to
continue speech in text the way the LLM continues the same words in text.

Output in `out_dir`:
- `plan.jsonl`: every planned sample (id, source, order, before, text =
  the spoken words, after), a pure function of the corpus and the settings;
- `audio/` + `manifest.jsonl` + `synth_report.json`: the synthesized speech
  (`pipelines.synth`; resumable, items the voice cannot say skipped and
  counted, e.g. an unsupported script);
- `samples-00000.jsonl`, ...: the samples in plan order, `shard_size` per
  shard, each line a manifest record (audio relative to `out_dir`, duration,
  text, before, after, order, source, voice, rate, pitch). A shard is written
  (atomically) once every sample of it is synthesized or has failed;
- `inserter.json`: the settings (a rerun with other settings into the same
  directory is refused) and the counts.

A killed job reruns with the same command: the plan is rebuilt identically,
spoken items are skipped, and shards are rewritten from the manifest.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError, ManifestError
from ..jsonl import atomic_write, dumps, iter_jsonl

__all__ = ["ORDERS", "InserterSummary", "PlanSettings", "build_inserter", "iter_corpus",
           "plan_samples", "read_samples", "sample_shards"]

ORDERS = ("speech_text", "text_speech_text")
PLAN_NAME = "plan.jsonl"
META_NAME = "inserter.json"
SHARD_PATTERN = "samples-{:05d}.jsonl"
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class PlanSettings:
    """How samples are cut from texts (all in words)."""

    num_samples: int | None = None     # None: one per usable text
    speech_words: tuple[int, int] = (3, 12)
    min_after_words: int = 2
    max_after_words: int = 40
    max_before_words: int = 20
    text_first_share: float = 0.25     # share of "text_speech_text" samples
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.speech_words
        if not 1 <= lo <= hi:
            raise ConfigError(f"speech_words must be LOW:HIGH with 1 <= LOW <= HIGH, got {lo}:{hi}")
        if self.min_after_words < 1 or self.max_after_words < self.min_after_words:
            raise ConfigError("need 1 <= min_after_words <= max_after_words (the loss is on the "
                              f"text after the speech), got {self.min_after_words}, "
                              f"{self.max_after_words}")
        if not 0.0 <= self.text_first_share <= 1.0:
            raise ConfigError(f"text_first_share must be in [0, 1], got {self.text_first_share}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1 or null, got {self.num_samples}")


@dataclass
class InserterSummary:
    out_dir: Path
    planned: int = 0
    texts: int = 0                 # usable texts in the corpus
    too_short: int = 0             # texts with too few words for a sample
    synthesized: int = 0           # by this run
    already_done: int = 0          # spoken by an earlier run
    failed: int = 0
    samples: int = 0               # in the shards
    shards: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0     # in the shards
    wall_seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        return self.synthesized / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> str:
        lines = [f"texts: {self.texts} usable, {self.too_short} too short; "
                 f"{self.planned} samples planned",
                 f"speech: {self.synthesized} synthesized now, {self.already_done} already done, "
                 f"{self.failed} failed ({self.audio_seconds / 3600:.3f} h in the shards)",
                 f"samples: {self.samples} in {len(self.shards)} shard(s) in {self.out_dir}; "
                 f"{self.wall_seconds:.1f} s wall ({self.samples_per_second:.1f} samples/s)"]
        if self.failures:
            first = self.failures[0]
            lines.append(f"failures listed in {self.out_dir / 'synth_report.json'}; first: "
                         f"{first['id']}: {first['reason']}")
        return "\n".join(lines)


# -- the corpus -------------------------------------------------------------------------------


def iter_corpus(spec: str) -> Iterator[tuple[str, str]]:
    """(source id, text) of a corpus: `embedded:en` / `embedded:es` (verses of the embedded
    corpus's training books: the books held out for dev/test speech never appear), a text
    file (one text per line, blank lines skipped) or JSONL with a `text` field."""
    if spec.startswith(EMBEDDED_PREFIX):
        from ..data.instructions import split_training_verses

        lang = spec[len(EMBEDDED_PREFIX):]
        if lang not in ("en", "es"):
            raise ConfigError(f"corpus {spec!r}: the embedded corpus has embedded:en and "
                              "embedded:es")
        train, _ = split_training_verses()
        for verse in train:
            yield verse.ref, verse.text(lang)
        return
    path = Path(spec)
    if not path.is_file():
        raise ManifestError(f"{path}: corpus file not found (give a text file, JSONL with a "
                            "'text' field, or embedded:en)")
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        for line, rec in iter_jsonl(path):
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ManifestError(f"{path}:{line}: no 'text' string in this record; every "
                                    "JSONL line needs {\"text\": \"...\"}")
            yield str(rec.get("id", f"line-{line:06d}")), text
        return
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for line, text in enumerate(f, start=1):
                if text.strip():
                    yield f"line-{line:06d}", text.strip()
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not UTF-8 text ({e}); convert it with iconv") from None


# -- the plan ---------------------------------------------------------------------------------


def _cut(words: list[str], rng: random.Random, s: PlanSettings) -> dict | None:
    """One sample's parts from a text's words, or None if the text is too short."""
    lo, hi = s.speech_words
    if len(words) < lo + s.min_after_words:
        return None
    text_first = rng.random() < s.text_first_share and len(words) >= 1 + lo + s.min_after_words
    start = 0
    if text_first:
        start = rng.randint(1, min(s.max_before_words, len(words) - lo - s.min_after_words))
    n_speech = rng.randint(lo, min(hi, len(words) - start - s.min_after_words))
    end = start + n_speech
    return {"order": ORDERS[1] if text_first else ORDERS[0],
            "before": " ".join(words[:start]),
            "text": " ".join(words[start:end]),
            "after": " ".join(words[end:end + s.max_after_words])}


def plan_samples(texts, settings: PlanSettings) -> tuple[list[dict], int, int]:
    """(samples, usable texts, too-short texts): at most one sample per text, drawn with a
    generator seeded by (seed, source id); `num_samples` keeps a seeded random subset."""
    samples, too_short = [], 0
    for source, text in texts:
        rng = random.Random(f"{settings.seed}-{source}")
        parts = _cut(text.split(), rng, settings)
        if parts is None:
            too_short += 1
            continue
        samples.append({"source": source, **parts})
    usable = len(samples)
    if settings.num_samples is not None and settings.num_samples < len(samples):
        keep = sorted(random.Random(settings.seed).sample(range(len(samples)),
                                                          settings.num_samples))
        samples = [samples[i] for i in keep]
    for i, sample in enumerate(samples):
        sample["id"] = f"ins-{i:07d}"
    return samples, usable, too_short


# -- the job ----------------------------------------------------------------------------------


def _check_meta(out_dir: Path, meta: dict) -> None:
    path = out_dir / META_NAME
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    changed = [k for k in meta if old.get(k) != meta[k]]
    if changed:
        raise ConfigError(
            f"{out_dir} holds InSerter samples built with other settings ({', '.join(changed)}: "
            f"{old.get(changed[0])!r} there, {meta[changed[0]]!r} now); use another --out "
            "directory, or delete this one to rebuild")


def build_inserter(corpus: str, out_dir, *, voices: list[str], rate=None, pitch=None,
                   settings: PlanSettings | None = None, shard_size: int = 1000, jobs: int = 1,
                   backend: str = "espeak", backend_options: dict | None = None,
                   progress: bool = True) -> InserterSummary:
    """Plan samples from `corpus`, speak their speech parts and write the shards (module doc)."""
    from .synth import MANIFEST_NAME, REPORT_NAME, synthesize_corpus

    start = time.perf_counter()
    settings = settings or PlanSettings()
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if not voices:
        raise ConfigError("give at least one TTS voice (e.g. en-us+f3)")
    out_dir = Path(out_dir)
    meta = {"corpus": corpus, "voices": list(voices), "rate": rate, "pitch": pitch,
            "backend": backend, "shard_size": shard_size,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}}
    meta = json.loads(json.dumps(meta))  # tuples as lists, as they read back
    _check_meta(out_dir, meta)

    samples, usable, too_short = plan_samples(iter_corpus(corpus), settings)
    summary = InserterSummary(out_dir, planned=len(samples), texts=usable, too_short=too_short)
    if not samples:
        raise ConfigError(f"corpus {corpus}: no text has the {settings.speech_words[0]} + "
                          f"{settings.min_after_words} words a sample needs")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / PLAN_NAME) as f:
        f.writelines(dumps(s) + "\n" for s in samples)
    with atomic_write(out_dir / META_NAME) as f:
        json.dump({"settings": meta, "finished": False}, f, indent=2)

    report = synthesize_corpus(out_dir / PLAN_NAME, out_dir, voices=voices, rate=rate, pitch=pitch,
                               jobs=jobs, seed=settings.seed, progress=progress, backend=backend,
                               backend_options=backend_options)
    summary.synthesized, summary.already_done = report.done, report.skipped
    summary.failures = report.failures
    failed = {f["id"] for f in report.failures}
    spoken = {rec["id"]: rec for _, rec in iter_jsonl(out_dir / MANIFEST_NAME,
                                                      tolerate_torn_tail=True)}
    summary.failed = len(failed)

    for old in out_dir.glob("samples-*.jsonl"):
        old.unlink()
    for index in range(0, len(samples), shard_size):
        rows = [spoken[s["id"]] for s in samples[index:index + shard_size] if s["id"] in spoken]
        if not rows:
            continue
        name = SHARD_PATTERN.format(index // shard_size)
        with atomic_write(out_dir / name) as f:
            f.writelines(dumps(r) + "\n" for r in rows)
        summary.shards.append(name)
        summary.samples += len(rows)
        summary.audio_seconds += sum(r["duration"] for r in rows)
    summary.wall_seconds = time.perf_counter() - start
    with atomic_write(out_dir / META_NAME) as f:
        json.dump({"settings": meta, "finished": report.finished, "planned": summary.planned,
                   "samples": summary.samples, "failed": summary.failed,
                   "shards": summary.shards, "synth_report": REPORT_NAME,
                   "audio_seconds": round(summary.audio_seconds, 3)}, f, indent=2)
    return summary


def sample_shards(path) -> list[Path]:
    """The shard files of an InSerter directory (or [path] for one shard file)."""
    path = Path(path)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("samples-*.jsonl"))
    if not shards:
        raise ManifestError(f"{path}: no InSerter sample shards (samples-*.jsonl); build them with "
                            f"`speechlm build inserter --corpus ... --out {path}`")
    return shards


def read_samples(path, limit: int | None = None) -> list[dict]:
    """The samples of an InSerter directory or shard, audio paths made absolute, as records
    with `text` (spoken), `before` and `continuation` (the text after the speech)."""
    from ..data.manifest import AUDIO_PATH_KEY, read_manifest

    records: list[dict] = []
    for shard in sample_shards(path):
        for rec in read_manifest(shard):
            if not rec.get("after"):
                raise ManifestError(f"{shard}: sample {rec.get('id')!r} has no 'after' text; "
                                    "this is not an InSerter shard (rebuild with "
                                    "`speechlm build inserter`)")
            rec["audio"] = rec.pop(AUDIO_PATH_KEY)
            rec["continuation"] = rec["after"]
            rec.setdefault("before", "")
            records.append(rec)
            if limit is not None and len(records) >= limit:
                return records
    return records
