"""Benchmark: `synthesize_corpus` throughput (eSpeak NG + resample + FLAC + manifest), 2 jobs vs 1.

~200 English verses of the embedded corpus (speechlm/resources/bible_en_es.jsonl.gz),
two voices, rates drawn per item. Baseline: jobs=1 (in this process); ours:
jobs=2 (worker processes). Each run writes to a fresh directory and includes
starting its worker pool (forked from a server that imported torch once,
before timing; ~0.3 s, which is why 100 items are too few to show scaling).
Runs alternate and the median of 3 is reported (the machine may be shared:
the note gives the load average). Reported: items per second and seconds of
audio per wall second; ratio = jobs2 / jobs1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time


def _verses(n: int) -> list[dict]:
    from speechlm.jsonl import iter_jsonl
    from speechlm.paths import resource

    items = []
    for _, rec in iter_jsonl(resource("bible_en_es.jsonl.gz")):
        words = len(rec["en"].split())
        if 6 <= words <= 30:
            items.append({"id": f"v{len(items):04d}", "text": rec["en"], "ref": rec["ref"]})
            if len(items) == n:
                break
    return items


def _timed_run(items: list[dict], jobs: int, root: str) -> tuple[float, float, int]:
    from speechlm.pipelines.synth import synthesize_corpus

    out = tempfile.mkdtemp(dir=root)
    start = time.perf_counter()
    report = synthesize_corpus(items, out, voices=["en-us+f3", "en-us+m1"], rate=(150, 190),
                               jobs=jobs, progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out)
    return wall, report.audio_seconds, report.done


def run(quick: bool = False) -> list[dict]:
    n = 40 if quick else 200
    items = _verses(n)
    root = tempfile.mkdtemp(prefix="speechlm-bench-synth-")
    repeats = 1 if quick else 3
    try:
        _timed_run(items[:4], 1, root)  # warm up: imports, voice catalogue, resampler kernel
        _timed_run(items[:8], 2, root)  # starts the worker server once
        runs: dict[int, list] = {1: [], 2: []}
        for _ in range(repeats):  # alternate, so both see the same machine load
            for jobs in (1, 2):
                runs[jobs].append(_timed_run(items, jobs, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # median wall time; audio and item counts are identical across runs (deterministic)
    (w1, a1, d1), (w2, a2, d2) = (sorted(runs[j])[len(runs[j]) // 2] for j in (1, 2))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"{d1} verses, {a1:.0f} s of audio; jobs=2 vs jobs=1 on {os.cpu_count()} CPUs "
            f"(load average {load:.1f})")
    return [
        {"benchmark": "synth", "metric": "items_per_s", "value": d2 / w2, "baseline": d1 / w1,
         "ratio": (d2 / w2) / (d1 / w1), "note": note},
        {"benchmark": "synth", "metric": "audio_s_per_wall_s", "value": a2 / w2,
         "baseline": a1 / w1, "ratio": (a2 / w2) / (a1 / w1), "note": note},
    ]


if __name__ == "__main__":  # worker processes re-import this module: keep the guard
    import json

    for row in run():
        print(json.dumps(row))
