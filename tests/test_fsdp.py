"""train.sharding=fsdp: two gloo processes with FSDP2 train a tiny Llama like one process does,
a crashed sharded run resumes exactly, and `speechlm convert fsdp` gathers a transformers dir."""

from pathlib import Path

import pytest
import torch
from _fsdp_worker import PROBE, SETUP, make_lm_trainer
from _torchrun import run_workers

from speechlm.cli import main as cli_main
from speechlm.errors import ConfigError
from speechlm.training import checkpoint, sharded_checkpoint
from speechlm.training.metrics_log import read_metrics
from speechlm.training.trainer import TrainConfig

WORKER = Path(__file__).with_name("_fsdp_worker.py")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return run_workers(WORKER, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The same model, data and global batch in one process, without sharding."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = make_lm_trainer(tmp_path_factory.mktemp("single"), save_every=None)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    return trainer


def train_losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir, split="train")]


@pytest.mark.parametrize("case", ["full", "accum2"])
def test_two_sharded_processes_match_one_process(fsdp_run, single_run, case):
    sharded = train_losses(fsdp_run / case)
    single = train_losses(single_run.output_dir)
    assert [s for s, _ in sharded] == list(range(1, SETUP["max_steps"] + 1))
    assert [s for s, _ in single] == [s for s, _ in sharded]
    assert single[-1][1] < single[0][1] - 0.1  # it learns: the curves compared are not flat
    worst = max(abs(a - b) for (_, a), (_, b) in zip(sharded, single, strict=True))
    assert worst < 1e-5, worst  # fp32, only the reduction order differs
    gathered = sharded_checkpoint.load_full_model_state(fsdp_run / case / "step_000006")
    for key, value in single_run.model.state_dict().items():
        if key in gathered:
            assert torch.allclose(gathered[key], value, atol=1e-5), key
    assert "model.layers.1.mlp.up_proj.weight" in gathered


def test_crashed_sharded_run_resumes_exactly(fsdp_run):
    assert train_losses(fsdp_run / "cut") == train_losses(fsdp_run / "full")  # bit-identical
    assert [s for s, _ in checkpoint.list_checkpoints(fsdp_run / "cut")] == [2, 4, 6]
    assert not list((fsdp_run / "cut").glob("*.tmp"))
    step4 = fsdp_run / "cut" / "step_000004"
    state = sharded_checkpoint.read_trainer_state(step4)
    assert state["sharding"] == "fsdp" and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler"]["position"] == 4
    assert sorted(p.name for p in (step4 / "sharded").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]  # one shard file per rank


def test_gathered_directory_loads_with_from_pretrained(fsdp_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gathered"
    assert cli_main(["convert", "fsdp", str(fsdp_run / "full"), str(out)]) == 0
    assert "transformers directory" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    trained = torch.load(fsdp_run / "full" / "probe_logits.pt", weights_only=True)
    assert torch.allclose(logits, trained, atol=1e-5), (logits - trained).abs().max()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cli_main(["convert", "fsdp", str(fsdp_run / "full"), str(out)]) == 2  # exists


def test_bf16_policy_computes_blocks_in_bf16(fsdp_run):
    assert (fsdp_run / "bf16" / "block_dtypes.txt").read_text() == "torch.bfloat16"
    bf16 = dict(train_losses(fsdp_run / "bf16"))
    fp32 = dict(train_losses(fsdp_run / "full"))
    assert all(abs(bf16[step] - fp32[step]) < 0.05 for step in (1, 2)), (bf16, fp32)


def test_sharded_checkpoint_refuses_other_setups(fsdp_run, tmp_path):
    step6 = fsdp_run / "full" / "step_000006"
    state = sharded_checkpoint.read_trainer_state(step6)
    with pytest.raises(checkpoint.CheckpointError, match="--nproc_per_node 2"):
        sharded_checkpoint.check_resumable(step6, state, world_size=4)
    with pytest.raises(checkpoint.CheckpointError, match="speechlm convert fsdp"):
        make_lm_trainer(tmp_path, resume=str(step6)).fit()  # sharding=none
    with pytest.raises(checkpoint.CheckpointError, match="speechlm convert fsdp"):
        checkpoint.load_checkpoint(step6)


@pytest.mark.parametrize("overrides,message", [
    ({"sharding": "zero3"}, "train.sharding must be 'none'"),
    ({"sharding": "fsdp", "precision": "fp16"}, "precision=bf16 or fp32"),
    ({"sharding": "fsdp", "freeze_initially": ["model"], "freeze_for_steps": 2},
     "freeze_initially"),
])
def test_bad_sharding_config_is_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**overrides)


def test_fsdp_in_a_single_process_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node N"):
        make_lm_trainer(tmp_path, sharding="fsdp")


def test_recipe_without_sharded_support_is_rejected():
    from speechlm.recipes import load_recipe

    root = Path(__file__).parents[1]
    with pytest.raises(ConfigError, match="task 'ctc' does not support sharded.*text_lm"):
        load_recipe(root / "recipes/tiny/ctc_en.yaml", ["train.sharding=fsdp"])
    _, config = load_recipe(root / "recipes/tiny/llm_en_es.yaml", ["train.sharding=fsdp"])
    assert config.train.sharding == "fsdp"
