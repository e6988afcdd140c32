"""Skill-It online data mixing (arXiv 2307.14430): the mixture update and the skills graph.

*Skills* are the mixture's sources (languages, tasks, domains). The *skills graph*
A (k training skills x m evaluation skills) says how much training on skill i
lowers the validation loss of skill j. Training runs in rounds of a fixed number of
updates; after every round the validation losses L_j are measured and the next
round's mixture is

    p_i ∝ exp(eta * sum over the last `window` rounds tau of sum_j A_ij L_j(tau))

so a skill whose validation loss stays high, or one that helps such skills, gains
weight, and one whose loss has fallen loses it. eta = 0 keeps the mixture uniform.
The evaluation skills may be all the training skills (the paper's continual
pre-training setting), a target among them (its fine-tuning setting: only the
target's loss drives the mixture) or others.

The graph is
- "identity" (or null): each training skill helps its own evaluation skill only
  (the paper's "no graph" ablation);
- given: {train_skill: {eval_skill: weight}} (missing entries are 0) or a k x m
  list in the order of the training and evaluation skills; weights >= 0;
- estimated by probe runs (`probe_graph`): from the same starting weights, train
  on skill i alone for a few steps and take A_ij = (L_j before - L_j after) /
  L_j before, the relative drop of skill j's validation loss. A rise (negative
  drop) is clipped to 0 and A is scaled so that its largest entry is 1, the scale
  of the identity graph and of the paper's graphs (diagonal 1, related skills
  below it).

numpy only: importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

GRAPH_NAMES = ("identity", "probe")


def skill_it_probabilities(graph, losses: Sequence[Sequence[float]], eta: float) -> np.ndarray:
    """The mixture over the k training skills from the validation losses of the rounds in
    the window (one vector of m losses per round, oldest first)."""
    graph = np.asarray(graph, dtype=np.float64)
    window = np.asarray(losses, dtype=np.float64)
    if graph.ndim != 2 or window.ndim != 2 or window.shape[1] != graph.shape[1]:
        raise ValueError(f"need a k x m graph and rounds of m losses, got graph {graph.shape} "
                         f"and losses {window.shape}")
    if not np.all(np.isfinite(window)):
        raise ValueError(f"validation losses must be finite, got {window.tolist()}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    scores = eta * graph @ window.sum(axis=0)
    weights = np.exp(scores - scores.max())  # shifted: same ratios, no overflow
    return weights / weights.sum()


def skills_graph(spec, train_skills: Sequence[str], eval_skills: Sequence[str], *,
                 where: str = "data.mixture.graph") -> np.ndarray:
    """The k x m graph a recipe gives ("identity"/null, a mapping or a k x m list); errors
    name the field. ("probe" is estimated by `probe_graph` instead.)"""
    train_skills, eval_skills = list(train_skills), list(eval_skills)
    if spec is None or spec == "identity":
        graph = np.array([[1.0 if i == j else 0.0 for j in eval_skills] for i in train_skills])
        if not graph.any():
            raise ConfigError(f"{where}=identity links no training skill ({train_skills}) to a "
                              f"validation skill ({eval_skills}); give the graph as "
                              "{train_skill: {validation_skill: weight}} or use graph=probe")
        return graph
    if isinstance(spec, str):
        raise ConfigError(f"{where}={spec!r}: use 'identity', 'probe', null, "
                          "{train_skill: {validation_skill: weight}} or a k x m list")
    if isinstance(spec, Mapping):
        graph = np.zeros((len(train_skills), len(eval_skills)))
        for row, weights in spec.items():
            if row not in train_skills:
                raise ConfigError(f"{where}.{row}: unknown training skill '{row}'; the "
                                  f"training skills (data.train languages) are {train_skills}")
            if not isinstance(weights, Mapping):
                raise ConfigError(f"{where}.{row} must map validation skills to weights, e.g. "
                                  f"{{{eval_skills[0]}: 1.0}}; got {weights!r}")
            for col, weight in weights.items():
                if col not in eval_skills:
                    raise ConfigError(f"{where}.{row}.{col}: unknown validation skill '{col}'; "
                                      "the validation skills (data.mixture.validation) are "
                                      f"{eval_skills}")
                graph[train_skills.index(row), eval_skills.index(col)] = _weight(
                    weight, f"{where}.{row}.{col}")
    elif isinstance(spec, (list, tuple)):
        shape = f"{len(train_skills)} x {len(eval_skills)}"
        order = (f"rows: training skills {train_skills}, columns: validation skills "
                 f"{eval_skills}")
        if len(spec) != len(train_skills) or not all(
                isinstance(r, (list, tuple)) and len(r) == len(eval_skills) for r in spec):
            raise ConfigError(f"{where}: wrong shape, need a {shape} list ({order}); got "
                              f"{spec!r}")
        graph = np.array([[_weight(w, f"{where}[{i}][{j}]") for j, w in enumerate(r)]
                          for i, r in enumerate(spec)])
    else:
        raise ConfigError(f"{where}: expected 'identity', 'probe', null, a mapping or a list; "
                          f"got {spec!r}")
    if not graph.any():
        raise ConfigError(f"{where}: every weight is 0, so the mixture would never move; give "
                          "each training skill's effect on the validation skills")
    return graph


def probe_graph(before: Mapping[str, float], after: Mapping[str, Mapping[str, float]],
                train_skills: Sequence[str], eval_skills: Sequence[str]) -> np.ndarray:
    """The graph from probe runs: `before[j]` the validation loss of skill j at the start,
    `after[i][j]` after training on skill i alone. Relative drops, rises clipped to 0,
    scaled to a largest entry of 1 (see the module doc)."""
    drops = np.zeros((len(train_skills), len(eval_skills)))
    for i, row in enumerate(train_skills):
        for j, col in enumerate(eval_skills):
            start, end = float(before[col]), float(after[row][col])
            if not (math.isfinite(start) and math.isfinite(end)) or start <= 0:
                raise ValueError(f"probe losses must be finite and the starting loss > 0; "
                                 f"got {start} -> {end} for training on '{row}', "
                                 f"validating '{col}'")
            drops[i, j] = (start - end) / start
    graph = np.clip(drops, 0.0, None)
    if not graph.any():
        raise ValueError("no probe run lowered any validation loss (relative drops "
                         f"{drops.round(4).tolist()}): raise data.mixture.probe_steps or "
                         "give the graph in the recipe")
    return graph / graph.max()


def _weight(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: a graph weight must be a finite number >= 0, got {value!r}")
    return float(value)
