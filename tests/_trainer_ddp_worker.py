"""Run by `torchrun --nproc_per_node 2` from test_trainer_ddp.py: trains the toy cases with DDP."""

from __future__ import annotations

import sys
from pathlib import Path

# Global batch 8 in each case; DDP_CASES[name] is per-rank setup, SINGLE_CASES the 1-process twin.
COMMON = dict(max_steps=10, schedule="cosine", warmup_steps=2, lr=2e-2)
DDP_CASES = {
    "batch8": dict(global_batch=8, grad_accum=1, save_every=5, keep_last=None),
    "accum2": dict(global_batch=4, grad_accum=2),  # 2 per rank per micro-batch: no_sync path
    "freeze": dict(global_batch=8, grad_accum=1, freeze_initially=["encoder"],
                   freeze_for_steps=3),  # DDP with parameters that join after 3 updates
    # sample weights normalised over the global batch (all_gather of every rank's losses)
    "reweight": dict(global_batch=8, grad_accum=1,
                     sample_weighting={"strategy": "linupper", "r": 0.5, "warmup_steps": 2}),
}
SINGLE_CASES = {
    "batch8": dict(global_batch=8, grad_accum=1),
    "accum2": dict(global_batch=8, grad_accum=1),
    "freeze": DDP_CASES["freeze"],
    "reweight": DDP_CASES["reweight"],
}


def main(out: Path) -> None:
    import torch
    from _trainer_toy import make_trainer

    from speechlm.training import distributed

    torch.set_num_threads(1)
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    for name, setup in DDP_CASES.items():
        trainer = make_trainer(out / name, rank=info.rank, world_size=info.world_size,
                               **{**COMMON, **setup})
        trainer.fit()
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
