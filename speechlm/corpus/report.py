"""The clean-text report: what each stage removed, with examples, and histograms.

Built from files the run leaves behind, never from memory, so a resumed or
cluster run reports the same as one uninterrupted local run: datatrove's
per-task stats (`_work/logs/JOB/stats/*.json`), the removed documents
(`removed/STAGE/*.jsonl.gz`), the bad-input records and the output itself.
Writes `report.json`, `report.md` and, when matplotlib is installed,
`report.png` (document lengths kept and removed, languages).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

from ..jsonl import atomic_write
from .pipeline import FILTER_STAGES, Layout

__all__ = ["build_report", "write_report"]

_DEDUP_STAGES = ("exact_dedup", "near_dedup")
_BAD_INPUT_LISTED = 100  # bad-input records listed in report.json (all are in _work/bad_input)


def _read_jsonl_gz(folder: Path):
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)


def _total(value) -> float:
    if isinstance(value, dict):
        return value.get("total", 0)
    return value or 0


def _job_stats(layout: Layout, job: str) -> list[dict[str, float]]:
    """Per pipeline step, datatrove's stats summed over the job's tasks ({} if it never ran)."""
    steps: list[Counter] = []
    for path in sorted((layout.logs(job) / "stats").glob("*.json")):
        for i, step in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            while len(steps) <= i:
                steps.append(Counter())
            for key, value in step.get("stats", {}).items():
                steps[i][key] += _total(value)
    return [dict(s) for s in steps]


def _step(stats: list[dict], steps: list[str], name: str) -> dict:
    return stats[steps.index(name)] if name in steps and len(stats) > steps.index(name) else {}


def _length_bucket(n: int) -> str:
    """Power-of-two bucket of a length in characters: '256-511'."""
    if n <= 0:
        return "0"
    low = 1 << int(math.log2(n))
    return f"{low}-{2 * low - 1}"


def _sorted_buckets(counts: Counter) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0].split("-")[0])))


def build_report(layout: Layout, job_steps: dict[str, list[str]], examples: int = 3,
                 example_chars: int = 300) -> dict:
    """The report as a dict (see the module doc)."""
    filter_steps = job_steps.get("filter", [])
    filter_stats = _job_stats(layout, "filter")
    read = _step(filter_stats, filter_steps, "read")
    final_steps = job_steps.get("final", [])
    final_stats = _job_stats(layout, "final")

    stages = []
    removed_lengths: Counter = Counter()
    for name in (*FILTER_STAGES, *_DEDUP_STAGES):
        job_stats, steps = ((filter_stats, filter_steps) if name in FILTER_STAGES
                            else (final_stats, final_steps))
        if name not in steps:
            continue
        st = _step(job_stats, steps, name)
        entry = {"stage": name, "docs_in": int(st.get("total", 0)),
                 "docs_removed": int(st.get("dropped", 0))}
        if name == "unicode":
            entry["docs_changed"] = int(st.get("changed", 0))
        if name == "refine":
            entry["docs_refined"] = int(st.get("outcome_refined", 0))
            entry["programs_ignored"] = int(st.get("outcome_ignored", 0))
            for key in ("lines_removed", "replacements", "malformed_ops"):
                entry[key] = int(_total(st.get(key, 0)))
        if name == "perplexity":
            entry["buckets"] = {k[len("bucket_"):]: int(v) for k, v in sorted(st.items())
                                if k.startswith("bucket_")}
        reasons: Counter = Counter()
        chars, shown = 0, []
        for record in _read_jsonl_gz(layout.removed(name)):
            text = record.get("text", "")
            chars += len(text)
            removed_lengths[_length_bucket(len(text))] += 1
            reason = (record.get("metadata") or {}).get("filter_reason")
            if reason:
                reasons[reason] += 1
            if len(shown) < examples:
                shown.append({"id": record.get("id"), "reason": reason,
                              "text": text[:example_chars]})
        entry["chars_removed"] = chars
        entry["docs_removed_fraction"] = (round(entry["docs_removed"] / entry["docs_in"], 4)
                                          if entry["docs_in"] else 0.0)
        if reasons:
            entry["reasons"] = dict(reasons.most_common())
        entry["examples"] = shown
        stages.append(entry)

    kept_lengths: Counter = Counter()
    languages: Counter = Counter()
    docs_out = chars_out = sentences = 0
    for record in _read_jsonl_gz(layout.clean):
        docs_out += 1
        chars_out += len(record.get("text", ""))
        sentences += len(record.get("sentences", ()))
        kept_lengths[_length_bucket(len(record.get("text", "")))] += 1
        if record.get("language"):
            languages[record["language"]] += 1

    seen_languages = {k[len("lang_"):]: int(v)
                      for k, v in _step(filter_stats, filter_steps, "language").items()
                      if k.startswith("lang_")}
    bad = list(_read_bad_input(layout))
    docs_in = int(read.get("documents_read", 0))
    chars_in = int(read.get("doc_len", 0))
    return {
        "input": {"files": int(read.get("input_files", 0)), "documents": docs_in,
                  "chars": chars_in, "bad_input": len(bad)},
        "output": {"documents": docs_out, "chars": chars_out, "sentences": sentences,
                   "docs_kept_fraction": round(docs_out / docs_in, 4) if docs_in else 0.0,
                   "chars_kept_fraction": round(chars_out / chars_in, 4) if chars_in else 0.0},
        "stages": stages,
        "bad_input": {"by_reason": dict(Counter(_reason_kind(b["reason"]) for b in bad)
                                        .most_common()),
                      "records": bad[:_BAD_INPUT_LISTED]},
        "histograms": {"kept_length_chars": _sorted_buckets(kept_lengths),
                       "removed_length_chars": _sorted_buckets(removed_lengths),
                       "kept_languages": dict(languages.most_common()),
                       "identified_languages": dict(sorted(seen_languages.items(),
                                                           key=lambda kv: -kv[1]))},
    }


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split("=")[0]


def _read_bad_input(layout: Layout):
    for path in sorted(layout.bad_input.glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def _markdown(report: dict) -> str:
    inp, out = report["input"], report["output"]
    lines = ["# Text cleaning report", "",
             f"Input: {inp['files']} files, {inp['documents']} documents, {inp['chars']:,} "
             f"characters; {inp['bad_input']} bad inputs skipped.",
             f"Output: {out['documents']} documents ({out['docs_kept_fraction']:.1%}), "
             f"{out['chars']:,} characters ({out['chars_kept_fraction']:.1%}), "
             f"{out['sentences']} sentences for synthesis.", "",
             "| stage | docs in | removed | removed % | chars removed |",
             "|---|---:|---:|---:|---:|"]
    for s in report["stages"]:
        changed = f" ({s['docs_changed']} changed)" if "docs_changed" in s else ""
        if "docs_refined" in s:
            changed = (f" ({s['docs_refined']} refined: {s['lines_removed']} lines removed, "
                       f"{s['replacements']} replacements; {s['programs_ignored']} programs "
                       f"ignored, {s['malformed_ops']} malformed operations)")
        lines.append(f"| {s['stage']}{changed} | {s['docs_in']} | {s['docs_removed']} | "
                     f"{s['docs_removed_fraction']:.1%} | {s['chars_removed']:,} |")
    if report["bad_input"]["by_reason"]:
        lines += ["", "## Bad input", ""]
        lines += [f"- {reason}: {n}" for reason, n in report["bad_input"]["by_reason"].items()]
        lines += [f"  - `{b['file']}:{b['line']}` {b['reason']}"
                  for b in report["bad_input"]["records"][:10]]
    lines += ["", "## Removed examples", ""]
    for s in report["stages"]:
        for ex in s["examples"]:
            text = " ".join(ex["text"].split())[:200]
            reason = f" ({ex['reason']})" if ex.get("reason") else ""
            lines.append(f"- **{s['stage']}**{reason} `{ex['id']}`: {text}")
    hist = report["histograms"]
    lines += ["", "## Kept documents by length (characters)", ""]
    lines += [f"- {bucket}: {n}" for bucket, n in hist["kept_length_chars"].items()]
    if hist["identified_languages"]:
        lines += ["", "## Languages identified (all documents that reached the filter)", ""]
        lines += [f"- {lang}: {n}" for lang, n in list(hist["identified_languages"].items())[:15]]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: Path) -> bool:
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["histograms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    buckets = sorted(set(hist["kept_length_chars"]) | set(hist["removed_length_chars"]),
                     key=lambda b: int(b.split("-")[0]))
    xs = range(len(buckets))
    ax1.bar([x - 0.2 for x in xs], [hist["kept_length_chars"].get(b, 0) for b in buckets],
            width=0.4, label="kept")
    ax1.bar([x + 0.2 for x in xs], [hist["removed_length_chars"].get(b, 0) for b in buckets],
            width=0.4, label="removed")
    ax1.set_xticks(list(xs), buckets, rotation=60, fontsize=7)
    ax1.set_xlabel("document length (characters)")
    ax1.set_ylabel("documents")
    ax1.legend()
    langs = list(hist["identified_languages"].items())[:15]
    ax2.bar([k for k, _ in langs], [v for _, v in langs])
    ax2.set_title("languages identified")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(layout: Layout, job_steps: dict[str, list[str]], examples: int = 3,
                 example_chars: int = 300, extra: dict | None = None) -> dict:
    """Build the report (plus `extra` entries) and write report.json, report.md (and
    report.png) into the output."""
    report = {**build_report(layout, job_steps, examples, example_chars), **(extra or {})}
    report["plot"] = "report.png" if _plot(report, layout.out / "report.png") else None
    with atomic_write(layout.out / "report.json") as f:
        f.write(json.dumps(report, indent=1, ensure_ascii=False))
    with atomic_write(layout.out / "report.md") as f:
        f.write(_markdown(report))
    return report
