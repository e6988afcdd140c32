"""`speechlm build tokenize`: audio of a manifest -> speech units, with a trained tokenizer.

    summary = build_tokenize("runs/tok/final", "embedded:en/train", "data/units.jsonl")
    print(summary.summary())
    meta = check_units("data/units.jsonl", tokenizer="runs/tok/final")   # readers of units

Each record is copied with `units` (ints, 12.5 per second for the GLM-4-Voice
layout), `tokenizer` (the tokenizer's identity: a hash of its settings and
codebook), `num_codes` and `frame_rate` added. Audio longer than 30 s is
tokenized in 30 s windows whose units are concatenated. Batches are filled up
to `batch_duration` seconds of padded audio, shortest first.

Skipped (listed in `<out>.skipped.jsonl` with the reason, counted, the job
goes on): audio that cannot be read, and audio shorter than one unit (80 ms).

A `speechlm.pipelines.record_job` job: `<out>.meta.json` holds the manifest
(path, sha256) and the tokenizer (directory, identity); a rerun resumes
without duplicates or gaps (even with another number of ranks), and a rerun
with another tokenizer is refused, naming its identity. Rank R tokenizes
records R, R+W, ... under torchrun into its own part; the parts are merged
when all are done. The summary gives the throughput (audio seconds per
second) and codebook usage (perplexity, unused codes, bits per second).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, ManifestError
from .record_job import (
    JobSummary,
    RecordJob,
    check_complete,
    job_device,
    manifest_sha256,
    prepare,
    run_records,
    shard,
    unique_records,
)

__all__ = ["TokenizeSummary", "build_tokenize", "check_units", "read_units"]

# What decides the units; the directory may move (same identity, same units).
SETTINGS = ("tokenizer_identity",)


@dataclass
class TokenizeSummary(JobSummary):
    audio_seconds: float = 0.0         # audio tokenized now
    units: list[list[int]] = field(default_factory=list, repr=False)  # this run's units
    num_codes: int = 0
    frame_rate: float = 0.0

    @property
    def realtime(self) -> float:
        return self.audio_seconds / self.wall_s if self.wall_s > 0 else 0.0

    def usage(self) -> dict:
        from ..models.speech_tokenizer import unit_statistics

        return unit_statistics(self.units, self.num_codes, self.frame_rate)

    def summary(self) -> str:
        text = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        text += (f"tokenized {self.items} record(s): {self.audio_seconds / 3600:.2f} h of audio "
                 f"in {self.wall_s:.1f} s ({self.realtime:.0f}x real time)")
        if self.units:
            u = self.usage()
            text += (f"; {u['units']} units, perplexity {u['perplexity']:.1f}, "
                     f"{u['unused_codes']} of {self.num_codes} codes unused, "
                     f"{u['entropy_bits_per_second']:.0f} of {u['bits_per_second']:.0f} bits/s")
        return text + self.status()


class _Tokenizer:
    """Loads audio of a chunk of records, batches it by duration, returns the lines."""

    def __init__(self, model, *, identity: str, batch_duration: float, manifest_path: Path,
                 summary: TokenizeSummary):
        self.model = model
        self.identity = identity
        self.batch_duration = batch_duration
        self.manifest_path = manifest_path
        self.summary = summary
        self.samples_per_unit = model.settings.samples_per_unit

    def _load(self, record: dict):
        from ..audio.io import load_audio
        from ..data.manifest import resolve_audio

        path = resolve_audio(record, self.manifest_path)
        if record.get("offset") is None:
            return load_audio(path, 16000)  # the whole file (a `duration` field only informs)
        return load_audio(path, 16000, offset=float(record["offset"]),
                          duration=record.get("duration"))

    def run(self, records: Sequence[dict]) -> list[tuple[dict, str | None]]:
        import torch

        from ..errors import AudioError

        results: list[tuple[dict, str | None]] = []
        loaded = []
        for record in records:
            try:
                wave = self._load(record)
            except AudioError as e:
                results.append(({"id": record["id"], "reason": "unreadable audio",
                                 "detail": str(e)}, "unreadable audio"))
                continue
            if len(wave) < self.samples_per_unit:
                results.append(({"id": record["id"], "reason": "shorter than one unit",
                                 "samples": len(wave)}, "shorter than one unit"))
                continue
            loaded.append((record, torch.as_tensor(wave, dtype=torch.float32)))
        loaded.sort(key=lambda item: len(item[1]))
        device = self.model.vq.codebook.device
        batch: list = []

        def flush():
            lengths = torch.tensor([len(w) for _, w in batch])
            audio = torch.zeros(len(batch), int(lengths.max()))
            for i, (_, wave) in enumerate(batch):
                audio[i, : len(wave)] = wave
            units = self.model.encode(audio.to(device), lengths.to(device))
            for (record, wave), seq in zip(batch, units, strict=True):
                results.append(({**record, "units": seq, "tokenizer": self.identity,
                                 "num_codes": self.model.settings.num_codes,
                                 "frame_rate": self.model.frame_rate}, None))
                self.summary.audio_seconds += len(wave) / 16000
                self.summary.units.append(seq)
            batch.clear()

        for record, wave in loaded:
            seconds = min(len(wave) / 16000, 30.0)  # encode() runs 30 s windows at most
            if batch and (len(batch) + 1) * seconds > self.batch_duration:
                flush()
            batch.append((record, wave))
        if batch:
            flush()
        return results


def build_tokenize(tokenizer_dir, manifest, out_path, *, batch_duration: float = 120.0,
                   chunk_size: int = 256, device: str = "auto", rank: int | None = None,
                   world_size: int | None = None, progress: bool = False,
                   say: Callable[[str], None] = print) -> TokenizeSummary:
    """Tokenize every record of `manifest` (a path or embedded:LANG/SPLIT) with the tokenizer
    saved in `tokenizer_dir` into `out_path` (see the module doc). chunk_size: records per
    appended chunk. rank/world_size: this process's shard (default: torchrun's environment,
    else 0 of 1)."""
    from ..models.speech_tokenizer import load_speech_tokenizer, read_tokenizer_info
    from ..recipes.sources import resolve_manifest
    from ..training import distributed

    if batch_duration <= 0 or chunk_size < 1:
        raise ConfigError(f"batch_duration must be > 0 and chunk_size >= 1, got "
                          f"{batch_duration} and {chunk_size}")
    started = time.perf_counter()
    out = Path(out_path)
    rank, world, group = shard(rank, world_size, str(device))
    tell = say if rank == 0 or not group else (lambda message: None)
    tokenizer_dir = Path(tokenizer_dir).resolve()
    info = read_tokenizer_info(tokenizer_dir)
    summary = TokenizeSummary(out_path=out, rank=rank, world_size=world,
                              num_codes=int(info["num_codes"]),
                              frame_rate=float(info["frame_rate"]))
    if group and rank != 0:
        distributed.barrier()
    manifest_path = resolve_manifest(manifest, progress=progress).resolve()
    if group and rank == 0:
        distributed.barrier()
    settings = {"manifest": str(manifest_path), "manifest_sha256": manifest_sha256(manifest_path),
                "tokenizer": str(tokenizer_dir), "tokenizer_identity": info["identity"],
                "num_codes": summary.num_codes, "frame_rate": summary.frame_rate}
    job = RecordJob(out, settings, SETTINGS, "units", summary,
                    totals=lambda lines: {"units": sum(len(r["units"]) for r in lines)})
    if prepare(job, rank, group, tell):
        return summary
    records = unique_records(manifest_path, summary)

    def start(count: int):
        where = job_device(str(device))
        model = load_speech_tokenizer(tokenizer_dir, device=where)
        tell(f"tokenizing {count} record(s) of {manifest_path} with {tokenizer_dir} "
             f"(identity {info['identity']}) on {where}"
             + (f" ({world} ranks)" if world > 1 else "")
             + (f"; {summary.already_done} done by an earlier run" if summary.already_done else ""))
        return _Tokenizer(model, identity=info["identity"], batch_duration=batch_duration,
                          manifest_path=manifest_path, summary=summary).run

    return run_records(job, records, start, rank=rank, world=world, group=group,
                       chunk=chunk_size, progress=progress, desc="tokenize", started=started)


def check_units(path, *, tokenizer=None) -> dict:
    """The meta of a finished unit file; with `tokenizer` (a directory or an identity), an
    error when the units were made by another tokenizer."""
    out = Path(path)
    meta = check_complete(out, "units", "speechlm build tokenize --tokenizer DIR --manifest "
                          f"MANIFEST --out {out}")
    if tokenizer is not None:
        identity = str(tokenizer)
        if Path(identity).is_dir():
            from ..models.speech_tokenizer import read_tokenizer_info

            identity = read_tokenizer_info(identity)["identity"]
        if meta.get("tokenizer_identity") != identity:
            raise ManifestError(
                f"{out}: the units were made by tokenizer {meta.get('tokenizer_identity')} "
                f"({meta.get('tokenizer')}), not {identity}; units of two tokenizers do not mean "
                "the same thing: tokenize the audio again with this tokenizer")
    return meta


def read_units(path, *, tokenizer=None) -> list[dict]:
    """Records of a finished unit file (checked like `check_units`); every line's own
    `tokenizer` field is checked too (a file edited or concatenated by hand)."""
    from ..jsonl import iter_jsonl

    meta = check_units(path, tokenizer=tokenizer)
    identity = meta.get("tokenizer_identity")
    records = []
    for line, record in iter_jsonl(path):
        if record.get("tokenizer") != identity:
            raise ManifestError(
                f"{path}:{line}: units of tokenizer {record.get('tokenizer')!r}, but the file "
                f"was made by {identity}; do not mix unit files: tokenize the audio again with "
                "one tokenizer")
        records.append(record)
    return records


def cached_units(tokenizer, manifest, *, progress: bool = True,
                 say: Callable[[str], None] = print) -> Path:
    """Units of `manifest` (a path or embedded:LANG/SPLIT) by `tokenizer` (a directory or
    zoo:NAME), tokenized into the cache on first use (a killed run resumes):
    cache/units/<manifest name>-<sha of the manifest>-<tokenizer identity>.jsonl."""
    from ..models.speech_tokenizer import read_tokenizer_info
    from ..paths import cache_dir
    from ..pretrained.resolve import resolve_model_dir
    from ..recipes.sources import resolve_manifest

    tokenizer_dir = resolve_model_dir(str(tokenizer), expect=None, progress=progress, say=say)
    identity = read_tokenizer_info(tokenizer_dir)["identity"]
    manifest_path = resolve_manifest(manifest, progress=progress)
    name = str(manifest).replace("embedded:", "embedded-").replace("/", "-")
    name = Path(name).stem if not str(manifest).startswith("embedded:") else name
    out = cache_dir() / "units" / f"{name}-{manifest_sha256(manifest_path)[:10]}-{identity}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = build_tokenize(tokenizer_dir, manifest_path, out, progress=progress,
                             rank=0, world_size=1, say=say)
    if not summary.complete:
        raise ConfigError(f"{out}: tokenization did not complete")
    if summary.items:
        say(summary.summary())
    return out
