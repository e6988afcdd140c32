"""Skill-It's online loop for the Trainer: measure the skills' losses, set the next mixture.

`SkillItSchedule` holds a `SkillItMixtureSampler` (one mixture epoch = one round),
the skills graph and a callable that measures each validation skill's loss. The
Trainer calls `start` before the first update (round 0's losses give the first
mixture) and `end_round` whenever the sampler's round is used up; each returns
the metrics to log (the round, p per training skill, the loss per validation
skill). Its state (losses so far, the graph) goes into every checkpoint, so a
resumed run continues the same mixture trajectory. The update rule is
`speechlm.data.skill_it.skill_it_probabilities`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..data.skill_it import skill_it_probabilities


class SkillItSchedule:
    """The online mixture: rounds, the loss window and the sampler's probabilities.

    measure(model) -> {validation skill: loss}, called in eval mode under no_grad on
    every rank (the Trainer broadcasts rank 0's numbers).
    """

    def __init__(self, sampler, graph, measure: Callable[[object], Mapping[str, float]], *,
                 eval_skills: Sequence[str], eta: float, window: int):
        self.sampler = sampler
        self.train_skills = list(sampler.languages)
        self.eval_skills = list(eval_skills)
        self.graph = np.asarray(graph, dtype=np.float64)
        if self.graph.shape != (len(self.train_skills), len(self.eval_skills)):
            raise ValueError(f"the graph is {self.graph.shape}, need (training skills "
                             f"{self.train_skills}) x (validation skills {self.eval_skills})")
        self.measure = measure
        self.eta, self.window = float(eta), int(window)
        self.losses: list[list[float]] = []  # one vector per measured round, oldest first
        self.ended_epoch: int | None = None  # the sampler epoch whose end was last handled

    @property
    def started(self) -> bool:
        return bool(self.losses)

    @property
    def probabilities(self) -> dict[str, float] | None:
        """The mixture set last: from the losses of the last `window` rounds (None before
        the first measurement)."""
        if not self.losses:
            return None
        probs = skill_it_probabilities(self.graph, self.losses[-self.window:], self.eta)
        return {s: float(p) for s, p in zip(self.train_skills, probs, strict=True)}

    def due(self, epoch: int, batches_in_epoch: int) -> bool:
        """Whether the round (sampler epoch `epoch`) is used up and not yet handled."""
        return batches_in_epoch >= len(self.sampler) and self.ended_epoch != epoch

    def start(self, losses: Mapping[str, float]) -> dict[str, float]:
        """Round 0: the losses before training set the first mixture."""
        return self._update(losses)

    def end_round(self, epoch: int, losses: Mapping[str, float]) -> dict[str, float]:
        """The round that was sampler epoch `epoch` is over: set the next one's mixture."""
        self.ended_epoch = epoch
        return self._update(losses)

    def _update(self, losses: Mapping[str, float]) -> dict[str, float]:
        missing = [s for s in self.eval_skills if s not in losses]
        if missing:
            raise ValueError(f"no validation loss for skill(s) {missing}")
        self.losses.append([float(losses[s]) for s in self.eval_skills])
        probs = self.probabilities
        self.sampler.set_probabilities(probs)
        metrics = {"round": len(self.losses) - 1}
        metrics.update({f"p_{s}": p for s, p in probs.items()})
        metrics.update({f"val_loss_{s}": float(losses[s]) for s in self.eval_skills})
        return metrics

    def state_dict(self) -> dict:
        return {"losses": [list(v) for v in self.losses], "ended_epoch": self.ended_epoch,
                "graph": self.graph.tolist(), "eval_skills": self.eval_skills,
                "eta": self.eta, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        mine = {"graph": self.graph.tolist(), "eval_skills": self.eval_skills,
                "eta": self.eta, "window": self.window}
        changed = [key for key, value in mine.items()
                   if not _same(state.get(key), value)]
        if changed:
            raise ValueError(f"the Skill-It state differs in {', '.join(changed)} (checkpoint: "
                             f"{ {k: state.get(k) for k in changed} }, now: "
                             f"{ {k: mine[k] for k in changed} }); resume with the same "
                             "data.mixture")
        self.losses = [list(map(float, v)) for v in state["losses"]]
        self.ended_epoch = state["ended_epoch"]


def _same(a, b) -> bool:
    if isinstance(b, list) and b and isinstance(b[0], list):
        if a is None or np.shape(a) != np.shape(b):
            return False
        return bool(np.allclose(np.asarray(a, dtype=np.float64), b, rtol=1e-12, atol=0))
    return a == b
