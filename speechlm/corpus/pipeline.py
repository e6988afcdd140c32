"""The clean-text pipeline as datatrove jobs, and the executors that run them.

    filter            read -> ftfy -> language -> Gopher repetition -> Gopher quality -> C4
                      -> FineWeb quality -> ProX refine -> perplexity
                      -> _work/filtered/                             (N tasks)
    exact_signatures  filtered -> exact-dedup hashes                 (N tasks)
    exact_find        all hashes -> duplicates                       (1 task)
    near_signatures   filtered -> minus exact dups -> MinHash sigs   (N tasks)
    near_buckets      signatures sharing an LSH band -> pairs        (one task per band)
    near_cluster      pairs -> clusters -> documents to remove       (1 task)
    final             filtered -> minus exact and near dups -> TTS sentences -> clean/ (N tasks)

The dedup stages are datatrove's own multi-stage algorithms; they find a
document by its position in its task's stream, so every job that reads
`filtered/` reads it the same way and `executor.tasks` is fixed for the life
of an output directory (`run.json` records it). Every filter writes what it
removes to `removed/STAGE/`, which the report reads.

Each job keeps datatrove's completion markers under `_work/logs/JOB/`: a
rerun skips finished tasks, and an unfinished task rewrites its own output
files from the start, so a killed run resumes without duplicates.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import multiprocessing
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .config import CleanTextConfig, filter_kwargs

__all__ = ["FILTER_STAGES", "Job", "Layout", "build_jobs", "check_resume", "make_executor"]

# the stages of the filter job, in order, after the reader
FILTER_STAGES = ("unicode", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb",
                 "refine", "perplexity")


@dataclass(frozen=True)
class Layout:
    """Where everything lives under the output directory."""

    out: Path

    @property
    def clean(self) -> Path:
        return self.out / "clean"

    def removed(self, stage: str) -> Path:
        return self.out / "removed" / stage

    @property
    def work(self) -> Path:
        return self.out / "_work"

    def logs(self, job: str) -> Path:
        return self.work / "logs" / job

    @property
    def bad_input(self) -> Path:
        return self.work / "bad_input"

    @property
    def filtered(self) -> Path:
        return self.work / "filtered"

    @property
    def progress(self) -> Path:
        return self.work / "progress"

    @property
    def run_record(self) -> Path:
        return self.work / "run.json"


@dataclass
class Job:
    name: str
    description: str
    pipeline: list
    tasks: int
    steps: list[str] = field(default_factory=list)  # stage name of each pipeline step


def _writer(folder: Path):
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", compression="gzip")


def _filtered_reader(layout: Layout):
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(str(layout.filtered), glob_pattern="*.jsonl.gz", add_file_path=False)


def document_text(doc) -> bytes:
    """What exact dedup compares: the text with its whitespace collapsed (bytes: xxhash 4
    hashes no str)."""
    return " ".join(doc.text.split()).encode("utf-8")


def clean_record(self, document) -> dict:
    """The output line: id, text, the fields the input carried, language and sentences."""
    return {"id": document.id, "text": document.text, **document.metadata}


def _filter_stage(name: str, cfg: CleanTextConfig, layout: Layout):
    section = getattr(cfg, name)
    removed = _writer(layout.removed(name))
    lang = cfg.main_language
    if name == "unicode":
        from .unicode import CountingFTFYFormatter

        return CountingFTFYFormatter()
    if name == "language":
        from .langid import LangIdFilter

        return LangIdFilter(section.keep, section.min_score, section.max_chars,
                            exclusion_writer=removed)
    if name == "gopher_repetition":
        from datatrove.pipeline.filters import GopherRepetitionFilter

        return GopherRepetitionFilter(**filter_kwargs(section), exclusion_writer=removed,
                                      language=lang)
    if name == "gopher_quality":
        from datatrove.pipeline.filters import GopherQualityFilter

        return GopherQualityFilter(**filter_kwargs(section), exclusion_writer=removed,
                                   language=lang)
    if name == "c4":
        from datatrove.pipeline.filters import C4QualityFilter

        return C4QualityFilter(**filter_kwargs(section), exclusion_writer=removed, language=lang)
    if name == "fineweb":
        from datatrove.pipeline.filters import FineWebQualityFilter

        return FineWebQualityFilter(**filter_kwargs(section), exclusion_writer=removed,
                                    language=lang)
    if name == "refine":
        from .prox import Guard
        from .refine import ProxRefiner

        guard = Guard(section.max_error_ops, section.min_words, section.min_kept_fraction)
        return ProxRefiner(section.writer, llm=section.llm, chunk_lines=section.chunk_lines,
                           guard=guard, max_boilerplate_fraction=section.max_boilerplate_fraction,
                           batch_size=section.batch_size, exclusion_writer=removed)
    if name == "perplexity":
        from .perplexity import NgramPerplexityFilter, prepare_reference_lm

        reference = prepare_reference_lm(section, lang, layout.work / "perplexity")
        return NgramPerplexityFilter(reference, lang, section.keep, section.max_words,
                                     exclusion_writer=removed)
    raise ValueError(name)


def build_jobs(cfg: CleanTextConfig, files: list[str], layout: Layout) -> list[Job]:
    """The jobs of the pipeline for `cfg` (stages switched off are left out)."""
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from .reader import TextCorpusReader

    tasks = cfg.executor.tasks
    reader = TextCorpusReader(files, str(layout.bad_input), cfg.input.text_unit,
                              cfg.input.text_key, cfg.input.max_line_bytes,
                              progress_dir=str(layout.progress))
    stages = [s for s in FILTER_STAGES if getattr(cfg, s).enabled]
    jobs = [Job("filter", "read and filter", [reader] + [_filter_stage(s, cfg, layout)
                                                          for s in stages]
                + [_writer(layout.filtered)], tasks, ["read", *stages, "write"])]

    exact = ExactDedupConfig(content_getter=document_text)
    exact_dir = layout.work / "exact"
    if cfg.exact_dedup.enabled:
        jobs.append(Job("exact_signatures", "exact dedup: hashes",
                        [_filtered_reader(layout), ExactDedupSignature(str(exact_dir / "sigs"),
                                                                       config=exact)],
                        tasks, ["read", "signatures"]))
        jobs.append(Job("exact_find", "exact dedup: find duplicates",
                        [ExactFindDedups(str(exact_dir / "sigs"), str(exact_dir / "dups"),
                                         config=exact)],
                        1, ["find"]))

    def exact_filter(keep_removed: bool):
        return ExactDedupFilter(str(exact_dir / "dups"), config=exact,
                                exclusion_writer=(_writer(layout.removed("exact_dedup"))
                                                  if keep_removed else None))

    near = cfg.near_dedup
    # sha1 shingle hashes: datatrove hashes str shingles, which xxhash >= 4 refuses (and
    # `datasets` may want xxhash 4); sha1 costs < 1 us a shingle, far below the tokenizer
    minhash = MinhashConfig(n_grams=near.n_grams, num_buckets=near.num_buckets,
                            hashes_per_bucket=near.hashes_per_bucket, seed=near.seed,
                            hash_config=HashConfig(precision=64, hash_fc="sha1"))
    near_dir = layout.work / "minhash"
    if near.enabled:
        before = [exact_filter(False)] if cfg.exact_dedup.enabled else []
        jobs.append(Job("near_signatures", "near dedup: MinHash signatures",
                        [_filtered_reader(layout), *before,
                         MinhashDedupSignature(str(near_dir / "sigs"), config=minhash,
                                               language=cfg.main_language)],
                        tasks, ["read", *(["exact_dedup"] if before else []), "signatures"]))
        jobs.append(Job("near_buckets", "near dedup: LSH buckets",
                        [MinhashDedupBuckets(str(near_dir / "sigs"), str(near_dir / "buckets"),
                                             config=minhash)],
                        near.num_buckets, ["buckets"]))
        jobs.append(Job("near_cluster", "near dedup: clusters",
                        [MinhashDedupCluster(str(near_dir / "buckets"), str(near_dir / "remove"),
                                             config=minhash)],
                        1, ["cluster"]))

    final, steps = [_filtered_reader(layout)], ["read"]
    if cfg.exact_dedup.enabled:
        final.append(exact_filter(True))
        steps.append("exact_dedup")
    if near.enabled:
        final.append(MinhashDedupFilter(str(near_dir / "remove"),
                                        exclusion_writer=_writer(layout.removed("near_dedup"))))
        steps.append("near_dedup")
    if cfg.tts.enabled:
        from .tts import TTSReadiness

        final.append(TTSReadiness(cfg.main_language, cfg.tts.verbalize,
                                  cfg.tts.max_sentence_chars))
        steps.append("tts")
    final.append(JsonlWriter(str(layout.clean), output_filename="${rank}.jsonl.gz",
                             compression="gzip", adapter=clean_record))
    steps.append("write")
    jobs.append(Job("final", "dedup and sentences for synthesis", final, tasks, steps))
    return jobs


def make_executor(cfg: CleanTextConfig, job: Job, layout: Layout, depends=None):
    """The datatrove executor of `executor.kind` for one job."""
    ex = cfg.executor
    logging_dir = str(layout.logs(job.name))
    if ex.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: a worker inherits the loaded modules (forkserver re-imports datatrove and spaCy
        # in every worker of every job, seconds each)
        start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        return LocalPipelineExecutor(job.pipeline, tasks=job.tasks,
                                     workers=min(ex.workers, job.tasks), logging_dir=logging_dir,
                                     depends=depends, start_method=start)
    if ex.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not ex.slurm.partition:
            raise ConfigError("executor.kind is slurm but executor.slurm.partition is empty; "
                              "name the partition to submit to")
        if shutil.which("sbatch") is None:
            raise ConfigError("executor.kind is slurm but there is no sbatch on PATH: run on a "
                              "Slurm login node, or use executor.kind=local or ray")
        return SlurmPipelineExecutor(
            job.pipeline, tasks=job.tasks, time=ex.slurm.time, partition=ex.slurm.partition,
            cpus_per_task=ex.slurm.cpus_per_task, mem_per_cpu_gb=ex.slurm.mem_per_cpu_gb,
            job_name=f"{ex.slurm.job_name}-{job.name}", venv_path=ex.slurm.venv_path,
            sbatch_args=dict(ex.slurm.sbatch_args) or None, logging_dir=logging_dir,
            depends=depends)
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("executor.kind is ray but Ray is not installed: pip install ray "
                          "(and set RAY_ADDRESS to use a running cluster; without it Ray starts "
                          "one on this machine)")
    from datatrove.executor.ray import RayPipelineExecutor

    return RayPipelineExecutor(job.pipeline, tasks=job.tasks, workers=ex.workers,
                               logging_dir=logging_dir, depends=depends,
                               cpus_per_task=ex.ray.cpus_per_task,
                               mem_per_cpu_gb=ex.ray.mem_per_cpu_gb)


# -- resuming ---------------------------------------------------------------------------

# settings that may change between a run and its resumption (they do not change the output)
_FREE = {("executor", "workers"), ("executor", "kind"), ("executor", "slurm"),
         ("executor", "ray"), ("report",)}


def _fixed_settings(cfg: CleanTextConfig) -> dict:
    data = dataclasses.asdict(cfg)
    for path in _FREE:
        section = data
        for key in path[:-1]:
            section = section[key]
        section.pop(path[-1], None)
    return data


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]} ({old!r} -> {new!r})"]


def check_resume(cfg: CleanTextConfig, files: list[str], layout: Layout) -> bool:
    """Record this run's settings, or check them against the run that started `layout.out`.

    Returns True when resuming. A changed setting or input list would mix two runs' outputs
    (the dedup stages find documents by position), so it is an error naming what changed.
    """
    record = {"config": _fixed_settings(cfg), "files": files}
    path = layout.run_record
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        # through JSON both ways, so tuples and lists compare equal
        changed = _differences(old["config"], json.loads(json.dumps(record["config"])))
        if old["files"] != files:
            changed.append(f"input files ({len(old['files'])} -> {len(files)}, or renamed)")
        if changed:
            raise ConfigError(
                f"{layout.out}: was started with other settings ({'; '.join(changed)}); rerun "
                "with the same inputs and settings to resume, or choose a new --out")
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return False
