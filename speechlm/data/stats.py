"""Summary statistics of a manifest: size, durations, languages, speakers, text lengths.

One streaming pass; memory grows with the number of records only by the
numeric arrays kept for medians (8 bytes per duration and text length) and
the per-language / per-speaker counters.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .manifest import AUDIO_PATH_KEY, iter_manifest


def summarize(values) -> dict[str, float] | None:
    """min / median / mean / p95 / max of a sequence of numbers (None when empty)."""
    if len(values) == 0:
        return None
    ordered = sorted(values)
    n = len(ordered)
    return {
        "min": ordered[0],
        "median": _quantile(ordered, 0.5),
        "mean": math.fsum(ordered) / n,
        "p95": _quantile(ordered, 0.95),
        "max": ordered[-1],
    }


def _quantile(ordered, q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default method).
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class ManifestStats:
    """What `manifest_stats` measured. `to_dict()` is the JSON form."""

    source: str
    count: int = 0
    total_seconds: float = 0.0
    missing_duration: int = 0
    duration: dict[str, float] | None = None
    text_chars: dict[str, float] | None = None
    text_words: dict[str, float] | None = None
    with_text: int = 0
    langs: list[tuple[str, int]] = field(default_factory=list)
    n_langs: int = 0
    speakers: list[tuple[str, int]] = field(default_factory=list)
    n_speakers: int = 0
    fields: dict[str, int] = field(default_factory=dict)

    @property
    def total_hours(self) -> float:
        return self.total_seconds / 3600.0

    def to_dict(self) -> dict:
        return {
            "source": self.source, "count": self.count,
            "total_hours": self.total_hours, "total_seconds": self.total_seconds,
            "missing_duration": self.missing_duration, "duration": self.duration,
            "text_chars": self.text_chars, "text_words": self.text_words,
            "with_text": self.with_text,
            "n_langs": self.n_langs, "langs": dict(self.langs),
            "n_speakers": self.n_speakers, "speakers": dict(self.speakers),
            "fields": self.fields,
        }


def manifest_stats(manifest_or_records, *, top: int = 10) -> ManifestStats:
    """Measure a manifest (path) or an iterable of records in one streaming pass.

    Durations are those written in the manifest; records without one are
    counted in `missing_duration` (fill them with `fill_durations`). `top`
    limits the per-language and per-speaker lists to the most frequent.
    """
    if isinstance(manifest_or_records, (str, Path)):
        source = str(manifest_or_records)
        records: Iterable[dict] = iter_manifest(manifest_or_records, resolve=False)
    else:
        source = "<records>"
        records = manifest_or_records
    stats = ManifestStats(source=source)
    durations, chars, words = array("d"), array("d"), array("d")
    langs: Counter[str] = Counter()
    speakers: Counter[str] = Counter()
    fields: Counter[str] = Counter()
    for record in records:
        stats.count += 1
        fields.update(k for k in record if k != AUDIO_PATH_KEY)
        duration = record.get("duration")
        if duration is None:
            stats.missing_duration += 1
        else:
            durations.append(float(duration))
        text = record.get("text")
        if isinstance(text, str):
            stats.with_text += 1
            chars.append(len(text))
            words.append(len(text.split()))
        if "lang" in record:
            langs[str(record["lang"])] += 1
        if "speaker" in record:
            speakers[str(record["speaker"])] += 1
    stats.total_seconds = math.fsum(durations)
    stats.duration = summarize(durations)
    stats.text_chars = summarize(chars)
    stats.text_words = summarize(words)
    stats.langs, stats.n_langs = langs.most_common(top), len(langs)
    stats.speakers, stats.n_speakers = speakers.most_common(top), len(speakers)
    stats.fields = dict(sorted(fields.items(), key=lambda kv: (-kv[1], kv[0])))
    return stats


def _row(name: str, summary: dict[str, float] | None, unit: str = "", digits: int = 2) -> str:
    if summary is None:
        return f"  {name:<16} -"
    cells = "  ".join(f"{key} {summary[key]:.{digits}f}{unit}"
                      for key in ("min", "median", "mean", "p95", "max"))
    return f"  {name:<16} {cells}"


def format_stats(stats: ManifestStats) -> str:
    """A human-readable table of `stats`."""
    lines = [f"{stats.source}",
             f"  {'utterances':<16} {stats.count}",
             f"  {'total':<16} {stats.total_hours:.3f} h ({stats.total_seconds:.1f} s)"]
    if stats.missing_duration:
        lines.append(f"  {'no duration':<16} {stats.missing_duration} record(s) "
                     "(not in the totals; use --fill-durations)")
    lines.append(_row("duration", stats.duration, " s"))
    lines.append(f"  {'with text':<16} {stats.with_text}")
    lines.append(_row("text chars", stats.text_chars, "", 1))
    lines.append(_row("text words", stats.text_words, "", 1))
    for title, pairs, total in (("languages", stats.langs, stats.n_langs),
                                ("speakers", stats.speakers, stats.n_speakers)):
        if not total:
            continue
        shown = ", ".join(f"{name} {count}" for name, count in pairs)
        rest = f" (top {len(pairs)} of {total})" if total > len(pairs) else ""
        lines.append(f"  {title:<16} {shown}{rest}")
    if stats.fields:
        shown = ", ".join(f"{name} {count}" for name, count in stats.fields.items())
        lines.append(f"  {'fields':<16} {shown}")
    return "\n".join(lines)
