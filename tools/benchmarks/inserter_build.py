"""Benchmark: `build_inserter` throughput (plan + eSpeak NG + FLAC + manifest + shards), with 2
TTS processes vs 1.

300 samples cut from a 2000-verse text file (the embedded corpus's English side), two voices,
rates drawn per sample. Baseline: jobs=1 (in this process); ours: jobs=2. Each run builds into a
fresh directory; runs alternate and the median of 3 is reported (the machine may be shared: the
note gives the load average). Reported: samples written per second; ratio = jobs2 / jobs1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time


def _corpus(root: str, n: int) -> str:
    from speechlm.data.text_corpus import load_verses

    path = os.path.join(root, "corpus.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(v.en + "\n" for v in load_verses()[:n])
    return path


def _timed_run(corpus: str, samples: int, jobs: int, root: str) -> tuple[float, int, float]:
    from speechlm.pipelines.inserter import PlanSettings, build_inserter

    out = tempfile.mkdtemp(dir=root)
    start = time.perf_counter()
    summary = build_inserter(corpus, out, voices=["en-us+f3", "en-us+m1"], rate=(150, 190),
                             settings=PlanSettings(num_samples=samples), jobs=jobs,
                             shard_size=100, progress=False)
    wall = time.perf_counter() - start
    shutil.rmtree(out)
    return wall, summary.samples, summary.audio_seconds


def run(quick: bool = False) -> list[dict]:
    n = 60 if quick else 300
    root = tempfile.mkdtemp(prefix="speechlm-bench-inserter-")
    repeats = 1 if quick else 3
    try:
        corpus = _corpus(root, 2000)
        _timed_run(corpus, 4, 1, root)  # warm up: imports, voice catalogue, resampler kernel
        _timed_run(corpus, 8, 2, root)  # starts the worker server once
        runs: dict[int, list] = {1: [], 2: []}
        for _ in range(repeats):  # alternate, so both see the same machine load
            for jobs in (1, 2):
                runs[jobs].append(_timed_run(corpus, n, jobs, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (w1, s1, a1), (w2, s2, _) = (sorted(runs[j])[len(runs[j]) // 2] for j in (1, 2))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"{s1} samples ({a1:.0f} s of speech) from 2000 verses; jobs=2 vs jobs=1 on "
            f"{os.cpu_count()} CPUs (load average {load:.1f})")
    return [{"benchmark": "inserter_build", "metric": "samples_per_s", "value": s2 / w2,
             "baseline": s1 / w1, "ratio": (s2 / w2) / (s1 / w1), "note": note}]


if __name__ == "__main__":  # worker processes re-import this module: keep the guard
    import json

    for row in run():
        print(json.dumps(row))
