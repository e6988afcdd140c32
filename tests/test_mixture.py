"""TemperatureMixtureSampler: language frequencies, offsets, upsampling, exact resume."""

import itertools

import numpy as np
import pytest

from speechlm.data.mixture import TemperatureMixtureSampler, temperature_probabilities
from speechlm.data.sampler import DurationBucketSampler, RandomBatchSampler

SIZES = {"hi": 120, "ta": 30, "sa": 6}


def durations(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1.0, 8.0, size=n)


def bucket_samplers(sizes=SIZES, *, rank=0, world_size=1, seed=0):
    return {lang: DurationBucketSampler(durations(n, i), max_batch_duration=20.0, num_buckets=3,
                                        seed=seed + i, rank=rank, world_size=world_size)
            for i, (lang, n) in enumerate(sizes.items())}


def one_item_samplers(sizes=SIZES):
    return {lang: RandomBatchSampler(np.ones(n), max_batch_size=1, seed=i)
            for i, (lang, n) in enumerate(sizes.items())}


def epochs(sampler, n_epochs, start_epoch=0):
    out = []
    for epoch in range(start_epoch, start_epoch + n_epochs):
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


# -- probabilities and frequencies ---------------------------------------------------


def test_probabilities_follow_the_temperature_formula():
    n = np.array([120.0, 30.0, 6.0])
    np.testing.assert_allclose(temperature_probabilities(n, 1.0), n / n.sum())
    np.testing.assert_allclose(temperature_probabilities(n, 0.0), [1 / 3] * 3)
    q = (n / n.sum()) ** 0.7
    np.testing.assert_allclose(temperature_probabilities(n, 0.7), q / q.sum())
    # Lower alpha gives the smallest language more, the largest less.
    p1, p07, p0 = (temperature_probabilities(n, a) for a in (1.0, 0.7, 0.0))
    assert p1[2] < p07[2] < p0[2] and p1[0] > p07[0] > p0[0]


@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.0])
def test_empirical_language_frequencies_match_p(alpha):
    sampler = TemperatureMixtureSampler(one_item_samplers(), alpha=alpha, seed=3,
                                        num_batches=20000)
    counts = dict.fromkeys(SIZES, 0)
    for batch in sampler:
        counts[sampler.language_of(batch[0])] += 1
    expected = sampler.probabilities
    for lang, p in expected.items():
        sigma = np.sqrt(p * (1 - p) / 20000)
        assert abs(counts[lang] / 20000 - p) < 4 * sigma + 1e-9, (lang, counts, expected)
    if alpha == 0.0:
        assert all(p == pytest.approx(1 / 3) for p in expected.values())


def test_sizes_in_hours_replace_item_counts():
    # Same item counts, but "sa" has long utterances: by hours it is the biggest.
    sampler = TemperatureMixtureSampler(one_item_samplers(), alpha=1.0,
                                        sizes={"hi": 1.0, "ta": 1.0, "sa": 2.0})
    assert sampler.probabilities == pytest.approx({"hi": 0.25, "ta": 0.25, "sa": 0.5})


# -- offsets, upsampling, epoch length ---------------------------------------------------


def test_batches_are_offset_into_the_concatenation_in_sampler_order():
    sampler = TemperatureMixtureSampler(bucket_samplers(), alpha=0.5, seed=1)
    assert sampler.offsets == {"hi": 0, "ta": 120, "sa": 150}
    datasets = {lang: [(lang, i) for i in range(n)] for lang, n in SIZES.items()}
    concat = sampler.concat_datasets(datasets)
    assert len(concat) == 156

    # Each language's batches, minus its offset, are its own sampler's batches in order,
    # epoch after epoch.
    reference = bucket_samplers()
    per_lang = {lang: [] for lang in SIZES}
    for batch in sampler:
        items = [concat[i] for i in batch]
        (lang,) = {item[0] for item in items}
        assert [i - sampler.offsets[lang] for i in batch] == [item[1] for item in items]
        per_lang[lang].append([item[1] for item in items])
    for lang, got in per_lang.items():
        expected = list(itertools.chain.from_iterable(epochs(reference[lang], 20)))
        assert got == expected[: len(got)]


def test_small_languages_are_upsampled_over_several_of_their_epochs():
    sampler = TemperatureMixtureSampler(bucket_samplers(), alpha=0.0, seed=0)
    reference = bucket_samplers()
    assert len(sampler) == sum(len(s) for s in reference.values())  # default epoch length
    batches = list(sampler)
    small = [b for b in batches if sampler.language_of(b[0]) == "sa"]
    # Uniform over 3 languages: "sa" gets ~1/3 of the batches but has only a few per epoch.
    assert len(small) > 3 * len(reference["sa"])
    # Every one of its epochs covers all 6 items exactly once.
    per_epoch = len(reference["sa"])
    for start in range(0, len(small) - per_epoch + 1, per_epoch):
        items = sorted(i - 150 for b in small[start:start + per_epoch] for i in b)
        assert items == list(range(6))


def test_num_batches_sets_the_epoch_length():
    sampler = TemperatureMixtureSampler(bucket_samplers(), num_batches=7)
    assert len(sampler) == 7 and len(list(sampler)) == 7


# -- determinism and distributed ----------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_draws():
    a = epochs(TemperatureMixtureSampler(bucket_samplers(), seed=5), 2)
    b = epochs(TemperatureMixtureSampler(bucket_samplers(), seed=5), 2)
    c = epochs(TemperatureMixtureSampler(bucket_samplers(), seed=6), 2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # epochs differ


def test_ranks_draw_the_same_language_at_every_step_and_disjoint_items():
    ranks = [TemperatureMixtureSampler(bucket_samplers(rank=r, world_size=2), seed=2)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    out = [list(s) for s in ranks]
    langs = [[ranks[0].language_of(b[0]) for b in batches] for batches in out]
    assert langs[0] == langs[1]
    # Within each language's first epoch the two ranks' items do not overlap.
    first_hi = [set(i for b in batches[:3] if ranks[0].language_of(b[0]) == "hi" for i in b)
                for batches in out]
    assert not first_hi[0] & first_hi[1]


# -- exact resume -----------------------------------------------------------------------------


def run_with_interruption(consumed: int, prefetch: int, n_epochs: int = 3):
    """Iterate epoch 0 to `consumed` (+ `prefetch` handed out but unused), save, resume in a
    fresh sampler and run to the end of `n_epochs` epochs; returns every batch trained on."""
    first = TemperatureMixtureSampler(bucket_samplers(), alpha=0.3, seed=4)
    first.set_epoch(0)
    it = iter(first)
    taken = [next(it) for _ in range(min(consumed + prefetch, len(first)))]
    state = first.state_dict(num_consumed=consumed)
    trained = taken[:consumed]

    second = TemperatureMixtureSampler(bucket_samplers(), alpha=0.3, seed=4)
    second.load_state_dict(state)
    second.set_epoch(0)  # the trainer does this; it keeps the loaded position
    trained += list(second)
    for epoch in range(1, n_epochs):
        second.set_epoch(epoch)
        trained += list(second)
    return trained


@pytest.mark.parametrize("consumed,prefetch", [(0, 0), (5, 0), (13, 4), (40, 2), (None, 0)])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(consumed, prefetch):
    full = list(itertools.chain.from_iterable(
        epochs(TemperatureMixtureSampler(bucket_samplers(), alpha=0.3, seed=4), 3)))
    length = len(TemperatureMixtureSampler(bucket_samplers()))
    if consumed is None:
        consumed = length  # saved exactly at the end of the epoch
    assert run_with_interruption(consumed, prefetch) == full


def test_state_records_each_language_sampler_position():
    sampler = TemperatureMixtureSampler(bucket_samplers(), alpha=0.0, seed=0)
    batches = list(itertools.islice(iter(sampler), 30))
    state = sampler.state_dict(num_consumed=30)
    per_epoch = len(bucket_samplers()["sa"])
    n_sa = sum(sampler.language_of(b[0]) == "sa" for b in batches)
    sa = state["samplers"]["sa"]
    assert sa["epoch"] * per_epoch + sa["position"] == n_sa
    assert sum(s["position"] for s in state["samplers"].values()) <= 30


def test_state_from_another_mixture_is_refused():
    state = TemperatureMixtureSampler(bucket_samplers(), alpha=0.7).state_dict()
    with pytest.raises(ValueError, match="differs in: alpha"):
        TemperatureMixtureSampler(bucket_samplers(), alpha=0.5).load_state_dict(state)
    other = {k: v for k, v in SIZES.items() if k != "sa"}
    with pytest.raises(ValueError, match="languages"):
        TemperatureMixtureSampler(bucket_samplers(other), alpha=0.7).load_state_dict(state)


# -- errors -----------------------------------------------------------------------------------


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="at least one language"):
        TemperatureMixtureSampler({})
    with pytest.raises(ValueError, match="sa have size 0"):
        TemperatureMixtureSampler(one_item_samplers(), sizes={"hi": 1, "ta": 1, "sa": 0})
    with pytest.raises(ValueError, match="missing: \\['sa'\\]"):
        TemperatureMixtureSampler(one_item_samplers(), sizes={"hi": 1, "ta": 1})
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        TemperatureMixtureSampler(one_item_samplers(), alpha=-1)
    with pytest.warns(UserWarning, match="longer than max_batch_duration"):
        too_long = DurationBucketSampler([30.0, 40.0], max_batch_duration=10.0)
    with pytest.raises(ValueError, match="language\\(s\\) xx yields no batches"):
        TemperatureMixtureSampler({"hi": one_item_samplers()["hi"], "xx": too_long})
    sampler = TemperatureMixtureSampler(one_item_samplers())
    with pytest.raises(ValueError, match="dataset of language 'ta' has 3 items"):
        sampler.concat_datasets({"hi": [0] * 120, "ta": [0] * 3, "sa": [0] * 6})
