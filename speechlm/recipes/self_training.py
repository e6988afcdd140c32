"""Recipe `task: self_training`: teacher on gold → pseudo-labels → student → fine-tune on gold.

The "predictions for pre-training" self-training recipe (arXiv 2011.10417) on
top of the CTC runner, as one command. One CTC config (`ctc:`) describes the
model and the gold data; each stage is that config plus its own overrides:

1. teacher: `ctc` as given (skipped when `teacher_model` names a trained dir);
2. pseudo-label `unlabelled` manifests with the teacher, keeping utterances
   whose confidence is at least `min_confidence`; greedily, or with `teacher_lm`
   (beam search with a word n-gram LM, built from text when no ARPA is named:
   the teacher the paper uses);
3. student: trained on the pseudo-labels (plus the gold data if
   `student_with_gold`), with TaiLr weighting of its loss if `tailr` is set
   (speechlm.training.tailr), then `student_overrides`;
4. fine-tune: the student fine-tuned on gold (`model.init` = the student, and its
   vocabulary), then `finetune_overrides` (`finetune: false` ends with the student).

Stages live in `output_dir/{teacher,pseudo,student,finetune}`; a finished
stage (its results.json exists) is not run again, and an unfinished one
resumes from its last checkpoint, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import apply_overrides
from ..errors import ConfigError
from ..training.tailr import TaiLrConfig
from . import ctc

STAGES = ("teacher", "student", "finetune")


@dataclass
class TeacherLM:
    """Beam search with a word n-gram LM for the teacher's pseudo-labels."""
    arpa: str | None = None           # an ARPA file; null: build one from `text`
    text: list[str] = field(default_factory=list)     # what `speechlm build lm --text` reads
    exclude: list[str] = field(default_factory=list)  # sentences never in the LM (dev, test)
    order: int = 4
    lm_weight: float = 0.5
    word_score: float = 0.0
    beam_size: int = 50

    def __post_init__(self):
        if not self.arpa and not self.text:
            raise ConfigError("teacher_lm: name an ARPA file (arpa:) or the text to build "
                              "one from (text: [embedded:es, ...])")


@dataclass
class Config:
    task: str = "self_training"
    ctc: ctc.Config = field(default_factory=ctc.Config)   # the model and the gold data
    unlabelled: list[str] = field(default_factory=list)  # manifests (their text is never used)
    unlabelled_lang: str | None = None                    # language of the pseudo-labels
    teacher_model: str | None = None                      # a trained CTC dir: skip stage 1
    min_confidence: float = 0.8                           # keep pseudo-labels at least this sure
    student_with_gold: bool = False                       # also train the student on gold
    student_overrides: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)
    output_dir: str = "runs/self_training"
    # TaiLr weighting of the student's CTC loss (its ctc.loss.tailr), against pseudo-label
    # noise (speechlm.training.tailr); with student_with_gold the gold utterances are
    # weighted too. null: the plain loss
    tailr: TaiLrConfig | None = None
    teacher_lm: TeacherLM | None = None                   # null: greedy pseudo-labels
    finetune: bool = True                                 # false: the student is the result

    def __post_init__(self):
        if isinstance(self.tailr, dict):
            self.tailr = TaiLrConfig(**self.tailr)
        if isinstance(self.teacher_lm, dict):
            self.teacher_lm = TeacherLM(**self.teacher_lm)
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"min_confidence must be in [0, 1], got {self.min_confidence}")


def stage_config(config: Config, stage: str, *, student_data=None, init=None) -> ctc.Config:
    """The CTC config of one stage: the base `ctc` section, its data/init, then its overrides."""
    base = config.ctc
    train = dataclasses.replace(base.train, output_dir=str(Path(config.output_dir) / stage))
    cfg = dataclasses.replace(base, train=train)
    if student_data is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=student_data))
    if init is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=init))
        vocab = Path(init) / "vocab.json"
        if cfg.data.vocab is None and vocab.is_file():
            # keep the student's output layer: the gold text alone may spell fewer characters
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, vocab=str(vocab)))
    if stage == "student" and config.tailr is not None:
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, tailr=config.tailr))
    overrides = {"student": config.student_overrides,
                 "finetune": config.finetune_overrides}.get(stage, [])
    return apply_overrides(cfg, overrides) if overrides else cfg


def _run_stage(cfg: ctc.Config) -> dict:
    results_file = Path(cfg.train.output_dir) / ctc.RESULTS_FILE
    if results_file.is_file():
        return json.loads(results_file.read_text(encoding="utf-8"))
    return ctc.run(cfg)


def teacher_beam(config: Config, out: Path) -> dict | None:
    """The BeamSearchCTCDecoder arguments of the teacher, or None. An LM built from
    `teacher_lm.text` is written to `out/pseudo/teacher_lm.arpa` once and reused by a rerun
    (delete it, with the pseudo-labels, after changing the text or `exclude`)."""
    lm = config.teacher_lm
    if lm is None:
        return None
    arpa = Path(lm.arpa) if lm.arpa else out / "pseudo" / "teacher_lm.arpa"
    if lm.arpa and not arpa.is_file():
        raise ConfigError(f"teacher_lm.arpa: {arpa} not found; build one with speechlm build "
                          "lm, or give teacher_lm.text instead to build it here")
    if not arpa.is_file():
        from ..text.ngram import build_word_lm

        arpa.parent.mkdir(parents=True, exist_ok=True)
        stats, dropped = build_word_lm(lm.text, arpa, order=lm.order,
                                       lang=config.unlabelled_lang, exclude=lm.exclude)
        print(f"teacher LM {arpa}: {stats.summary()}; {dropped} sentence(s) of "
              f"{', '.join(lm.exclude) or 'nothing'} left out")
    return {"lm_path": str(arpa), "lm_weight": lm.lm_weight, "word_score": lm.word_score,
            "beam_size": lm.beam_size}


def run(config: Config) -> dict:
    from ..pipelines.pseudo_label import pseudo_label_manifest
    from .sources import resolve_manifest

    if not config.unlabelled:
        raise ConfigError("unlabelled: list at least one manifest of audio to pseudo-label")
    out = Path(config.output_dir)
    progress = config.ctc.train.progress
    results: dict = {}

    if config.teacher_model:
        teacher_dir = Path(config.teacher_model)
        if not (teacher_dir / "config.json").is_file():
            raise ConfigError(f"teacher_model: {teacher_dir} is not a trained CTC model "
                              "directory (no config.json); train one with task: ctc")
    else:
        results["teacher"] = _run_stage(stage_config(config, "teacher"))
        teacher_dir = Path(results["teacher"]["final_dir"])

    beam = teacher_beam(config, out)
    pseudo_sources = []
    reports = {}
    for i, spec in enumerate(config.unlabelled):
        target = out / "pseudo" / f"pseudo_{i}.jsonl"
        report = pseudo_label_manifest(teacher_dir, resolve_manifest(spec, progress=progress),
                                       target, min_confidence=config.min_confidence,
                                       device=config.ctc.train.device, beam=beam,
                                       progress=progress)
        print(report.summary())
        reports[str(spec)] = dataclasses.asdict(report)
        if report.kept:
            pseudo_sources.append(ctc.TrainSource(manifest=str(target),
                                                  lang=config.unlabelled_lang))
    results["pseudo_labels"] = reports
    if not pseudo_sources:
        raise ConfigError(f"no pseudo-label reached min_confidence={config.min_confidence}; "
                          "lower it, or train the teacher longer")
    student_data = pseudo_sources + (list(config.ctc.data.train) if config.student_with_gold else [])
    results["student"] = _run_stage(stage_config(config, "student", student_data=student_data))
    if config.finetune:
        results["finetune"] = _run_stage(stage_config(config, "finetune",
                                                      init=results["student"]["final_dir"]))
    summary = {stage: {split: {k: results[stage][split][k] for k in ("wer", "cer")
                               if k in results[stage].get(split, {})}
                       for split in ("dev", "test") if split in results[stage]}
               for stage in STAGES if stage in results}
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(summary, indent=2))
    return results
