"""Run the clean-text jobs with the configured executor, then write the report."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from ..errors import SpeechLMError
from .config import CleanTextConfig
from .pipeline import Layout, build_jobs, check_resume, make_executor
from .reader import list_input_files
from .report import write_report

__all__ = ["run_clean_text", "report_only"]


def _job_steps(layout: Layout) -> dict[str, list[str]]:
    path = layout.work / "jobs.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 to `path` (datatrove logs every step of every task there, worker
    processes included) and yield a stream on the real stderr for our progress."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            with os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8") as real:
                yield real
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _input_progress(layout: Layout, files: list[str], stream, enabled: bool):
    """A bar of input bytes read by the filter job's tasks (their readers write the counts)."""
    from ..progress import progress_bar

    total = sum(os.path.getsize(f) for f in files)
    bar = progress_bar(total=total, desc="filter", unit="B", unit_scale=True, file=stream,
                       disable=not enabled)
    stop = threading.Event()

    def poll():
        while True:
            stopping = stop.wait(2.0)
            done = 0
            for path in layout.progress.glob("[0-9]*[0-9]"):
                with contextlib.suppress(OSError, ValueError):
                    done += int(path.read_text())
            bar.update(max(min(done, total) - bar.n, 0))
            if stopping:
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def run_clean_text(inputs: list[str], out, cfg: CleanTextConfig, *, progress: bool = True,
                   log=print) -> dict | None:
    """Clean the text files under `inputs` into `out` (see speechlm.corpus.pipeline).

    Local and Ray runs block and return the report (datatrove's Ray executor waits for its
    tasks; without RAY_ADDRESS Ray starts a cluster on this machine); Slurm runs return None
    once their jobs are submitted (write the report later with `report_only`).
    """
    layout = Layout(Path(out))
    # an --out inside an input directory must not feed a rerun its own output
    own = str(layout.out.resolve()) + os.sep
    files = [f for f in list_input_files(inputs) if not f.startswith(own)]
    missing = [str(p) for p in map(Path, inputs) if not p.exists()]
    if missing:
        raise SpeechLMError(f"{missing[0]}: input not found; pass text/JSONL files (.gz ok) "
                            "or directories of them")
    if not files:
        raise SpeechLMError(f"{', '.join(map(str, inputs))}: no files found to clean")
    resuming = check_resume(cfg, files, layout)
    jobs = build_jobs(cfg, files, layout)
    (layout.work / "jobs.json").write_text(json.dumps({j.name: j.steps for j in jobs}),
                                           encoding="utf-8")
    log(f"{'resuming' if resuming else 'cleaning'} {len(files)} input files into {layout.out} "
        f"({cfg.executor.kind}, {cfg.executor.tasks} tasks, {cfg.executor.workers} workers, "
        f"{len(jobs)} jobs)")
    if cfg.executor.kind != "local":
        executor = None
        for job in jobs:
            executor = make_executor(cfg, job, layout, depends=executor)
        executor.run()  # launches the whole chain through `depends`
        if cfg.executor.kind == "ray":  # run() returned with every task done
            return write_report(layout, _job_steps(layout), cfg.report.examples,
                                cfg.report.example_chars)
        log(f"jobs submitted; when they finish: speechlm build clean-text --report-only "
            f"--out {layout.out}")
        return None

    log_path = layout.work / "logs" / "datatrove.log"
    log(f"datatrove's logs: {log_path}")
    timings = {}
    with _stderr_to(log_path) as stderr:
        for i, job in enumerate(jobs, 1):
            step = f"[{i}/{len(jobs)}] {job.name} ({job.description}, {job.tasks} tasks)"
            start = time.perf_counter()
            if job.name == "filter":
                print(step, file=stderr)
                with _input_progress(layout, files, stderr, progress):
                    make_executor(cfg, job, layout).run()
            elif not any(layout.filtered.glob("*.jsonl.gz")):
                print(f"{step}: skipped, no document passed the filters", file=stderr)
                continue
            else:
                make_executor(cfg, job, layout).run()
            timings[job.name] = round(time.perf_counter() - start, 2)
            if progress:
                print(f"{step}: {timings[job.name]:.1f} s", file=stderr)
    # seconds of this invocation's jobs (a resumed run times only what it redid)
    return write_report(layout, _job_steps(layout), cfg.report.examples,
                        cfg.report.example_chars, extra={"seconds": timings})


def report_only(out) -> dict:
    """Write the report of a finished run in `out` (e.g. after a Slurm run)."""
    layout = Layout(Path(out))
    if not layout.run_record.is_file():
        raise SpeechLMError(f"{out}: no clean-text run here (no _work/run.json); pass the --out "
                            "of a run")
    from .config import load_clean_text_config

    cfg = load_clean_text_config()
    return write_report(layout, _job_steps(layout), cfg.report.examples,
                        cfg.report.example_chars)
