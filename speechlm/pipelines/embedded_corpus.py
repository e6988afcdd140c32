"""The embedded speech corpus: verses of the embedded text corpus spoken by eSpeak NG.

A deterministic recipe (which verses, which voices, rates and pitches) is
synthesized once into the user cache and reused. Splits are disjoint in both
text and voice: dev and test verses come from books that train never sees
(and any verse whose text also occurs in train is dropped from them), and
each split has its own voices, so test numbers measure generalisation to new
speakers and new sentences.

Re-spoken splits (`RESPOKEN`, e.g. `embedded:en/test_piper`) are a held-out
split's verses spoken again by another TTS engine: the same texts in a voice,
and a kind of synthesis, that training never heard.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.text_corpus import load_verses, normalized_key
from ..jsonl import atomic_write
from ..paths import cache_dir

SPLITS = ("train", "dev", "test")

# lang -> {name: (the held-out split it re-speaks, backend spec naming engine and voice)}
RESPOKEN: dict[str, dict[str, tuple[str, str]]] = {
    "en": {"test_piper": ("test", "piper:en_US-joe-medium")},
}


@dataclass(frozen=True)
class SplitSpec:
    size: int
    voices: tuple[str, ...]
    books: tuple[str, ...] = ()  # empty: every book not claimed by another split
    rate: tuple[int, int] = (145, 180)  # eSpeak words per minute, sampled uniformly
    pitch: tuple[int, int] = (35, 65)


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    lang: str
    splits: dict[str, SplitSpec] = field(default_factory=dict)
    min_words: int = 4
    max_words: int = 25
    seed: int = 0
    sample_rate: int = 16000
    audio_format: str = "flac"
    # "LANG/SPLIT" of an embedded corpus whose texts this one never repeats (null: none)
    exclude_texts_of: str | None = None

    def fingerprint(self) -> str:
        """Changes whenever anything that affects the audio or the selection changes."""
        fields = asdict(self)
        if fields["exclude_texts_of"] is None:  # corpora built before the field keep their key
            del fields["exclude_texts_of"]
        blob = json.dumps(fields, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# Variants m1..m8/f1..f5 and base voices are partitioned so that no voice
# (base + variant) of dev or test occurs in train.
EMBEDDED: dict[str, CorpusSpec] = {
    "en": CorpusSpec(
        name="en",
        lang="en",
        splits={
            "train": SplitSpec(
                size=3000,
                voices=("en-us+m1", "en-us+f1", "en-us+m3", "en-us+f3", "en+m2", "en+f2",
                        "en+m7", "en-gb-x-rp+m5", "en-gb-x-rp+f1", "en-gb-x-rp+m3"),
            ),
            "dev": SplitSpec(
                size=200,
                voices=("en-gb-x-gbclan+m6", "en-us-nyc+f4"),
                books=("Joel", "Titus", "Philemon", "Jude", "II Peter", "Lamentations"),
                rate=(150, 175),
            ),
            "test": SplitSpec(
                size=200,
                voices=("en-gb-scotland+m8", "en-029+f5"),
                books=("Ruth", "Esther", "Jonah", "James", "Philippians"),
                rate=(150, 175),
            ),
        },
    ),
    "es": CorpusSpec(
        name="es",
        lang="es",
        splits={
            "train": SplitSpec(
                size=600,
                voices=("es+m1", "es+f1", "es+m3", "es+f3", "es-419+m2", "es-419+f2"),
            ),
            "dev": SplitSpec(size=150, voices=("es+m6", "es-419+f4"),
                             books=("Joel", "Titus", "Philemon", "Jude", "II Peter",
                                    "Lamentations"), rate=(150, 175)),
            "test": SplitSpec(size=200, voices=("es+m8", "es-419+f5"),
                              books=("Ruth", "Esther", "Jonah", "James", "Philippians"),
                              rate=(150, 175)),
        },
    ),
}


def corpus_root(spec: CorpusSpec) -> Path:
    return cache_dir() / "corpus" / f"{spec.name}-{spec.fingerprint()}"


def plan_split(spec: CorpusSpec, split: str) -> list[dict]:
    """The synthesis items of one split: text, voice, rate and pitch, all deterministic."""
    claimed = {b for s in spec.splits.values() for b in s.books}
    split_spec = spec.splits[split]
    other = "es" if spec.lang == "en" else "en"

    def eligible(verse, books_wanted):
        in_books = verse.book in books_wanted if books_wanted else verse.book not in claimed
        n_words = len(verse.text(spec.lang).split())
        return in_books and spec.min_words <= n_words <= spec.max_words

    verses = [v for v in load_verses() if eligible(v, split_spec.books)]
    if split != "train" and "train" in spec.splits:
        # Parallel passages repeat across books; drop any text that train also has.
        train_keys = {normalized_key(v.text(spec.lang)) for v in load_verses()
                      if eligible(v, spec.splits["train"].books)}
        verses = [v for v in verses if normalized_key(v.text(spec.lang)) not in train_keys]
    if spec.exclude_texts_of:
        lang, _, other_split = spec.exclude_texts_of.partition("/")
        taken = {normalized_key(item["text"]) for item in plan_split(EMBEDDED[lang], other_split)}
        verses = [v for v in verses if normalized_key(v.text(spec.lang)) not in taken]
    rng = random.Random(f"{spec.seed}-{spec.name}-{split}")
    rng.shuffle(verses)
    if len(verses) < split_spec.size:
        raise ValueError(f"corpus {spec.name}/{split}: only {len(verses)} verses qualify, "
                         f"{split_spec.size} requested")
    items = []
    for i, verse in enumerate(verses[: split_spec.size]):
        items.append({
            "id": f"{spec.name}-{split}-{i:05d}",
            "text": verse.text(spec.lang),
            "lang": spec.lang,
            "translation": verse.text(other),
            "ref": verse.ref,
            "voice": split_spec.voices[i % len(split_spec.voices)],
            "rate": rng.randint(*split_spec.rate),
            "pitch": rng.randint(*split_spec.pitch),
        })
    return items


@dataclass
class BuiltCorpus:
    root: Path
    manifests: dict[str, Path]
    newly_built: bool


def embedded_manifest_path(split: str, lang: str = "en") -> Path | None:
    """The manifest of a split of the embedded corpus if it has been built, else None."""
    root = corpus_root(EMBEDDED[lang])
    path = root / split / "manifest.jsonl"
    return path if (root / "COMPLETE.json").exists() else None


def build_embedded_corpus(lang: str = "en", *, jobs: int | None = None,
                          progress: bool = True) -> BuiltCorpus:
    """Synthesize the embedded corpus of `lang` ("en" or "es") into the cache once."""
    return build_corpus(EMBEDDED[lang], jobs=jobs, progress=progress)


def build_corpus(spec: CorpusSpec, *, jobs: int | None = None,
                 progress: bool = True) -> BuiltCorpus:
    """Synthesize a corpus recipe into the cache once; later calls return at once.

    A killed build resumes where it stopped (the synthesis job is resumable);
    `COMPLETE.json` is written last, so a partial build is never taken as done.
    """
    import os

    from .synth import synthesize_corpus

    root = corpus_root(spec)
    manifests = {s: root / s / "manifest.jsonl" for s in spec.splits}
    marker = root / "COMPLETE.json"
    if marker.exists():
        return BuiltCorpus(root, manifests, newly_built=False)
    jobs = jobs or max(1, os.cpu_count() or 1)
    reports = {}
    for split in spec.splits:
        report = synthesize_corpus(
            plan_split(spec, split), root / split, voices=list(spec.splits[split].voices),
            jobs=jobs, audio_format=spec.audio_format, sample_rate=spec.sample_rate,
            seed=spec.seed, progress=progress, strict=False,
        )
        reports[split] = _report_summary(report)
    with atomic_write(marker) as f:
        json.dump({"spec": asdict(spec), "fingerprint": spec.fingerprint(), "splits": reports},
                  f, indent=2, default=list)
    return BuiltCorpus(root, manifests, newly_built=True)


def respoken_root(spec: CorpusSpec, name: str) -> Path:
    source, backend = RESPOKEN[spec.lang][name]
    key = hashlib.sha256(json.dumps([spec.fingerprint(), source, backend]).encode()).hexdigest()
    return cache_dir() / "corpus" / f"{spec.name}-{name}-{key[:10]}"


def plan_respoken(spec: CorpusSpec, name: str) -> list[dict]:
    """The items of re-spoken split `name`: the source split's verses (text, translation,
    ref) with ids of their own and no eSpeak voice, rate or pitch (the engine's own pace)."""
    source, _ = RESPOKEN[spec.lang][name]
    return [{"id": f"{spec.name}-{name}-{i:05d}", "text": item["text"], "lang": item["lang"],
             "translation": item["translation"], "ref": item["ref"]}
            for i, item in enumerate(plan_split(spec, source))]


def build_respoken_split(lang: str, name: str, *, jobs: int | None = None,
                         progress: bool = True) -> Path:
    """Synthesize re-spoken split `name` of `lang` into the cache once (resumable, marked
    complete last, like `build_corpus`); returns its manifest."""
    import os

    from ..tts.base import parse_backend_spec
    from .synth import synthesize_corpus

    spec = EMBEDDED[lang]
    root = respoken_root(spec, name)
    marker = root / "COMPLETE.json"
    if not marker.exists():
        source, backend = RESPOKEN[lang][name]
        backend_name, voice = parse_backend_spec(backend)
        report = synthesize_corpus(
            plan_respoken(spec, name), root, voices=[voice] if voice else [],
            jobs=jobs or max(1, os.cpu_count() or 1), audio_format=spec.audio_format,
            sample_rate=spec.sample_rate, seed=spec.seed, progress=progress, strict=False,
            backend=backend_name)
        with atomic_write(marker) as f:
            json.dump({"source": source, "backend": backend, "fingerprint": spec.fingerprint(),
                       "report": _report_summary(report)}, f, indent=2)
    return root / "manifest.jsonl"


def more_training_speech_spec(lang: str, size: int) -> CorpusSpec:
    """`size` more verses of the training books (1-60 words), spoken by the training voices:
    more real speech-text pairs than the embedded train split holds, held-out books (and so
    held-out texts) excluded. Texts may repeat train's, with new voices, rates and pitches."""
    base = EMBEDDED[lang]
    held_out = {b for name, s in base.splits.items() if name != "train" for b in s.books}
    train = base.splits["train"]
    books = tuple(sorted({v.book for v in load_verses()} - held_out))
    return CorpusSpec(name=f"{lang}-more-train", lang=lang, min_words=1, max_words=60,
                      seed=base.seed, splits={"train": SplitSpec(
                          size=size, voices=train.voices, books=books, rate=train.rate,
                          pitch=train.pitch)})


def build_more_training_speech(lang: str, size: int, *, jobs: int | None = None,
                               progress: bool = True) -> Path:
    """Synthesize `more_training_speech_spec(lang, size)` into the cache once (resumable);
    returns its manifest."""
    if lang not in EMBEDDED:
        raise ValueError(f"no embedded corpus for language {lang!r}; use one of "
                         f"{sorted(EMBEDDED)}")
    return build_corpus(more_training_speech_spec(lang, size), jobs=jobs,
                        progress=progress).manifests["train"]


# lang -> utterances of the "extra" split: more speech of the training books and voices
EXTRA_SIZES = {"es": 1800, "en": 3000}


def extra_speech_spec(lang: str) -> CorpusSpec:
    """`embedded:LANG/extra`: verses of the training books spoken by the training voices, as
    the train split is (same word range, rates and pitches), none of them a train text, and
    (as train's books hold no dev/test text) none a held-out one: speech to use as
    untranscribed audio for self-training (its text then only measures the pseudo-labels),
    or as labelled data for the bound of having it all transcribed."""
    base = EMBEDDED[lang]
    train = base.splits["train"]
    held_out = {b for name, s in base.splits.items() if name != "train" for b in s.books}
    books = tuple(sorted({v.book for v in load_verses()} - held_out))
    return CorpusSpec(name=f"{lang}-extra", lang=lang, min_words=base.min_words,
                      max_words=base.max_words, seed=base.seed, exclude_texts_of=f"{lang}/train",
                      splits={"extra": SplitSpec(size=EXTRA_SIZES[lang], voices=train.voices,
                                                 books=books, rate=train.rate,
                                                 pitch=train.pitch)})


def build_extra_speech(lang: str, *, jobs: int | None = None, progress: bool = True) -> Path:
    """Synthesize `extra_speech_spec(lang)` into the cache once (resumable); its manifest."""
    return build_corpus(extra_speech_spec(lang), jobs=jobs, progress=progress).manifests["extra"]


def _report_summary(report) -> dict:
    fields = getattr(report, "__dataclass_fields__", None)
    if fields:
        return {k: v for k, v in asdict(report).items() if isinstance(v, (int, float, str))}
    return {"report": str(report)}
