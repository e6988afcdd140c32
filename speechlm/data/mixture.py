"""Batches from several datasets (languages) mixed by temperature sampling, resumable.

Multilingual wav2vec2 pre-training (IndicWav2Vec, XLS-R) and multilingual
CTC fine-tuning draw each batch from one language, chosen with

    p_l ∝ (n_l / N) ** alpha

where n_l is the language's size (items by default; hours in the papers)
and N the total. alpha = 1 samples in proportion to the data, alpha = 0
uniformly over languages, alpha = 0.7 (IndicWav2Vec) in between, which
upsamples the small languages.

`TemperatureMixtureSampler` is a batch sampler over the *concatenation* of
the per-language datasets (build it with `concat_datasets`, same order as
the `samplers` dict): every batch comes from one language's own batch
sampler, with its indices shifted by that language's offset. A language
whose sampler runs out starts the sampler's next epoch, so a small language
can be seen several times in one mixture epoch.

Determinism: the language of each step depends on (seed, epoch) only, so
every rank draws the same language at the same step and DDP ranks stay in
step (shard the per-language samplers by rank; they keep equal batch counts
per rank). `state_dict(num_consumed=...)` / `load_state_dict` resume exactly
mid-epoch, including each per-language sampler's own position and epoch.

`SkillItMixtureSampler` is the same mixture with probabilities that change
between rounds (Skill-It, see `speechlm.data.skill_it`); `MixtureConfig` is a
recipe's `data.mixture` section choosing between the two.

numpy only: importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError


@dataclass
class MixtureConfig:
    """`data.mixture`: how the languages' batches are mixed (temperature: data.alpha)."""

    strategy: Literal["temperature", "skill_it"] = "temperature"
    # skill_it (arXiv 2307.14430); see speechlm.data.skill_it
    eta: float = 0.5                      # the paper uses 0.2-0.8
    window: int = 3                       # rounds of validation losses summed
    round_steps: int = 100                # updates per round (the mixture is fixed in a round)
    graph: Any = None                     # null/identity | probe | {skill: {skill: w}} | k x m
    probe_steps: int = 50                 # updates on each skill alone (graph: probe)
    validation: dict[str, str] = field(default_factory=dict)  # skill -> held-out manifest
    max_validation_items: int | None = 100  # per skill and round

    def __post_init__(self):
        where = "data.mixture"
        if not (isinstance(self.eta, (int, float)) and np.isfinite(self.eta) and self.eta >= 0):
            raise ConfigError(f"{where}.eta must be >= 0 (0.2-0.8 in the paper), got {self.eta!r}")
        for name in ("window", "round_steps", "probe_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_validation_items is not None and self.max_validation_items < 1:
            raise ConfigError(f"{where}.max_validation_items must be >= 1 or null, got "
                              f"{self.max_validation_items}")
        if self.strategy == "skill_it" and not self.validation:
            raise ConfigError(f"{where}.validation: Skill-It needs a held-out manifest per "
                              "validation skill, e.g. {es: embedded:es/dev, en: embedded:en/dev} "
                              "(only the target, {es: ...}, to steer towards it)")


def temperature_probabilities(sizes, alpha: float) -> np.ndarray:
    """p_l ∝ (n_l / N) ** alpha for sizes n_l (all > 0); alpha = 0 gives uniform."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError("need at least one size")
    if not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ValueError(f"sizes must be finite and > 0, got {sizes.tolist()}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    weights = (sizes / sizes.sum()) ** alpha
    return weights / weights.sum()


class TemperatureMixtureSampler:
    """Batch sampler mixing per-language batch samplers with p_l ∝ (n_l/N)^alpha.

    samplers: language -> batch sampler over that language's dataset. Each
        must expose `durations` (one entry per item of its dataset, as
        `DurationBucketSampler` / `RandomBatchSampler` do), `set_epoch`,
        `state_dict` and `load_state_dict`, with "epoch" and "position" in
        its state. Under DDP build each one with this process's rank and
        world size.
    alpha: temperature exponent (0.7 in IndicWav2Vec; 1 = proportional,
        0 = uniform).
    seed: drives the language draws (same on every rank).
    sizes: language -> n_l; default the number of items. Pass hours for
        the papers' definition.
    num_batches: batches per mixture epoch; default the sum of the
        per-language batch counts (fixed at construction).

    Yields lists of indices into `concat_datasets(...)` of the datasets in
    the order of `samplers`; `offsets[lang]` is where a language starts.
    """

    def __init__(self, samplers: Mapping[str, object], *, alpha: float = 0.7, seed: int = 0,
                 sizes: Mapping[str, float] | None = None, num_batches: int | None = None):
        if not samplers:
            raise ValueError("TemperatureMixtureSampler needs at least one language")
        self.samplers = dict(samplers)
        self.languages = list(self.samplers)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.num_items: dict[str, int] = {}
        for lang, sampler in self.samplers.items():
            for method in ("set_epoch", "state_dict", "load_state_dict", "__iter__", "__len__"):
                if not hasattr(sampler, method):
                    raise TypeError(f"the sampler of language '{lang}' lacks {method}")
            if not hasattr(sampler, "durations"):
                raise TypeError(f"the sampler of language '{lang}' has no `durations` (one per "
                                "item of its dataset); use DurationBucketSampler or "
                                "RandomBatchSampler")
            self.num_items[lang] = len(sampler.durations)
        offsets, total = {}, 0
        for lang in self.languages:
            offsets[lang] = total
            total += self.num_items[lang]
        self.offsets: dict[str, int] = offsets
        self.total_items = total

        if sizes is None:
            sizes = dict(self.num_items)
        else:
            sizes = dict(sizes)
            missing = [lang for lang in self.languages if lang not in sizes]
            extra = [lang for lang in sizes if lang not in self.samplers]
            if missing or extra:
                raise ValueError(f"sizes must name exactly the languages {self.languages} "
                                 f"(missing: {missing}, unknown: {extra})")
        empty = [lang for lang in self.languages if not sizes[lang] > 0]
        if empty:
            raise ValueError(f"language(s) {', '.join(empty)} have size 0: no data to sample; "
                             "remove them or check their manifests")
        self.sizes = {lang: float(sizes[lang]) for lang in self.languages}
        self._probs = temperature_probabilities([self.sizes[k] for k in self.languages],
                                                self.alpha)

        lengths = {lang: len(sampler) for lang, sampler in self.samplers.items()}
        no_batches = [lang for lang, n in lengths.items() if n == 0]
        if no_batches:
            raise ValueError(f"the sampler of language(s) {', '.join(no_batches)} yields no "
                             "batches (every item filtered out or longer than the batch budget?)")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches
        self._epoch_length = int(num_batches) if num_batches is not None else sum(lengths.values())

        # Rank sharding is the sub-samplers' business; expose theirs for the trainer's check.
        first = self.samplers[self.languages[0]]
        self.rank = getattr(first, "rank", 0)
        self.world_size = getattr(first, "world_size", 1)

        self.epoch = 0
        self._resume_at = 0
        self._position = 0
        self._iters: dict[str, Iterator | None] = {lang: None for lang in self.languages}
        # Live (epoch, position) of each sub-sampler: batches drawn from it in its epoch.
        self._live = {lang: self._sub_position(sampler) for lang, sampler in self.samplers.items()}
        self._starts = self._epoch_starts(0)
        self._sequence_cache: tuple[int, np.ndarray] | None = None

    # -- public properties ------------------------------------------------------

    @property
    def probabilities(self) -> dict[str, float]:
        """Language -> probability of drawing it at each step."""
        return {lang: float(p) for lang, p in zip(self.languages, self._probs, strict=True)}

    def concat_datasets(self, datasets: Mapping[str, object]):
        """`torch.utils.data.ConcatDataset` of `datasets` in this sampler's language order.

        Checks that each dataset has as many items as its sampler's durations.
        """
        from torch.utils.data import ConcatDataset

        if set(datasets) != set(self.languages):
            raise ValueError(f"datasets must name exactly the languages {self.languages}, "
                             f"got {list(datasets)}")
        for lang in self.languages:
            if len(datasets[lang]) != self.num_items[lang]:
                raise ValueError(f"dataset of language '{lang}' has {len(datasets[lang])} items "
                                 f"but its sampler has {self.num_items[lang]} durations")
        return ConcatDataset([datasets[lang] for lang in self.languages])

    def language_of(self, index: int) -> str:
        """The language an index of the concatenation belongs to."""
        if not 0 <= index < self.total_items:
            raise IndexError(f"index {index} out of range for {self.total_items} items")
        for lang in reversed(self.languages):
            if index >= self.offsets[lang]:
                return lang
        raise AssertionError("unreachable")

    # -- the draws --------------------------------------------------------------

    def _sequence(self) -> np.ndarray:
        """Language index of every step of the current epoch (depends on seed, epoch only)."""
        if self._sequence_cache is None or self._sequence_cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            draws = rng.choice(len(self.languages), size=self._epoch_length, p=self._probs)
            self._sequence_cache = (self.epoch, draws)
        return self._sequence_cache[1]

    @staticmethod
    def _sub_position(sampler) -> tuple[int, int]:
        state = sampler.state_dict()
        return int(state["epoch"]), int(state["position"])

    def _epoch_starts(self, start: int) -> dict[str, list[tuple[int, int]]]:
        """Per language, [(draw count at which a sub-epoch starts, sub-epoch)], seeded so that
        the language's live position corresponds to its draw count at step `start`."""
        counts = self._counts(start) if start else np.zeros(len(self.languages), dtype=np.int64)
        return {lang: [(int(counts[i]) - self._live[lang][1], self._live[lang][0])]
                for i, lang in enumerate(self.languages)}

    def _counts(self, steps: int) -> np.ndarray:
        """How many of the first `steps` draws of this epoch went to each language."""
        return np.bincount(self._sequence()[:steps], minlength=len(self.languages))

    def _next_batch(self, lang: str, drawn_before: int) -> list[int]:
        sampler = self.samplers[lang]
        for attempt in range(2):
            if self._iters[lang] is None:
                self._iters[lang] = iter(sampler)
            try:
                batch = next(self._iters[lang])
            except StopIteration:
                if attempt:
                    raise RuntimeError(f"the sampler of language '{lang}' yielded no batches in "
                                       f"its epoch {self._live[lang][0]}") from None
                # Exhausted: this language starts its next epoch (upsampling small languages).
                epoch = self._live[lang][0] + 1
                sampler.set_epoch(epoch)
                self._iters[lang] = None
                self._live[lang] = (epoch, 0)
                self._starts[lang].append((drawn_before, epoch))
                continue
            epoch, position = self._live[lang]
            self._live[lang] = (epoch, position + 1)
            return batch
        raise AssertionError("unreachable")

    # -- sampler protocol -------------------------------------------------------

    def __iter__(self) -> Iterator[list[int]]:
        sequence = self._sequence()
        start, self._resume_at = self._resume_at, 0
        if start == 0:
            self._starts = self._epoch_starts(0)
        counts = self._counts(start).tolist()
        self._position = start
        for step in range(start, len(sequence)):
            i = int(sequence[step])
            lang = self.languages[i]
            batch = self._next_batch(lang, counts[i])
            counts[i] += 1
            self._position = step + 1
            offset = self.offsets[lang]
            yield [offset + int(index) for index in batch]

    def curriculum_p(self) -> float | None:
        """Mean pacing value of the languages' curriculum samplers (None if none has one)."""
        values = [sampler.curriculum_p() for sampler in self.samplers.values()
                  if callable(getattr(sampler, "curriculum_p", None))]
        return float(np.mean(values)) if values else None

    def __len__(self) -> int:
        """Batches per mixture epoch (this rank)."""
        return self._epoch_length

    def set_epoch(self, epoch: int) -> None:
        """Select the mixture epoch: the language draws depend on (seed, epoch). Keeps a loaded
        resume point when `epoch` is the epoch that was loaded. Per-language samplers keep
        their own epochs (they move on when exhausted)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = 0
            self._position = 0
            self._starts = self._epoch_starts(0)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        """Where the mixture and every per-language sampler are after `num_consumed` batches of
        this epoch (default: batches handed out, which runs ahead with DataLoader prefetch)."""
        position = self._position if num_consumed is None else int(num_consumed)
        if not 0 <= position <= self._epoch_length:
            raise ValueError(f"num_consumed={position} outside this epoch's "
                             f"{self._epoch_length} batches")
        counts = self._counts(position)
        sub_states = {}
        for i, lang in enumerate(self.languages):
            count = int(counts[i])
            # The last sub-epoch that had started by `count` draws of this language.
            eligible = [(s, e) for s, e in self._starts[lang] if s <= count]
            if not eligible:
                raise ValueError(f"num_consumed={position} is before this run's resume point")
            start, sub_epoch = eligible[-1]
            state = dict(self.samplers[lang].state_dict())
            state.update(epoch=sub_epoch, position=count - start)
            sub_states[lang] = state
        return {"kind": type(self).__name__, "epoch": self.epoch, "position": position,
                "samplers": sub_states, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields exactly what an uninterrupted run would have
        yielded after `state['position']` batches of `state['epoch']`."""
        mine = self._fingerprint()
        theirs = {key: state.get(key) for key in mine}
        if state.get("kind") != type(self).__name__ or theirs != mine:
            changed = [key for key in mine if theirs[key] != mine[key]]
            if state.get("kind") != type(self).__name__:
                changed.insert(0, "kind")
            raise ValueError(
                "mixture sampler state does not match this sampler (differs in: "
                f"{', '.join(changed)}); resume with the same languages, sizes, alpha and seed")
        for lang in self.languages:
            try:
                self.samplers[lang].load_state_dict(state["samplers"][lang])
            except ValueError as e:
                raise ValueError(f"language '{lang}': {e}") from None
            self._live[lang] = self._sub_position(self.samplers[lang])
            self._iters[lang] = None
        self.epoch = int(state["epoch"])
        self._sequence_cache = None
        self._resume_at = self._position = int(state["position"])
        self._starts = self._epoch_starts(self._position)

    def _fingerprint(self) -> dict:
        return {"languages": list(self.languages), "alpha": self.alpha, "seed": self.seed,
                "sizes": [self.sizes[lang] for lang in self.languages],
                "num_items": [self.num_items[lang] for lang in self.languages],
                "epoch_length": self._epoch_length, "world_size": self.world_size}


class SkillItMixtureSampler(TemperatureMixtureSampler):
    """A language mixture whose probabilities change between rounds (Skill-It), resumable.

    Every mixture epoch is one *round* of `round_batches` batches drawn with that
    round's probabilities (seeded by (seed, round), as the temperature mixture's
    epochs are), so a round's draws never change once it has begun.
    `set_probabilities(p)` sets the mixture of the round that has not begun yet:
    this one if nothing has been drawn from it, else the next one (allowed only
    once this round is used up). The state holds both, so a resumed run draws
    exactly what an uninterrupted one would have. Starts uniform.
    """

    def __init__(self, samplers: Mapping[str, object], *, round_batches: int, seed: int = 0):
        super().__init__(samplers, alpha=0.0, seed=seed, num_batches=round_batches)
        self._pending: np.ndarray | None = None

    def set_probabilities(self, probabilities: Mapping[str, float]) -> None:
        probs = self._checked(probabilities)
        if self._position == 0 and self._resume_at == 0:
            self._probs, self._pending = probs, None  # this round has not begun: it uses them
            self._sequence_cache = None
        elif self._position >= self._epoch_length:
            self._pending = probs                     # this round is over: the next one does
        else:
            raise RuntimeError(f"round {self.epoch} is under way ({self._position} of "
                               f"{self._epoch_length} batches drawn): its mixture is fixed; "
                               "set the next round's mixture when this one is used up")

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch and self._pending is not None:
            self._probs, self._pending = self._pending, None
            self._sequence_cache = None
        super().set_epoch(epoch)

    def state_dict(self, num_consumed: int | None = None) -> dict:
        pending = None if self._pending is None else self._pending.tolist()
        return {**super().state_dict(num_consumed), "probabilities": self._probs.tolist(),
                "pending_probabilities": pending}

    def load_state_dict(self, state: dict) -> None:
        if "probabilities" not in state:
            raise ValueError("mixture sampler state has no probabilities (written by a "
                             "temperature mixture?); resume with the same data.mixture")
        # The round's own probabilities first: the loaded position is counted in its draws.
        probs = self._checked(dict(zip(self.languages, state["probabilities"], strict=True)))
        pending = state.get("pending_probabilities")
        super().load_state_dict(state)
        self._probs, self._sequence_cache = probs, None
        self._pending = None if pending is None else self._checked(
            dict(zip(self.languages, pending, strict=True)))
        self._starts = self._epoch_starts(self._position)

    def _checked(self, probabilities: Mapping[str, float]) -> np.ndarray:
        if set(probabilities) != set(self.languages):
            raise ValueError(f"probabilities must name exactly the languages {self.languages}, "
                             f"got {list(probabilities)}")
        probs = np.array([float(probabilities[lang]) for lang in self.languages])
        if not np.all(np.isfinite(probs)) or np.any(probs < 0) or not probs.sum() > 0:
            raise ValueError(f"probabilities must be finite, >= 0 and not all 0, got "
                             f"{probs.tolist()}")
        return probs / probs.sum()

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "round_batches": self._epoch_length}
