"""Two gloo processes on CPU train like one process with the same global batch."""

from pathlib import Path

import pytest
import torch
from _torchrun import run_workers
from _trainer_ddp_worker import COMMON, DDP_CASES, SINGLE_CASES
from _trainer_toy import make_trainer

from speechlm.training import checkpoint
from speechlm.training.metrics_log import read_metrics

WORKER = Path(__file__).with_name("_trainer_ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return run_workers(WORKER, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", list(DDP_CASES))
def test_two_ranks_match_one_process_at_the_same_global_batch(ddp_run, tmp_path, case):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = make_trainer(tmp_path, **{**COMMON, **SINGLE_CASES[case]})
        single.fit()
    finally:
        torch.set_num_threads(threads)
    ddp_rows = read_metrics(ddp_run / case, split="train")
    single_rows = read_metrics(tmp_path, split="train")
    assert [r["step"] for r in ddp_rows] == list(range(1, COMMON["max_steps"] + 1))
    for a, b in zip(ddp_rows, single_rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["mse"] == pytest.approx(b["mse"], abs=1e-5), a["step"]  # reduced over ranks
        for key in ("weight_max", "weight_min", "weight_ess"):  # only in case "reweight"
            assert (key in a) == (key in b)
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), (key, a["step"])
    ddp_weights = checkpoint.load_checkpoint(ddp_run / case / "step_000010").model_state
    for key, value in single.model_state().items():
        assert torch.allclose(ddp_weights[key], value, atol=1e-5), key


def test_rank0_writes_checkpoints_with_every_ranks_rng(ddp_run):
    saved = [step for step, _ in checkpoint.list_checkpoints(ddp_run / "batch8")]
    assert saved == [5, 10]
    state = checkpoint.load_checkpoint(ddp_run / "batch8" / "step_000005").trainer_state
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler"]["world_size"] == 2 and state["batches_in_epoch"] == 5
    assert not list((ddp_run / "batch8").glob("*.tmp"))
