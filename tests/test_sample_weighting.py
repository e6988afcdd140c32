"""Loss-based sample reweighting (train.sample_weighting): the formulas, the weighted loss,
warm-up, exact resume, the objectives that support it, and config errors."""

import dataclasses

import pytest
import torch
from _trainer_toy import assert_same_weights, make_trainer, model_weights, one_thread  # noqa: F401

from speechlm.config import load_config
from speechlm.errors import ConfigError
from speechlm.training import checkpoint
from speechlm.training.metrics_log import read_metrics
from speechlm.training.sample_weighting import (
    SUPPORTED_OBJECTIVES,
    SampleLosses,
    SampleWeightingConfig,
    relative_weights,
    scores,
    weighted_loss,
    weights,
)
from speechlm.training.trainer import TrainConfig

# -- the formulas -----------------------------------------------------------------------

# Losses 1, 2, 3, 5: min 1, max 5, midpoint 3, spread 4, so with delta=1 x = (l - 3) / 2 =
# -1, -0.5, 0, 1 and with delta=2 x = -2, -1, 0, 2. Expected values worked out by hand
# (f as below, then softmax(f / r) with e^1 = 2.718282, e^1.5 = 4.481689, e^2 = 7.389056).
LOSSES = [1.0, 2.0, 3.0, 5.0]
HAND = {
    # strategy, delta, r: f, softmax(f / r)
    ("linupper", 1.0, 0.5): ([0.0, 0.5, 1.0, 1.0],       # min(x + 1, 1)
                             [0.054065, 0.146963, 0.399486, 0.399486]),
    ("quadratic", 1.0, 0.5): ([0.0, 0.75, 1.0, 0.0],     # 1 - x^2
                              [0.072094, 0.323104, 0.532708, 0.072094]),
    ("extremes", 1.0, 0.5): ([1.0, 0.5, 0.0, 1.0],       # |x|
                             [0.399486, 0.146963, 0.054065, 0.399486]),
    ("linupper", 2.0, 1.0): ([0.0, 1.0, 2.0, 2.0],       # min(x + 2, 2)
                             [0.054065, 0.146963, 0.399486, 0.399486]),
    ("quadratic", 2.0, 1.0): ([0.0, 0.75, 1.0, 0.0],     # 1 - x^2 / 4
                              [0.146300, 0.309717, 0.397684, 0.146300]),
    ("extremes", 2.0, 1.0): ([2.0, 1.0, 0.0, 2.0],       # |x|
                             [0.399486, 0.146963, 0.054065, 0.399486]),
}


@pytest.mark.parametrize("case", list(HAND))
def test_strategies_match_hand_computed_values(case):
    strategy, delta, r = case
    f, w = HAND[case]
    losses = torch.tensor(LOSSES)
    assert scores(losses, strategy, delta).tolist() == pytest.approx(f, abs=1e-6)
    got = weights(losses, strategy, delta, r)
    assert got.tolist() == pytest.approx(w, abs=1e-6)
    # order does not matter: the weights follow their losses
    perm = torch.tensor([2, 0, 3, 1])
    assert weights(losses[perm], strategy, delta, r).tolist() == pytest.approx(
        [w[i] for i in perm.tolist()], abs=1e-6)


@pytest.mark.parametrize("n", [1, 3, 5, 7])
@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes"])
def test_equal_losses_give_exactly_the_plain_mean(strategy, n):
    losses = torch.full((n,), 0.7310586, requires_grad=True)
    assert torch.equal(relative_weights(losses, strategy, 1.0, 0.5), torch.ones(n, dtype=torch.float64))
    config = SampleWeightingConfig(strategy=strategy, warmup_steps=0)
    loss, stats = weighted_loss(SampleLosses(losses, {}), config, uniform=False)
    assert torch.equal(loss, losses.mean())
    assert stats == {"weight_max": 1.0, "weight_min": 1.0, "weight_ess": 1.0,
                     "loss_plain": float(losses.detach().mean())}


def test_uniform_weights_give_exactly_the_plain_loss_with_or_without_coef():
    losses = torch.tensor([0.3, 1.7, 0.2, 4.1, 0.9])
    config = SampleWeightingConfig(warmup_steps=10)
    loss, stats = weighted_loss(SampleLosses(losses, {}), config, uniform=True)
    assert torch.equal(loss, losses.mean()) and stats["weight_ess"] == 1.0
    coef = torch.tensor([3.0, 1.0, 2.0, 4.0, 5.0]) / 15  # e.g. label lengths / their sum
    loss, _ = weighted_loss(SampleLosses(losses, {}, coef), config, uniform=True)
    assert torch.equal(loss, (coef * losses).sum())
    # ... and outside warm-up the loss is no longer the plain one
    reweighted, stats = weighted_loss(SampleLosses(losses, {}), config, uniform=False)
    assert abs(float(reweighted) - float(losses.mean())) > 0.1 and stats["weight_ess"] < 1.0


def test_weights_carry_no_gradient():
    # linupper, delta 1, r 0.5 on 1, 2, 3, 5: w = (0.054065, 0.146963, 0.399486, 0.399486).
    # With no-grad weights, d(sum N w_i l_i / N)/d l_i = w_i; a gradient through w would add
    # terms (and make the first one negative or zero).
    losses = torch.tensor(LOSSES, requires_grad=True)
    config = SampleWeightingConfig(strategy="linupper", delta=1.0, r=0.5, warmup_steps=0)
    loss, stats = weighted_loss(SampleLosses(losses, {}), config, uniform=False)
    assert not weights(losses, "linupper", 1.0, 0.5).requires_grad
    loss.backward()
    assert losses.grad.tolist() == pytest.approx([0.054065, 0.146963, 0.399486, 0.399486],
                                                 abs=1e-6)
    # loss = sum w_i l_i = 0.054065 + 0.293926 + 1.198458 + 1.997430
    assert float(loss.detach()) == pytest.approx(3.543879, abs=1e-5)
    assert stats["weight_max"] == pytest.approx(4 * 0.399486, abs=1e-5)
    assert stats["weight_min"] == pytest.approx(4 * 0.054065, abs=1e-5)
    # ESS = 1 / sum w^2 = 1 / 0.343700 = 2.909518 of 4 items
    assert stats["weight_ess"] == pytest.approx(2.909518 / 4, abs=1e-5)


# -- in the trainer ---------------------------------------------------------------------

ON = {"strategy": "linupper", "delta": 1.0, "r": 0.5}


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, split="train")]


def test_warmup_trains_exactly_like_the_plain_loss(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=6)
    plain.fit()
    warm = make_trainer(tmp_path / "warm", max_steps=6,
                        sample_weighting={**ON, "warmup_steps": 6})
    warm.fit()
    assert _losses(tmp_path / "warm") == _losses(tmp_path / "plain")
    assert_same_weights(model_weights(warm), model_weights(plain))
    rows = read_metrics(tmp_path / "warm", split="train")
    assert all(r["weight_max"] == r["weight_min"] == r["weight_ess"] == 1.0 for r in rows)


def test_reweighting_starts_after_warmup_and_logs_the_weights(tmp_path):
    plain = make_trainer(tmp_path / "plain", max_steps=30)
    plain.fit()
    run = make_trainer(tmp_path / "rw", max_steps=30, sample_weighting={**ON, "warmup_steps": 3})

    def train_set_loss():
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(run.model(run.dataset.x), run.dataset.y))

    before = train_set_loss()
    run.fit()
    rows = read_metrics(tmp_path / "rw", split="train")
    assert [r["loss"] for r in rows[:3]] == _losses(tmp_path / "plain")[:3]
    assert all(r["loss"] == r["loss_plain"] for r in rows[:3])
    for row in rows[3:]:
        assert row["weight_max"] > 1.0 > row["weight_min"] > 0.0
        assert 0.0 < row["weight_ess"] < 1.0
        # linupper favours the larger losses: the weighted loss is above the plain one
        assert row["loss"] > row["loss_plain"]
    assert _losses(tmp_path / "rw")[3:] != _losses(tmp_path / "plain")[3:]
    assert train_set_loss() < 0.3 * before  # it still learns (8.4 -> 1.7)


def test_an_empty_micro_batch_is_fine_with_weighting(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, grad_accum=2,
                           sample_weighting={**ON, "warmup_steps": 1})
    real = trainer.objective.sample_losses
    calls = {"n": 0}

    def sample_losses(batch):
        calls["n"] += 1
        return None if calls["n"] in (2, 5) else real(batch)

    trainer.objective.sample_losses = sample_losses
    result = trainer.fit()
    assert result.step == 4 and result.skipped_nonfinite == 0
    rows = read_metrics(tmp_path, split="train")
    assert [r.get("empty_batch_frac") for r in rows] == [0.5, None, 0.5, None]


RESUME_SETUP = dict(dropout=0.2, grad_accum=2, schedule="cosine", warmup_steps=3, max_steps=12,
                    sample_weighting={"strategy": "quadratic", "delta": 1.0, "r": 0.4,
                                      "warmup_steps": 3})


@pytest.mark.parametrize("killed_after", [2, 7])  # in warm-up, and after it mid-epoch
def test_killed_run_with_weighting_resumes_bit_exactly(tmp_path, killed_after):
    full = make_trainer(tmp_path / "full", **RESUME_SETUP)
    full.fit()
    out = tmp_path / "killed"
    first = make_trainer(out, save_every=1, keep_last=2,
                         objective_kwargs={"fail_on_call": killed_after * 2 + 1}, **RESUME_SETUP)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit()
    assert checkpoint.latest_checkpoint(out).name == f"step_{killed_after:06d}"
    resumed = make_trainer(out, model_seed=123, save_every=1, keep_last=2, **RESUME_SETUP)
    assert resumed.fit().step == 12
    assert_same_weights(model_weights(resumed), model_weights(full))
    full_rows = read_metrics(tmp_path / "full", split="train")
    resumed_rows = read_metrics(out, split="train")
    keys = ("step", "loss", "weight_max", "weight_min", "weight_ess")
    assert [[r[k] for k in keys] for r in resumed_rows] == [[r[k] for k in keys]
                                                            for r in full_rows]


# -- objectives -------------------------------------------------------------------------


def test_an_objective_without_sample_losses_is_a_config_error(tmp_path):
    trainer = make_trainer(tmp_path)  # the toy objective has sample_losses
    objective = trainer.objective

    class NoSampleLosses:
        model = objective.model
        loss = objective.loss

    from speechlm.training.trainer import Trainer

    config = dataclasses.replace(trainer.config, sample_weighting=SampleWeightingConfig())
    with pytest.raises(ConfigError, match=r"train\.sample_weighting needs per-sample losses, "
                       r"which NoSampleLosses does not give.*CTCObjective.*"
                       r"train\.sample_weighting=null"):
        Trainer(config, NoSampleLosses(), trainer.dataset, trainer.batch_sampler)


def test_supported_objectives_list_is_the_classes_with_sample_losses():
    import importlib
    import inspect
    import pkgutil

    import speechlm.training.objectives as package

    having, lacking = set(), set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "loss", None)):
                (having if callable(getattr(cls, "sample_losses", None)) else lacking).add(name)
    assert having == {entry.split()[0] for entry in SUPPORTED_OBJECTIVES}
    assert lacking  # the error message is worth having


@pytest.mark.parametrize("reduction", ["token_mean", "mean", "sum"])
def test_ctc_sample_losses_reduce_to_its_loss(reduction):
    from speechlm.models.ctc import CharVocab
    from speechlm.training.objectives.ctc import CTCObjective

    vocab = CharVocab("abcdefgh")
    torch.manual_seed(0)
    log_probs = torch.randn(3, 30, len(vocab)).log_softmax(-1)
    frames = torch.tensor([30, 20, 25])
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100], [7, 7, 9, -100]])
    lengths = torch.tensor([4, 2, 3])
    objective = CTCObjective(torch.nn.Linear(1, 1), vocab, reduction=reduction)
    loss, per_item = objective.ctc_loss(log_probs, frames, labels, lengths)
    losses, coef = objective.sample_ctc_losses(per_item, lengths)
    assert torch.allclose(losses, per_item / torch.tensor([4.0, 2.0, 3.0]))  # loss per label
    uniform, _ = weighted_loss(SampleLosses(losses, {}, coef), SampleWeightingConfig(),
                               uniform=True)
    assert torch.allclose(uniform, loss, rtol=1e-6)


# -- config -----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("strategy", "cubic", r"train\.sample_weighting\.strategy must be one of linupper, "
                          r"quadratic, extremes, got 'cubic'"),
    ("delta", 0.0, r"train\.sample_weighting\.delta must be a number > 0, got 0\.0 \(the paper"),
    ("r", -0.5, r"train\.sample_weighting\.r must be a number > 0, got -0\.5"),
    ("warmup_steps", -1, r"train\.sample_weighting\.warmup_steps must be >= 0, got -1 "
                         r"\(0 reweights from the first update\)"),
])
def test_bad_values_are_rejected(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(sample_weighting={field: value})


def test_recipe_yaml_and_overrides(tmp_path):
    @dataclasses.dataclass
    class Recipe:
        train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_config(Recipe, path).train.sample_weighting is None  # off by default
    on = load_config(Recipe, path, ["train.sample_weighting.strategy=extremes",
                                    "train.sample_weighting.r=0.8"]).train.sample_weighting
    assert on == SampleWeightingConfig(strategy="extremes", delta=1.0, r=0.8, warmup_steps=1000)
    path.write_text("train:\n  sample_weighting: {strategy: quadratic, warmup_steps: 0}\n")
    assert load_config(Recipe, path).train.sample_weighting.strategy == "quadratic"
    with pytest.raises(ConfigError, match=r"'train\.sample_weighting\.strategy' must be one of"):
        load_config(Recipe, path, ["train.sample_weighting.strategy=lin"])
    with pytest.raises(ConfigError, match=r"r\.yaml:2: invalid 'train\.sample_weighting' .*"
                       r"delta must be a number > 0"):
        load_config(Recipe, path, ["train.sample_weighting.delta=-1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.sample_weighting\.temp'"):
        load_config(Recipe, path, ["train.sample_weighting.temp=1"])
