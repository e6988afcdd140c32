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

The job is a `speechlm.pipelines.record_job` job: `<out>.meta.json` holds
the manifest (path, sha256 of its bytes), the LLM (directory, config_sha256),
template, instruction, max_new_tokens and max_prompt_tokens (a rerun must
match them: it resumes, without duplicates or gaps, even with another number
of ranks); rank R continues records R, R+W, ... under torchrun, into its own
part; the parts are merged into `<out>` once every record is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.instructions import CONTINUE_INSTRUCTION
from ..errors import ConfigError, SpeechLMError
from .record_job import (
    JobSummary,
    RecordJob,
    check_complete,
    job_device,
    manifest_mismatch,
    manifest_sha256,
    meta_path,
    part_path,
    prepare,
    run_records,
    shard,
    skipped_path,
    unique_records,
)

__all__ = [
    "ContinuationSummary", "build_continuations", "check_continuations", "manifest_sha256",
    "meta_path", "part_path", "read_continuations", "skipped_path",
]

# Settings that decide what the continuations are; a rerun must match them all.
SETTINGS = ("llm", "llm_config_sha256", "template", "instruction", "max_new_tokens",
            "max_prompt_tokens", "precision")
PRECISIONS = ("fp32", "bf16")


def check_continuations(path, *, manifest=None) -> dict:
    """The meta of finished continuations at `path` (stage 2 calls this before training).

    Raises SpeechLMError when the meta is missing, the job is not complete, or `manifest`
    (a path or embedded:LANG/SPLIT) is not the manifest the continuations were made from.
    """
    out = Path(path)
    meta = check_complete(out, "continuations", "speechlm build continuations --llm LLM "
                          f"--manifest MANIFEST --out {out}")
    if manifest is not None:
        from ..recipes.sources import resolve_manifest

        resolved = resolve_manifest(manifest, progress=False)
        sha = manifest_sha256(resolved)
        if sha != meta.get("manifest_sha256"):
            raise SpeechLMError(
                f"{manifest_mismatch(out, meta, resolved, sha, 'continuations')}; build continuations for this "
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
class ContinuationSummary(JobSummary):
    """What one build_continuations call did (not lines an earlier run wrote)."""

    tokens: int = 0                    # new tokens generated now

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        text = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        text += (f"continued {self.items} record(s): {self.tokens} tokens in {self.wall_s:.1f} s "
                f"({self.tokens_per_s:.1f} tokens/s)")
        text += self.status()
        return text


# -- the job -----------------------------------------------------------------------------


class _Continuer:
    """The LLM, tokenizer and template that turn a chunk of records into output lines."""

    def __init__(self, llm_dir: Path, template: str, instruction: str, *, device,
                 max_new_tokens: int, max_prompt_tokens: int, batch_size: int,
                 precision: str = "fp32"):
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
        self.precision = precision

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        # bf16 matmuls: 2.5x the tokens/s of fp32 at batch 32 on an AVX-512 CPU
        device = next(self.model.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16)

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
        with self._autocast():
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
                        precision: str = "fp32",
                        chunk_size: int | None = None, device: str = "auto",
                        rank: int | None = None, world_size: int | None = None,
                        progress: bool = False,
                        say: Callable[[str], None] = print) -> ContinuationSummary:
    """Continue every transcript of `manifest` with the LLM in `llm_dir` (a directory or
    zoo:NAME) into `out_path` (see the module doc). `manifest`: a path or
    embedded:LANG/SPLIT. chunk_size: records per appended chunk (default 8 batches).
    rank/world_size: this process's shard (default: torchrun's environment, else 0 of 1).
    """
    from ..models.encoders import config_sha256
    from ..pretrained.resolve import resolve_model_dir
    from ..recipes.sources import resolve_manifest
    from ..training import distributed

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                        ("max_prompt_tokens", max_prompt_tokens),
                        ("chunk_size", 1 if chunk_size is None else chunk_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    started = time.perf_counter()
    out = Path(out_path)
    rank, world, group = shard(rank, world_size, str(device))
    tell = say if rank == 0 or not group else (lambda message: None)
    summary = ContinuationSummary(out_path=out, rank=rank, world_size=world)

    # Rank 0 resolves first, so a zoo model or the embedded corpus is built only once.
    if group and rank != 0:
        distributed.barrier()
    llm_path = resolve_model_dir(str(llm_dir), progress=progress, say=tell,
                                 what="LLM").resolve()
    manifest_path = resolve_manifest(manifest, progress=progress).resolve()
    if group and rank == 0:
        distributed.barrier()
    settings = {"manifest": str(manifest_path), "manifest_sha256": manifest_sha256(manifest_path),
                "llm": str(llm_path), "llm_config_sha256": config_sha256(llm_path),
                "template": template, "instruction": instruction,
                "max_new_tokens": int(max_new_tokens), "max_prompt_tokens": int(max_prompt_tokens),
                **({"precision": precision} if precision != "fp32" else {})}
    job = RecordJob(out, settings, SETTINGS, "continuations", summary,
                    totals=lambda lines: {"tokens": sum(int(r.get("continuation_tokens", 0))
                                                        for r in lines)})
    if prepare(job, rank, group, tell):
        return summary
    records = unique_records(manifest_path, summary)

    def start(count: int):
        where = job_device(str(device))
        tell(f"continuing {count} record(s) of {manifest_path} with {llm_path} on {where}"
             + (f" ({world} ranks)" if world > 1 else "")
             + (f"; {summary.already_done} done by an earlier run" if summary.already_done else ""))
        continuer = _Continuer(llm_path, template, instruction, device=where,
                               max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                               batch_size=batch_size, precision=precision)

        def work(part):
            results, tokens = continuer.run(part)
            summary.tokens += tokens
            return results

        return work

    return run_records(job, records, start, rank=rank, world=world, group=group,
                       chunk=chunk_size or batch_size * 8, progress=progress, desc="continue",
                       started=started)
