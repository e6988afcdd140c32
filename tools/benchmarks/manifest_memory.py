"""Benchmark: memory of streaming a large manifest with iter_manifest stays flat.

Writes a 1M-line manifest (200k in quick mode) to a temporary directory with
`write_manifest` from a generator, then reads it back with `iter_manifest`
(validation and path resolution on) while tracemalloc records the peak of
Python allocations; the peak is sampled at 10%, 50% and 100% of the file.
Baseline, same process and file: the usual `[json.loads(l) for l in f]`
that holds every record. Allocations are measured with tracemalloc (which
counts Python objects, not the interpreter itself); the per-record cost of
the baseline is what grows with the file. A second view without
tracemalloc: how much the process's peak RSS grows while each reads the file.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MiB = 1024 * 1024


def synthetic_records(n: int):
    """Realistic-looking manifest records, generated lazily."""
    langs = ("en", "es", "fr", "de")
    for i in range(n):
        yield {"id": f"utt-{i:07d}", "audio": f"audio/spk{i % 997:03d}/utt-{i:07d}.flac",
               "duration": round(1.0 + (i * 7919 % 1500) / 100.0, 2), "lang": langs[i % 4],
               "speaker": f"spk{i % 997:03d}",
               "text": f"this is utterance number {i} of the synthetic benchmark manifest"}


def _max_rss_mib() -> float:
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MiB


def _stream_peaks(path: Path, n: int) -> dict[int, float]:
    from speechlm.data.manifest import iter_manifest

    checkpoints = {max(1, n // 10): 10, max(1, n // 2): 50, n: 100}
    peaks: dict[int, float] = {}
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for count, record in enumerate(iter_manifest(path), start=1):
            del record
            if count in checkpoints:
                peaks[checkpoints[count]] = (tracemalloc.get_traced_memory()[1] - base) / MiB
    finally:
        tracemalloc.stop()
    return peaks


def _load_all_peak(path: Path) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        peak = (tracemalloc.get_traced_memory()[1] - base) / MiB
        count = len(records)
        del records
    finally:
        tracemalloc.stop()
    return peak, count


def run(quick: bool = False) -> list[dict]:
    from speechlm.data.manifest import iter_manifest, write_manifest

    n = 200_000 if quick else 1_000_000
    rows = []
    with tempfile.TemporaryDirectory(prefix="speechlm-bench-") as tmp:
        path = Path(tmp) / "big.jsonl"
        start = time.perf_counter()
        written = write_manifest(path, synthetic_records(n))
        write_s = time.perf_counter() - start
        assert written == n
        size_mib = path.stat().st_size / MiB

        # Timing pass, also the peak-RSS growth (streaming first: ru_maxrss never goes down).
        rss_before = _max_rss_mib()
        start = time.perf_counter()
        count = sum(1 for _ in iter_manifest(path))
        read_s = time.perf_counter() - start
        stream_rss = _max_rss_mib() - rss_before
        assert count == n

        peaks = _stream_peaks(path, n)
        rss_before = _max_rss_mib()
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        load_all_rss = _max_rss_mib() - rss_before
        del records
        baseline_peak, loaded = _load_all_peak(path)
        assert loaded == n

    where = f"{n:,} lines, {size_mib:.0f} MiB file; tracemalloc peak of Python allocations"
    for pct in (10, 50, 100):
        rows.append({"benchmark": "manifest_memory", "metric": f"stream_peak_mib_at_{pct}pct",
                     "value": peaks[pct], "baseline": None, "ratio": None,
                     "note": f"iter_manifest (validate + resolve paths); {where}"})
    rows.append({"benchmark": "manifest_memory", "metric": "stream_peak_growth_100_vs_10pct",
                 "value": peaks[100], "baseline": peaks[10], "ratio": peaks[100] / peaks[10],
                 "note": "ratio = peak at 100% / peak at 10% of the file (1.0 = flat; this row "
                         "is a flatness check, not a speed-up)"})
    rows.append({"benchmark": "manifest_memory", "metric": "peak_mib_vs_load_all",
                 "value": peaks[100], "baseline": baseline_peak,
                 "ratio": baseline_peak / peaks[100],
                 "note": "baseline = [json.loads(line) for line in f] (all records in memory); "
                         "ratio = baseline / ours"})
    rows.append({"benchmark": "manifest_memory", "metric": "peak_rss_growth_mib_vs_load_all",
                 "value": stream_rss, "baseline": load_all_rss,
                 "ratio": load_all_rss / max(stream_rss, 1.0),
                 "note": "growth of the process's peak RSS (ru_maxrss) while reading the whole "
                         "file, no tracemalloc; ratio = baseline / max(ours, 1 MiB)"})
    rows.append({"benchmark": "manifest_memory", "metric": "write_lines_per_s",
                 "value": n / write_s, "baseline": None, "ratio": None,
                 "note": "write_manifest from a generator (atomic, streaming), no tracemalloc"})
    rows.append({"benchmark": "manifest_memory", "metric": "read_lines_per_s",
                 "value": n / read_s, "baseline": None, "ratio": None,
                 "note": "iter_manifest with validation and path resolution, no tracemalloc"})
    return rows


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
