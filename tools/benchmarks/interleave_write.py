"""Benchmark: `build_interleave` shard-writing throughput, and flat memory as the corpus grows.

Corpus: verses of the embedded corpus (English side, cycled), one document a line; the tiny
Llama tokenizer (SentencePiece, 1024 pieces) extended with 16384 unit tokens; a fake T2U
that returns five units per word at once, so what is timed is our side (span cutting,
tokenization, packing, atomic shard writes), not a model. Settings: speech share 0.3, spans of
4-24 words, seq_len 512, 250 documents per shard.

Rows:
- tokens written per second; baseline: the same tokenizer on the same texts as plain text
  (one batched call per 256 documents, nothing written); ratio = ours / baseline.
- peak-RSS growth (ru_maxrss) and tracemalloc peak during a build of the base corpus and of
  one 4x larger, each in a fresh process after a warm-up build; ratio = 4x / base (1.0 =
  flat: memory is bounded by one shard, not by the corpus).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MiB = 1024 * 1024
NUM_CODES = 16384
SETTINGS = dict(speech_share=0.3, span_words=(4, 24), seq_len=512, docs_per_shard=250)


class FakeT2U:
    """Five units per word, a deterministic function of the word (no model)."""

    num_codes = NUM_CODES
    tokenizer_identity = "bench-fake-t2u"

    def unseen_chars(self, text):
        return set()

    def generate(self, texts, method=None):
        return [[(len(w) * 977 + ord(w[0]) * 31 + k) % NUM_CODES for w in t.split()
                 for k in range(5)] for t in texts]


def _corpus(root: Path, n: int) -> str:
    from speechlm.data.text_corpus import load_verses

    verses = [v.en for v in load_verses()]
    path = root / f"corpus-{n}.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(verses[i % len(verses)] + "\n" for i in range(n))
    return str(path)


def _tokenizer_dir(root: Path) -> str:
    from speechlm.testing.tiny_tokenizers import save_llama_tokenizer

    out = root / "llama-tokenizer"
    save_llama_tokenizer(out)
    return str(out)


def _build(corpus: str, out: Path, tokenizer):
    from speechlm.pipelines.interleave import InterleaveSettings, build_interleave

    return build_interleave(corpus, out, t2u=FakeT2U(), tokenizer=tokenizer,
                            settings=InterleaveSettings(**SETTINGS), progress=False)


def _tokenizer(tok_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def _max_rss_mib() -> float:
    import resource

    scale = 1.0 if sys.platform == "darwin" else 1024.0  # ru_maxrss: KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MiB


def _memory_child(corpus: str, warmup: str, tok_dir: str, root: str, queue) -> None:
    """In a fresh process: warm up, then the growth of peak RSS and the tracemalloc peak of
    one build (two builds: tracemalloc would inflate RSS)."""
    import tracemalloc

    root, tokenizer = Path(root), _tokenizer(tok_dir)
    _build(warmup, Path(tempfile.mkdtemp(dir=root)), tokenizer)
    before = _max_rss_mib()
    summary = _build(corpus, Path(tempfile.mkdtemp(dir=root)), tokenizer)
    rss_growth = _max_rss_mib() - before
    tracemalloc.start()
    _build(corpus, Path(tempfile.mkdtemp(dir=root)), tokenizer)
    peak = tracemalloc.get_traced_memory()[1] / MiB
    tracemalloc.stop()
    queue.put((rss_growth, peak, summary.counts.docs, summary.sequences))


def _memory(corpus: str, warmup: str, tok_dir: str, root: Path) -> tuple[float, float, int, int]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(corpus, warmup, tok_dir, str(root), queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join()
    return result


def _plain_tokens_per_s(corpus: str, tok_dir: str) -> float:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    texts = Path(corpus).read_text(encoding="utf-8").splitlines()
    start = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 256):
        n += sum(map(len, tok(texts[i:i + 256], add_special_tokens=False)["input_ids"]))
    return n / (time.perf_counter() - start)


def run(quick: bool = False) -> list[dict]:
    base = 1000 if quick else 4000
    root = Path(tempfile.mkdtemp(prefix="speechlm-bench-interleave-"))
    try:
        tok_dir = _tokenizer_dir(root)
        warmup, small, large = _corpus(root, 20), _corpus(root, base), _corpus(root, 4 * base)
        tokenizer = _tokenizer(tok_dir)
        _build(warmup, root / "warmup", tokenizer)  # imports, first unit-token extension
        walls, summary = [], None
        for _ in range(1 if quick else 3):
            out = Path(tempfile.mkdtemp(dir=root))
            start = time.perf_counter()
            summary = _build(large, out, tokenizer)
            walls.append(time.perf_counter() - start)
            shutil.rmtree(out)
        wall = sorted(walls)[len(walls) // 2]
        ours = (summary.sequences * SETTINGS["seq_len"]) / wall
        plain = _plain_tokens_per_s(large, tok_dir)
        rss_small, peak_small, docs_small, _ = _memory(small, warmup, tok_dir, root)
        rss_large, peak_large, docs_large, _ = _memory(large, warmup, tok_dir, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = (f"{4 * base} verses, {summary.sequences} x 512 ids, {summary.unit_share:.0%} units; "
             f"fake T2U (no model), tiny Llama tokenizer + 16384 unit tokens; load {load:.1f}")
    return [
        {"benchmark": "interleave_write", "metric": "tokens_per_s", "value": ours,
         "baseline": plain, "ratio": ours / plain,
         "note": f"{where}; baseline = plain batched tokenization of the same texts, no output"},
        {"benchmark": "interleave_write", "metric": "peak_rss_growth_mib_4x_vs_1x",
         "value": rss_large, "baseline": rss_small,
         "ratio": max(rss_large, 1.0) / max(rss_small, 1.0),
         "note": f"ru_maxrss growth of a build of {docs_large} vs {docs_small} documents, fresh "
                 "process after a warm-up build; ratio = 4x / 1x, floors at 1 MiB (1.0 = flat)"},
        {"benchmark": "interleave_write", "metric": "tracemalloc_peak_mib_4x_vs_1x",
         "value": peak_large, "baseline": peak_small, "ratio": peak_large / peak_small,
         "note": "peak of Python allocations during the same builds; ratio = 4x / 1x (1.0 = "
                 "flat, bounded by one shard of 250 documents)"},
    ]


if __name__ == "__main__":  # spawned workers re-import this module: keep the guard
    for row in run(quick="--quick" in sys.argv):
        print(row)
