"""A resumable, rank-sharded job that turns each manifest record into one output line.

BLSP continuations and speech tokenization share this shape: every record of
a manifest gives one output line or is skipped with a reason; the job may be
killed at any time and rerun; it may run on several ranks. Files beside
`<out>`:

- `<out>.meta.json` (written atomically): the job's settings (the manifest's
  path and sha256 of its bytes, plus the job's own, e.g. the model's
  identity); `complete: true` and totals once `<out>` is final. A rerun with
  the same settings resumes (or returns at once when complete); other
  settings are an error naming the field.
- `<out>.part-r{R}-of-{W}.jsonl` (+ `.skipped.jsonl`): rank R's lines while
  the job runs, appended and fsynced chunk by chunk (`JsonlAppender`). Ids in
  any part or in `<out>` are not redone, so a killed job reruns without
  duplicates or gaps, even with another number of ranks.

Rank R does records R, R+W, ... (after dropping repeated ids). When every
record is done the parts are merged into `<out>` and `<out>.skipped.jsonl` in
manifest order (atomic writes) and removed, and the meta is marked complete:
under torchrun by rank 0 after a barrier, with explicit ranks by whichever
process finds every record done.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, SpeechLMError

META_SUFFIX = ".meta.json"
SKIPPED_SUFFIX = ".skipped.jsonl"


# -- file names --------------------------------------------------------------------------


def meta_path(out) -> Path:
    return Path(f"{out}{META_SUFFIX}")


def skipped_path(out) -> Path:
    return Path(f"{out}{SKIPPED_SUFFIX}")


def part_path(out, rank: int, world_size: int, *, skipped: bool = False) -> Path:
    """Rank `rank`'s part of `out` (or of its skipped list) while the job runs."""
    return Path(f"{out}.part-r{rank}-of-{world_size}" + (SKIPPED_SUFFIX if skipped else ".jsonl"))


def part_files(out: Path) -> tuple[list[Path], list[Path]]:
    """(line parts, skipped parts) of any world size found beside `out`."""
    pattern = re.compile(re.escape(out.name) + r"\.part-r\d+-of-\d+(\.skipped)?\.jsonl")
    lines, skipped = [], []
    if out.parent.is_dir():
        for path in sorted(out.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match:
                (skipped if match.group(1) else lines).append(path)
    return lines, skipped


def start_again(out: Path) -> str:
    return (f"use another --out, or delete {out}* (the output, its {META_SUFFIX} and any parts) "
            "to start again")


# -- meta --------------------------------------------------------------------------------


def manifest_sha256(path) -> str:
    """sha256 of the manifest file's bytes."""
    from ..paths import file_sha256

    return file_sha256(path)


def read_meta(out: Path) -> dict | None:
    path = meta_path(out)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpeechLMError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                            f"{start_again(out)}") from None
    if not isinstance(meta, dict):
        raise SpeechLMError(f"{path}: expected a JSON object; {start_again(out)}")
    return meta


def write_meta(out: Path, meta: dict) -> None:
    from ..jsonl import atomic_write

    with atomic_write(meta_path(out)) as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")


def manifest_mismatch(out: Path, old: dict, manifest, sha: str, what: str) -> str:
    return (f"{what} in {out} were written for {old.get('manifest')} (sha256 "
            f"{str(old.get('manifest_sha256'))[:12]}), not {manifest} (sha256 {sha[:12]})")


def check_settings(out: Path, old: dict, new: dict, keys: Sequence[str], what: str) -> None:
    if old.get("manifest_sha256") != new["manifest_sha256"]:
        raise SpeechLMError(f"{manifest_mismatch(out, old, new['manifest'], new['manifest_sha256'], what)}"
                            f"; {start_again(out)}")
    for key in keys:  # a key absent on both sides (an optional setting left default) matches
        if old.get(key) != new.get(key):
            raise SpeechLMError(f"{out} was built with {key} {old.get(key)!r}, not "
                                f"{new.get(key)!r}; {start_again(out)}")


def check_complete(out: Path, what: str, command: str) -> dict:
    """The meta of a finished job's output, or an error saying how to make / finish it."""
    meta = read_meta(out)
    if meta is None:
        raise SpeechLMError(
            f"{out}: no {meta_path(out).name} beside it, so these are not {what} written by "
            f"`speechlm build ...`; build them with `{command}`")
    if not meta.get("complete") or not out.is_file():
        raise SpeechLMError(
            f"{out}: the {what} are not complete (the job was interrupted, or other ranks "
            f"have not finished); rerun the same `{command.split(' --')[0]}` command (it "
            "resumes) until it reports them complete")
    return meta


# -- ranks and devices -------------------------------------------------------------------


def shard(rank, world_size, device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether a torch process group coordinates the ranks)."""
    if rank is None and world_size is None:
        from ..training import distributed

        kind = "cpu" if device == "cpu" else "cuda" if device.startswith("cuda") else "auto"
        info = distributed.init_distributed(kind)
        return info.rank, info.world_size, info.enabled
    if rank is None or world_size is None:
        raise ConfigError("give both rank and world_size (or neither: torchrun's environment)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    return int(rank), int(world_size), False


def job_device(device: str):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            from ..training import distributed

            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    return torch.device(device)


# -- parts, done ids, merge --------------------------------------------------------------


def _read(path: Path) -> list[dict]:
    """Records of a JSONL file that may be torn at its end or removed meanwhile (a merge by
    another process): missing -> []."""
    from ..jsonl import iter_jsonl

    if not path.is_file():
        return []
    try:
        return [record for _, record in iter_jsonl(path, tolerate_torn_tail=True)]
    except FileNotFoundError:
        return []


def done_ids(out: Path) -> set[str]:
    """Ids finished (written or skipped) in any part or in the final files."""
    lines, skipped = part_files(out)
    paths = [*lines, *skipped, out, skipped_path(out)]
    return {str(record.get("id")) for path in paths for record in _read(path)}


def merge(out: Path, ids: Sequence[str], settings: dict,
          totals: Callable[[list[dict]], dict] | None = None) -> dict | None:
    """Merge parts (any world size) and any final files into `out` in manifest order and
    mark the meta complete (plus `totals(lines)`); None (nothing written) when some record
    is not done yet."""
    from ..jsonl import write_jsonl

    lines_parts, skipped_parts = part_files(out)
    # Parts first, the final files after: a concurrent merge writes the final files before
    # removing parts, so a part gone missing here is already in them.
    kept: dict[str, dict] = {}
    dropped: dict[str, dict] = {}
    for paths, into in ((lines_parts, kept), (skipped_parts, dropped),
                        ([out], kept), ([skipped_path(out)], dropped)):
        for path in paths:
            for record in _read(path):
                into.setdefault(str(record.get("id")), record)
    if any(i not in kept and i not in dropped for i in ids):
        return None
    lines = [kept[i] for i in ids if i in kept]
    skipped = [dropped[i] for i in ids if i not in kept and i in dropped]
    write_jsonl(skipped_path(out), skipped)
    write_jsonl(out, lines)
    for path in (*lines_parts, *skipped_parts):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    meta = {**settings, "complete": True, "items": len(lines),
            "skipped": dict(sorted(Counter(r.get("reason") for r in skipped).items())),
            **(totals(lines) if totals else {})}
    write_meta(out, meta)
    return meta


# -- the job -----------------------------------------------------------------------------


@dataclass
class JobSummary:
    """What one run of a record job did (not lines an earlier run wrote)."""

    items: int = 0                     # records written now
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped now
    wall_s: float = 0.0
    already_done: int = 0              # this rank's records found from earlier runs
    duplicates: int = 0                # manifest lines repeating an earlier id (left out)
    remaining: int = 0                 # records other ranks still have to do
    complete: bool = False             # `out_path` is final
    out_path: Path | None = None
    rank: int = 0
    world_size: int = 1

    def status(self) -> str:
        """The skipped / earlier / completion part of a summary line."""
        text = ""
        if self.skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} ({reasons})"
        if self.already_done:
            text += f"; {self.already_done} done by an earlier run"
        if self.duplicates:
            text += f"; {self.duplicates} repeated id(s) left out"
        if self.complete:
            text += f"; complete: {self.out_path}"
        else:
            text += (f"; {self.remaining} record(s) still to do by other ranks (the last to "
                     f"finish writes {self.out_path})")
        return text


@dataclass
class RecordJob:
    """One job: where it writes, what it is (settings), and how it does a chunk of records.

    work(records) -> [(line, None) | (skip line with "reason", reason)], in any order; the
    job's summary (`summary`, a JobSummary or subclass) may be updated there too.
    """

    out: Path
    settings: dict                     # includes manifest + manifest_sha256
    setting_keys: Sequence[str]        # the keys (besides the manifest) a rerun must match
    what: str                          # "continuations", "units": for messages
    summary: JobSummary
    totals: Callable[[list[dict]], dict] | None = None


def prepare(job: RecordJob, rank: int, group: bool, tell: Callable[[str], None]) -> bool:
    """Check or write the meta; True when the output is already complete (nothing to do).
    Every rank checks (so all raise alike, none waits at a barrier); one writes."""
    from ..training import distributed

    out = job.out
    meta = read_meta(out)
    if meta is None:
        if out.exists() or any(part_files(out)):
            raise SpeechLMError(f"{out} exists but has no {meta_path(out).name}, so it was not "
                                f"written by this job (or its meta file was deleted); "
                                f"{start_again(out)}")
    else:
        check_settings(out, meta, job.settings, job.setting_keys, job.what)
        if meta.get("complete") and out.is_file():
            tell(f"{out}: already complete ({meta.get('items')} {job.what})")
            job.summary.complete = True
            return True
    if meta is None or meta.get("complete"):  # new, or complete but the output was deleted
        if rank == 0 or not group:
            write_meta(out, {**job.settings, "complete": False})
    if group:
        distributed.barrier()
    return False


def unique_records(manifest_path: Path, summary: JobSummary) -> list[dict]:
    """The manifest's records, repeated ids left out (and counted)."""
    from ..data.manifest import iter_manifest_lines

    records: list[dict] = []
    seen: set[str] = set()
    for _, record in iter_manifest_lines(manifest_path, resolve=False):
        rid = str(record["id"])
        if rid in seen:
            summary.duplicates += 1
            continue
        seen.add(rid)
        records.append(record)
    return records


def run_records(job: RecordJob, records: Sequence[dict], start, *, rank: int, world: int,
                group: bool, chunk: int, progress: bool, desc: str, started: float) -> JobSummary:
    """Do this rank's records not done yet, chunk by chunk into its parts; then merge when
    every record is done. start(n) is called (only when this rank has n > 0 records to do,
    with summary.already_done set) and returns work(records), see RecordJob."""
    from ..jsonl import JsonlAppender
    from ..training import distributed

    out, summary = job.out, job.summary
    ids = [str(r["id"]) for r in records]
    done = done_ids(out)
    todo = [r for r in records[rank::world] if str(r["id"]) not in done]
    summary.already_done = len(records[rank::world]) - len(todo)
    if todo:
        work = start(len(todo))
        bar = None
        if progress and (rank == 0 or not group):
            from ..progress import progress_bar

            bar = progress_bar(total=len(todo), desc=desc, unit="record", dynamic_ncols=True)
        try:
            with JsonlAppender(part_path(out, rank, world)) as lines, \
                    JsonlAppender(part_path(out, rank, world, skipped=True)) as skips:
                for first in range(0, len(todo), chunk):
                    part = todo[first:first + chunk]
                    for line, reason in work(part):
                        if reason is None:
                            lines.write(line)
                            summary.items += 1
                        else:
                            skips.write(line)
                            summary.skipped[reason] += 1
                    if bar is not None:
                        bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
            summary.wall_s = time.perf_counter() - started
    if group:
        distributed.barrier()
        merged = merge(out, ids, job.settings, job.totals) is not None if rank == 0 else None
        summary.complete = bool(distributed.broadcast_object(merged))
    else:
        summary.complete = merge(out, ids, job.settings, job.totals) is not None
    if not summary.complete:
        finished = done_ids(out)
        summary.remaining = sum(i not in finished for i in ids)
    summary.wall_s = time.perf_counter() - started
    return summary
