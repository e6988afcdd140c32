"""Skill-It's skills graph from short probe runs: train on one skill alone, see what it helps.

For each training skill i, starting from the same weights every time, train
`steps` updates on batches of skill i only (AdamW at the run's learning rate,
constant, gradients clipped), then measure every validation skill's loss. The
relative drops give the graph (`speechlm.data.skill_it.probe_graph`). The model's
weights, train/eval modes and every RNG are restored afterwards, so the run that
follows starts exactly as it would have without the probes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from ..data.skill_it import probe_graph
from .trainer import TrainConfig, build_optimizer, capture_rng_state, restore_rng_state

logger = logging.getLogger(__name__)


def probe_skills_graph(model, loss: Callable, batches: Callable[[str], Iterator],
                       measure: Callable[[object], Mapping[str, float]], *,
                       train_skills: Sequence[str], eval_skills: Sequence[str], steps: int,
                       lr: float, weight_decay: float = 0.0,
                       max_grad_norm: float | None = 1.0) -> tuple:
    """(graph k x m, report dict) from probe runs (see the module doc).

    loss(batch) -> (scalar loss, metrics) or None for an empty batch;
    batches(skill) -> an endless iterator of that skill's collated batches (on the model's
    device); measure(model) -> {validation skill: loss} (called in eval mode, no_grad).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = copy.deepcopy(model.state_dict())
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay)
    rng = capture_rng_state(device)
    try:
        before = _measured(model, measure)
        after, curves = {}, {}
        for skill in train_skills:
            model.load_state_dict(start)
            optimizer = build_optimizer(named, cfg)
            model.train()
            source, losses = batches(skill), []
            for _ in range(steps):
                out = loss(next(source))
                if out is None:
                    continue
                value = out[0]
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for _, p in named], max_grad_norm if max_grad_norm else math.inf)
                if torch.isfinite(value) and torch.isfinite(norm):
                    optimizer.step()
                losses.append(float(value.detach()))
            after[skill] = _measured(model, measure)
            curves[skill] = losses
            logger.info("probe on %s: validation losses %s -> %s", skill, before, after[skill])
    finally:
        model.load_state_dict(start)
        for module, training in modes.items():
            module.training = training
        for param in model.parameters():
            param.grad = None
        restore_rng_state(rng, device)
    graph = probe_graph(before, after, train_skills, eval_skills)
    report = {"steps": steps, "lr": lr, "before": before, "after": after,
              "train_loss_first_last": {s: [c[0], c[-1]] if c else [] for s, c in
                                        curves.items()},
              "train_skills": list(train_skills), "eval_skills": list(eval_skills),
              "graph": graph.tolist()}
    return graph, report


def _measured(model, measure) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in measure(model).items()}
    finally:
        model.train(was_training)
