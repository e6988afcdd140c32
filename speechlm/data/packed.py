"""Fixed-length token sequences for pre-training, from memory-mapped shards or lists.

    data = PackedSequences(iter_interleaved_shards("data/interleaved"))
    data[0]   # {"input_ids": [...seq_len ids], "labels": same}: every token is learned
    pack_documents([[1, 5, 9, 2], [1, 7, 2]], seq_len=4)   # -> [[1, 5, 9, 2], [1, 7, 2]] cut
    rows, labels = pack_documents(docs, 4, learned=[[False, True, True, True], ...])
    PackedSequences([rows], labels=[labels])   # -100 where a token is context only

Shards are read lazily (numpy memmaps): a row is copied out only when indexed, so a
corpus much larger than memory trains with flat memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class PackedSequences:
    """Rows of several [N_i, seq_len] arrays as one dataset of causal-LM items."""

    def __init__(self, blocks: Iterable[np.ndarray], *, labels: Iterable[np.ndarray] | None = None):
        blocks = list(blocks)
        label_blocks = list(labels) if labels is not None else None
        if label_blocks is not None and [b.shape for b in label_blocks] != \
                [b.shape for b in blocks]:
            raise ValueError("labels must have the shape of the packed blocks")
        keep = [i for i, b in enumerate(blocks) if len(b)]
        self.blocks = [blocks[i] for i in keep]
        self.label_blocks = [label_blocks[i] for i in keep] if label_blocks is not None else None
        widths = {int(b.shape[1]) for b in self.blocks}
        if len(widths) > 1:
            raise ValueError(f"packed blocks of different lengths {sorted(widths)}")
        self.seq_len = widths.pop() if widths else 0
        self.offsets = np.cumsum([0] + [len(b) for b in self.blocks])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _where(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        block = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return block, index - int(self.offsets[block])

    def row(self, index: int) -> np.ndarray:
        block, i = self._where(index)
        return np.asarray(self.blocks[block][i])

    def __getitem__(self, index: int) -> dict:
        block, i = self._where(int(index))
        ids = np.asarray(self.blocks[block][i]).astype(np.int64).tolist()
        if self.label_blocks is None:
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids,
                "labels": np.asarray(self.label_blocks[block][i]).astype(np.int64).tolist()}


def pack_documents(documents: Sequence[Sequence[int]], seq_len: int, *,
                   learned: Sequence[Sequence[bool]] | None = None):
    """Concatenate documents (each already ending with EOS) and cut [N, seq_len]; the last
    partial sequence is dropped (as `build interleave` does), so no row needs padding.

    With `learned` (one flag per token of each document), returns (rows, labels): labels are
    the ids where learned and -100 where the token is context only."""
    flat = [t for doc in documents for t in doc]
    rows = len(flat) // seq_len
    ids = np.asarray(flat[: rows * seq_len], dtype=np.int64).reshape(rows, seq_len)
    if learned is None:
        return ids
    flags = [bool(f) for doc, mask in zip(documents, learned, strict=True)
             for f in _same_length(doc, mask)]
    keep = np.asarray(flags[: rows * seq_len], dtype=bool).reshape(rows, seq_len)
    return ids, np.where(keep, ids, -100)


def _same_length(doc: Sequence[int], mask: Sequence[bool]) -> Sequence[bool]:
    if len(doc) != len(mask):
        raise ValueError(f"a document of {len(doc)} tokens has {len(mask)} learned flags")
    return mask
