"""Fixed-length token sequences for pre-training, from memory-mapped shards or lists.

    data = PackedSequences(iter_interleaved_shards("data/interleaved"))
    data[0]   # {"input_ids": [...seq_len ids], "labels": same}: every token is learned
    pack_documents([[1, 5, 9, 2], [1, 7, 2]], seq_len=4)   # -> [[1, 5, 9, 2], [1, 7, 2]] cut

Shards are read lazily (numpy memmaps): a row is copied out only when indexed, so a
corpus much larger than memory trains with flat memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class PackedSequences:
    """Rows of several [N_i, seq_len] arrays as one dataset of causal-LM items."""

    def __init__(self, blocks: Iterable[np.ndarray]):
        self.blocks = [b for b in blocks if len(b)]
        widths = {int(b.shape[1]) for b in self.blocks}
        if len(widths) > 1:
            raise ValueError(f"packed blocks of different lengths {sorted(widths)}")
        self.seq_len = widths.pop() if widths else 0
        self.offsets = np.cumsum([0] + [len(b) for b in self.blocks])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def row(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return np.asarray(self.blocks[block][index - self.offsets[block]])

    def __getitem__(self, index: int) -> dict:
        ids = self.row(int(index)).astype(np.int64).tolist()
        return {"input_ids": ids, "labels": ids}


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int) -> np.ndarray:
    """Concatenate documents (each already ending with EOS) and cut [N, seq_len]; the last
    partial sequence is dropped (as `build interleave` does), so no row needs padding."""
    flat = [t for doc in documents for t in doc]
    rows = len(flat) // seq_len
    return np.asarray(flat[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)
