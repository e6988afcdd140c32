import dataclasses
import logging
import math

import pytest
import torch
from _trainer_toy import assert_same_weights, make_trainer, one_thread  # noqa: F401 (autouse)
from _trainer_toy import model_weights as weights

from speechlm.config import load_config
from speechlm.errors import ConfigError, SpeechLMError
from speechlm.training import checkpoint
from speechlm.training.checkpoint import CheckpointMismatchError
from speechlm.training.metrics_log import read_metrics
from speechlm.training.schedules import lr_factor, tri_stage_phases
from speechlm.training.trainer import NonFiniteLossError, TrainConfig

# -- learning ---------------------------------------------------------------------


def test_loss_falls_and_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=60, schedule="cosine", warmup_steps=5)
    result = trainer.fit()
    rows = read_metrics(tmp_path, split="train")
    assert [r["step"] for r in rows] == list(range(1, 61))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first / 5
    assert rows[0]["mse"] == pytest.approx(rows[0]["loss"], rel=1e-6)
    assert rows[0]["lr"] == pytest.approx(1e-2 / 6)  # warmup: (0 + 1) / (5 + 1)
    evals = read_metrics(tmp_path, split="eval")
    assert [r["step"] for r in evals] == [60]  # eval_every=None: only at the end
    assert result.step == 60 and result.last_checkpoint == tmp_path / "step_000060"
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_000060"


def test_no_weight_decay_on_biases_and_norms(tmp_path):
    trainer = make_trainer(tmp_path)
    groups = {g["weight_decay"]: set(g["param_names"]) for g in trainer.optimizer.param_groups}
    assert groups[0.01] == {"encoder.0.weight", "head.weight"}
    assert groups[0.0] == {"encoder.0.bias", "encoder.2.weight", "encoder.2.bias", "head.bias"}


def test_bf16_autocast_on_cpu_trains(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=30, precision="bf16")
    assert trainer.amp_dtype is torch.bfloat16
    trainer.fit()
    rows = read_metrics(tmp_path, split="train")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_fp16_on_cpu_falls_back_to_fp32_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path, precision="fp16")
    assert trainer.amp_dtype is None and not trainer.scaler.is_enabled()
    assert "fp16 needs a CUDA device" in caplog.text


# -- exact resume -----------------------------------------------------------------

RESUME_SETUP = dict(dropout=0.2, grad_accum=2, schedule="cosine", warmup_steps=3, max_steps=12)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("full"), **RESUME_SETUP)
    trainer.fit()
    losses = [r["loss"] for r in read_metrics(trainer.output_dir, split="train")]
    return weights(trainer), losses


# 40 items / batch 4 = 10 batches an epoch; 2 micro-batches per update, so 5 ends
# epoch 0 and 7 is mid-epoch. With DataLoader workers the sampler runs ahead of
# training: the checkpoint must record the batches trained on, not those handed out.
@pytest.mark.parametrize("killed_after,workers", [(5, 0), (7, 0), (7, 2)])
def test_killed_run_resumes_bit_exactly(tmp_path, uninterrupted, killed_after, workers):
    crash_call = killed_after * 2 + 1
    first = make_trainer(tmp_path, save_every=1, keep_last=2, num_workers=workers,
                         objective_kwargs={"fail_on_call": crash_call}, **RESUME_SETUP)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit()
    assert checkpoint.latest_checkpoint(tmp_path).name == f"step_{killed_after:06d}"
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [killed_after - 1, killed_after]

    resumed = make_trainer(tmp_path, model_seed=123, save_every=1, keep_last=2,
                           num_workers=workers, **RESUME_SETUP)
    result = resumed.fit()
    assert result.step == 12
    full_weights, full_losses = uninterrupted
    assert_same_weights(weights(resumed), full_weights)
    # metrics.jsonl: each step once, same losses as the uninterrupted run.
    assert [r["loss"] for r in read_metrics(tmp_path, split="train")] == full_losses


def test_killed_save_leaves_no_checkpoint_that_resume_would_pick(tmp_path, uninterrupted,
                                                                 monkeypatch):
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if "step_000004.tmp" in str(f):
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path, save_every=1, keep_last=None, **RESUME_SETUP).fit()
    monkeypatch.setattr(checkpoint.torch, "save", real_save)

    assert (tmp_path / "step_000004.tmp").is_dir()  # half-written, as a kill leaves it
    assert not (tmp_path / "step_000004").exists()
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "step_000003"

    resumed = make_trainer(tmp_path, save_every=1, keep_last=None, **RESUME_SETUP)
    resumed.fit()
    assert not (tmp_path / "step_000004.tmp").exists()
    assert_same_weights(weights(resumed), uninterrupted[0])


def test_explicit_resume_path_and_finished_run(tmp_path):
    make_trainer(tmp_path / "a", max_steps=4, save_every=2, keep_last=None).fit()
    trainer = make_trainer(tmp_path / "b", max_steps=4, resume=str(tmp_path / "a" / "step_000002"))
    trainer.fit()
    assert trainer.step == 4
    from_run_dir = make_trainer(tmp_path / "c", max_steps=4, resume=str(tmp_path / "a"))
    from_run_dir.fit()  # resumes from a's latest (step 4): nothing left to do
    assert_same_weights(weights(trainer), weights(from_run_dir))
    # A finished run resumed again does nothing more.
    again = make_trainer(tmp_path / "a", max_steps=4)
    assert again.fit().step == 4


def test_training_time_counts_every_session_of_a_resumed_run(tmp_path):
    first = make_trainer(tmp_path, max_steps=4, save_every=2).fit()
    assert first.train_seconds > 0
    resumed = make_trainer(tmp_path, max_steps=8, save_every=2).fit()
    assert resumed.train_seconds > first.train_seconds
    # Resumed at its last step, a finished run reports the time it took, not zero, and the
    # metrics it logged then, not none.
    again = make_trainer(tmp_path, max_steps=8).fit()
    assert again.train_seconds == resumed.train_seconds
    assert again.train_metrics["loss"] == pytest.approx(resumed.train_metrics["loss"])
    assert again.eval_metrics and again.eval_metrics == pytest.approx(resumed.eval_metrics)


def test_training_time_of_an_old_checkpoint_comes_from_its_metrics_log(tmp_path):
    make_trainer(tmp_path, max_steps=4, save_every=4).fit()
    logged = sum(r["sec_per_step"] for r in read_metrics(tmp_path, split="train"))  # log_every=1
    path = tmp_path / "step_000004"
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    del state["train_seconds"]  # as checkpoints written before the field existed
    torch.save(state, path / "trainer_state.pt")
    assert make_trainer(tmp_path, max_steps=4).fit().train_seconds == pytest.approx(logged)


def test_an_output_dir_that_is_a_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"train.output_dir=.*run: is a file, not a directory"):
        make_trainer(tmp_path / "run").fit()


def test_resume_never_refuses_to_mix_runs(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*resume=auto"):
        make_trainer(tmp_path, max_steps=2, resume="never").fit()


def test_checkpoint_from_another_model_config_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, max_steps=2, run_config={"model": {"hidden": 16, "layers": 1}}).fit()
    later = make_trainer(tmp_path, hidden=8, max_steps=4,
                         run_config={"model": {"hidden": 8, "layers": 1}})
    with pytest.raises(CheckpointMismatchError) as err:
        later.fit()
    message = str(err.value)
    assert "step_000002" in message and "model.hidden (checkpoint: 16, this run: 8)" in message
    assert "layers" not in message


def test_checkpoint_with_other_weights_is_a_clear_error(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(CheckpointMismatchError, match=r"step_000002.*different shapes: "
                       r"encoder\.0\.bias \(checkpoint \(16,\), model \(8,\)\)"):
        make_trainer(tmp_path, hidden=8, max_steps=4).fit()
    with pytest.raises(CheckpointMismatchError, match=r"not in this model: encoder\.0\.bias"):
        make_trainer(tmp_path, max_steps=4, freeze=["encoder.0"]).fit()


def test_weights_only_snapshot_cannot_be_resumed(tmp_path):
    make_trainer(tmp_path / "run", max_steps=2).fit()  # evaluates at the end: writes best/
    with pytest.raises(checkpoint.CheckpointError, match=r"best.*weights only"):
        make_trainer(tmp_path / "other", resume=str(tmp_path / "run" / "best")).fit()


# -- schedules --------------------------------------------------------------------


def test_warmup_then_cosine_reaches_final_scale():
    kw = dict(schedule="cosine", max_steps=100, warmup_steps=9, final_lr_scale=0.1)
    assert [lr_factor(s, **kw) for s in (0, 4, 8)] == pytest.approx([0.1, 0.5, 0.9])
    assert lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(9 + 91 // 2, **kw) == pytest.approx(0.55, abs=0.01)  # half way
    assert lr_factor(100, **kw) == pytest.approx(0.1)
    assert lr_factor(500, **kw) == pytest.approx(0.1)
    assert lr_factor(50, schedule="linear", max_steps=100, final_lr_scale=0.0 + 0.5) == 0.75
    assert lr_factor(70, schedule="constant", max_steps=100, warmup_steps=9) == 1.0


def test_tri_stage_phases():
    kw = dict(schedule="tri_stage", max_steps=1000, tri_stage_ratios=(0.1, 0.4, 0.5),
              init_lr_scale=0.01, final_lr_scale=0.05)
    assert tri_stage_phases(1000, (0.1, 0.4, 0.5)) == (100, 400, 500)
    assert lr_factor(0, **kw) == pytest.approx(0.01)
    assert lr_factor(50, **kw) == pytest.approx(0.505)
    assert lr_factor(100, **kw) == 1.0 and lr_factor(499, **kw) == 1.0
    assert lr_factor(750, **kw) == pytest.approx(math.sqrt(0.05))  # exponential decay
    assert lr_factor(1000, **kw) == pytest.approx(0.05)
    assert lr_factor(5000, **kw) == pytest.approx(0.05)


def test_trainer_applies_the_schedule(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, schedule="tri_stage",
                           tri_stage_ratios=(0.2, 0.3, 0.5), init_lr_scale=0.1,
                           final_lr_scale=0.1)
    trainer.fit()
    lrs = [r["lr"] for r in read_metrics(tmp_path, split="train")]
    expected = [1e-2 * lr_factor(s, schedule="tri_stage", max_steps=10,
                                 tri_stage_ratios=(0.2, 0.3, 0.5), init_lr_scale=0.1,
                                 final_lr_scale=0.1) for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-2)


def test_a_run_can_stop_partway_down_a_longer_schedule(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=8, schedule="cosine", warmup_steps=2)
    full.fit()
    part = make_trainer(tmp_path / "part", max_steps=5, schedule="cosine", warmup_steps=2,
                        schedule_steps=8)
    part.fit()
    full_lrs = [r["lr"] for r in read_metrics(tmp_path / "full", split="train")]
    part_lrs = [r["lr"] for r in read_metrics(tmp_path / "part", split="train")]
    assert len(part_lrs) == 5 and part_lrs == pytest.approx(full_lrs[:5])
    assert part_lrs[-1] > full_lrs[-1] * 2  # still high: the schedule had not ended
    with pytest.raises(ConfigError, match=r"schedule_steps \(4\) must be >= max_steps \(5\)"):
        TrainConfig(max_steps=5, schedule_steps=4)


def test_schedule_config_errors():
    with pytest.raises(ConfigError, match="warmup_steps is not used by schedule=tri_stage"):
        TrainConfig(schedule="tri_stage", warmup_steps=10)
    with pytest.raises(ConfigError, match="sum to <= 1"):
        TrainConfig(schedule="tri_stage", tri_stage_ratios=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="freeze_initially and train.freeze_for_steps"):
        TrainConfig(freeze_for_steps=10)


# -- freezing ---------------------------------------------------------------------


def test_freeze_for_steps_then_train_and_permanent_freeze(tmp_path):
    setup = dict(freeze=["encoder.2"], freeze_initially=["encoder"], freeze_for_steps=3,
                 save_every=1, keep_last=None)
    trainer = make_trainer(tmp_path, max_steps=5, **setup)
    start = weights(trainer)
    snapshots = {}
    real_update = trainer._update

    def spy(loss):
        norm = real_update(loss)
        snapshots[trainer.step + 1] = weights(trainer)
        return norm

    trainer._update = spy
    trainer.fit()
    for step in (1, 2, 3):  # encoder frozen for the first 3 updates, the head trains
        assert torch.equal(snapshots[step]["encoder.0.weight"], start["encoder.0.weight"])
        assert not torch.equal(snapshots[step]["head.weight"], start["head.weight"])
    assert not torch.equal(snapshots[4]["encoder.0.weight"], start["encoder.0.weight"])
    # encoder.2 (the LayerNorm) is frozen for good and not stored in checkpoints.
    assert torch.equal(snapshots[5]["encoder.2.weight"], start["encoder.2.weight"])
    stored = checkpoint.load_checkpoint(tmp_path / "step_000005").model_state
    assert "encoder.2.weight" not in stored and "encoder.0.weight" in stored

    # Resuming inside the frozen phase restores it: same weights as uninterrupted.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    import shutil
    shutil.copytree(tmp_path / "step_000002", resumed_dir / "step_000002")
    resumed = make_trainer(resumed_dir, max_steps=5, **setup)
    resumed.fit()
    assert_same_weights(weights(resumed), snapshots[5])


def test_freeze_prefix_that_matches_nothing_names_the_modules(tmp_path):
    with pytest.raises(ConfigError, match=r"'encodr' matches no parameter.*encoder, head"):
        make_trainer(tmp_path, freeze=["encodr"])


# -- evaluation and best checkpoint -------------------------------------------------


@pytest.mark.parametrize("mode,values,best_step", [("min", [5.0, 3.0, 4.0, 6.0], 4),
                                                   ("max", [5.0, 3.0, 7.0, 6.0], 6)])
def test_best_checkpoint_follows_the_eval_metric(tmp_path, mode, values, best_step):
    trainer = make_trainer(tmp_path, max_steps=8, eval_every=2, save_every=2, keep_last=None,
                           best_mode=mode, objective_kwargs={"eval_values": values})
    result = trainer.fit()
    assert [r["loss"] for r in read_metrics(tmp_path, split="eval")] == values
    best = checkpoint.load_checkpoint(tmp_path / "best")
    assert best.trainer_state["step"] == best_step and best.optimizer_state is None
    at_step = checkpoint.load_checkpoint(tmp_path / f"step_{best_step:06d}")
    assert_same_weights(best.model_state, at_step.model_state)
    assert result.best_checkpoint == tmp_path / "best"
    assert result.best_value == (max(values) if mode == "max" else min(values))


def test_unknown_best_metric_lists_the_eval_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"best_metric 'wer' is not among.*\(loss\)"):
        make_trainer(tmp_path, max_steps=2, best_metric="wer").fit()


def test_eval_keeps_module_modes(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.model.encoder.eval()  # e.g. a frozen encoder kept in eval mode on purpose
    trainer.model.head.train()
    trainer.evaluate()
    assert not trainer.model.encoder.training and trainer.model.head.training


# -- non-finite losses --------------------------------------------------------------


def test_non_finite_update_is_skipped_and_counted(tmp_path):
    reference = make_trainer(tmp_path / "ref", max_steps=3)
    reference.fit()
    # grad_accum=1: loss call 3 is update 3's only micro-batch; it is retried on the next batch
    trainer = make_trainer(tmp_path / "nan", max_steps=3, objective_kwargs={"nan_on_calls": {3}})
    real_update, changes = trainer._update, []

    def spy(loss):
        before = weights(trainer)
        norm = real_update(loss)
        changes.append(any(not torch.equal(v, trainer.model.state_dict()[k])
                           for k, v in before.items()))
        return norm

    trainer._update = spy
    result = trainer.fit()
    assert result.step == 3 and result.skipped_nonfinite == 1
    assert changes == [True, True, False, True]  # the NaN update left the weights alone
    rows = read_metrics(tmp_path / "nan", split="train")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["skipped_nonfinite"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows)
    ref_rows = read_metrics(tmp_path / "ref", split="train")
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in ref_rows[:2]]


def test_consecutive_non_finite_losses_stop_with_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=10, save_every=1, max_consecutive_nonfinite=3,
                           objective_kwargs={"nan_on_calls": set(range(3, 100))})
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf for 3 consecutive updates at step 3.*"
                       r"lower train\.lr"):
        trainer.fit()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_000002"


# -- config integration -------------------------------------------------------------


def test_train_config_loads_from_a_recipe_with_overrides(tmp_path):
    @dataclasses.dataclass
    class Recipe:
        train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-4\n  schedule: tri_stage\n  freeze: [encoder.feature_"
                    "extractor]\n")
    recipe = load_config(Recipe, path, ["train.max_steps=20", "train.betas=[0.9, 0.98]"])
    assert recipe.train.lr == 3e-4 and recipe.train.max_steps == 20
    assert recipe.train.betas == (0.9, 0.98)
    assert recipe.train.freeze == ["encoder.feature_extractor"]
    with pytest.raises(ConfigError, match=r"r\.yaml:1: invalid 'train' \(after override 'train.warmup_steps=5'\): .*"
                       r"warmup_steps is not used"):
        load_config(Recipe, path, ["train.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"'train.schedule' must be one of .*'cosine'.*"
                       r"did you mean 'cosine'"):
        load_config(Recipe, path, ["train.schedule=cosin"])


def test_objective_may_pass_on_an_empty_batch(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=4, grad_accum=2)
    real_loss = trainer.objective.loss
    calls = {"n": 0}

    def loss(batch):
        calls["n"] += 1
        return None if calls["n"] == 2 else real_loss(batch)

    trainer.objective.loss = loss
    result = trainer.fit()
    assert result.step == 4
    rows = read_metrics(tmp_path, split="train")
    assert rows[0]["empty_batch_frac"] == 0.5 and "empty_batch_frac" not in rows[1]


def test_a_whole_epoch_without_a_usable_item_stops_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=50)  # 10 batches per epoch
    trainer.objective.loss = lambda batch: None  # every item of every batch was skipped
    with pytest.raises(SpeechLMError, match=r"10 update\(s\) in a row had no usable training item"):
        trainer.fit()
    # with 2 micro-batches per update, an epoch of 10 batches is 5 updates
    trainer = make_trainer(tmp_path / "accum", max_steps=50, grad_accum=2)
    trainer.objective.loss = lambda batch: None
    with pytest.raises(SpeechLMError, match=r"5 update\(s\) in a row had no usable training item"):
        trainer.fit()


# -- the real duration-bucketing sampler ------------------------------------------


def test_resume_is_exact_with_the_duration_bucket_sampler(tmp_path):
    sampler_module = pytest.importorskip("speechlm.data.sampler")
    from _trainer_toy import ToyDataset, ToyModel, ToyObjective

    from speechlm.training.trainer import Trainer

    durations = torch.linspace(1.0, 9.0, 40).tolist()

    def build(out, fail_on_call=None):
        torch.manual_seed(0)
        sampler = sampler_module.DurationBucketSampler(durations, max_batch_duration=30.0,
                                                       num_buckets=3, seed=5)
        config = TrainConfig(max_steps=10, lr=1e-2, log_every=1, save_every=1, progress=False,
                             tensorboard=False, device="cpu", output_dir=str(out),
                             grad_accum=2)
        objective = ToyObjective(ToyModel(dropout=0.2), fail_on_call=fail_on_call)
        return Trainer(config, objective, ToyDataset(40), sampler)

    full = build(tmp_path / "full")
    full.fit()
    with pytest.raises(RuntimeError):
        build(tmp_path / "cut", fail_on_call=9).fit()
    resumed = build(tmp_path / "cut")
    resumed.fit()
    assert_same_weights(weights(resumed), weights(full))
    assert full.epoch >= 1  # crossed an epoch boundary
