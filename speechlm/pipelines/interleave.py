"""GLM-4-Voice synthetic interleaved data: text documents with some spans replaced by the
speech units a text-to-token model (T2U) predicts for them, packed into fixed-length token
sequences for pre-training (GLM-4-Voice, arXiv 2411.17607).

    summary = build_interleave("embedded:en", "data/interleaved", t2u=t2u, tokenizer=llm_tok)
    for block in iter_interleaved_shards("data/interleaved"): ...   # uint32 [N, seq_len]

Each document of the corpus (`pipelines.inserter.iter_corpus`: a text file, JSONL with
`text`, or `embedded:en`) is cut at word boundaries into spans of `span_words` words; each
span becomes speech with probability `speech_share`, drawn from a generator seeded by
(seed, document index), so the job is a pure function of the corpus and the settings. A
speech span is `<|begin_of_audio|> <|audio_u1|> ... <|end_of_audio|>`; a span holding a
character the T2U never saw stays text (counted, with the characters, in the sidecars).
Documents end with the LLM's EOS and are concatenated and cut into `seq_len` sequences.

Output in `out_dir`:
- `shard-00000.npy`, ...: uint32 [N, seq_len], shard k packs documents
  [k * docs_per_shard, (k + 1) * docs_per_shard) of the corpus; `shard-00000.json` beside
  it holds its counts and the ids left over after its last full sequence;
- `shard-tail.npy`: the leftovers of all shards, in order, packed the same way; what is
  left after that (fewer than seq_len ids, once per job) is dropped, not padded, so every
  row is real text and speech and the trainer needs no padding mask;
- `unit_vocab.json` (`models.unit_vocab`): the ids the units were written with;
- `interleave.json`: the settings (a rerun with other settings, another T2U or another LLM
  tokenizer into the same directory is refused, naming the field), the shard list and totals.

Memory is bounded by one shard: documents stream from the corpus and the tail shard is
written row by row. Files are written under a temporary name and renamed; a killed job reruns
with the same command, keeps the shards whose sidecar is complete and rewrites the others
byte for byte.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ConfigError, SpeechLMError
from ..jsonl import atomic_write
from ..models.unit_vocab import UNIT_VOCAB_NAME, UnitVocab, add_unit_tokens
from .inserter import iter_corpus

__all__ = ["InterleaveCounts", "InterleaveSettings", "InterleaveSummary", "TextToUnits",
           "build_interleave", "cut_spans", "iter_interleaved_shards", "tokenizer_fingerprint"]

META_NAME = "interleave.json"
SHARD_PATTERN = "shard-{:05d}"
TAIL_NAME = "shard-tail.npy"
DTYPE = np.dtype("<u4")
GROUP_DOCS = 256          # documents tokenized (and their speech spans generated) together
MAX_UNSEEN_LISTED = 64    # distinct unseen characters kept per shard for the report


class TextToUnits(Protocol):
    """What the job needs of a text-to-token model (`models.text_to_token`)."""

    num_codes: int
    tokenizer_identity: str

    def unseen_chars(self, text: str) -> set[str]: ...

    def generate(self, texts: list[str], method=None) -> list[list[int]]: ...
    # a MaskGIT T2U also takes steps= (its iterations); the job passes it only when asked


@dataclass(frozen=True)
class InterleaveSettings:
    speech_share: float = 0.3          # probability that a span becomes speech
    span_words: tuple[int, int] = (4, 24)
    seq_len: int = 512
    docs_per_shard: int = 2000
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.span_words
        if not 1 <= lo <= hi:
            raise ConfigError(f"span_words must be LOW:HIGH with 1 <= LOW <= HIGH, got {lo}:{hi}")
        if not 0.0 <= self.speech_share <= 1.0:
            raise ConfigError(f"speech_share must be in [0, 1], got {self.speech_share}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.docs_per_shard < 1:
            raise ConfigError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")


@dataclass
class InterleaveCounts:
    """What went into some documents (one shard's, or the whole job's)."""

    docs: int = 0                # documents with words
    empty: int = 0               # documents without a word: skipped
    spans: int = 0
    speech_spans: int = 0
    unseen_char_spans: int = 0   # drawn for speech, kept as text: a character the T2U never saw
    no_units_spans: int = 0      # drawn for speech, kept as text: the T2U returned no units
    text_tokens: int = 0
    unit_tokens: int = 0         # <|audio_i|> only
    marker_tokens: int = 0       # <|begin_of_audio|> and <|end_of_audio|>
    eos_tokens: int = 0
    unseen_chars: str = ""       # the distinct characters behind unseen_char_spans (a sample)

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.unit_tokens + self.marker_tokens + self.eos_tokens

    def add(self, other: InterleaveCounts) -> None:
        for f in fields(self):
            if f.name != "unseen_chars":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.unseen_chars = _merge_chars(self.unseen_chars, other.unseen_chars)


def _merge_chars(a: str, b: Iterable[str]) -> str:
    return "".join(sorted(set(a) | set(b))[:MAX_UNSEEN_LISTED])


@dataclass
class InterleaveSummary:
    out_dir: Path
    counts: InterleaveCounts = field(default_factory=InterleaveCounts)
    sequences: int = 0
    seq_len: int = 0
    shards: list[str] = field(default_factory=list)
    shards_written: int = 0      # by this run
    shards_kept: int = 0         # complete from an earlier run
    dropped_tokens: int = 0      # the job's last partial sequence
    tokens_written: int = 0      # by this run
    wall_seconds: float = 0.0

    @property
    def unit_share(self) -> float:
        return self.counts.unit_tokens / self.counts.tokens if self.counts.tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_written / self.wall_seconds if self.wall_seconds else 0.0

    def summary(self) -> str:
        c = self.counts
        share = c.speech_spans / c.spans if c.spans else 0.0
        lines = [f"documents: {c.docs} ({c.empty} empty, skipped); spans: {c.spans}, "
                 f"{c.speech_spans} speech ({share:.1%})",
                 f"tokens: {c.tokens:,} ({self.unit_share:.1%} units, {c.text_tokens:,} text); "
                 f"{self.sequences} sequences of {self.seq_len} in {len(self.shards)} shard(s) in "
                 f"{self.out_dir} ({self.shards_written} written now, {self.shards_kept} kept); "
                 f"{self.dropped_tokens} tokens of the last partial sequence dropped",
                 f"{self.wall_seconds:.1f} s wall ({self.tokens_per_second:,.0f} tokens/s written)"]
        if c.unseen_char_spans or c.no_units_spans:
            lines.append(f"kept as text: {c.unseen_char_spans} span(s) with characters the T2U "
                         f"never saw ({c.unseen_chars!r}), {c.no_units_spans} with no units")
        return "\n".join(lines)


# -- one document -------------------------------------------------------------------------------


def cut_spans(n_words: int, rng: random.Random, settings: InterleaveSettings
              ) -> list[tuple[int, int, bool]]:
    """(first word, end word, drawn for speech) of each span of a document of `n_words`."""
    lo, hi = settings.span_words
    spans, start = [], 0
    while start < n_words:
        end = min(n_words, start + rng.randint(lo, hi))
        spans.append((start, end, rng.random() < settings.speech_share))
        start = end
    return spans


@dataclass
class _Doc:
    text: str                        # words joined by single spaces
    char_starts: list[int]           # per span; a span owns the space before it (see _pack_doc)
    speech_texts: dict[int, str]     # span index -> its text, for spans to be spoken


def _plan_doc(index: int, words: list[str], settings: InterleaveSettings, t2u: TextToUnits,
              counts: InterleaveCounts, unseen: set[str]) -> _Doc:
    rng = random.Random(f"{settings.seed}:{index}")
    word_starts = list(itertools.accumulate((len(w) + 1 for w in words[:-1]), initial=0))
    doc = _Doc(" ".join(words), [], {})
    for j, (start, end, speech) in enumerate(cut_spans(len(words), rng, settings)):
        doc.char_starts.append(max(0, word_starts[start] - 1))
        counts.spans += 1
        if not speech:
            continue
        text = " ".join(words[start:end])
        missing = t2u.unseen_chars(text)
        if missing:
            counts.unseen_char_spans += 1
            unseen.update(missing)
            continue
        doc.speech_texts[j] = text
    return doc


def _generate(t2u: TextToUnits, texts: list[str], batch: int, method: str | None,
              steps: int | None = None) -> list[list[int]]:
    """Units for each text; batches of similar length, so a real T2U pads little."""
    order = sorted(range(len(texts)), key=lambda k: (len(texts[k]), k))
    out: list[list[int] | None] = [None] * len(texts)
    for first in range(0, len(order), batch):
        chunk = order[first:first + batch]
        units = t2u.generate([texts[k] for k in chunk], method=method,
                             **({"steps": steps} if steps is not None else {}))
        if len(units) != len(chunk):
            raise SpeechLMError(f"the T2U returned {len(units)} unit sequences for {len(chunk)} "
                                "texts; it must return one per text")
        for k, u in zip(chunk, units, strict=True):
            out[k] = list(u)
    return out  # type: ignore[return-value]


def _pack_doc(ids: list[int], offsets, doc: _Doc, units_of: dict[int, list[int]],
              vocab: UnitVocab, eos_id: int, counts: InterleaveCounts) -> np.ndarray:
    """The document's ids: text spans as tokenized in the whole document, speech spans as
    units between the audio markers, then EOS.

    The text is tokenized once, as running text, and each span takes the tokens that start
    inside it, the space before it included. So a text span after speech keeps the leading
    space token (" world" -> "▁wor"/"Ġwor") it has in running text, and no tokenizer-specific
    prefix-space rule is needed. Tokens never straddle a span boundary: span boundaries are
    spaces, and SentencePiece pieces and byte-level pre-tokenizers never cross a space.
    """
    ids_arr = np.asarray(ids, dtype=np.int64)
    token_starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(ids))
    bounds = np.searchsorted(token_starts, doc.char_starts, side="left").tolist() + [len(ids)]
    pieces = []
    for j in range(len(doc.char_starts)):
        units = units_of.get(j)
        if units:
            u = np.asarray(units, dtype=np.int64)
            bad = u[(u < 0) | (u >= vocab.num_codes)]
            if bad.size:
                raise SpeechLMError(f"the T2U returned unit {int(bad[0])} outside "
                                    f"[0, {vocab.num_codes}) (its num_codes)")
            pieces += [[vocab.begin_id], u + vocab.unit_base, [vocab.end_id]]
            counts.speech_spans += 1
            counts.unit_tokens += len(u)
            counts.marker_tokens += 2
        else:
            if j in units_of:
                counts.no_units_spans += 1
            text = ids_arr[bounds[j]:bounds[j + 1]]
            pieces.append(text)
            counts.text_tokens += len(text)
    pieces.append([eos_id])
    counts.eos_tokens += 1
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces])


# -- one shard ----------------------------------------------------------------------------------


@dataclass
class _Job:
    settings: InterleaveSettings
    t2u: TextToUnits
    tokenizer: object
    vocab: UnitVocab
    eos_id: int
    t2u_batch: int
    t2u_method: str | None
    t2u_steps: int | None = None


def _group_ids(docs: list[_Doc], job: _Job, counts: InterleaveCounts) -> list[np.ndarray]:
    enc = job.tokenizer([d.text for d in docs], add_special_tokens=False,
                        return_offsets_mapping=True)
    requests = [(i, j, text) for i, d in enumerate(docs) for j, text in d.speech_texts.items()]
    units = _generate(job.t2u, [text for _, _, text in requests], job.t2u_batch,
                      job.t2u_method, job.t2u_steps)
    per_doc: list[dict[int, list[int]]] = [{} for _ in docs]
    for (i, j, _), u in zip(requests, units, strict=True):
        per_doc[i][j] = u
    return [_pack_doc(enc["input_ids"][i], enc["offset_mapping"][i], d, per_doc[i], job.vocab,
                      job.eos_id, counts) for i, d in enumerate(docs)]


def _build_shard(first_doc: int, texts: Iterable[str], job: _Job, bar
                 ) -> tuple[np.ndarray, list[int], InterleaveCounts, int]:
    """(sequences, leftover ids, counts, documents in range) of one shard's documents."""
    counts, unseen = InterleaveCounts(), set()
    parts: list[np.ndarray] = []
    group: list[_Doc] = []
    n = 0
    for n, text in enumerate(texts, start=1):
        bar.update(1)
        words = text.split()
        if not words:
            counts.empty += 1
            continue
        counts.docs += 1
        group.append(_plan_doc(first_doc + n - 1, words, job.settings, job.t2u, counts, unseen))
        if len(group) >= GROUP_DOCS:
            parts += _group_ids(group, job, counts)
            group = []
    if group:
        parts += _group_ids(group, job, counts)
    counts.unseen_chars = _merge_chars("", unseen)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    seq_len = job.settings.seq_len
    full = len(ids) // seq_len * seq_len
    return (ids[:full].astype(DTYPE).reshape(-1, seq_len), ids[full:].tolist(), counts, n)


def _read_sidecar(out_dir: Path, name: str) -> dict | None:
    """The sidecar of a complete shard, else None (missing, or its .npy is not all there)."""
    try:
        side = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
        if (out_dir / f"{name}.npy").stat().st_size == side["npy_bytes"]:
            return side
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_shard(out_dir: Path, name: str, sequences: np.ndarray, tail: list[int],
                 counts: InterleaveCounts, first_doc: int, docs_in_range: int) -> dict:
    with atomic_write(out_dir / f"{name}.npy", "wb") as f:
        np.save(f, sequences, allow_pickle=False)
    side = {"first_doc": first_doc, "docs_in_range": docs_in_range,
            "sequences": int(sequences.shape[0]),
            "npy_bytes": (out_dir / f"{name}.npy").stat().st_size, **asdict(counts),
            "tail": tail}
    # Written last: its presence (with a matching .npy size) marks the shard complete.
    with atomic_write(out_dir / f"{name}.json") as f:
        json.dump(side, f)
    return side


def _write_tail(out_dir: Path, names: list[str], sidecars: dict[str, dict], seq_len: int
                ) -> tuple[int, int]:
    """Pack the shards' leftovers in order into the tail shard, streaming row by row.
    Returns (rows, ids dropped)."""
    total = sum(len(sidecars[n]["tail"]) for n in names)
    rows = total // seq_len
    path = out_dir / TAIL_NAME
    if rows == 0:
        path.unlink(missing_ok=True)
        return 0, total
    header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
              "shape": (rows, seq_len)}
    with atomic_write(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        pending: list[int] = []
        left = rows * seq_len
        for name in names:
            pending += sidecars[name]["tail"]
            take = min(len(pending) // seq_len * seq_len, left)
            if take:
                f.write(np.asarray(pending[:take], dtype=DTYPE).tobytes())
                del pending[:take]
                left -= take
    return rows, total - rows * seq_len


# -- the job ------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id, added tokens included): two
    tokenizers with the same fingerprint write the same ids for the same tokens."""
    items = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([items, tokenizer.eos_token_id], ensure_ascii=False).encode("utf-8")
    return "vocab-sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def _check_meta(out_dir: Path, settings: dict) -> None:
    path = out_dir / META_NAME
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except ValueError:
        raise ConfigError(f"{path}: unreadable; delete {out_dir} to rebuild") from None
    # a key only one side has counts too (t2u_steps is written only when it was given)
    changed = [k for k in {**settings, **old} if old.get(k) != settings.get(k)]
    if changed:
        raise ConfigError(
            f"{out_dir} holds interleaved data built with other settings ({', '.join(changed)}: "
            f"{old.get(changed[0])!r} there, {settings.get(changed[0])!r} now); use another --out "
            "directory, or delete this one to rebuild")


def _exclusive(out_dir: Path):
    """One job per output directory."""
    from ..jsonl import exclusive

    return exclusive(out_dir / ".interleave.lock", f"{out_dir}: another interleave job is writing here; "
                     "wait for it or use another --out")


def _seed_t2u(seed: int, shard: int) -> None:
    # A T2U that samples draws from torch's global generator: seeding it per shard makes a
    # rerun of one shard give the bytes an uninterrupted run gave.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed * 1_000_003 + shard)


def build_interleave(corpus: str, out_dir, *, t2u: TextToUnits, tokenizer,
                     settings: InterleaveSettings | None = None, t2u_batch: int = 64,
                     t2u_method: str | None = None, t2u_steps: int | None = None,
                     progress: bool = True) -> InterleaveSummary:
    """Write the interleaved, packed shards of `corpus` into `out_dir` (module doc).

    `tokenizer` is the LLM's (a fast Hugging Face tokenizer); the unit tokens are added to it
    here, exactly as training adds them to the model. `t2u_batch` texts go to each
    `t2u.generate(texts, method=t2u_method)` call (None: the T2U's default decoder);
    `t2u_steps` sets a MaskGIT T2U's iterations (None: its own default).
    """
    start = time.perf_counter()
    settings = settings or InterleaveSettings()
    if t2u_batch < 1:
        raise ConfigError(f"t2u_batch must be >= 1, got {t2u_batch}")
    if t2u_steps is not None and t2u_steps < 1:
        raise ConfigError(f"t2u_steps must be >= 1, got {t2u_steps}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("the LLM tokenizer must be a fast (tokenizers-backed) one: spans are "
                          "located by character offsets")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the LLM tokenizer has no EOS token to end documents with")
    vocab = add_unit_tokens(None, tokenizer, t2u.num_codes,
                            tokenizer_identity=t2u.tokenizer_identity)
    out_dir = Path(out_dir)
    meta = {"corpus": corpus, **asdict(settings), "t2u_tokenizer_identity": vocab.tokenizer_identity,
            "t2u_num_codes": vocab.num_codes, "t2u_method": t2u_method,
            "llm_tokenizer": tokenizer_fingerprint(tokenizer)}
    if t2u_steps is not None:  # only then: directories built before the option still resume
        meta["t2u_steps"] = t2u_steps
    meta = json.loads(json.dumps(meta))  # tuples as lists, as they read back
    _check_meta(out_dir, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = _Job(settings, t2u, tokenizer, vocab, tokenizer.eos_token_id, t2u_batch, t2u_method,
               t2u_steps)
    summary = InterleaveSummary(out_dir, seq_len=settings.seq_len)

    from ..progress import progress_bar

    with _exclusive(out_dir):
        for stale in out_dir.glob(".shard-*.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
        vocab.save(out_dir)
        with atomic_write(out_dir / META_NAME) as f:
            json.dump({"settings": meta, "finished": False}, f, indent=2)
        bar = progress_bar(unit="doc", desc="interleave", dynamic_ncols=True,
                   disable=not progress)
        names: list[str] = []
        sidecars: dict[str, dict] = {}
        docs = (text for _, text in iter_corpus(corpus))
        try:
            for index in itertools.count():
                chunk = itertools.islice(docs, settings.docs_per_shard)
                name, first_doc = SHARD_PATTERN.format(index), index * settings.docs_per_shard
                side = _read_sidecar(out_dir, name)
                if side is not None:
                    texts = list(chunk)  # at most one shard's texts, kept in case it changed
                    if side["docs_in_range"] == len(texts) and texts:
                        bar.update(len(texts))
                        summary.shards_kept += 1
                        names.append(name)
                        sidecars[name] = side
                        continue
                    chunk = iter(texts)
                _seed_t2u(settings.seed, index)
                sequences, tail, counts, n = _build_shard(first_doc, chunk, job, bar)
                if n == 0:
                    break
                sidecars[name] = _write_shard(out_dir, name, sequences, tail, counts, first_doc, n)
                names.append(name)
                summary.shards_written += 1
                summary.tokens_written += sequences.size
                if n < settings.docs_per_shard:
                    break
            tail_rows, summary.dropped_tokens = _write_tail(out_dir, names, sidecars,
                                                            settings.seq_len)
        finally:
            bar.close()
        if not names:
            raise ConfigError(f"corpus {corpus}: no documents")
        summary.tokens_written += tail_rows * settings.seq_len
        for name in names:
            side = sidecars[name]
            summary.counts.add(InterleaveCounts(**{f.name: side[f.name]
                                                   for f in fields(InterleaveCounts)}))
            summary.sequences += side["sequences"]
        summary.sequences += tail_rows
        summary.shards = [f"{n}.npy" for n in names] + ([TAIL_NAME] if tail_rows else [])
        summary.wall_seconds = time.perf_counter() - start
        with atomic_write(out_dir / META_NAME) as f:
            json.dump({"settings": meta, "finished": True, "shards": summary.shards,
                       "sequences": summary.sequences, "eos_id": job.eos_id,
                       "unit_vocab": UNIT_VOCAB_NAME, "dropped_tokens": summary.dropped_tokens,
                       "unit_share": round(summary.unit_share, 6),
                       "counts": asdict(summary.counts)}, f, indent=2)
    return summary


# -- reading ------------------------------------------------------------------------------------


def iter_interleaved_shards(directory) -> Iterator[np.ndarray]:
    """The packed sequences of a finished `build_interleave` directory, shard by shard, each
    a read-only memory-mapped uint32 array [N, seq_len] (nothing is read until indexed)."""
    directory = Path(directory)
    meta_path = directory / META_NAME
    if not meta_path.is_file():
        raise ConfigError(f"{directory}: not an interleaved-data directory (no {META_NAME}); "
                          f"build one with `speechlm build interleave --out {directory} ...`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("finished"):
        raise ConfigError(f"{directory}: the interleave job did not finish; rerun the same "
                          "`speechlm build interleave` command to complete it")
    seq_len = meta["settings"]["seq_len"]
    for name in meta["shards"]:
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"{path}: listed in {META_NAME} but missing; rerun the same "
                              "`speechlm build interleave` command to rewrite it")
        block = np.load(path, mmap_mode="r", allow_pickle=False)
        if block.dtype != DTYPE or block.ndim != 2 or block.shape[1] != seq_len:
            raise ConfigError(f"{path}: expected uint32 [N, {seq_len}], found {block.dtype} "
                              f"{list(block.shape)}; rebuild this directory")
        yield block
