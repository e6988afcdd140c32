"""Collate dataset items into padded batches; skipped items ride along as a list.

`AudioDataset` returns a `SkippedItem` in place of an item it could not load
(non-strict mode). The collator drops those from the tensors but lists them
in `batch["skipped"]`, so the main process can count skips even when the
items were loaded in DataLoader workers (see `SkipReport`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

# Item keys the collator turns into dedicated batch entries.
_SPECIAL_KEYS = ("id", "audio", "text")


@dataclass(frozen=True)
class SkippedItem:
    """A dataset item that could not be used: which (id, audio path), and why."""

    index: int
    id: str | None
    audio: str | None
    reason: str  # the AudioError subclass's `reason`, e.g. "file not found"
    detail: str = ""
    error: str = ""  # the AudioError class name, e.g. "AudioMissingError"

    def to_dict(self) -> dict:
        return asdict(self)


class AudioCollator:
    """Pad a list of dataset items into a batch dict.

    The batch holds `audio` float32 [B, T] (padded with `pad_value`, T rounded
    up to `pad_to_multiple_of`), `audio_lengths` int64 [B] (samples),
    `attention_mask` int64 [B, T] (1 = real sample, 0 = padding; the
    convention of transformers' speech models), `ids` and `texts` lists, one
    list per other item field under the field's own name (None where an item
    lacks it, e.g. `lang`, `units`, `audio_path`), and `skipped`: a list of
    dicts for the SkippedItems in the input. B may be 0 when every item of
    the batch was skipped; training loops should skip such a batch.
    """

    def __init__(self, *, pad_value: float = 0.0, pad_to_multiple_of: int | None = None):
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_value = float(pad_value)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[dict | SkippedItem]) -> dict:
        skipped = [item.to_dict() for item in items if isinstance(item, SkippedItem)]
        kept = [item for item in items if not isinstance(item, SkippedItem)]
        lengths = [int(item["audio"].shape[-1]) for item in kept]
        longest = max(lengths, default=0)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        audio = torch.full((len(kept), longest), self.pad_value, dtype=torch.float32)
        mask = torch.zeros((len(kept), longest), dtype=torch.long)
        for row, (item, length) in enumerate(zip(kept, lengths, strict=True)):
            audio[row, :length] = item["audio"].reshape(-1)
            mask[row, :length] = 1
        batch = {
            "ids": [item.get("id") for item in kept],
            "audio": audio,
            "audio_lengths": torch.tensor(lengths, dtype=torch.long),
            "attention_mask": mask,
            "texts": [item.get("text") for item in kept],
        }
        return add_item_fields(batch, kept, skipped, _SPECIAL_KEYS)


def add_item_fields(batch: dict, kept: Sequence[dict], skipped: list[dict],
                    special_keys: Sequence[str]) -> dict:
    """Finish a batch: one list per other item field under the field's own name (None where
    an item lacks it) and `skipped`. A field that collides with a batch entry keeps its
    values under item_<key>."""
    other_keys = dict.fromkeys(key for item in kept for key in item if key not in special_keys)
    for key in other_keys:
        name = key if key not in batch and key != "skipped" else f"item_{key}"
        batch[name] = [item.get(key) for item in kept]
    batch["skipped"] = skipped
    return batch
