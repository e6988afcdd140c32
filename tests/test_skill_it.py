"""Skill-It online mixture: the update rule, the graph, the round sampler, exact resume."""

import itertools
import math

import numpy as np
import pytest
import torch
from _trainer_toy import (  # noqa: F401  (one_thread: an autouse fixture)
    ToyDataset,
    ToyModel,
    ToyObjective,
    assert_same_weights,
    model_weights,
    one_thread,
)

from speechlm.config import config_from_dict
from speechlm.data.mixture import MixtureConfig, SkillItMixtureSampler
from speechlm.data.sampler import RandomBatchSampler
from speechlm.data.skill_it import probe_graph, skill_it_probabilities, skills_graph
from speechlm.errors import ConfigError
from speechlm.training import checkpoint
from speechlm.training.metrics_log import read_metrics
from speechlm.training.mixture_plot import write_mixture_svg
from speechlm.training.skill_it import SkillItSchedule
from speechlm.training.skill_probe import probe_skills_graph
from speechlm.training.trainer import TrainConfig, Trainer

SKILLS = ["es", "en"]


# -- the update rule ----------------------------------------------------------------------


def test_update_rule_on_a_hand_computed_example():
    graph = [[1.0, 0.5], [0.0, 1.0]]  # es also helps en
    window = [[2.0, 1.0], [1.5, 1.0]]  # summed: es 3.5, en 2.0
    p = skill_it_probabilities(graph, window, eta=0.4)
    score_es, score_en = 0.4 * (3.5 + 0.5 * 2.0), 0.4 * 2.0  # 1.8, 0.8
    expected_es = math.exp(score_es) / (math.exp(score_es) + math.exp(score_en))
    assert p == pytest.approx([expected_es, 1 - expected_es], abs=1e-12)
    assert expected_es == pytest.approx(0.7311, abs=1e-4)


def test_eta_zero_keeps_the_mixture_uniform():
    p = skill_it_probabilities(np.eye(2), [[9.0, 0.1], [8.0, 0.2]], eta=0.0)
    assert p.tolist() == [0.5, 0.5]


def test_huge_losses_do_not_overflow():
    p = skill_it_probabilities(np.eye(2), [[5000.0, 1.0]], eta=0.8)
    assert np.all(np.isfinite(p)) and p[0] == pytest.approx(1.0)


# -- the graph ------------------------------------------------------------------------------


def test_graph_given_as_mapping_identity_or_matrix():
    assert skills_graph(None, SKILLS, SKILLS).tolist() == [[1, 0], [0, 1]]
    assert skills_graph("identity", SKILLS, ["es"]).tolist() == [[1], [0]]
    assert skills_graph({"en": {"es": 0.4}, "es": {"es": 1}}, SKILLS, ["es"]).tolist() == \
        [[1.0], [0.4]]
    assert skills_graph([[1, 0.2], [0.3, 1]], SKILLS, SKILLS).tolist() == [[1, 0.2], [0.3, 1]]


@pytest.mark.parametrize("spec,message", [
    ({"fr": {"es": 1.0}}, r"data.mixture.graph.fr: unknown training skill 'fr'"),
    ({"es": {"de": 1.0}}, r"data.mixture.graph.es.de: unknown validation skill 'de'"),
    ({"es": {"es": -0.5}}, r"data.mixture.graph.es.es: a graph weight must be a finite "
                           r"number >= 0"),
    ({"es": {"es": float("nan")}}, r"data.mixture.graph.es.es"),
    ({"es": 1.0}, r"data.mixture.graph.es must map validation skills"),
    ([[1.0, 0.0]], r"data.mixture.graph: wrong shape, need a 2 x 2 list"),
    ([[1.0], [0.0, 1.0]], r"wrong shape"),
    ([[1.0, 0.0], [0.0, -1.0]], r"data.mixture.graph\[1\]\[1\]: a graph weight"),
    ({"es": {"es": 0.0}}, r"every weight is 0"),
    ("probes", r"data.mixture.graph='probes': use 'identity', 'probe'"),
])
def test_bad_graphs_are_refused_naming_the_field(spec, message):
    with pytest.raises(ConfigError, match=message):
        skills_graph(spec, SKILLS, SKILLS)


def test_identity_with_no_shared_skill_is_refused():
    with pytest.raises(ConfigError, match="links no training skill"):
        skills_graph("identity", SKILLS, ["fr"])


def test_probe_graph_is_relative_drops_clipped_and_scaled():
    before = {"es": 4.0, "en": 2.0}
    after = {"es": {"es": 2.0, "en": 1.9},   # drops 0.5, 0.05
             "en": {"es": 3.0, "en": 2.2}}   # drops 0.25, -0.1 (a rise: clipped)
    graph = probe_graph(before, after, SKILLS, SKILLS)
    assert graph == pytest.approx(np.array([[1.0, 0.1], [0.5, 0.0]]))
    with pytest.raises(ValueError, match="no probe run lowered"):
        probe_graph(before, {"es": before, "en": before}, SKILLS, SKILLS)


# -- the config -----------------------------------------------------------------------------


def test_mixture_config_errors():
    with pytest.raises(ConfigError, match="validation"):
        MixtureConfig(strategy="skill_it")
    with pytest.raises(ConfigError, match="eta"):
        MixtureConfig(strategy="skill_it", eta=-1, validation={"es": "x"})
    with pytest.raises(ConfigError, match="round_steps"):
        MixtureConfig(round_steps=0)
    with pytest.raises(ConfigError, match="roundsteps"):
        config_from_dict(MixtureConfig, {"roundsteps": 5})


def test_ctc_recipe_reads_the_mixture_section_and_refuses_unknown_keys():
    from speechlm.recipes.ctc import Config

    raw = {"data": {"train": [{"manifest": "a.jsonl", "lang": "es"}],
                    "mixture": {"strategy": "skill_it", "graph": {"es": {"es": 1.0}},
                                "validation": {"es": "embedded:es/dev"}}}}
    config = config_from_dict(Config, raw)
    assert config.data.mixture.strategy == "skill_it" and config.data.mixture.window == 3
    raw["data"]["mixture"]["windw"] = 2
    with pytest.raises(ConfigError, match="windw"):
        config_from_dict(Config, raw)


# -- the round sampler ----------------------------------------------------------------------


def samplers(sizes=(30, 12)):
    return {lang: RandomBatchSampler(np.ones(n), max_batch_size=2, seed=i)
            for i, (lang, n) in enumerate(zip(SKILLS, sizes, strict=True))}


def fake_losses(round_index: int) -> dict:
    """Spanish stays hard, English gets easy: Skill-It should move to Spanish."""
    return {"es": 3.0 - 0.1 * round_index, "en": 3.0 / (1 + round_index)}


def run_rounds(sampler, schedule, n_rounds, *, start_round=0, start_epoch=0, out=None):
    """What the trainer does: draw each round's batches, then set the next mixture."""
    out = [] if out is None else out
    if not schedule.started:
        schedule.start(fake_losses(0))
    for epoch in range(start_epoch, n_rounds):
        sampler.set_epoch(epoch)
        out.extend(list(sampler))
        schedule.end_round(epoch, fake_losses(epoch + 1))
    return out


def make(round_batches=8, eta=0.5):
    sampler = SkillItMixtureSampler(samplers(), round_batches=round_batches, seed=3)
    schedule = SkillItSchedule(sampler, np.eye(2), measure=None, eval_skills=SKILLS, eta=eta,
                               window=3)
    return sampler, schedule


def test_a_skill_whose_loss_stays_high_gains_probability():
    sampler, schedule = make(round_batches=400)
    batches = run_rounds(sampler, schedule, 4)
    assert sampler.probabilities["es"] > 0.9  # after 4 rounds en's loss is 0.6, es's 2.6
    last = batches[-400:]  # the fourth round, drawn with p set after the third
    share_es = sum(sampler.language_of(b[0]) == "es" for b in last) / len(last)
    losses = [fake_losses(r) for r in (1, 2, 3)]
    expected = skill_it_probabilities(np.eye(2), [[v["es"], v["en"]] for v in losses], 0.5)
    assert share_es == pytest.approx(expected[0], abs=0.05)


def test_eta_zero_keeps_the_sampler_at_its_start():
    sampler, schedule = make(eta=0.0)
    run_rounds(sampler, schedule, 3)
    assert sampler.probabilities == {"es": 0.5, "en": 0.5}


@pytest.mark.parametrize("stop_epoch,consumed", [(1, 3), (2, 0), (1, 8)])
def test_resumed_rounds_draw_the_uninterrupted_batches(stop_epoch, consumed):
    sampler, schedule = make()
    full = run_rounds(sampler, schedule, 4)

    first, first_schedule = make()
    out = run_rounds(first, first_schedule, stop_epoch)
    first.set_epoch(stop_epoch)
    it = iter(first)
    out.extend(next(it) for _ in range(consumed))
    if consumed == len(first):  # a checkpoint at a round's end holds the next mixture
        first_schedule.end_round(stop_epoch, fake_losses(stop_epoch + 1))
    sampler_state, schedule_state = first.state_dict(num_consumed=consumed), \
        first_schedule.state_dict()

    second, second_schedule = make()
    second.load_state_dict(sampler_state)
    second_schedule.load_state_dict(schedule_state)
    second.set_epoch(stop_epoch)
    out.extend(second)
    if consumed < len(second):
        second_schedule.end_round(stop_epoch, fake_losses(stop_epoch + 1))
    run_rounds(second, second_schedule, 4, start_epoch=stop_epoch + 1, out=out)
    assert out == full


def test_a_round_under_way_keeps_its_mixture():
    sampler, _ = make()
    sampler.set_probabilities({"es": 0.9, "en": 0.1})  # nothing drawn yet: this round
    assert sampler.probabilities["es"] == pytest.approx(0.9)
    it = iter(sampler)
    next(it)
    with pytest.raises(RuntimeError, match="under way"):
        sampler.set_probabilities({"es": 0.5, "en": 0.5})
    with pytest.raises(ValueError, match="exactly the languages"):
        make()[0].set_probabilities({"es": 1.0})


def test_schedule_state_from_another_graph_is_refused():
    _, schedule = make()
    state = schedule.state_dict()
    other = SkillItSchedule(make()[0], [[1.0, 0.5], [0.0, 1.0]], measure=None,
                            eval_skills=SKILLS, eta=0.5, window=3)
    with pytest.raises(ValueError, match="differs in graph"):
        other.load_state_dict(state)


# -- with the trainer: exact resume, the log, the plot ---------------------------------------


class TwoSkillData(torch.utils.data.Dataset):
    """Two regression tasks ('skills') with different weights, concatenated."""

    def __init__(self):
        self.parts = [ToyDataset(24, seed=0), ToyDataset(24, seed=1)]

    def __len__(self):
        return 48

    def __getitem__(self, i):
        return self.parts[i // 24][i % 24]


def build_trainer(out, fail_on_call=None):
    torch.manual_seed(0)
    sampler = SkillItMixtureSampler(
        {lang: RandomBatchSampler(np.ones(24), max_batch_size=4, seed=i)
         for i, lang in enumerate(SKILLS)}, round_batches=6, seed=1)
    objective = ToyObjective(ToyModel(dropout=0.2), fail_on_call=fail_on_call)
    heldout = {"es": ToyDataset(8, seed=10), "en": ToyDataset(8, seed=11)}
    heldout["en"].y = heldout["en"].x @ torch.ones(heldout["en"].x.shape[1])

    def measure(model):
        return {s: torch.nn.functional.mse_loss(model(d.x), d.y).item()
                for s, d in heldout.items()}

    schedule = SkillItSchedule(sampler, np.eye(2), measure, eval_skills=SKILLS, eta=0.5,
                               window=3)
    config = TrainConfig(max_steps=12, lr=1e-2, log_every=1, save_every=1, keep_last=None,
                         progress=False, tensorboard=False, device="cpu", output_dir=str(out),
                         grad_accum=2)
    return Trainer(config, objective, TwoSkillData(), sampler, mixture_schedule=schedule)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer = build_trainer(out)
    trainer.fit()
    return trainer, read_metrics(out, split="mixture")


# 6 batches a round, 2 per update: rounds end at updates 3, 6, 9, 12. Killed after update 6
# (at a round's end: the checkpoint holds the next mixture) and after 7 (mid-round).
@pytest.mark.parametrize("killed_after", [6, 7])
def test_killed_skill_it_run_resumes_exactly(tmp_path, full_run, killed_after):
    full, full_log = full_run
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_trainer(tmp_path, fail_on_call=killed_after * 2 + 1).fit()
    assert checkpoint.latest_checkpoint(tmp_path).name == f"step_{killed_after:06d}"
    resumed = build_trainer(tmp_path)
    resumed.fit()
    assert_same_weights(model_weights(resumed), model_weights(full))
    log = read_metrics(tmp_path, split="mixture")
    strip = [{k: v for k, v in r.items() if k != "time"} for r in log]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in full_log]


def test_the_log_holds_every_round_and_the_plot_draws_it(tmp_path, full_run):
    _, log = full_run
    assert [r["step"] for r in log] == [0, 3, 6, 9, 12]
    assert [r["round"] for r in log] == [0, 1, 2, 3, 4]
    for record in log:
        assert record["p_es"] + record["p_en"] == pytest.approx(1.0)
        assert {"val_loss_es", "val_loss_en"} <= record.keys()
    # the skill with the higher windowed loss has the higher probability
    last = log[-1]
    window = log[-3:]
    higher = max(SKILLS, key=lambda s: sum(r[f"val_loss_{s}"] for r in window))
    assert last[f"p_{higher}"] > 0.5
    svg = write_mixture_svg(full_run[0].output_dir, tmp_path / "m.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # p and loss, two skills
    assert write_mixture_svg(tmp_path, tmp_path / "none.svg") is None  # no metrics, no plot


def test_a_temperature_checkpoint_is_not_resumed_with_skill_it(tmp_path):
    from speechlm.data.mixture import TemperatureMixtureSampler

    torch.manual_seed(0)
    sampler = TemperatureMixtureSampler(
        {lang: RandomBatchSampler(np.ones(24), max_batch_size=4, seed=i)
         for i, lang in enumerate(SKILLS)}, seed=1)
    config = TrainConfig(max_steps=2, lr=1e-2, save_every=1, progress=False, tensorboard=False,
                         device="cpu", output_dir=str(tmp_path))
    Trainer(config, ToyObjective(ToyModel()), TwoSkillData(), sampler).fit()
    with pytest.raises(checkpoint.CheckpointMismatchError, match="no probabilities"):
        build_trainer(tmp_path).fit()


# -- probe runs -----------------------------------------------------------------------------


def test_probes_measure_which_skill_helps_which_and_leave_the_model_as_it_was():
    torch.manual_seed(0)
    data = {"es": ToyDataset(32, seed=0), "en": ToyDataset(32, seed=1)}
    model = ToyModel(dropout=0.2)  # dropout: the probes use the RNG, which must be restored
    before = model_weights_of(model)
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)

    def loss(batch):
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}

    def batches(skill):
        for start in itertools.cycle(range(0, 32, 8)):
            d = data[skill]
            yield {"x": d.x[start:start + 8], "y": d.y[start:start + 8]}

    def measure(m):
        return {s: torch.nn.functional.mse_loss(m(d.x), d.y).item() for s, d in data.items()}

    graph, report = probe_skills_graph(model, loss, batches, measure, train_skills=SKILLS,
                                       eval_skills=SKILLS, steps=30, lr=1e-2)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    for key, value in model_weights_of(model).items():
        assert torch.equal(value, before[key]), key
    assert model.training
    assert graph.shape == (2, 2) and graph.max() == 1.0
    # each task teaches itself more than the other task (their weights differ)
    assert graph[0, 0] > graph[1, 0] and graph[1, 1] > graph[0, 1]
    assert report["after"]["es"]["es"] < report["before"]["es"]


def model_weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
