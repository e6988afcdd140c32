"""Batch samplers that hand over from one sampler to another at a fixed batch of the run.

`SwitchBatchSampler(first, then, switch_batches)`: the run's first `switch_batches`
batches come from `first` (cycling its epochs if it runs out), the rest of epoch 0 is
`then`'s epoch 0 from its batch `switch_batches` on (so a phase schedule that `then`
follows, such as a warm-up phase, keeps its timing), and later epochs are `then`'s alone.
SALT's data selection uses it: `first` draws from the selected sequences only.

`IndexMapBatchSampler(inner, indices)`: `inner` samples positions of a subset; this yields
the dataset indices `indices[position]`.

Both are resumable like the samplers they wrap (state_dict / load_state_dict): the batches
of an epoch are a function of (seeds, epoch), so resuming skips the ones consumed.
"""

from __future__ import annotations

from collections.abc import Sequence


class IndexMapBatchSampler:
    """Batches of `inner` (positions into `indices`) as dataset indices."""

    def __init__(self, inner, indices: Sequence[int]):
        self.inner, self.indices = inner, [int(i) for i in indices]
        self.rank = getattr(inner, "rank", 0)
        self.world_size = getattr(inner, "world_size", 1)

    def __iter__(self):
        for batch in self.inner:
            yield [self.indices[i] for i in batch]

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        inner = (self.inner.state_dict(num_consumed=num_consumed)
                 if num_consumed is not None else self.inner.state_dict())
        return {"kind": type(self).__name__, "size": len(self.indices), "inner": inner}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != type(self).__name__ or state.get("size") != len(self.indices):
            raise ValueError("sampler state does not match this sampler (differs in: the "
                             "selected subset)")
        self.inner.load_state_dict(state["inner"])


class EpochListSampler:
    """A batch sampler whose epoch is a list of batches computed by `_epoch_batches()` (a
    function of the seeds and `self.epoch`), so resuming only skips the batches consumed.
    Subclasses set `self.epoch = 0` and `self._resume_at = self._position = 0`, and put
    `position_state()` in their state_dict and `load_position()` in load_state_dict."""

    def __iter__(self):
        batches = self._epoch_batches()
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for i in range(start, len(batches)):
            self._position = i + 1
            yield batches[i]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = self._position = 0

    def position_state(self, num_consumed: int | None = None) -> dict:
        return {"kind": type(self).__name__, "epoch": self.epoch,
                "position": self._position if num_consumed is None else int(num_consumed)}

    def load_position(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume_at = self._position = int(state["position"])


class SwitchBatchSampler(EpochListSampler):
    """`switch_batches` batches from `first`, then `then` (see the module doc)."""

    def __init__(self, first, then, *, switch_batches: int):
        if switch_batches < 0:
            raise ValueError(f"switch_batches must be >= 0, got {switch_batches}")
        self.first, self.then = first, then
        self.switch_batches = int(switch_batches)
        self.rank = getattr(then, "rank", 0)
        self.world_size = getattr(then, "world_size", 1)
        self.epoch = 0
        self._resume_at = self._position = 0

    def _epoch_batches(self) -> list[list[int]]:
        later = [list(b) for b in _from_start(self.then, self.epoch)]
        if self.epoch != 0 or not self.switch_batches:
            return later
        early: list[list[int]] = []
        first_epoch = 0
        while len(early) < self.switch_batches:
            got = [list(b) for b in _from_start(self.first, first_epoch)]
            if not got:
                raise ValueError("the first-phase sampler yields no batches (an empty subset)")
            early += got
            first_epoch += 1
        return early[: self.switch_batches] + later[self.switch_batches:]

    def __len__(self) -> int:
        return max(len(self.then), self.switch_batches) if self.epoch == 0 else len(self.then)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        return {**self.position_state(num_consumed), "switch_batches": self.switch_batches,
                "first": self.first.state_dict(), "then": self.then.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("kind", "switch_batches"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state does not match this sampler (differs in: {key})")
        # the inner samplers check that the data is the same; the position is ours
        # (_from_start drops the resume point they load)
        self.first.load_state_dict(state["first"])
        self.then.load_state_dict(state["then"])
        self.load_position(state)


def _from_start(sampler, epoch: int):
    """`sampler` at the start of `epoch`: setting another epoch first drops any resume
    point it holds (samplers keep one while the epoch they loaded stays selected)."""
    sampler.set_epoch(epoch + 1)
    sampler.set_epoch(epoch)
    return sampler
