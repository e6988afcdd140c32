"""Map-style dataset of manifest utterances, and the report of items it skipped.

A bad item (missing, corrupt, empty, silent, NaN, too short or too long
audio) does not stop a long job: in the default non-strict mode
`__getitem__` returns a `SkippedItem`, `AudioCollator` drops it from the
batch and lists it in `batch["skipped"]`, and the training loop adds each
batch to a `SkipReport`. Counting in the main process from the batches is
what keeps the counts right when DataLoader workers (separate processes)
load the items. `strict=True` raises the AudioError instead.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..errors import AudioError, AudioTooLongError, AudioTooShortError, ManifestError
from ..jsonl import atomic_write
from .collate import SkippedItem
from .manifest import AUDIO_PATH_KEY, check_record, manifest_durations, read_manifest


class AudioDataset:
    """Utterances of a manifest (path) or of a list of records, loaded on `__getitem__`.

    An item is a dict: `id`, `audio` (float32 mono tensor at `sample_rate`),
    `audio_path` (absolute), `text` and every other record field as written
    in the manifest (`lang`, `units`, ...). Audio is read through
    `speechlm.audio.checks.load_checked`, honouring `offset`/`duration`.
    `min_duration` / `max_duration` (seconds) reject items outside the range;
    when the manifest states a duration that check happens without reading
    the file. Audio quieter than `silence_dbfs` RMS is skipped as silent
    (None disables that check). Relative audio paths in `records` resolve against `base_dir`
    (default: the working directory); in a manifest, against its directory.
    """

    def __init__(self, manifest_or_records, *, sample_rate: int = 16000, strict: bool = False,
                 min_duration: float | None = None, max_duration: float | None = None,
                 silence_dbfs: float | None = -60.0, base_dir=None):
        if isinstance(manifest_or_records, (str, os.PathLike)):
            self.source = str(manifest_or_records)
            self.records = read_manifest(manifest_or_records)
        else:
            self.source = "<records>"
            self.records = [self._checked_record(pos, rec, base_dir)
                            for pos, rec in enumerate(manifest_or_records)]
        self.sample_rate = sample_rate
        self.strict = strict
        self.min_duration = min_duration
        self.max_duration = max_duration
        self.silence_dbfs = silence_dbfs

    @staticmethod
    def _checked_record(pos: int, record: dict, base_dir) -> dict:
        problems = check_record(record)
        if problems:
            name, problem = problems[0]
            raise ManifestError(f"record {pos} (id {record.get('id')!r}): {name}: {problem}")
        if AUDIO_PATH_KEY not in record:
            audio = Path(os.path.expanduser(record["audio"]))
            if not audio.is_absolute():
                audio = Path(base_dir or os.getcwd()).resolve() / audio
            record = {**record, AUDIO_PATH_KEY: str(audio)}
        return record

    def __len__(self) -> int:
        return len(self.records)

    @property
    def durations(self) -> list[float]:
        """Manifest durations (seconds) per item, for `DurationBucketSampler`.

        Raises ManifestError naming the first record without one (fill them
        with `speechlm data stats --fill-durations MANIFEST`).
        """
        return manifest_durations(self.records, source=self.source)

    def __getitem__(self, index: int) -> dict | SkippedItem:
        record = self.records[index]
        path = record[AUDIO_PATH_KEY]
        try:
            audio = self._load(record, path)
        except AudioError as e:
            if self.strict:
                raise
            return SkippedItem(index=index, id=record.get("id"), audio=path, reason=e.reason,
                               detail=e.detail, error=type(e).__name__)
        item = {key: value for key, value in record.items()
                if key not in ("audio", AUDIO_PATH_KEY)}
        item["audio"] = audio
        item["audio_path"] = path
        return item

    def _load(self, record: dict, path: str):
        from ..audio.checks import load_checked

        stated = record.get("duration")
        # Cheap rejection from the manifest's own duration: no file access needed.
        if stated is not None and self.min_duration is not None and stated < self.min_duration:
            raise AudioTooShortError(path, f"{stated:.3f} s < min_duration {self.min_duration:g} s",
                                     hint="drop it or lower min_duration")
        if stated is not None and self.max_duration is not None and stated > self.max_duration:
            raise AudioTooLongError(path, f"{stated:.3f} s > max_duration {self.max_duration:g} s",
                                    hint="segment it into shorter pieces or raise max_duration")
        return load_checked(path, self.sample_rate, offset=float(record.get("offset", 0.0)),
                            duration=stated, min_duration=self.min_duration,
                            max_duration=self.max_duration, silence_dbfs=self.silence_dbfs)


class SkipReport:
    """Skipped items gathered from batches in the main process.

    `add(batch)` takes a collated batch (its `skipped` list), a list of
    skipped entries, or one SkippedItem. `count`, `by_reason` (reason ->
    count) and `items` (dicts with index, id, audio, reason, detail) say what
    was skipped; `write(path)` saves them as JSON (atomically).
    """

    def __init__(self):
        self.count = 0
        self.by_reason: Counter[str] = Counter()
        self.items: list[dict] = []

    def add(self, batch_or_items) -> int:
        """Record the skipped items of a batch; returns how many it had."""
        if isinstance(batch_or_items, dict):
            entries: Iterable = batch_or_items.get("skipped", ())
        elif isinstance(batch_or_items, SkippedItem):
            entries = [batch_or_items]
        else:
            entries = batch_or_items
        n = 0
        for entry in entries:
            entry = entry.to_dict() if isinstance(entry, SkippedItem) else dict(entry)
            self.items.append(entry)
            self.by_reason[entry.get("reason", "unknown")] += 1
            n += 1
        self.count += n
        return n

    def merge(self, other: SkipReport) -> None:
        """Add the items of another report (e.g. one gathered on another rank)."""
        self.add(other.items)

    def to_dict(self) -> dict:
        return {"count": self.count, "by_reason": dict(self.by_reason.most_common()),
                "items": self.items}

    def summary(self) -> str:
        if not self.count:
            return "no items skipped"
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.by_reason.most_common())
        return f"skipped {self.count} item(s) ({reasons})"

    def write(self, path) -> Path:
        """Write the report as JSON; returns the path."""
        path = Path(path)
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=2)
            f.write("\n")
        return path
