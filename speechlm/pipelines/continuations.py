"""BLSP stage 1 (arXiv 2309.00916): the text LLM's greedy continuation of every transcript.

    summary = build_continuations("zoo:llm_en_es", "embedded:en/train", "data/cont.jsonl")
    print(summary.summary())
    meta = check_continuations("data/cont.jsonl", manifest="embedded:en/train")  # stage 2

Each record's `text` goes into the BLSP prompt exactly as stage 2's text
teacher reads it (`get_template(template).encode(tokenizer, instruction,
transcript=text)`); the greedy continuation (max_new_tokens, cut at the stop
tokens) is stored as the record's fields + `continuation` (stripped text) +
`continuation_tokens`. Records with an empty transcript, a prompt over
`max_prompt_tokens` or an empty continuation are listed in
`<out>.skipped.jsonl` as {id, reason} and counted; the job goes on.

Files beside `<out>`:
- `<out>.meta.json` (written atomically): the manifest (path, sha256 of its
  bytes), the LLM (directory, config_sha256), template, instruction,
  max_new_tokens, max_prompt_tokens; `complete: true` and the counts once
  `<out>` is final. A rerun with the same settings resumes (or returns at
  once when complete); other settings are an error naming the field.
- `<out>.part-r{R}-of-{W}.jsonl` (+ `.skipped.jsonl`): rank R's lines while
  the job runs, appended and fsynced chunk by chunk (`JsonlAppender`). Ids in
  any part or in `<out>` are not redone, so a killed job reruns without
  duplicates or gaps, even with another number of ranks.

Sharding: under torchrun (or with explicit rank/world_size, e.g. one job per
GPU on a cluster) rank R continues records R, R+W, ... of the manifest (after
dropping repeated ids). When every record is done the parts are merged into
`<out>` and `<out>.skipped.jsonl` in manifest order (atomic writes), removed,
and the meta is marked complete: under torchrun by rank 0 after a barrier,
with explicit ranks by whichever process finds every record done. A single
process is rank 0 of 1 and merges at its end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.instructions import CONTINUE_INSTRUCTION
from ..errors import ConfigError, SpeechLMError

__all__ = [
    "ContinuationSummary", "build_continuations", "check_continuations", "manifest_sha256",
    "meta_path", "part_path", "read_continuations", "skipped_path",
]

META_SUFFIX = ".meta.json"
SKIPPED_SUFFIX = ".skipped.jsonl"
# Settings that decide what the continuations are; a rerun must match them all.
SETTINGS = ("llm", "llm_config_sha256", "template", "instruction", "max_new_tokens",
            "max_prompt_tokens")


# -- file names --------------------------------------------------------------------------


def meta_path(out) -> Path:
    return Path(f"{out}{META_SUFFIX}")


def skipped_path(out) -> Path:
    return Path(f"{out}{SKIPPED_SUFFIX}")


def part_path(out, rank: int, world_size: int, *, skipped: bool = False) -> Path:
    """Rank `rank`'s part of `out` (or of its skipped list) while the job runs."""
    return Path(f"{out}.part-r{rank}-of-{world_size}" + (SKIPPED_SUFFIX if skipped else ".jsonl"))


def _part_files(out: Path) -> tuple[list[Path], list[Path]]:
    """(line parts, skipped parts) of any world size found beside `out`."""
    pattern = re.compile(re.escape(out.name) + r"\.part-r\d+-of-\d+(\.skipped)?\.jsonl")
    lines, skipped = [], []
    if out.parent.is_dir():
        for path in sorted(out.parent.iterdir()):
            match = pattern.fullmatch(path.name)
            if match:
                (skipped if match.group(1) else lines).append(path)
    return lines, skipped


def _fix(out: Path) -> str:
    return (f"use another --out, or delete {out}* (the output, its {META_SUFFIX} and any parts) "
            "to start again")


# -- meta --------------------------------------------------------------------------------


def manifest_sha256(path) -> str:
    """sha256 of the manifest file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_meta(out: Path) -> dict | None:
    path = meta_path(out)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpeechLMError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
                            f"{_fix(out)}") from None
    if not isinstance(meta, dict):
        raise SpeechLMError(f"{path}: expected a JSON object; {_fix(out)}")
    return meta


def _write_meta(out: Path, meta: dict) -> None:
    from ..jsonl import atomic_write

    with atomic_write(meta_path(out)) as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _manifest_mismatch(out: Path, old: dict, manifest, sha: str) -> str:
    return (f"continuations in {out} were written for {old.get('manifest')} (sha256 "
            f"{str(old.get('manifest_sha256'))[:12]}), not {manifest} (sha256 {sha[:12]})")


def _check_settings(out: Path, old: dict, new: dict) -> None:
    if old.get("manifest_sha256") != new["manifest_sha256"]:
        raise SpeechLMError(f"{_manifest_mismatch(out, old, new['manifest'], new['manifest_sha256'])}"
                            f"; {_fix(out)}")
    for key in SETTINGS:
        if old.get(key) != new[key]:
            raise SpeechLMError(f"{out} was built with {key} {old.get(key)!r}, not {new[key]!r}; "
                                f"{_fix(out)}")


def check_continuations(path, *, manifest=None) -> dict:
    """The meta of finished continuations at `path` (stage 2 calls this before training).

    Raises SpeechLMError when the meta is missing, the job is not complete, or `manifest`
    (a path or embedded:LANG/SPLIT) is not the manifest the continuations were made from.
    """
    out = Path(path)
    meta = _read_meta(out)
    if meta is None:
        raise SpeechLMError(
            f"{out}: no {meta_path(out).name} beside it, so these are not continuations written "
            f"by `speechlm build continuations`; build them with `speechlm build continuations "
            f"--llm LLM --manifest MANIFEST --out {out}`")
    if not meta.get("complete") or not out.is_file():
        raise SpeechLMError(
            f"{out}: the continuations are not complete (the job was interrupted, or other ranks "
            "have not finished); rerun the same `speechlm build continuations` command (it "
            "resumes) until it reports them complete")
    if manifest is not None:
        from ..recipes.sources import resolve_manifest

        resolved = resolve_manifest(manifest, progress=False)
        sha = manifest_sha256(resolved)
        if sha != meta.get("manifest_sha256"):
            raise SpeechLMError(
                f"{_manifest_mismatch(out, meta, resolved, sha)}; build continuations for this "
                f"manifest (`speechlm build continuations --manifest {manifest} --out OTHER.jsonl`)"
                f" or train on {meta.get('manifest')}")
    return meta


def read_continuations(path, *, manifest=None, limit: int | None = None) -> list[dict]:
    """The records of finished continuations (checked like `check_continuations`), their
    audio paths made absolute: relative ones are relative to the manifest the
    continuations were written from (the records were copied from it)."""
    import os

    from ..data.manifest import read_manifest

    meta = check_continuations(path, manifest=manifest)
    base = Path(meta["manifest"]).resolve().parent
    records = read_manifest(path, validate=True)[:limit] if limit else read_manifest(path)
    for record in records:
        record.pop("_audio_path", None)
        if not os.path.isabs(record["audio"]):
            record["audio"] = str(base / record["audio"])
    return records


# -- summary -----------------------------------------------------------------------------


@dataclass
class ContinuationSummary:
    """What one build_continuations call did (not lines an earlier run wrote)."""

    items: int = 0                     # records continued now
    skipped: Counter = field(default_factory=Counter)  # reason -> records skipped now
    tokens: int = 0                    # new tokens generated now
    wall_s: float = 0.0
    already_done: int = 0              # this rank's records found from earlier runs
    duplicates: int = 0                # manifest lines repeating an earlier id (left out)
    remaining: int = 0                 # records other ranks still have to do
    complete: bool = False             # `out_path` is final
    out_path: Path | None = None
    rank: int = 0
    world_size: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        text = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        text += (f"continued {self.items} record(s): {self.tokens} tokens in {self.wall_s:.1f} s "
                f"({self.tokens_per_s:.1f} tokens/s)")
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


# -- the job -----------------------------------------------------------------------------


def _shard(rank, world_size, device: str) -> tuple[int, int, bool]:
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


def _device(device: str):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            from ..training import distributed

            return torch.device("cuda", distributed.local_rank())
        return torch.device("cpu")
    return torch.device(device)


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


def _done_ids(out: Path) -> set[str]:
    """Ids finished (continued or skipped) in any part or in the final files."""
    lines, skipped = _part_files(out)
    paths = [*lines, *skipped, out, skipped_path(out)]
    return {str(record.get("id")) for path in paths for record in _read(path)}


def _merge(out: Path, ids: Sequence[str], settings: dict) -> dict | None:
    """Merge parts (any world size) and any final files into `out` in manifest order and
    mark the meta complete; None (nothing written) when some record is not done yet."""
    from ..jsonl import write_jsonl

    lines_parts, skipped_parts = _part_files(out)
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
    continued = [kept[i] for i in ids if i in kept]
    skipped = [dropped[i] for i in ids if i not in kept and i in dropped]
    write_jsonl(skipped_path(out), skipped)
    write_jsonl(out, continued)
    for path in (*lines_parts, *skipped_parts):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    meta = {**settings, "complete": True, "items": len(continued),
            "skipped": dict(sorted(Counter(r.get("reason") for r in skipped).items())),
            "tokens": sum(int(r.get("continuation_tokens", 0)) for r in continued)}
    _write_meta(out, meta)
    return meta


class _Continuer:
    """The LLM, tokenizer and template that turn a chunk of records into output lines."""

    def __init__(self, llm_dir: Path, template: str, instruction: str, *, device,
                 max_new_tokens: int, max_prompt_tokens: int, batch_size: int):
        from ..inference.text_generation import stop_ids_of
        from ..models.prompts import ChatTemplate, get_template, pick_pad_id
        from ..models.speech_lm import load_llm

        self.model, self.tokenizer = load_llm(llm_dir)
        self.model.to(device)
        self.template = get_template(template)
        if isinstance(self.template, ChatTemplate):
            ChatTemplate.check(self.tokenizer, str(llm_dir))
        self.instruction = instruction
        self.pad_id = pick_pad_id(self.tokenizer)
        self.stop_ids = stop_ids_of(self.model, self.template.stop_token_ids(self.tokenizer))
        self.max_new_tokens, self.max_prompt_tokens = max_new_tokens, max_prompt_tokens
        self.batch_size = batch_size

    def prompt_ids(self, text: str) -> list[int]:
        return self.template.encode(self.tokenizer, self.instruction, transcript=text).prompt_ids()

    def run(self, records: Sequence[dict]) -> tuple[list[tuple[dict, str | None]], int]:
        """([(line, None) or ({id, reason}, reason)] in input order, new tokens generated)."""
        from ..inference import text_generation

        results: list[tuple[dict, str | None] | None] = [None] * len(records)
        usable, prompts = [], []
        for k, record in enumerate(records):
            text = record.get("text")
            reason = None
            if not isinstance(text, str) or not text.strip():
                reason = "empty transcript"
            else:
                ids = self.prompt_ids(text)
                if len(ids) > self.max_prompt_tokens:
                    reason = f"prompt over {self.max_prompt_tokens} tokens"
                else:
                    usable.append(k)
                    prompts.append(ids)
            if reason is not None:
                results[k] = ({"id": record["id"], "reason": reason}, reason)
        new = text_generation.greedy_generate(
            self.model, prompts, pad_id=self.pad_id, stop_ids=self.stop_ids,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size) if prompts else []
        tokens = 0
        for k, ids in zip(usable, new, strict=True):
            tokens += len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text:
                results[k] = ({**records[k], "continuation": text,
                               "continuation_tokens": len(ids)}, None)
            else:
                reason = "empty continuation"
                results[k] = ({"id": records[k]["id"], "reason": reason}, reason)
        return results, tokens  # type: ignore[return-value]


def build_continuations(llm_dir, manifest, out_path, *, instruction: str = CONTINUE_INSTRUCTION,
                        template: str = "blsp", max_new_tokens: int = 64,
                        max_prompt_tokens: int = 192, batch_size: int = 32,
                        chunk_size: int | None = None, device: str = "auto",
                        rank: int | None = None, world_size: int | None = None,
                        progress: bool = False,
                        say: Callable[[str], None] = print) -> ContinuationSummary:
    """Continue every transcript of `manifest` with the LLM in `llm_dir` (a directory or
    zoo:NAME) into `out_path` (see the module doc). `manifest`: a path or
    embedded:LANG/SPLIT. chunk_size: records per appended chunk (default 8 batches).
    rank/world_size: this process's shard (default: torchrun's environment, else 0 of 1).
    """
    from ..data.manifest import iter_manifest_lines
    from ..jsonl import JsonlAppender
    from ..models.encoders import config_sha256, resolve_pretrained_dir
    from ..recipes.sources import resolve_manifest
    from ..training import distributed
    from ..zoo import resolve_model_path

    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("max_prompt_tokens", max_prompt_tokens),
                        ("chunk_size", 1 if chunk_size is None else chunk_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    started = time.perf_counter()
    out = Path(out_path)
    rank, world, group = _shard(rank, world_size, str(device))
    tell = say if rank == 0 or not group else (lambda message: None)
    summary = ContinuationSummary(out_path=out, rank=rank, world_size=world)

    # Rank 0 resolves first, so a zoo model or the embedded corpus is built only once.
    if group and rank != 0:
        distributed.barrier()
    llm_path = resolve_pretrained_dir(resolve_model_path(str(llm_dir), progress=progress, say=tell),
                                      what="LLM").resolve()
    manifest_path = resolve_manifest(manifest, progress=progress).resolve()
    if group and rank == 0:
        distributed.barrier()
    settings = {"manifest": str(manifest_path), "manifest_sha256": manifest_sha256(manifest_path),
                "llm": str(llm_path), "llm_config_sha256": config_sha256(llm_path),
                "template": template, "instruction": instruction,
                "max_new_tokens": int(max_new_tokens), "max_prompt_tokens": int(max_prompt_tokens)}

    # Every rank checks (so all raise alike, none waits at a barrier); one writes.
    meta = _read_meta(out)
    if meta is None:
        if out.exists() or any(_part_files(out)):
            raise SpeechLMError(f"{out} exists but has no {meta_path(out).name}, so it was not "
                                f"written by this job (or its meta file was deleted); {_fix(out)}")
    else:
        _check_settings(out, meta, settings)
        if meta.get("complete") and out.is_file():
            tell(f"{out}: already complete ({meta.get('items')} continuations)")
            summary.complete = True
            return summary
    if meta is None or meta.get("complete"):  # new, or complete but the output was deleted
        if rank == 0 or not group:
            _write_meta(out, {**settings, "complete": False})
    if group:
        distributed.barrier()

    ids: list[str] = []
    records: list[dict] = []
    seen: set[str] = set()
    for _, record in iter_manifest_lines(manifest_path, resolve=False):
        rid = str(record["id"])
        if rid in seen:
            summary.duplicates += 1
            continue
        seen.add(rid)
        ids.append(rid)
        records.append(record)
    done = _done_ids(out)
    mine = records[rank::world]
    todo = [r for r in mine if str(r["id"]) not in done]
    summary.already_done = len(mine) - len(todo)
    if todo:
        where = _device(str(device))
        tell(f"continuing {len(todo)} record(s) of {manifest_path} with {llm_path} on {where}"
             + (f" ({world} ranks)" if world > 1 else "")
             + (f"; {summary.already_done} done by an earlier run" if summary.already_done else ""))
        continuer = _Continuer(llm_path, template, instruction, device=where,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                               batch_size=batch_size)
        chunk = chunk_size or batch_size * 8
        bar = None
        if progress and (rank == 0 or not group):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="continue", unit="record", dynamic_ncols=True)
        try:
            with JsonlAppender(part_path(out, rank, world)) as lines, \
                    JsonlAppender(part_path(out, rank, world, skipped=True)) as skips:
                for first in range(0, len(todo), chunk):
                    part = todo[first:first + chunk]
                    results, tokens = continuer.run(part)
                    for line, reason in results:
                        if reason is None:
                            lines.write(line)
                            summary.items += 1
                        else:
                            skips.write(line)
                            summary.skipped[reason] += 1
                    summary.tokens += tokens
                    if bar is not None:
                        bar.update(len(part))
        finally:
            if bar is not None:
                bar.close()
            summary.wall_s = time.perf_counter() - started

    if group:
        distributed.barrier()
        merged = _merge(out, ids, settings) is not None if rank == 0 else None
        summary.complete = bool(distributed.broadcast_object(merged))
    else:
        summary.complete = _merge(out, ids, settings) is not None
    if not summary.complete:
        finished = _done_ids(out)
        summary.remaining = sum(i not in finished for i in ids)
    summary.wall_s = time.perf_counter() - started
    return summary
