"""Duration-bucketing batch sampler: budget, coverage, ranks, determinism, exact resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechlm.data.sampler import (
    DurationBucketSampler,
    RandomBatchSampler,
    padded_duration,
    padding_fraction,
)


def lognormal_durations(n: int = 600, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(5.0), 0.6, n), 0.3, 20.0)


def all_batches(sampler):
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("max_batch_size", [None, 7])
def test_budget_never_exceeded_and_every_index_once(max_batch_size):
    d = lognormal_durations()
    sampler = DurationBucketSampler(d, max_batch_duration=60.0, max_batch_size=max_batch_size)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = all_batches(sampler)
        assert len(batches) == len(sampler)
        assert all(padded_duration(b, d) <= 60.0 for b in batches)
        if max_batch_size:
            assert max(len(b) for b in batches) <= max_batch_size
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(d)))


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_disjoint_equal_counts_and_cover_everything(drop_last):
    d = lognormal_durations(501, seed=3)
    ranks = [DurationBucketSampler(d, max_batch_duration=45.0, seed=5, rank=r, world_size=2,
                                   drop_last=drop_last) for r in range(2)]
    for epoch in range(3):
        shares = []
        for sampler in ranks:
            sampler.set_epoch(epoch)
            shares.append(all_batches(sampler))
        assert len(shares[0]) == len(shares[1]) == len(ranks[0])
        flat = [set(i for b in share for i in b) for share in shares]
        assert not flat[0] & flat[1]
        everything = sorted(i for share in shares for b in share for i in b)
        assert len(everything) == len(set(everything))  # no index twice
        if not drop_last:
            assert everything == list(range(len(d)))
        else:
            assert len(everything) > 0.8 * len(d)
        assert all(padded_duration(b, d) <= 45.0 for share in shares for b in share)


def test_uneven_batch_count_is_split_not_repeated():
    # Three batches of two for two ranks: one batch is split so each rank gets two.
    d = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    ranks = [DurationBucketSampler(d, max_batch_duration=6.0, num_buckets=3, shuffle=False,
                                   rank=r, world_size=2) for r in range(2)]
    shares = [all_batches(s) for s in ranks]
    assert [len(s) for s in shares] == [2, 2]
    assert sorted(i for s in shares for b in s for i in b) == list(range(6))


def test_determinism_by_seed_and_epoch():
    d = lognormal_durations()

    def run(seed, epoch):
        s = DurationBucketSampler(d, max_batch_duration=50.0, seed=seed)
        s.set_epoch(epoch)
        return all_batches(s)

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(2, 0)
    assert run(1, 0) != run(1, 1)
    s = DurationBucketSampler(d, max_batch_duration=50.0, seed=1)
    assert all_batches(s) == all_batches(s)  # same epoch twice without set_epoch: same order


@pytest.mark.parametrize("cls,kwargs", [
    (DurationBucketSampler, {"max_batch_duration": 40.0}),
    (RandomBatchSampler, {"max_batch_size": 8}),
])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_is_exact(cls, kwargs, world_size):
    d = lognormal_durations(400, seed=7)
    for rank in range(world_size):
        uninterrupted = cls(d, seed=11, rank=rank, world_size=world_size, **kwargs)
        uninterrupted.set_epoch(2)
        expected = all_batches(uninterrupted)
        uninterrupted.set_epoch(3)
        expected_next_epoch = all_batches(uninterrupted)

        first = cls(d, seed=11, rank=rank, world_size=world_size, **kwargs)
        first.set_epoch(2)
        it = iter(first)
        consumed = [next(it) for _ in range(5)]
        state = first.state_dict()
        assert state["epoch"] == 2 and state["position"] == 5

        resumed = cls(d, seed=11, rank=rank, world_size=world_size, **kwargs)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # a trainer re-announcing the loaded epoch keeps the position
        rest = all_batches(resumed)
        assert consumed + rest == expected
        resumed.set_epoch(3)
        assert all_batches(resumed) == expected_next_epoch


def test_state_dict_with_num_consumed_and_mismatch():
    d = lognormal_durations(200)
    s = DurationBucketSampler(d, max_batch_duration=40.0)
    it = iter(s)
    for _ in range(6):  # a DataLoader prefetched 6 batches; the trainer used 4
        next(it)
    state = s.state_dict(num_consumed=4)
    resumed = DurationBucketSampler(d, max_batch_duration=40.0)
    resumed.load_state_dict(state)
    assert all_batches(resumed) == all_batches(DurationBucketSampler(d, max_batch_duration=40.0))[4:]
    other = DurationBucketSampler(d, max_batch_duration=30.0)
    with pytest.raises(ValueError, match="max_batch_duration"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        RandomBatchSampler(d, max_batch_duration=40.0).load_state_dict(state)


def test_bucketing_pads_less_than_random_batching():
    d = lognormal_durations(2000, seed=1)
    bucketed = all_batches(DurationBucketSampler(d, max_batch_duration=100.0))
    random_ = all_batches(RandomBatchSampler(d, max_batch_duration=100.0))
    assert padding_fraction(bucketed, d) < 0.10
    assert padding_fraction(random_, d) > 3 * padding_fraction(bucketed, d)
    assert len(bucketed) < len(random_)  # fuller batches, fewer steps


def test_padding_fraction_values():
    d = [1.0, 2.0, 4.0, 4.0]
    assert padding_fraction([[0, 1], [2, 3]], d) == pytest.approx(1.0 / 12.0)
    assert padding_fraction([[2], [3]], d) == 0.0
    assert padding_fraction([], d) == 0.0
    assert padded_duration([0, 2], d) == 8.0


def test_items_longer_than_budget_are_excluded_with_warning():
    d = [1.0, 50.0, 2.0]
    with pytest.warns(UserWarning, match="1 item"):
        s = DurationBucketSampler(d, max_batch_duration=10.0, num_buckets=2)
    assert list(s.excluded) == [1]
    assert sorted(i for b in s for i in b) == [0, 2]


def test_random_batch_sampler_fixed_size_and_no_shuffle():
    s = RandomBatchSampler(list(range(1, 11)), max_batch_size=4, shuffle=False)
    assert all_batches(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    s = RandomBatchSampler(list(range(1, 11)), max_batch_size=4, shuffle=False, drop_last=True)
    assert all_batches(s) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_invalid_arguments_are_explained():
    with pytest.raises(ValueError, match="max_batch_duration"):
        DurationBucketSampler([1.0], max_batch_duration=None)
    with pytest.raises(ValueError, match="item 1"):
        DurationBucketSampler([1.0, float("nan")], max_batch_duration=5.0)
    with pytest.raises(ValueError, match="rank"):
        DurationBucketSampler([1.0], max_batch_duration=5.0, rank=2, world_size=2)


@settings(max_examples=60, deadline=None)
@given(
    durations=st.lists(st.floats(0.1, 15.0), min_size=1, max_size=120),
    budget=st.floats(15.0, 80.0),
    world_size=st.integers(1, 3),
    num_buckets=st.integers(1, 8),
    max_batch_size=st.one_of(st.none(), st.integers(1, 10)),
    seed=st.integers(0, 3),
)
def test_property_budget_coverage_and_equal_shares(durations, budget, world_size, num_buckets,
                                                   max_batch_size, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shares = [all_batches(DurationBucketSampler(
            durations, max_batch_duration=budget, max_batch_size=max_batch_size,
            num_buckets=num_buckets, seed=seed, rank=r, world_size=world_size))
            for r in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    for share in shares:
        for batch in share:
            assert batch and padded_duration(batch, durations) <= budget
            assert max_batch_size is None or len(batch) <= max_batch_size
    flat = [i for share in shares for b in share for i in b]
    assert set(flat) == set(range(len(durations)))
    if len(durations) % world_size == 0:  # splitting batches can always even out the shares
        assert sorted(flat) == list(range(len(durations)))
    else:  # otherwise a few batches may be repeated so every rank has as many
        assert len(flat) - len(durations) < world_size
