"""Curriculum pacing (CLIMB, arXiv 2311.08886): train on the easiest items first.

Every item has a *difficulty* (its duration, or a precomputed number from its
manifest record such as `snr_db` or a small model's `cer`) and so a difficulty
percentile in (0, 1]: the fraction of items at most as difficult (ties share
the larger value). A *pacing function* p(t) of the training progress t (the
fraction of the run done) says which percentile is admissible:

    p(t) = start                          for t < ramp[0]
    p(t) = start + (1 - start) * g(x)     for ramp[0] <= t < ramp[1],
                                          x = (t - ramp[0]) / (ramp[1] - ramp[0])
    p(t) = 1                              for t >= ramp[1]

with g(x) = x (linear), x^2 (quadratic), sqrt(x) (root),
(e^(10x) - 1) / (e^10 - 1) (exp), 1 + ln(x + e^-10) / 10 (log, clipped to
[0, 1]), and 0 (step: the jump to 1 happens at ramp[1]). Defaults follow the
paper: start = 0.1, ramp = [0.0625, 0.875].

`CurriculumBucketSampler` is a `DurationBucketSampler` whose "epochs" are
*rounds*: round e draws batches (duration-bucketed, as usual) only from the
items whose percentile <= p at the round's first batch, and while p < 1 a round
is cut to `round_batches` batches, so p is re-read often (about 100 times over
the ramp by default). Once p = 1 a round is an ordinary full epoch. Progress t
is this sampler's own count of batches handed out (per rank) before the round,
over `total_batches` (max_steps x grad_accum for a trainer; a language's
expected share of that inside a mixture). It is therefore a deterministic
function of (durations, difficulties, seed, round), the same on every rank, and
resuming needs only (round, position), like the plain sampler. Since p never
falls, an item admissible at a round's start stays admissible through it.
Updates skipped for a non-finite loss still count their batches.

numpy only: importing this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .sampler import DurationBucketSampler

PACINGS = ("linear", "quadratic", "root", "exp", "log", "step")
_C = 10.0  # growth constant of the exp and log pacings (CLIMB's value)


def _shape(pacing: str, x: float) -> float:
    """g(x) for x in [0, 1): how far between start and 1 the pacing is."""
    if pacing == "linear":
        return x
    if pacing == "quadratic":
        return x * x
    if pacing == "root":
        return math.sqrt(x)
    if pacing == "exp":
        return math.expm1(_C * x) / math.expm1(_C)
    if pacing == "log":
        return min(1.0, max(0.0, 1.0 + math.log(x + math.exp(-_C)) / _C))
    if pacing == "step":
        return 0.0
    raise ValueError(f"unknown pacing {pacing!r}; choose one of {', '.join(PACINGS)}")


def pacing_value(pacing: str, t: float, *, start: float = 0.1,
                 ramp: tuple[float, float] = (0.0625, 0.875)) -> float:
    """p(t): the admissible difficulty percentile at training progress t (fraction of the run)."""
    low, high = ramp
    if pacing not in PACINGS:
        raise ValueError(f"unknown pacing {pacing!r}; choose one of {', '.join(PACINGS)}")
    if t >= high:
        return 1.0
    if t < low:
        return float(start)
    x = (t - low) / (high - low)
    return float(min(1.0, start + (1.0 - start) * _shape(pacing, x)))


def difficulty_percentiles(difficulties) -> np.ndarray:
    """Per item, the fraction of items whose difficulty is <= its own (in (0, 1])."""
    values = np.asarray(difficulties, dtype=np.float64)
    if len(values) == 0:
        return values
    ordered = np.sort(values)
    return np.searchsorted(ordered, values, side="right") / len(values)


@dataclass
class CurriculumConfig:
    """`data.curriculum`: null (default) samples every item from the first step."""

    difficulty: str = "duration"   # "duration", or a numeric field of every manifest record
    pacing: str = "linear"         # linear | quadratic | root | exp | log | step
    start: float = 0.1             # admissible percentile before the ramp
    ramp: list[float] = field(default_factory=lambda: [0.0625, 0.875])  # fractions of the run

    def __post_init__(self):
        where = "data.curriculum"
        if self.pacing not in PACINGS:
            raise ConfigError(f"{where}.pacing must be one of {', '.join(PACINGS)}, got "
                              f"{self.pacing!r}")
        if not isinstance(self.difficulty, str) or not self.difficulty:
            raise ConfigError(f"{where}.difficulty must be 'duration' or the name of a numeric "
                              f"manifest field (e.g. snr_db, cer), got {self.difficulty!r}")
        if not (isinstance(self.start, (int, float)) and 0 < self.start <= 1):
            raise ConfigError(f"{where}.start must be in (0, 1] (the easiest fraction sampled "
                              f"before the ramp; the paper uses 0.1), got {self.start!r}")
        ramp = list(self.ramp) if isinstance(self.ramp, (list, tuple)) else None
        if (ramp is None or len(ramp) != 2
                or not all(isinstance(v, (int, float)) for v in ramp)
                or not 0 <= ramp[0] < ramp[1] <= 1):
            raise ConfigError(f"{where}.ramp must be [begin, end] with 0 <= begin < end <= 1 "
                              f"(fractions of train.max_steps; the paper uses [0.0625, 0.875]), "
                              f"got {self.ramp!r}")
        self.ramp = [float(ramp[0]), float(ramp[1])]


def record_difficulties(records, difficulty: str, *, where: str = "the training manifest"):
    """Per record, its difficulty: `duration`, or the numeric field `difficulty`.

    A record lacking the field (or with a non-numeric or non-finite value) is a ConfigError
    naming the record and the fix: silently dropping items would change what the run trains on.
    """
    field_name = "duration" if difficulty == "duration" else difficulty
    values = []
    for i, record in enumerate(records):
        value = record.get(field_name)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if value is None or isinstance(value, bool) or not math.isfinite(number):
            ident = record.get("id", f"#{i}")
            got = "lacks it" if value is None else f"has {value!r}"
            raise ConfigError(
                f"data.curriculum.difficulty={difficulty!r}: record {ident} of {where} {got}; "
                f"every training record needs a finite number in the manifest field "
                f"'{field_name}' (compute it first, e.g. an SNR or a small model's CER), or use "
                "data.curriculum.difficulty=duration")
        values.append(number)
    return values


class CurriculumBucketSampler(DurationBucketSampler):
    """DurationBucketSampler that samples only items under the pacing percentile (module doc).

    difficulties: one number per item (higher = harder). total_batches: this rank's batches
    over the whole run (max_steps x grad_accum). round_batches: batches per rank per round
    while p < 1 (default total_batches / 100, at least 1). Other arguments as
    DurationBucketSampler.
    """

    def __init__(self, durations, difficulties, *, total_batches: int, pacing: str = "linear",
                 start: float = 0.1, ramp=(0.0625, 0.875), round_batches: int | None = None,
                 **kwargs):
        super().__init__(durations, **kwargs)
        difficulties = np.asarray(difficulties, dtype=np.float64)
        if difficulties.shape != self.durations.shape:
            raise ValueError(f"need one difficulty per item: {len(difficulties)} difficulties "
                             f"for {len(self.durations)} items")
        if not np.all(np.isfinite(difficulties)):
            raise ValueError("difficulties must be finite")
        if pacing not in PACINGS:
            raise ValueError(f"unknown pacing {pacing!r}; choose one of {', '.join(PACINGS)}")
        if not 0 < start <= 1 or not 0 <= ramp[0] < ramp[1] <= 1:
            raise ValueError(f"need 0 < start <= 1 and 0 <= ramp[0] < ramp[1] <= 1, got "
                             f"start={start}, ramp={ramp}")
        if total_batches < 1:
            raise ValueError(f"total_batches must be >= 1, got {total_batches}")
        self.pacing, self.start = pacing, float(start)
        self.ramp = (float(ramp[0]), float(ramp[1]))
        self.total_batches = int(total_batches)
        self.round_batches = int(round_batches) if round_batches else max(
            1, math.ceil(self.total_batches / 100))
        # Percentiles among the items that can be sampled at all (not over the budget).
        self.percentiles = np.full(len(self.durations), np.inf)
        self.percentiles[self._eligible] = difficulty_percentiles(difficulties[self._eligible])
        self._difficulty_sum = float(difficulties.sum())
        self._round_starts = {0: 0}  # round -> this rank's batches handed out before it

    # -- pacing ---------------------------------------------------------------

    def round_start(self, epoch: int) -> int:
        """Batches (this rank) the rounds before `epoch` hold: the progress at its start."""
        known = max(e for e in self._round_starts if e <= epoch)
        start = self._round_starts[known]
        for e in range(known, epoch):
            start += len(self._batches_for(e)) // self.world_size
            self._round_starts[e + 1] = start
        return start

    def pacing_at(self, epoch: int) -> float:
        """p for round `epoch`."""
        return pacing_value(self.pacing, self.round_start(epoch) / self.total_batches,
                            start=self.start, ramp=self.ramp)

    def curriculum_p(self) -> float:
        """p of the round being sampled (for the training log)."""
        return self.pacing_at(self.epoch)

    def admissible(self, epoch: int) -> np.ndarray:
        """Indices round `epoch` may sample (never empty: the easiest items at least)."""
        p = self.pacing_at(epoch)
        eligible = self.percentiles[self._eligible]
        if len(eligible) == 0:
            return self._eligible
        return self._eligible[eligible <= max(p, float(eligible.min())) + 1e-12]

    # -- batches --------------------------------------------------------------

    def _global_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = self._batches_for(self.epoch)
        self._cache = (self.epoch, batches)
        return batches

    def _batches_for(self, epoch: int) -> list[list[int]]:
        p = self.pacing_at(epoch)
        mask = np.zeros(len(self.durations), dtype=bool)
        mask[self.admissible(epoch)] = True
        buckets = [b[mask[b]] for b in self.buckets]
        rng = np.random.default_rng([self.seed, epoch])
        batches = self._assemble(rng, self._groups(rng, [b for b in buckets if len(b)]))
        if p < 1.0:
            keep = self.round_batches * self.world_size
            batches = batches[:keep]
        return batches

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "curriculum": [
            self.pacing, self.start, list(self.ramp), self.total_batches, self.round_batches,
            self._difficulty_sum]}
