"""CLIMB curriculum pacing (data.curriculum): the pacing functions, the paced duration-bucket
sampler (admissible sets, exact resume, DDP), config errors, and a short CTC recipe run."""

import json

import numpy as np
import pytest

from speechlm.data.curriculum import (
    PACINGS,
    CurriculumBucketSampler,
    CurriculumConfig,
    pacing_value,
    record_difficulties,
)
from speechlm.errors import ConfigError
from tests.test_ctc import _recipe, corpus  # noqa: F401  (the tiny eSpeak CTC corpus fixture)

# Hand-computed with start = 0.1, ramp = [0.0625, 0.875] (ramp length 0.8125).
# t = 0.265625 is x = 0.25 of the way through the ramp:
#   linear    0.1 + 0.9 * 0.25                                  = 0.325
#   quadratic 0.1 + 0.9 * 0.0625                                = 0.15625
#   root      0.1 + 0.9 * 0.5                                   = 0.55
#   exp       0.1 + 0.9 * (e^2.5 - 1) / (e^10 - 1)
#           = 0.1 + 0.9 * 11.182494 / 22025.465795              = 0.10045694
#   log       0.1 + 0.9 * (1 + ln(0.25 + e^-10) / 10)
#           = 0.1 + 0.9 * (1 - 1.3861128 / 10)                  = 0.87524985
#   step      0.1 (it jumps at the ramp's end)
AT_QUARTER = {"linear": 0.325, "quadratic": 0.15625, "root": 0.55, "exp": 0.10045694,
              "log": 0.87524985, "step": 0.1}


@pytest.mark.parametrize("pacing", PACINGS)
def test_pacing_functions_against_hand_computed_values(pacing):
    p = lambda t: pacing_value(pacing, t, start=0.1, ramp=(0.0625, 0.875))  # noqa: E731
    assert p(0.0) == p(0.03) == p(0.0624) == 0.1          # before the ramp: start
    assert p(0.265625) == pytest.approx(AT_QUARTER[pacing], abs=1e-7)
    assert p(0.0625) == pytest.approx(0.1, abs=1e-9)       # the ramp begins at start
    assert p(0.875) == p(0.9) == p(1.0) == 1.0             # after it: everything
    values = [p(t) for t in np.linspace(0, 1, 201)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))  # never falls
    if pacing != "step":
        assert p(0.8749) > 0.9 or pacing in ("quadratic", "exp")
    else:
        assert p(0.8749) == 0.1


def _sampler(n=200, **kw):
    rng = np.random.default_rng(0)
    durations = rng.uniform(1.0, 5.0, size=n)
    difficulty = rng.permutation(n).astype(float)  # unrelated to duration
    args = dict(total_batches=100, pacing="linear", max_batch_duration=12.0, num_buckets=4,
                seed=3)
    args.update(kw)
    return CurriculumBucketSampler(durations, difficulty, **args), difficulty


def _run(sampler, batches):
    """The first `batches` batches of a trainer-like loop over rounds: [(round, batch)]."""
    out = []
    while len(out) < batches:
        sampler.set_epoch(sampler.epoch if not out else out[-1][0] + 1)
        for batch in sampler:
            out.append((sampler.epoch, batch))
            if len(out) == batches:
                break
    return out


def test_before_the_ramp_only_the_easiest_start_fraction_after_it_everything():
    sampler, difficulty = _sampler()
    seen_early, seen_late = set(), set()
    for epoch, batch in _run(sampler, 100 + 40):
        start = sampler.round_start(epoch)
        p = sampler.pacing_at(epoch)
        if start < 6:                       # t < 0.0625 of 100 batches
            assert p == 0.1
            seen_early.update(batch)
        elif start >= 88:                   # t >= 0.875
            assert p == 1.0
            seen_late.update(batch)
    easiest = set(np.argsort(difficulty)[:20].tolist())  # 10% of 200
    assert seen_early and seen_early <= easiest
    assert len(seen_late) > 150  # the hardest items are sampled too
    assert max(difficulty[i] for i in seen_late) >= 190


def test_batches_never_hold_an_item_above_the_current_percentile():
    for pacing in PACINGS:
        sampler, _ = _sampler(pacing=pacing)
        steps = 0
        for epoch, batch in _run(sampler, 110):
            p = sampler.pacing_at(epoch)
            assert max(sampler.percentiles[i] for i in batch) <= p + 1e-12
            assert sum(sampler.durations[i] for i in batch) <= 12.0 + 1e-9 or len(batch) == 1
            steps += 1
        # the pace is re-read often: rounds are short while p < 1
        assert sampler.round_batches == 1 and steps == 110


def test_resume_mid_ramp_gives_the_same_batches():
    full, _ = _sampler(round_batches=3)
    expected = _run(full, 60)
    first, _ = _sampler(round_batches=3)
    head = _run(first, 31)  # stop mid-round, mid-ramp
    epoch = head[-1][0]
    consumed = sum(1 for e, _ in head if e == epoch)
    state = first.state_dict(num_consumed=consumed)
    assert 0.1 < first.pacing_at(epoch) < 1.0

    resumed, _ = _sampler(round_batches=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(state["epoch"])
    tail = []
    while len(head) + len(tail) < 60:
        for batch in resumed:
            tail.append((resumed.epoch, batch))
            if len(head) + len(tail) == 60:
                break
        else:
            resumed.set_epoch(resumed.epoch + 1)
    assert head + tail == expected

    other, _ = _sampler(round_batches=3, pacing="root")
    with pytest.raises(ValueError, match="curriculum"):
        other.load_state_dict(state)


def test_ddp_ranks_share_the_admissible_set_and_get_disjoint_batches():
    ranks = [_sampler(rank=r, world_size=2)[0] for r in range(2)]
    for epoch in (0, 5, 12, 40):
        for s in ranks:
            s.set_epoch(epoch)
        assert ranks[0].pacing_at(epoch) == ranks[1].pacing_at(epoch)
        assert np.array_equal(ranks[0].admissible(epoch), ranks[1].admissible(epoch))
        mine = [set(i for b in s for i in b) for s in ranks]
        assert len(list(ranks[0])) == len(list(ranks[1])) >= 1
        assert not mine[0] & mine[1]


def test_bad_config_is_rejected_with_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"data.curriculum.pacing must be one of linear, "
                                          r"quadratic, root, exp, log, step, got 'cubic'"):
        CurriculumConfig(pacing="cubic")
    with pytest.raises(ConfigError, match=r"data.curriculum.start must be in \(0, 1\]"):
        CurriculumConfig(start=0.0)
    with pytest.raises(ConfigError, match=r"data.curriculum.ramp must be \[begin, end\] with "
                                          r"0 <= begin < end <= 1"):
        CurriculumConfig(ramp=[0.9, 0.5])
    with pytest.raises(ConfigError, match="data.curriculum.ramp"):
        CurriculumConfig(ramp=[0.1])
    records = [{"id": "a", "duration": 1.0, "snr_db": 20.0}, {"id": "b", "duration": 2.0}]
    assert record_difficulties(records[:1], "snr_db") == [20.0]
    with pytest.raises(ConfigError, match=r"record b of .* lacks it; every training record "
                                          r"needs a finite number in the manifest field 'snr_db'"
                                          r".*data.curriculum.difficulty=duration"):
        record_difficulties(records, "snr_db")
    with pytest.raises(ConfigError, match="record a .* has 'x'"):
        record_difficulties([{"id": "a", "cer": "x"}], "cer")


def test_ctc_recipe_trains_with_the_curriculum_on(tmp_path, corpus):  # noqa: F811
    from speechlm.recipes import load_recipe

    out = tmp_path / "paced"
    module, config = load_recipe(
        _recipe(tmp_path, corpus, steps=8, out=out),
        ["data.curriculum.pacing=root", "data.curriculum.start=0.25", "eval.use_best=false",
         "train.eval_every=8"])
    assert config.data.curriculum.ramp == [0.0625, 0.875]
    results = module.run(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    paces = [r["curriculum_p"] for r in rows if r["split"] == "train"]
    assert len(paces) == 8 and paces[0] == 0.25 and paces[-1] == 1.0
    assert all(b >= a for a, b in zip(paces, paces[1:], strict=False))
    assert 0.0 <= results["dev"]["cer"] <= 1.5

    # a manifest field that the records lack is refused before training
    module, config = load_recipe(_recipe(tmp_path, corpus, steps=2, out=tmp_path / "bad"),
                                 ["data.curriculum.difficulty=snr_db"])
    with pytest.raises(ConfigError, match="manifest field 'snr_db'"):
        module.run(config)
    with pytest.raises(ConfigError, match="data.curriculum.pacing must be one of"):
        load_recipe(_recipe(tmp_path, corpus, steps=2, out=tmp_path / "bad2"),
                    ["data.curriculum.pacing=cubic"])
    with pytest.raises(ConfigError, match="data.curriculum needs data.bucketing: true"):
        load_recipe(_recipe(tmp_path, corpus, steps=2, out=tmp_path / "bad3"),
                    ["data.curriculum.pacing=linear", "data.bucketing=false"])


def test_a_language_mixture_of_paced_samplers_resumes_exactly():
    from speechlm.data.mixture import TemperatureMixtureSampler

    def build():
        parts = {lang: _sampler(n=n, seed=s, round_batches=2)[0]
                 for lang, n, s in (("es", 60, 1), ("en", 200, 2))}
        return TemperatureMixtureSampler(parts, alpha=0.7, seed=5)

    def take(mixture, count, first_epoch=0):
        out, epoch = [], first_epoch
        while len(out) < count:
            mixture.set_epoch(epoch)
            for batch in mixture:
                out.append(batch)
                if len(out) == count:
                    return out
            epoch += 1
        return out

    full = take(build(), 40)
    cut = build()
    head = take(cut, 17)
    state = json.loads(json.dumps(cut.state_dict(num_consumed=cut._position)))
    assert 0 < cut.curriculum_p() <= 1.0
    resumed = build()
    resumed.load_state_dict(state)
    assert head + take(resumed, 40 - 17, first_epoch=state["epoch"]) == full
