"""Run by `torchrun --nproc_per_node 2` from test_fsdp.py: a tiny Llama trained with FSDP2.

Cases (each in OUT/<case>): `full`, an uninterrupted sharded run; `cut`, the same run crashing
on both ranks in the forward of update 5 (after the step-4 checkpoint), then resumed by a new
trainer; `accum2`, micro-batches of 2 per rank with grad_accum 2 (the same global batch of
8, gradients reduced on the second only); `bf16`, two updates under the bf16 mixed-precision policy. Rank 0 writes the trained
model's logits on PROBE to OUT/full/probe_logits.pt and the dtypes a block computed with in the
bf16 run to OUT/bf16/block_dtypes.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _trainer_toy import ToySampler

from speechlm.training.objectives.causal_lm import CausalLMCollator, CausalLMObjective, TokenDataset
from speechlm.training.trainer import TrainConfig, Trainer

SETUP = dict(max_steps=6, lr=1e-2, schedule="cosine", warmup_steps=2, weight_decay=0.01,
             log_every=1, save_every=2, keep_last=None, progress=False, tensorboard=False,
             device="cpu")
GLOBAL_BATCH, ITEMS, LENGTH, VOCAB = 8, 32, 12, 64
PROBE = torch.arange(20).reshape(2, 10) % VOCAB


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")
    return model


class CrashingObjective(CausalLMObjective):
    """Raises on its `crash_on_call`-th loss, as a killed process stops mid-update."""

    def __init__(self, model, crash_on_call=None):
        super().__init__(model)
        self.calls, self.crash_on_call = 0, crash_on_call

    def loss(self, batch):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        return super().loss(batch)


def make_lm_trainer(output_dir, *, rank=0, world_size=1, crash_on_call=None,
                    global_batch=GLOBAL_BATCH, **overrides):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (ITEMS, LENGTH), generator=g).tolist()
    dataset = TokenDataset([{"input_ids": row, "labels": row} for row in ids])
    sampler = ToySampler(ITEMS, global_batch, rank=rank, world_size=world_size)
    config = TrainConfig(**{**SETUP, "output_dir": str(output_dir), **overrides})
    return Trainer(config, CrashingObjective(tiny_llama(), crash_on_call), dataset, sampler,
                   collate_fn=CausalLMCollator(0))


def main(out: Path) -> None:
    from speechlm.training import distributed

    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    kw = dict(rank=info.rank, world_size=info.world_size, sharding="fsdp")

    trainer = make_lm_trainer(out / "full", **kw)
    trainer.fit()
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(input_ids=PROBE).logits
    if info.is_main:
        torch.save(logits, out / "full" / "probe_logits.pt")

    try:
        make_lm_trainer(out / "cut", crash_on_call=5, **kw).fit()
        raise AssertionError("the cut run did not crash")
    except RuntimeError as e:
        assert "simulated crash" in str(e), e
    make_lm_trainer(out / "cut", **kw).fit()

    make_lm_trainer(out / "accum2", global_batch=4, grad_accum=2, save_every=None, **kw).fit()

    bf16 = make_lm_trainer(out / "bf16", precision="bf16", max_steps=2, save_every=None, **kw)
    seen = set()  # the dtype a block computes with: the mixed-precision policy's, not fp32
    bf16.model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda module, args, output: seen.add(str(module.weight.dtype)))
    bf16.fit()
    if info.is_main:
        (out / "bf16" / "block_dtypes.txt").write_text(" ".join(sorted(seen)))
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
