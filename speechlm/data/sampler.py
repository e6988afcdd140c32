"""Batch samplers that fill batches up to a duration budget, resumable mid-epoch.

A batch costs memory for `len(batch) x longest item` (everything is padded
to the longest), so that padded duration is what the budget limits.
`DurationBucketSampler` groups items of similar duration (quantile buckets)
so little of each batch is padding; `RandomBatchSampler` packs items in
random order under the same budget, the baseline it is measured against.

Both are batch samplers: pass one as `DataLoader(dataset, batch_sampler=...)`.
Both are deterministic functions of (durations, seed, epoch), so every rank
computes the same global batch list and takes its own share, and resuming is
skipping the batches already consumed. With DataLoader workers the sampler
runs ahead of training (prefetch), so a trainer should save
`state_dict(num_consumed=batches_it_trained_on)`.

numpy only: importing this module does not import torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np


def padded_duration(batch: Sequence[int], durations) -> float:
    """Duration a batch occupies once padded: len(batch) x its longest item."""
    return len(batch) * max(float(durations[i]) for i in batch) if len(batch) else 0.0


def padding_fraction(batches, durations) -> float:
    """Padded frames / total frames over `batches` (0 = no padding)."""
    durations = np.asarray(durations, dtype=np.float64)
    total = padded = 0.0
    for batch in batches:
        if len(batch) == 0:
            continue
        values = durations[np.asarray(batch)]
        size = len(values) * float(values.max())
        total += size
        padded += size - float(values.sum())
    return padded / total if total > 0 else 0.0


class _BudgetBatchSampler:
    """Shared machinery: packing under a budget, rank sharding, epochs, resume."""

    _num_buckets = 1

    def __init__(self, durations, *, max_batch_duration: float | None, max_batch_size: int | None,
                 shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int):
        self.durations = np.asarray(durations, dtype=np.float64)
        if self.durations.ndim != 1:
            raise ValueError("durations must be a 1-D sequence of seconds")
        if not np.all(np.isfinite(self.durations)) or np.any(self.durations < 0):
            bad = int(np.flatnonzero(~np.isfinite(self.durations) | (self.durations < 0))[0])
            raise ValueError(f"duration of item {bad} is {self.durations[bad]}; "
                             "durations must be finite and >= 0 (check the manifest)")
        if max_batch_duration is None and max_batch_size is None:
            raise ValueError("give max_batch_duration, max_batch_size or both")
        if max_batch_duration is not None and max_batch_duration <= 0:
            raise ValueError(f"max_batch_duration must be > 0, got {max_batch_duration}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.max_batch_duration = None if max_batch_duration is None else float(max_batch_duration)
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume_at = 0  # batches of the current epoch to skip on the next __iter__
        self._position = 0  # batches handed out so far in the current epoch
        self._cache: tuple[int, list[list[int]]] | None = None

        eligible = np.ones(len(self.durations), dtype=bool)
        if self.max_batch_duration is not None:
            eligible = self.durations <= self.max_batch_duration
        # An item longer than the whole budget cannot fit in any batch.
        self.excluded = np.flatnonzero(~eligible)
        if len(self.excluded):
            warnings.warn(
                f"{len(self.excluded)} item(s) are longer than max_batch_duration="
                f"{self.max_batch_duration} s and are never sampled (longest "
                f"{self.durations[self.excluded].max():.2f} s); raise the budget or filter "
                "them with max_duration", stacklevel=3)
        self._eligible = np.flatnonzero(eligible)

    # -- batch construction ---------------------------------------------------

    def _groups(self, rng: np.random.Generator) -> list[np.ndarray]:
        """Index groups packed separately; one group of everything here."""
        indices = self._eligible
        return [rng.permutation(indices) if self.shuffle else indices]

    def _pack(self, indices: np.ndarray) -> list[list[int]]:
        budget = self.max_batch_duration
        size_cap = self.max_batch_size
        durations = self.durations
        batches: list[list[int]] = []
        batch: list[int] = []
        longest = 0.0
        for index in indices.tolist():
            d = durations[index]
            new_longest = d if d > longest else longest
            full = (size_cap is not None and len(batch) >= size_cap) or (
                budget is not None and (len(batch) + 1) * new_longest > budget)
            if batch and full:
                batches.append(batch)
                batch, new_longest = [], d
            batch.append(index)
            longest = new_longest
        if batch:
            # drop_last drops a group's remainder batch unless it is exactly full.
            if not self.drop_last or (size_cap is not None and len(batch) == size_cap):
                batches.append(batch)
        return batches

    def _global_batches(self) -> list[list[int]]:
        """Every rank's batches for the current epoch, in order (cached per epoch)."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._assemble(rng, self._groups(rng))
        self._cache = (self.epoch, batches)
        return batches

    def _assemble(self, rng: np.random.Generator, groups) -> list[list[int]]:
        """Pack each group, shuffle the batch order, even the count out over ranks."""
        batches: list[list[int]] = []
        for group in groups:
            batches.extend(self._pack(group))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._even_out(batches)

    def _even_out(self, batches: list[list[int]]) -> list[list[int]]:
        """Make the batch count a multiple of world_size so every rank gets as many."""
        extra = -len(batches) % self.world_size
        if extra == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - (self.world_size - extra)]
        # Split the largest batches in two: halves still respect the budget and
        # no index is repeated, so the ranks' shares stay disjoint.
        batches = list(batches)
        for _ in range(extra):
            largest = max(range(len(batches)), key=lambda i: len(batches[i]), default=None)
            if largest is None or len(batches[largest]) < 2:
                break
            batch = batches[largest]
            half = len(batch) // 2
            batches[largest: largest + 1] = [batch[:half], batch[half:]]
        extra = -len(batches) % self.world_size
        if extra and batches:
            # Fewer items than ranks: repeat some batches like DistributedSampler does.
            batches += [batches[i % len(batches)] for i in range(extra)]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        return self._global_batches()[self.rank:: self.world_size]

    # -- sampler protocol -----------------------------------------------------

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for i in range(start, len(batches)):
            self._position = i + 1
            yield list(batches[i])

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        return len(self._rank_batches())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shuffle depends on (seed, epoch). Keeps a loaded resume point
        when `epoch` is the epoch that was loaded."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = 0
            self._position = 0

    def state_dict(self, num_consumed: int | None = None) -> dict:
        """Where this sampler is. `num_consumed`: batches of this epoch the trainer has used
        (default: batches handed out, which runs ahead of training with DataLoader prefetch)."""
        return {
            "kind": type(self).__name__,
            "epoch": self.epoch,
            "position": self._position if num_consumed is None else int(num_consumed),
            **self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields exactly the batches an uninterrupted run would
        have yielded after `state['position']` batches of `state['epoch']`."""
        mine = self._fingerprint()
        theirs = {key: state.get(key) for key in mine}
        if state.get("kind") != type(self).__name__ or theirs != mine:
            changed = [key for key in mine if theirs[key] != mine[key]]
            if state.get("kind") != type(self).__name__:
                changed.insert(0, "kind")
            raise ValueError(
                "sampler state does not match this sampler (differs in: "
                f"{', '.join(changed)}); resume with the same data, seed, budget and world size")
        self.epoch = int(state["epoch"])
        self._cache = None
        self._resume_at = self._position = int(state["position"])

    def _fingerprint(self) -> dict:
        return {
            "seed": self.seed, "num_items": len(self.durations),
            "world_size": self.world_size, "max_batch_duration": self.max_batch_duration,
            "max_batch_size": self.max_batch_size, "num_buckets": self._num_buckets,
            "shuffle": self.shuffle, "drop_last": self.drop_last,
            "pool_batches": getattr(self, "pool_batches", None),
        }


class DurationBucketSampler(_BudgetBatchSampler):
    """Batches of similar-duration items under a padded-duration budget.

    Items are put in `num_buckets` buckets with quantile boundaries (equal
    counts). Each epoch, every bucket is shuffled, cut into pools of about
    `pool_batches` batches' worth of items, each pool sorted by duration
    (0 = no sorting: batches are random within the bucket, with more
    padding), and packed greedily so `len(batch) * longest <=
    max_batch_duration` (and `len(batch) <= max_batch_size`); then the batch
    order is shuffled. The shuffles depend on (seed, epoch) only. Items longer
    than the budget are never sampled (listed in `.excluded`, with a warning).

    Distributed: all ranks build the same batch list; rank r takes batches
    r, r + world_size, ... Without drop_last, the largest batches are split
    until the count divides evenly, so ranks get the same number of batches,
    disjoint, covering every index once. With drop_last each bucket's
    remainder batch and the uneven tail are dropped.
    """

    def __init__(self, durations, *, max_batch_duration: float, max_batch_size: int | None = None,
                 num_buckets: int = 10, pool_batches: int = 8, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if max_batch_duration is None:
            raise ValueError("DurationBucketSampler needs max_batch_duration (seconds of padded "
                             "audio per batch); use RandomBatchSampler for fixed-size batches")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if pool_batches < 0:
            raise ValueError(f"pool_batches must be >= 0, got {pool_batches}")
        self._num_buckets = int(num_buckets)
        self.pool_batches = int(pool_batches)
        super().__init__(durations, max_batch_duration=max_batch_duration,
                         max_batch_size=max_batch_size, shuffle=shuffle, seed=seed,
                         drop_last=drop_last, rank=rank, world_size=world_size)
        eligible = self.durations[self._eligible]
        if len(eligible):
            cuts = np.quantile(eligible, np.linspace(0, 1, self._num_buckets + 1)[1:-1])
        else:
            cuts = np.array([])
        bucket_of = np.searchsorted(cuts, eligible, side="right")
        # Within a bucket keep items by duration so that without shuffle batches are tight too.
        self.buckets = []
        for b in range(self._num_buckets):
            members = self._eligible[bucket_of == b]
            if len(members):
                self.buckets.append(members[np.argsort(self.durations[members], kind="stable")])

    def _groups(self, rng: np.random.Generator, buckets=None) -> list[np.ndarray]:
        """The buckets (default all of them), shuffled and pool-sorted per epoch."""
        buckets = self.buckets if buckets is None else buckets
        if not self.shuffle:
            return buckets
        groups = []
        for bucket in buckets:
            shuffled = rng.permutation(bucket)
            if self.pool_batches:
                # Sort random pools of a few batches' worth by duration: batch membership
                # stays random per epoch, but neighbours in a batch are close in length.
                per_batch = self.max_batch_duration / max(float(self.durations[bucket].mean()), 1e-9)
                if self.max_batch_size is not None:
                    per_batch = min(per_batch, self.max_batch_size)
                pool = max(1, int(per_batch)) * self.pool_batches
                shuffled = np.concatenate([
                    chunk[np.argsort(self.durations[chunk], kind="stable")]
                    for chunk in np.array_split(shuffled, max(1, -(-len(shuffled) // pool)))
                ])
            groups.append(shuffled)
        return groups


class RandomBatchSampler(_BudgetBatchSampler):
    """Batches of randomly ordered items under the same budget rules (the baseline).

    Same interface as DurationBucketSampler; `max_batch_duration` may be None
    for fixed-size batches of `max_batch_size`.
    """

    def __init__(self, durations, *, max_batch_duration: float | None = None,
                 max_batch_size: int | None = None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__(durations, max_batch_duration=max_batch_duration,
                         max_batch_size=max_batch_size, shuffle=shuffle, seed=seed,
                         drop_last=drop_last, rank=rank, world_size=world_size)
