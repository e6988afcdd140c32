"""On-disk cache of frozen speech-encoder outputs: encode each utterance once, train many times.

    from torch.utils.data import DataLoader
    from speechlm.data.sampler import DurationBucketSampler
    from speechlm.models.encoders import load_encoder
    from speechlm.pipelines.encoder_cache import (CachedEncoderDataset, EncoderCache,
                                                  collate_encoder_batch)

    encoder = load_encoder("auto", "ckpt/whisper-small")
    cache = EncoderCache.for_encoder("cache/encoders", encoder, "ckpt/whisper-small")
    print(cache.fill(encoder, "data/train.jsonl", progress=True).summary())
    dataset = CachedEncoderDataset("data/train.jsonl", cache)
    sampler = DurationBucketSampler(dataset.durations, max_batch_duration=200.0, ...)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_encoder_batch)
    # batch["encoder_hidden"] [B, F, D] float32, batch["encoder_lengths"] [B], batch["texts"], ...

Layout under the cache root (one subdirectory per encoder, so caches of
several encoders or checkpoints live side by side and never mix):

    <root>/<identity[:16]>/identity.json         what encoder this is (see `encoder_identity`)
    <root>/<identity[:16]>/shard-r0-00000.bin    raw rows [frames, output_dim], float16 by default
    <root>/<identity[:16]>/index-r0.jsonl        {"key", "id", "shard", "row", "frames"} per clip
    <root>/<identity[:16]>/lock-r0               held (flock) while rank 0 fills

An entry is found by its audio key: the hash of the absolute audio path, the
file's size and mtime and the record's offset/duration, so an edited audio
file gets a new key and its stale entry is never used. Each rank (torchrun, or
explicit rank/world_size) fills its share of the records into its own
`-r{rank}` files; readers merge every rank's index.

Nothing is lost when a fill is killed: per chunk the rows are appended to the
shard and fsynced *before* the index lines are appended, so the index only
points at data on disk (a torn last index line is ignored). Rows written
without their index lines are cut off when that rank next fills, and a rerun
encodes only what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.collate import SkippedItem, add_item_fields
from ..data.manifest import AUDIO_PATH_KEY
from ..errors import (
    AudioError,
    AudioMissingError,
    AudioTooShortError,
    ConfigError,
    ManifestError,
    SpeechLMError,
)
from ..jsonl import JsonlAppender, atomic_write, iter_jsonl

__all__ = [
    "CachedEncoderDataset", "EncoderCache", "FillSummary", "audio_key", "collate_encoder_batch",
    "encoder_identity", "identity_digest",
]

CACHE_FORMAT = 1
SHARD_BYTES = 256 * 2**20  # start a new shard once the current one holds this much
NOT_CACHED = "not in encoder cache"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_SHARD_RE = re.compile(r"shard-r(\d+)-(\d+)\.bin$")
_INDEX_RE = re.compile(r"index-r(\d+)\.jsonl$")


# -- identities and keys ---------------------------------------------------------------


# (path, size, mtime_ns) -> sha256: a weights file is hashed once per process
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        from ..paths import file_sha256

        _FILE_HASHES[memo] = file_sha256(path)
    return _FILE_HASHES[memo]


def _encoder_settings(encoder) -> dict:
    """The encoder options that change its output frames."""
    layer = encoder.layer
    if layer == "weighted":
        raise ConfigError("encoder layer 'weighted' learns its layer weights during training, so "
                          "its outputs cannot be cached; cache a fixed layer (an int or 'last') "
                          "or train without the encoder cache")
    if encoder._backbone_trainable():
        raise ConfigError("the encoder backbone has trainable parameters (frozen=False or LoRA), "
                          "so its outputs change during training and cannot be cached; load it "
                          "with frozen=True or train without the encoder cache")
    return {
        "class": type(encoder).__name__,
        "kind": encoder.kind,
        "layer": layer,
        "window_samples": encoder.window_samples,
        "unpadded": bool(getattr(encoder, "unpadded", False)),
        "pad_to_window": bool(getattr(encoder, "pad_to_window", False)),
        "do_normalize": getattr(encoder, "do_normalize", None),
        "use_attention_mask": getattr(encoder, "use_attention_mask", None),
        "sample_rate": int(encoder.sample_rate),
        "frame_rate": float(encoder.frame_rate),
        "output_dim": int(encoder.output_dim),
        "weights_dtype": str(encoder.dtype).replace("torch.", ""),
        # only when set, so the caches filled before this option keep their identity
        **({"full_window": True} if getattr(encoder, "full_window", False) else {}),
    }


def encoder_identity(encoder, model_dir=None) -> dict:
    """What makes an encoder's outputs what they are, as a JSON-able dict.

    `config_sha256` (config.json without fields re-saving changes), every
    weights file of `model_dir` (*.safetensors / *.bin: name, size, sha256 of
    the whole content) and the encoder settings that change outputs. Two
    checkpoints with the same config but other weights differ. `model_dir`
    (default: the path the encoder was loaded from) is recorded for messages
    but not hashed (see `identity_digest`), so a copied checkpoint keeps its
    identity.
    """
    from ..models.encoders import config_sha256
    from ..pretrained.resolve import resolve_model_dir

    if model_dir is None:
        model_dir = getattr(encoder, "source_path", None)
        if model_dir is None:
            raise ConfigError("encoder_identity needs the encoder's model directory: pass "
                              "model_dir (the directory it was loaded from)")
    directory = resolve_model_dir(model_dir, what="speech encoder")
    weights = [{"name": p.name, "size": p.stat().st_size, "sha256": _file_sha256(p)}
               for p in sorted(directory.iterdir())
               if p.is_file() and p.suffix in (".safetensors", ".bin")]
    if not weights:
        raise ConfigError(f"speech encoder directory {directory} has no weights file "
                          "(*.safetensors or *.bin); point model_dir at the checkpoint the "
                          "encoder was loaded from")
    return {"cache_format": CACHE_FORMAT, "config_sha256": config_sha256(directory),
            "weights": weights, "settings": _encoder_settings(encoder),
            "model_dir": str(directory.resolve())}


def identity_digest(identity: dict) -> str:
    """sha256 hex of an identity, without its informational `model_dir`."""
    hashed = {k: v for k, v in identity.items() if k != "model_dir"}
    text = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _audio_path(record: dict, base_dir=None) -> str:
    """Absolute audio path of a record (manifest readers already resolved it)."""
    path = record.get(AUDIO_PATH_KEY)
    if path is None:
        path = os.path.expanduser(record["audio"])
        if not os.path.isabs(path):
            path = os.path.join(base_dir or os.getcwd(), path)
    return os.path.abspath(path)


def audio_key(record: dict, base_dir=None) -> str:
    """The cache key of a manifest record: sha256 of (absolute audio path, file size,
    mtime_ns, offset, duration). Raises AudioMissingError when the file is gone."""
    path = _audio_path(record, base_dir)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise AudioMissingError(path, hint="check the path in the manifest") from None
    duration = record.get("duration")
    parts = [path, stat.st_size, stat.st_mtime_ns, float(record.get("offset") or 0.0),
             None if duration is None else float(duration)]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


def _records_of(manifest_or_records, base_dir=None) -> list[dict]:
    """Validated records with their absolute audio paths, from a manifest path or a list."""
    from ..data.dataset import AudioDataset

    return AudioDataset(manifest_or_records, base_dir=base_dir).records


# -- fill summary ----------------------------------------------------------------------


@dataclass
class FillSummary:
    """What one `EncoderCache.fill` did on this rank."""

    built: int = 0
    reused: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_items: list[dict] = field(default_factory=list)  # SkippedItem dicts
    audio_s: float = 0.0  # seconds of audio encoded (built entries only)
    wall_s: float = 0.0
    rank: int = 0
    world_size: int = 1

    def skip(self, item: SkippedItem) -> None:
        self.skipped[item.reason] += 1
        self.skipped_items.append(item.to_dict())

    def summary(self) -> str:
        where = f" (rank {self.rank} of {self.world_size})" if self.world_size > 1 else ""
        text = f"encoder cache{where}: built {self.built}, reused {self.reused}"
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common())
            text += f", skipped {total} ({reasons})"
        if self.built:
            speed = self.audio_s / self.wall_s if self.wall_s > 0 else float("inf")
            text += f"; encoded {self.audio_s:.1f} s of audio in {self.wall_s:.1f} s " \
                    f"({speed:.1f}x real time)"
        return text


# -- the cache -------------------------------------------------------------------------


class EncoderCache:
    """Cached encoder frames of one encoder identity, in `directory` (`<root>/<id[:16]>`).

    Open it with `EncoderCache.for_encoder(root, encoder, model_dir)` (creates
    it) or `EncoderCache(directory)` (an existing one). `cache.get(record or
    key)` -> float32 Tensor [frames, dim]; `key in cache`, `len(cache)`, `cache.root`,
    `cache.missing(records)`, `cache.nbytes` (bytes of data on disk).
    `refresh()` re-reads the index (entries other processes added).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        meta_path = self.directory / "identity.json"
        if not meta_path.is_file():
            raise ConfigError(f"{self.directory} is not an encoder cache (no identity.json); "
                              "create one with EncoderCache.for_encoder(root, encoder, model_dir)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            self.identity: dict = meta["identity"]
            self.digest: str = meta["digest"]
            self.dtype = np.dtype(_DTYPES[meta["dtype"]])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SpeechLMError(f"{meta_path}: damaged encoder cache identity ({e!r}); delete "
                                f"{self.directory} and fill the cache again") from None
        settings = self.identity["settings"]
        self.dim = int(settings["output_dim"])
        self.frame_rate = float(settings["frame_rate"])
        self.shard_bytes = SHARD_BYTES
        self._row_bytes = self.dim * self.dtype.itemsize
        self._maps: dict[str, np.memmap] = {}
        self.refresh()

    @classmethod
    def for_encoder(cls, root, encoder, model_dir=None, *, dtype: str | None = None
                    ) -> EncoderCache:
        """The cache of `encoder` (loaded from `model_dir`) under `root`, created if new.

        dtype: "float16" (default for a new cache) or "float32" (when float16
        overflows); an existing cache keeps the dtype it was built with.
        """
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigError(f"encoder cache dtype must be one of {', '.join(_DTYPES)}, "
                              f"got {dtype!r}")
        identity = encoder_identity(encoder, model_dir)
        digest = identity_digest(identity)
        root = Path(root)
        if (root / "identity.json").is_file():  # the user named an identity dir itself
            existing = cls(root)
            if existing.digest != digest:
                raise SpeechLMError(
                    f"{root} is the encoder cache of encoder {existing.digest[:16]} "
                    f"({existing.identity.get('model_dir')}), not of this encoder {digest[:16]} "
                    f"({identity['model_dir']}); point at the parent cache root {root.parent} "
                    f"(each encoder gets its own subdirectory there) or delete {root}")
            directory = root
        else:
            directory = root / digest[:16]
        meta_path = directory / "identity.json"
        if not meta_path.is_file():
            meta = {"digest": digest, "dtype": dtype or "float16", "identity": identity}
            with atomic_write(meta_path) as f:
                json.dump(meta, f, indent=2)
                f.write("\n")
        cache = cls(directory)
        if cache.digest != digest:  # a 64-bit prefix collision: never mix two encoders
            raise SpeechLMError(f"{directory} holds encoder {cache.digest}, not {digest}; "
                                f"delete {directory} or use another cache root")
        if dtype is not None and cache.dtype != np.dtype(_DTYPES[dtype]):
            raise SpeechLMError(
                f"encoder cache {directory} stores {cache.dtype.name}, not {dtype}; open it "
                f"without dtype, or delete {directory} (or use another root) to rebuild it "
                f"as {dtype}")
        return cache

    # - index -

    def refresh(self) -> None:
        """(Re)read every rank's index; an entry is kept only if its rows are on disk."""
        self._entries: dict[str, tuple[str, int, int]] = {}  # key -> (shard, row, frames)
        self._indexed_end: dict[str, int] = {}  # shard -> rows referenced by index lines
        shard_rows = {p.name: p.stat().st_size // self._row_bytes
                      for p in self.directory.glob("shard-r*-*.bin")}
        for path in sorted(self.directory.glob("index-r*.jsonl")):
            try:
                for lineno, line in iter_jsonl(path, tolerate_torn_tail=True):
                    try:
                        key, shard = str(line["key"]), str(line["shard"])
                        row, frames = int(line["row"]), int(line["frames"])
                    except (KeyError, TypeError, ValueError):
                        raise ManifestError(f"{path}:{lineno}: not an encoder cache index "
                                            "line") from None
                    end = row + frames
                    self._indexed_end[shard] = max(self._indexed_end.get(shard, 0), end)
                    if end <= shard_rows.get(shard, 0) and key not in self._entries:
                        self._entries[key] = (shard, row, frames)
            except ManifestError as e:
                raise SpeechLMError(f"{e}; the encoder cache {self.directory} is damaged: "
                                    "delete it and fill it again") from None

    def key_of(self, record_or_key, base_dir=None) -> str:
        return record_or_key if isinstance(record_or_key, str) else audio_key(record_or_key,
                                                                              base_dir)

    def __contains__(self, record_or_key) -> bool:
        try:
            return self.key_of(record_or_key) in self._entries
        except AudioError:
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def frames(self, record_or_key, base_dir=None) -> int | None:
        """Cached frame count of a record or key (None when not cached)."""
        entry = self._entries.get(self.key_of(record_or_key, base_dir))
        return None if entry is None else entry[2]

    def missing(self, manifest_or_records, base_dir=None) -> list[dict]:
        """The records (manifest path or list) that have no entry (missing audio included)."""
        out = []
        for record in _records_of(manifest_or_records, base_dir):
            try:
                cached = audio_key(record) in self._entries
            except AudioError:
                cached = False
            if not cached:
                out.append(record)
        return out

    @property
    def root(self) -> Path:
        """The cache root this encoder's directory lives in (other encoders' beside it)."""
        return self.directory.parent

    @property
    def nbytes(self) -> int:
        """Bytes of encoder frames on disk (all shards)."""
        return sum(p.stat().st_size for p in self.directory.glob("shard-r*-*.bin"))

    # - reading -

    def get(self, record_or_key, base_dir=None) -> torch.Tensor:
        """The cached frames of a record (or key): float32 Tensor [frames, dim]."""
        key = self.key_of(record_or_key, base_dir)
        entry = self._entries.get(key)
        if entry is None:
            what = key if isinstance(record_or_key, str) else \
                f"record {record_or_key.get('id')!r} (key {key[:16]})"
            raise KeyError(f"{what} is not in the encoder cache {self.directory}; run "
                           "cache.fill(encoder, records) first")
        shard, row, frames = entry
        rows = self._map(shard, row + frames)
        return torch.from_numpy(np.array(rows[row : row + frames], dtype=np.float32))  # a copy

    def _map(self, shard: str, rows_needed: int) -> np.memmap:
        mapped = self._maps.get(shard)
        if mapped is None or mapped.shape[0] < rows_needed:  # the shard grew since
            rows = (self.directory / shard).stat().st_size // self._row_bytes
            mapped = np.memmap(self.directory / shard, dtype=self.dtype, mode="r",
                               shape=(rows, self.dim))
            self._maps[shard] = mapped
        return mapped

    def __getstate__(self):
        # DataLoader workers started by spawn get the index, not copies of mapped shards.
        return {**self.__dict__, "_maps": {}}

    # - filling -

    def fill(self, encoder, records, *, base_dir=None, max_batch_seconds: float = 200.0,
             progress: bool = False, rank: int | None = None, world_size: int | None = None,
             num_workers: int = 0, silence_dbfs: float | None = -60.0) -> FillSummary:
        """Encode the records (manifest path or list) that have no entry yet.

        Records are sorted by duration and encoded in batches whose padded
        length (what the encoder computes) stays under `max_batch_seconds`;
        encoders that take no attention mask run one clip at a time, so an
        entry never depends on its batch. Relative audio paths of a list
        resolve against `base_dir` (a manifest's against its directory). Each
        rank fills `records[rank::world_size]` (default: torchrun's rank and
        world size; under torch.distributed every rank must call fill, and
        afterwards each sees every rank's entries). Bad audio (missing,
        corrupt, silent, too short) is skipped and counted. `num_workers`
        DataLoader workers read audio.
        """
        start = time.perf_counter()
        if _encoder_settings(encoder) != self.identity["settings"]:
            raise SpeechLMError(
                f"the encoder cache {self.directory} holds outputs of another encoder "
                f"configuration ({self.identity.get('model_dir')}); open the cache for this "
                "encoder with EncoderCache.for_encoder(root, encoder, model_dir)")
        rank, world_size = _rank_and_world(rank, world_size)
        from ..data.dataset import AudioDataset

        dataset = AudioDataset(records, sample_rate=encoder.sample_rate, base_dir=base_dir,
                               silence_dbfs=silence_dbfs)
        summary = FillSummary(rank=rank, world_size=world_size)
        with _RankWriter(self, rank) as writer:  # locks this rank's files, re-reads the index
            todo: dict[str, int] = {}  # key -> dataset index, each key encoded once
            for index in range(rank, len(dataset), world_size):
                record = dataset.records[index]
                try:
                    key = audio_key(record)
                except AudioError as e:
                    summary.skip(_skipped(index, record, e))
                    continue
                if key in self._entries or key in todo:
                    summary.reused += 1
                else:
                    todo[key] = index
            if todo:
                self._fill_todo(encoder, dataset, todo, writer, summary,
                                max_batch_seconds=max_batch_seconds, progress=progress,
                                num_workers=num_workers)
        from ..training import distributed

        if distributed.is_distributed():  # every rank then sees every rank's entries
            distributed.barrier()
            self.refresh()
        summary.wall_s = time.perf_counter() - start
        return summary

    def _fill_todo(self, encoder, dataset, todo: dict[str, int], writer: _RankWriter,
                   summary: FillSummary, *, max_batch_seconds: float, progress: bool,
                   num_workers: int) -> None:
        from torch.utils.data import DataLoader

        from ..progress import progress_bar

        keys = {index: key for key, index in todo.items()}
        batches = _batches(encoder, dataset.records, list(todo.values()), max_batch_seconds)
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_as_list,
                            num_workers=num_workers)
        bar = progress_bar(total=len(todo), desc=f"encoder cache r{writer.rank}", unit="utt",
                   disable=not progress)
        try:
            for indices, items in zip(batches, loader, strict=True):
                clips = []  # (index, wave)
                for index, item in zip(indices, items, strict=True):
                    if isinstance(item, SkippedItem):
                        summary.skip(item)
                    elif int(encoder.output_lengths([item["audio"].numel()])[0]) <= 0:
                        summary.skip(_skipped(index, dataset.records[index], AudioTooShortError(
                            item["audio_path"], f"{item['audio'].numel()} samples give no "
                            "encoder frames", hint="drop it from the manifest")))
                    else:
                        clips.append((index, item["audio"]))
                if clips:
                    rows = self._encode(encoder, clips, dataset.records)
                    entries = writer.append([(keys[i], dataset.records[i]["id"], r)
                                             for (i, _), r in zip(clips, rows, strict=True)])
                    self._entries.update(entries)
                    summary.built += len(clips)
                    summary.audio_s += sum(w.numel() for _, w in clips) / encoder.sample_rate
                bar.update(len(indices))
        finally:
            bar.close()

    def _encode(self, encoder, clips, records) -> list[np.ndarray]:
        """Frames of each clip as rows of the storage dtype; non-finite values are errors."""
        from ..audio.features import as_padded_batch

        waves = [w for _, w in clips]
        if getattr(encoder, "use_attention_mask", True) is False \
                and not getattr(encoder, "unpadded", False):
            groups = [[i] for i in range(len(waves))]  # padding would change its frames
        else:
            groups = [list(range(len(waves)))]
        rows: list[np.ndarray] = [None] * len(waves)  # type: ignore[list-item]
        with torch.no_grad():
            for group in groups:
                out = encoder(*as_padded_batch([waves[i] for i in group]))
                for row, i in enumerate(group):
                    rows[i] = out.hidden[row, : int(out.lengths[row])].float().cpu().numpy()
        stored = []
        for (index, _), frames in zip(clips, rows, strict=True):
            record = records[index]
            where = f"record {record.get('id')!r} ({record[AUDIO_PATH_KEY]})"
            if not np.isfinite(frames).all():
                raise SpeechLMError(f"the encoder produced NaN/Inf frames for {where}; check the "
                                    "checkpoint and the encoder dtype (bfloat16/float16 weights "
                                    "can overflow: load it in float32)")
            with np.errstate(over="ignore"):  # overflow is checked right below
                cast = frames.astype(self.dtype)
            if not np.isfinite(cast).all():
                raise SpeechLMError(
                    f"encoder frames of {where} overflow {self.dtype.name} (largest |value| "
                    f"{float(np.abs(frames).max()):.4g}); rebuild the cache with "
                    "dtype='float32': EncoderCache.for_encoder(root, encoder, model_dir, "
                    f"dtype='float32') with another root, or after deleting {self.directory}")
            stored.append(cast)
        return stored


def _skipped(index: int, record: dict, error: AudioError) -> SkippedItem:
    return SkippedItem(index=index, id=record.get("id"), audio=error.path, reason=error.reason,
                       detail=error.detail, error=type(error).__name__)


def _as_list(items):
    return items


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world_size, else the torch.distributed group's, else torchrun's env."""
    if (rank is None) != (world_size is None):
        raise ConfigError("give both rank and world_size, or neither (torchrun's are used)")
    if rank is None:
        from ..training import distributed

        if distributed.is_distributed():
            rank, world_size = distributed.rank(), distributed.world_size()
        else:
            rank = int(os.environ.get("RANK", "0"))
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    return rank, world_size


def _batches(encoder, records: list[dict], indices: list[int], max_seconds: float
             ) -> list[list[int]]:
    """Indices sorted by duration, packed so len(batch) x padded longest <= max_seconds."""
    from ..audio.io import audio_info

    window = encoder.window_samples / encoder.sample_rate if encoder.window_samples else None
    whisper = getattr(encoder, "kind", "") == "whisper"

    def seconds(index: int) -> float:
        record = records[index]
        if record.get("duration") is not None:
            return float(record["duration"])
        try:
            return max(0.0, audio_info(record[AUDIO_PATH_KEY]).duration
                       - float(record.get("offset") or 0.0))
        except AudioError:
            return 0.0  # skipped when it is loaded

    def padded(duration: float) -> float:
        # Whisper pads every window to 30 s: that is what one clip costs
        return max(1, -(-duration // window)) * window if whisper and window else duration

    batches: list[list[int]] = []
    longest = 0.0
    for index in sorted(indices, key=seconds):
        cost = padded(seconds(index))
        if batches and (len(batches[-1]) + 1) * max(longest, cost) <= max_seconds:
            batches[-1].append(index)
            longest = max(longest, cost)
        else:
            batches.append([index])
            longest = cost
    return batches


class _RankWriter:
    """Appends chunks for one rank: rows to its current shard (fsync), then index lines."""

    def __init__(self, cache: EncoderCache, rank: int):
        self.cache = cache
        self.rank = rank
        self.index_path = cache.directory / f"index-r{rank}.jsonl"
        self._lock = None
        self._lock_file = cache.directory / f"lock-r{rank}"

    def __enter__(self):
        self._lock = open(self._lock_file, "a")  # noqa: SIM115 - held for the whole fill
        with contextlib.suppress(ImportError):
            import fcntl

            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                # Another job fills (or checks) the same rank: wait, then encode only what it
                # left missing - two jobs on one cache are normal (two recipes, one encoder).
                print(f"waiting for another process filling rank {self.rank} of the encoder "
                      f"cache {self.cache.directory}", file=sys.stderr, flush=True)
                fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.cache.refresh()  # under the lock: the index as the last writer left it
        numbers = [int(m.group(2)) for p in self.cache.directory.glob(f"shard-r{self.rank}-*.bin")
                   if (m := _SHARD_RE.search(p.name)) and int(m.group(1)) == self.rank]
        self._open_shard(max(numbers, default=0))
        return self

    def _open_shard(self, number: int) -> None:
        cache = self.cache
        self.shard = f"shard-r{self.rank}-{number:05d}.bin"
        path = cache.directory / self.shard
        on_disk = path.stat().st_size // cache._row_bytes if path.exists() else 0
        indexed = cache._indexed_end.get(self.shard, 0)
        if indexed > on_disk:
            # Index lines point past this shard's data (it was cut short outside our
            # control): appending here would make them point at other clips' rows.
            self._open_shard(number + 1)
            return
        if on_disk * cache._row_bytes != (path.stat().st_size if path.exists() else 0) \
                or on_disk > indexed:
            with open(path, "r+b") as f:  # rows written without their index lines are dropped
                f.truncate(indexed * cache._row_bytes)
        self.rows = indexed

    def append(self, rows: Sequence[tuple[str, str, np.ndarray]]) -> dict:
        """Write (key, id, frames) rows as one chunk; returns the new index entries."""
        cache = self.cache
        if self.rows * cache._row_bytes >= cache.shard_bytes:
            number = int(_SHARD_RE.search(self.shard).group(2)) + 1
            self._open_shard(number)
        lines, entries, start = [], {}, self.rows
        with open(cache.directory / self.shard, "ab") as f:
            for key, item_id, frames in rows:
                f.write(np.ascontiguousarray(frames, dtype=cache.dtype).tobytes())
                lines.append({"key": key, "id": item_id, "shard": self.shard, "row": start,
                              "frames": int(frames.shape[0])})
                entries[key] = (self.shard, start, int(frames.shape[0]))
                start += int(frames.shape[0])
            f.flush()
            os.fsync(f.fileno())
        self.rows = start
        with JsonlAppender(self.index_path, fsync_every=len(lines)) as index:
            for line in lines:
                index.write(line)
        cache._indexed_end[self.shard] = start
        return entries

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.close()  # releases the flock


# -- training-time reading -------------------------------------------------------------


class CachedEncoderDataset:
    """Map-style dataset of manifest records with their cached encoder frames.

    An item is the record's fields (the audio path as `audio_path`, like
    `AudioDataset`) plus `encoder_hidden` (float32 Tensor [F, D]) and
    `encoder_frames` (F). A record without an entry (not filled, or its audio
    edited since) is a `SkippedItem` with reason "not in encoder cache"; one
    whose audio file is gone, a SkippedItem "file not found".
    """

    def __init__(self, manifest_or_records, cache: EncoderCache, *, base_dir=None):
        self.records = _records_of(manifest_or_records, base_dir)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.records)

    @property
    def durations(self) -> list[float]:
        """Seconds per item for the duration-bucketing sampler: the manifest's duration,
        else the cached frames / frame rate, else 0 (the item is skipped anyway)."""
        out = []
        for record in self.records:
            if record.get("duration") is not None:
                out.append(float(record["duration"]))
                continue
            try:
                frames = self.cache.frames(record)
            except AudioError:
                frames = None
            out.append(0.0 if frames is None else frames / self.cache.frame_rate)
        return out

    def __getitem__(self, index: int) -> dict | SkippedItem:
        record = self.records[index]
        path = record[AUDIO_PATH_KEY]
        try:
            key = audio_key(record)
        except AudioError as e:
            return _skipped(index, record, e)
        if key not in self.cache:
            return SkippedItem(index=index, id=record.get("id"), audio=path, reason=NOT_CACHED,
                               detail=f"key {key[:16]}; fill the cache with these records "
                                      "(edited audio gets a new key)")
        hidden = self.cache.get(key)
        item = {k: v for k, v in record.items() if k not in ("audio", AUDIO_PATH_KEY)}
        item["audio_path"] = path
        item["encoder_hidden"] = hidden
        item["encoder_frames"] = int(hidden.shape[0])
        return item


# Item keys that get dedicated batch entries (AudioCollator's naming: ids, texts).
_SPECIAL_KEYS = ("id", "text", "encoder_hidden", "encoder_frames")


def collate_encoder_batch(items: Sequence[dict | SkippedItem]) -> dict:
    """Pad cached-encoder items into a batch, following `AudioCollator`'s conventions.

    `encoder_hidden` float32 [B, Fmax, D] (zero after each item's frames),
    `encoder_lengths` int64 [B], `ids` and `texts` lists, one list per other
    item field under its own name (None where an item lacks it, e.g.
    `continuation`), and `skipped`: dicts of the SkippedItems, which are left
    out of the tensors (B may be 0).
    """
    skipped = [item.to_dict() for item in items if isinstance(item, SkippedItem)]
    kept = [item for item in items if not isinstance(item, SkippedItem)]
    lengths = [int(item["encoder_hidden"].shape[0]) for item in kept]
    dim = int(kept[0]["encoder_hidden"].shape[1]) if kept else 0
    hidden = torch.zeros((len(kept), max(lengths, default=0), dim), dtype=torch.float32)
    for row, (item, length) in enumerate(zip(kept, lengths, strict=True)):
        hidden[row, :length] = item["encoder_hidden"]
    batch = {
        "ids": [item.get("id") for item in kept],
        "encoder_hidden": hidden,
        "encoder_lengths": torch.tensor(lengths, dtype=torch.long),
        "texts": [item.get("text") for item in kept],
    }
    return add_item_fields(batch, kept, skipped, _SPECIAL_KEYS)
