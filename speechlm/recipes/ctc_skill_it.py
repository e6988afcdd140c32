"""`data.mixture.strategy: skill_it` for `task: ctc`: Skill-It's online language mixture.

    data:
      train:
        - {manifest: "embedded:es/train", lang: es}
        - {manifest: "embedded:en/train", lang: en}
      mixture:
        strategy: skill_it
        eta: 0.5              # 0.2-0.8 in the paper
        window: 3             # rounds of validation losses summed
        round_steps: 100      # updates per round
        graph: probe          # identity (null) | probe | {es: {es: 1.0}, en: {es: 0.4}} | k x m
        probe_steps: 50       # graph: probe
        validation: {es: "embedded:es/dev"}   # validation skills and their manifests

The training skills are the languages of `data.train`; the validation skills are
the keys of `data.mixture.validation` (all the languages, or only the target).
This module builds the validation sets, the skills graph (given, identity, or
estimated by probe runs and written to `output_dir/skills_graph.json`, which a
resumed run reads back) and the `SkillItSchedule` the Trainer runs; see
`speechlm.data.skill_it` for the update rule. A round is one epoch of the
mixture sampler, so the `epoch` in the training log counts rounds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..errors import ConfigError

GRAPH_FILE = "skills_graph.json"
PLOT_FILE = "mixture.svg"


def enabled(data) -> bool:
    return data.mixture is not None and data.mixture.strategy == "skill_it"


def check_options(data, *, whisper: bool) -> None:
    """Combinations this recipe does not support, refused before any work is done."""
    if not enabled(data):
        return
    languages = {source.lang for source in data.train}
    if len(data.train) < 2 or None in languages or len(languages) < 2:
        raise ConfigError("data.mixture.strategy=skill_it mixes languages: give at least two "
                          "data.train entries with different `lang:`, or use strategy="
                          "temperature")
    if data.curriculum is not None:
        raise ConfigError("data.mixture.strategy=skill_it and data.curriculum both decide what "
                          "each batch holds; set one of them (data.curriculum=null or "
                          "data.mixture.strategy=temperature)")
    if whisper:
        raise ConfigError("data.mixture.strategy=skill_it is not supported with a Whisper "
                          "model.init (its validation sets would bypass the encoder cache); "
                          "use strategy=temperature")


def build_schedule(cfg, model, objective, dataset, sampler, vocab, out: Path, dist, say):
    """The SkillItSchedule of this run (probing the graph first when asked)."""
    import numpy as np

    from ..data.skill_it import skills_graph
    from ..training import distributed
    from ..training.skill_it import SkillItSchedule

    mixture = cfg.data.mixture
    train_skills, eval_skills = list(sampler.languages), list(mixture.validation)
    sets = _validation_sets(cfg.data, vocab, dist.is_main)

    def measure(model_) -> dict[str, float]:
        return {skill: objective.transcribe(model_, sets[skill],
                                            max_items=mixture.max_validation_items)[1]
                for skill in eval_skills}

    if mixture.graph == "probe":
        graph = _probed_graph(cfg, model, objective, dataset, sampler, measure, out, dist, say)
    else:
        graph = skills_graph(mixture.graph, train_skills, eval_skills)
    # Every rank must draw the same language at each step: rank 0's probed graph for all.
    graph = np.asarray(distributed.broadcast_object(np.asarray(graph).tolist()))
    say("Skill-It graph (rows: training skills, columns: validation skills "
        f"{eval_skills}): " + "; ".join(
            f"{s}: {[round(float(w), 3) for w in row]}" for s, row in zip(train_skills, graph,
                                                                            strict=True)))
    return SkillItSchedule(sampler, graph, measure, eval_skills=eval_skills, eta=mixture.eta,
                           window=mixture.window)


def write_plot(out: Path) -> Path | None:
    """output_dir/mixture.svg from the run's metrics (None if it logged no rounds)."""
    from ..training.mixture_plot import write_mixture_svg

    return write_mixture_svg(out, out / PLOT_FILE)


def _validation_sets(data, vocab, is_main: bool) -> dict:
    from ..data.dataset import AudioDataset
    from ..training import distributed
    from ..training.objectives.ctc import prepare_ctc_records
    from .sources import resolve_manifest

    def resolve_all(show: bool) -> dict:
        return {skill: resolve_manifest(spec, progress=show)
                for skill, spec in data.mixture.validation.items()}

    if is_main:  # embedded splits are built once, on rank 0
        paths = resolve_all(True)
        distributed.barrier()
    else:
        distributed.barrier()
        paths = resolve_all(False)
    sets = {}
    for skill, path in paths.items():
        records, _ = prepare_ctc_records(path, vocab, training=False,
                                         name=f"data.mixture.validation.{skill}")
        if not records:
            raise ConfigError(f"data.mixture.validation.{skill}: {path} has no utterances")
        sets[skill] = AudioDataset(records, sample_rate=data.sample_rate, strict=data.strict,
                                   silence_dbfs=None)
    return sets


def _probed_graph(cfg, model, objective, dataset, sampler, measure, out: Path, dist, say):
    """The graph from probe runs, or the one this run's earlier session probed."""
    import numpy as np

    from ..training import distributed
    from ..training.skill_probe import probe_skills_graph
    from .ctc import _resume_run_dir, _write_json

    mixture = cfg.data.mixture
    resume_dir = _resume_run_dir(cfg.train)
    if resume_dir is not None and (resume_dir / GRAPH_FILE).is_file():
        return np.asarray(json.loads((resume_dir / GRAPH_FILE).read_text())["graph"])
    device = distributed.resolve_device(cfg.train.device)
    model.to(device)
    if hasattr(objective, "to"):
        objective.to(device)
    say(f"Skill-It: probing the skills graph ({mixture.probe_steps} updates on each of "
        f"{', '.join(sampler.languages)} alone)")
    graph, report = probe_skills_graph(
        model, objective.loss, lambda skill: _skill_batches(cfg, dataset, sampler, skill, device),
        measure, train_skills=sampler.languages, eval_skills=list(mixture.validation),
        steps=mixture.probe_steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm)
    if dist.is_main:
        _write_json(out / GRAPH_FILE, report)
    return graph


def _skill_batches(cfg, dataset, sampler, skill: str, device):
    """Endless collated batches of one language, from a sampler of its own (the run's
    samplers are left untouched)."""
    from ..data.sampler import RandomBatchSampler
    from ..training.objectives.ctc import CTCCollator
    from ..training.trainer import _to_device

    data = cfg.data
    index = sampler.languages.index(skill)
    probe_sampler = RandomBatchSampler(
        sampler.samplers[skill].durations, max_batch_duration=data.max_batch_duration,
        max_batch_size=data.max_batch_size, seed=cfg.train.seed + 1000 + index)
    offset, collate = sampler.offsets[skill], CTCCollator()
    for epoch in itertools.count():
        probe_sampler.set_epoch(epoch)
        for batch in probe_sampler:
            yield _to_device(collate([dataset[offset + int(i)] for i in batch]), device)
