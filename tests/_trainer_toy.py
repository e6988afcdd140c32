"""A tiny regression task for the trainer tests (shared by the single-process and DDP tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from speechlm.training.sample_weighting import SampleLosses
from speechlm.training.trainer import TrainConfig, Trainer

DIM = 6


class ToyDataset(Dataset):
    """y = x . w + small noise, fixed by `seed`."""

    def __init__(self, n: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM, generator=g)
        w = torch.randn(DIM, generator=g)
        self.y = self.x @ w + 0.05 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class ToySampler:
    """Shuffling batch sampler with the trainer's interface (set_epoch / state_dict / load).

    Each global batch of `global_batch` items is split between ranks, so N ranks
    with global_batch B see exactly the items one process with batch B sees.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        assert global_batch % world_size == 0
        self.n, self.global_batch, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume_at = 0
        self.position = 0

    def _batches(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        per_rank = self.global_batch // self.world_size
        out = []
        for start in range(0, self.n - self.global_batch + 1, self.global_batch):
            batch = order[start:start + self.global_batch]
            out.append(batch[self.rank * per_rank:(self.rank + 1) * per_rank].tolist())
        return out

    def __iter__(self):
        batches = self._batches()
        start, self._resume_at = self._resume_at, 0
        for i in range(start, len(batches)):
            self.position = i + 1
            yield batches[i]

    def __len__(self):
        return len(self._batches())

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self._resume_at, self.position = epoch, 0, 0

    def state_dict(self, num_consumed: int | None = None):
        return {"epoch": self.epoch,
                "position": self.position if num_consumed is None else num_consumed,
                "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state):
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError("sampler state does not match this sampler (seed or world_size)")
        self.epoch = state["epoch"]
        self._resume_at = self.position = state["position"]


class ToyModel(nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.dropout(self.encoder(x))).squeeze(-1)


class ToyObjective:
    """MSE regression; `evaluate` scores a fixed held-out set (or replays `eval_values`)."""

    def __init__(self, model: nn.Module, eval_values=None, nan_on_calls=(), fail_on_call=None):
        self.model = model
        self.calls = 0
        self.nan_on_calls = set(nan_on_calls)
        self.fail_on_call = fail_on_call
        self.eval_values = list(eval_values) if eval_values is not None else None
        self.heldout = ToyDataset(16, seed=99)

    def loss(self, batch):
        losses = self._squared_errors(batch)
        loss = losses.mean()
        return loss, {"mse": loss.detach()}

    def sample_losses(self, batch):
        """Each item's squared error (for train.sample_weighting); their mean is `loss`."""
        losses = self._squared_errors(batch)
        return SampleLosses(losses, {"mse": losses.detach().mean()})

    def _squared_errors(self, batch):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        losses = torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"],
                                              reduction="none")
        if self.calls in self.nan_on_calls:
            losses = losses * float("nan")
        return losses

    def evaluate(self, model):
        if self.eval_values is not None:
            return {"loss": self.eval_values.pop(0)}
        pred = model(self.heldout.x)
        return {"loss": torch.nn.functional.mse_loss(pred, self.heldout.y).item()}


def make_trainer(output_dir, *, dropout=0.0, hidden=16, n=40, global_batch=4, sampler_seed=0,
                 rank=0, world_size=1, model_seed=0, objective_kwargs=None, run_config=None,
                 **train_overrides) -> Trainer:
    torch.manual_seed(model_seed)
    model = ToyModel(hidden=hidden, dropout=dropout)
    defaults = dict(max_steps=12, lr=1e-2, weight_decay=0.01, schedule="constant",
                    log_every=1, save_every=None, progress=False, tensorboard=False,
                    device="cpu", output_dir=str(output_dir))
    config = TrainConfig(**{**defaults, **train_overrides})
    sampler = ToySampler(n, global_batch, seed=sampler_seed, rank=rank, world_size=world_size)
    return Trainer(config, ToyObjective(model, **(objective_kwargs or {})), ToyDataset(n),
                   sampler, run_config=run_config)


def model_weights(trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's model weights, to compare runs with."""
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module to run it on one thread: bit-exact comparisons must not depend
    on thread scheduling, and the toy is faster that way on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
