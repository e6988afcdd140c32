"""Encoder cache: cached frames equal the encoder's own, reuse, invalidation by audio edits
and by encoder identity, a killed fill resumed, bad audio skipped, rank shards, the dataset."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from speechlm.audio.io import load_audio
from speechlm.data.collate import SkippedItem
from speechlm.errors import ConfigError, SpeechLMError
from speechlm.jsonl import read_jsonl, write_jsonl
from speechlm.models.encoders import EncoderOutput, config_sha256, load_encoder
from speechlm.pipelines.encoder_cache import (
    CachedEncoderDataset,
    EncoderCache,
    audio_key,
    collate_encoder_batch,
    encoder_identity,
    identity_digest,
)

SR = 16000
DURATIONS = (0.5, 1.3, 0.8, 2.0, 1.1)
F16 = dict(atol=3e-3, rtol=3e-3)  # float16 storage


class _Encoders(dict):
    """name -> (encoder, model_dir), built on first use; "wav2vec2" takes an attention mask,
    "hubert" does not, "wav2vec2-seed1" has the config of "wav2vec2" and other weights."""

    def __init__(self, tiny_ckpt):
        super().__init__()
        self.tiny_ckpt = tiny_ckpt

    def __missing__(self, name):
        kind, _, seed = name.partition("-seed")
        model_dir = self.tiny_ckpt(kind, **({"seed": int(seed)} if seed else {}))
        self[name] = (load_encoder("auto", model_dir), model_dir)
        return self[name]


@pytest.fixture(scope="module")
def encoders(tiny_ckpt):
    return _Encoders(tiny_ckpt)


def _noise(seconds, seed):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture
def clips(tmp_path):
    """A manifest (relative audio paths) of five 0.5-2 s noise clips; returns its path."""
    (tmp_path / "wav").mkdir()
    records = []
    for i, seconds in enumerate(DURATIONS):
        sf.write(tmp_path / "wav" / f"u{i}.wav", _noise(seconds, i), SR)
        records.append({"id": f"u{i}", "audio": f"wav/u{i}.wav", "duration": seconds,
                        "text": f"text {i}", "continuation": f"more {i}"})
    write_jsonl(tmp_path / "train.jsonl", records)
    return tmp_path / "train.jsonl"


def _own_output(encoder, path):
    wave = load_audio(path)
    with torch.no_grad():
        out = encoder(wave[None], torch.tensor([wave.numel()]))
    return out.hidden[0, : int(out.lengths[0])], wave.numel()


def _check_all(cache, encoder, manifest, **tol):
    for i in range(len(DURATIONS)):
        path = manifest.parent / "wav" / f"u{i}.wav"
        expected, samples = _own_output(encoder, path)
        got = cache.get({"id": f"u{i}", "audio": str(path), "duration": DURATIONS[i]})
        assert got.dtype == torch.float32
        assert got.shape == (int(encoder.output_lengths([samples])[0]), encoder.output_dim)
        torch.testing.assert_close(got, expected, **(tol or F16))


def _absolute(manifest):
    return [{**r, "audio": str(manifest.parent / r["audio"])} for r in read_jsonl(manifest)]


def _index_keys(directory):
    return [line["key"] for p in sorted(directory.glob("index-r*.jsonl")) for line in read_jsonl(p)]


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_cached_frames_equal_the_encoders_own_and_are_reused(encoders, clips, tmp_path, kind):
    encoder, model_dir = encoders[kind]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    first = cache.fill(encoder, clips, max_batch_seconds=4.0)
    assert (first.built, first.reused, sum(first.skipped.values())) == (5, 0, 0)
    assert first.audio_s == pytest.approx(sum(DURATIONS), abs=1e-3)
    assert len(cache) == 5 and "built 5, reused 0" in first.summary()
    _check_all(cache, encoder, clips)
    frames = sum(cache.frames(r) for r in _absolute(clips))
    assert cache.nbytes == frames * encoder.output_dim * 2  # float16 rows, nothing else

    # A fresh reader of the same directory sees the same entries.
    again = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    assert again.directory == cache.directory and len(again) == 5
    second = again.fill(encoder, clips)
    assert (second.built, second.reused) == (0, 5)
    keys = _index_keys(cache.directory)
    assert len(keys) == len(set(keys)) == 5


def test_a_second_filler_waits_for_the_first_then_reuses_its_entries(encoders, clips, tmp_path,
                                                                     capfd):
    import fcntl
    import threading

    encoder, model_dir = encoders["wav2vec2"]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    cache.fill(encoder, clips)
    holder = open(cache.directory / "lock-r0", "a")  # another job holding rank 0
    fcntl.flock(holder, fcntl.LOCK_EX)
    threading.Timer(0.5, holder.close).start()
    again = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    summary = again.fill(encoder, clips)
    assert (summary.built, summary.reused) == (0, 5)
    assert "waiting for another process filling rank 0" in capfd.readouterr().err

def test_edited_audio_gets_a_new_key_and_only_it_is_recomputed(encoders, clips, tmp_path):
    encoder, model_dir = encoders["wav2vec2"]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    cache.fill(encoder, clips)
    path = clips.parent / "wav" / "u2.wav"
    record = {"id": "u2", "audio": str(path), "duration": DURATIONS[2]}
    old_key, old_frames = audio_key(record), cache.get(record)
    stat = path.stat()
    sf.write(path, _noise(DURATIONS[2], 99), SR)  # same size, other content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == stat.st_size and audio_key(record) != old_key
    assert record not in cache and old_key in cache  # the stale entry is never used
    dataset = CachedEncoderDataset(clips, cache)
    assert isinstance(dataset[2], SkippedItem) and dataset[2].reason == "not in encoder cache"

    summary = cache.fill(encoder, clips)
    assert (summary.built, summary.reused) == (1, 4)
    expected, _ = _own_output(encoder, path)
    torch.testing.assert_close(cache.get(record), expected, **F16)
    assert not torch.allclose(cache.get(record), old_frames, atol=1e-2)


def test_encoder_identity_separates_checkpoints_and_settings(encoders, tmp_path):
    encoder, model_dir = encoders["wav2vec2"]
    other, other_dir = encoders["wav2vec2-seed1"]
    ident = encoder_identity(encoder, model_dir)
    assert config_sha256(model_dir) == config_sha256(other_dir)  # same config ...
    assert identity_digest(encoder_identity(other, other_dir)) != identity_digest(ident)  # ...
    copy = shutil.copytree(model_dir, tmp_path / "copy")  # a copied checkpoint keeps its identity
    assert identity_digest(encoder_identity(load_encoder("auto", copy), copy)) \
        == identity_digest(ident)
    layer1 = load_encoder("auto", model_dir, layer=1)
    assert identity_digest(encoder_identity(layer1, model_dir)) != identity_digest(ident)
    with pytest.raises(ConfigError, match="layer 'weighted' .* cannot be cached"):
        encoder_identity(load_encoder("auto", model_dir, layer="weighted"), model_dir)

    root = tmp_path / "cache"
    mine = EncoderCache.for_encoder(root, encoder, model_dir)
    theirs = EncoderCache.for_encoder(root, other, other_dir)
    assert mine.directory.parent == theirs.directory.parent == mine.root == root
    assert mine.directory != theirs.directory
    assert mine.directory.name == identity_digest(ident)[:16]
    assert json.loads((mine.directory / "identity.json").read_text())["identity"]["weights"]

    # An identity dir named directly: fine for its own encoder, an error for another.
    assert EncoderCache.for_encoder(mine.directory, encoder, model_dir).directory == mine.directory
    short_mine, short_theirs = mine.digest[:16], theirs.digest[:16]
    with pytest.raises(SpeechLMError, match=rf"{mine.directory} is the encoder cache of encoder "
                                            rf"{short_mine} \(.*\), not of this encoder "
                                            rf"{short_theirs} \(.*\); point at the parent cache "
                                            rf"root {root}.* or delete {mine.directory}"):
        EncoderCache.for_encoder(mine.directory, other, other_dir)
    with pytest.raises(SpeechLMError, match="holds outputs of another encoder configuration"):
        mine.fill(layer1, [])


def test_killed_fill_loses_one_chunk_and_a_rerun_completes_it(encoders, clips, tmp_path,
                                                              monkeypatch):
    encoder, model_dir = encoders["wav2vec2"]
    reference = EncoderCache.for_encoder(tmp_path / "ref", encoder, model_dir)
    reference.fill(encoder, clips, max_batch_seconds=2.5)

    calls = []
    real_forward = encoder.forward

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_forward(*args, **kwargs)

    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    monkeypatch.setattr(encoder, "forward", dies_on_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        cache.fill(encoder, clips, max_batch_seconds=2.5)
    monkeypatch.undo()
    kept = len(EncoderCache(cache.directory))
    assert 0 < kept < 5  # the first chunk is on disk and indexed, the second is lost

    summary = cache.fill(encoder, clips, max_batch_seconds=2.5)
    assert (summary.built, summary.reused) == (5 - kept, kept)
    keys = _index_keys(cache.directory)
    assert len(keys) == len(set(keys)) == 5
    for record in _absolute(clips):
        torch.testing.assert_close(cache.get(record), reference.get(record), **F16)
    _check_all(EncoderCache(cache.directory), encoder, clips)


def test_torn_index_tail_and_unindexed_rows_are_dropped_then_refilled(encoders, clips, tmp_path):
    encoder, model_dir = encoders["hubert"]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    cache.fill(encoder, clips)
    expected_bytes = cache.nbytes
    # A kill after the last chunk's rows were written but before its index line was whole:
    index = cache.directory / "index-r0.jsonl"
    lines = index.read_text().splitlines(keepends=True)
    index.write_text("".join(lines[:-1]) + lines[-1][:25])  # torn last line
    (shard,) = cache.directory.glob("shard-r0-*.bin")
    with open(shard, "ab") as f:
        f.write(b"\x7f" * (encoder.output_dim * 3))  # a row and a half of garbage

    reader = EncoderCache(cache.directory)
    assert len(reader) == 4
    summary = reader.fill(encoder, clips)
    assert (summary.built, summary.reused) == (1, 4)
    assert reader.nbytes == expected_bytes  # the orphan rows were cut off before appending
    assert len(set(_index_keys(cache.directory))) == len(_index_keys(cache.directory)) == 5
    _check_all(EncoderCache(cache.directory), encoder, clips)


def test_bad_audio_is_skipped_and_counted(encoders, clips, tmp_path):
    encoder, model_dir = encoders["wav2vec2"]
    wav = clips.parent / "wav"
    sf.write(wav / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    sf.write(wav / "short.wav", _noise(0.01, 7), SR)  # 160 samples: no encoder frame
    (wav / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    records = read_jsonl(clips) + [{"id": "gone", "audio": "wav/gone.wav"},
                                   {"id": "silent", "audio": "wav/silent.wav"},
                                   {"id": "short", "audio": "wav/short.wav"},
                                   {"id": "corrupt", "audio": "wav/corrupt.wav"}]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    summary = cache.fill(encoder, records, base_dir=clips.parent)
    assert summary.built == 5
    assert dict(summary.skipped) == {"file not found": 1, "audio is silent": 1,
                                     "audio is shorter than the limit": 1,
                                     "unreadable or corrupt audio": 1}
    assert sorted(item["id"] for item in summary.skipped_items) == \
        ["corrupt", "gone", "short", "silent"]
    assert "skipped 4" in summary.summary()
    assert sorted(r["id"] for r in cache.missing(records, base_dir=clips.parent)) == \
        ["corrupt", "gone", "short", "silent"]
    again = cache.fill(encoder, records, base_dir=clips.parent)
    assert (again.built, again.reused, sum(again.skipped.values())) == (0, 5, 4)


def test_rank_shards_together_cover_every_record(encoders, clips, tmp_path):
    encoder, model_dir = encoders["wav2vec2"]
    root = tmp_path / "cache"
    r0 = EncoderCache.for_encoder(root, encoder, model_dir).fill(encoder, clips, rank=0,
                                                                  world_size=2)
    r1 = EncoderCache.for_encoder(root, encoder, model_dir).fill(encoder, clips, rank=1,
                                                                  world_size=2)
    assert (r0.built, r1.built) == (3, 2) and "rank 1 of 2" in r1.summary()
    directory = EncoderCache.for_encoder(root, encoder, model_dir).directory
    assert sorted(p.name for p in directory.iterdir() if p.suffix != "" and "lock" not in p.name) \
        == ["identity.json", "index-r0.jsonl", "index-r1.jsonl",
            "shard-r0-00000.bin", "shard-r1-00000.bin"]
    ids = {rank: [line["id"] for line in read_jsonl(directory / f"index-r{rank}.jsonl")]
           for rank in (0, 1)}
    assert sorted(ids[0]) == ["u0", "u2", "u4"] and sorted(ids[1]) == ["u1", "u3"]
    reader = EncoderCache(directory)
    assert len(reader) == 5 and reader.missing(clips) == []
    _check_all(reader, encoder, clips)
    with pytest.raises(ConfigError, match="give both rank and world_size"):
        reader.fill(encoder, clips, rank=1)
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size\)"):
        reader.fill(encoder, clips, rank=2, world_size=2)


def test_float16_overflow_asks_for_float32(encoders, clips, tmp_path, monkeypatch):
    encoder, model_dir = encoders["hubert"]
    real_forward = encoder.forward

    def loud(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return EncoderOutput(out.hidden * 1e6, out.lengths)

    monkeypatch.setattr(encoder, "forward", loud)
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    with pytest.raises(SpeechLMError, match=r"overflow float16 .*dtype='float32'"):
        cache.fill(encoder, clips)
    assert len(EncoderCache(cache.directory)) == 0
    with pytest.raises(SpeechLMError, match="stores float16, not float32"):
        EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir, dtype="float32")

    wide = EncoderCache.for_encoder(tmp_path / "cache32", encoder, model_dir, dtype="float32")
    assert wide.fill(encoder, clips).built == 5
    monkeypatch.undo()
    path = clips.parent / "wav" / "u3.wav"
    expected, _ = _own_output(encoder, path)
    got = wide.get({"id": "u3", "audio": str(path), "duration": DURATIONS[3]})
    torch.testing.assert_close(got, expected * 1e6, rtol=1e-5, atol=1e-2)


def test_dataset_and_collate_pad_frames_and_skip_uncached(encoders, clips, tmp_path):
    encoder, model_dir = encoders["wav2vec2"]
    cache = EncoderCache.for_encoder(tmp_path / "cache", encoder, model_dir)
    records = read_jsonl(clips)
    cache.fill(encoder, records[:4], base_dir=clips.parent)  # u4 is left out

    dataset = CachedEncoderDataset(clips, cache)
    assert len(dataset) == 5 and dataset.durations == list(DURATIONS)
    items = [dataset[i] for i in range(5)]
    assert isinstance(items[4], SkippedItem) and items[4].reason == "not in encoder cache"
    assert items[0]["encoder_frames"] == items[0]["encoder_hidden"].shape[0]
    assert items[0]["audio_path"] == str(clips.parent / "wav" / "u0.wav")

    batch = collate_encoder_batch(items)
    lengths = [int(encoder.output_lengths([int(d * SR)])[0]) for d in DURATIONS[:4]]
    assert batch["encoder_hidden"].shape == (4, max(lengths), encoder.output_dim)
    assert batch["encoder_hidden"].dtype == torch.float32
    assert batch["encoder_lengths"].tolist() == lengths
    assert batch["ids"] == ["u0", "u1", "u2", "u3"]
    assert batch["texts"] == [f"text {i}" for i in range(4)]
    assert batch["continuation"] == [f"more {i}" for i in range(4)]
    assert [s["id"] for s in batch["skipped"]] == ["u4"]
    for row, n in enumerate(lengths):
        torch.testing.assert_close(batch["encoder_hidden"][row, :n], items[row]["encoder_hidden"])
        assert not batch["encoder_hidden"][row, n:].any()

    # Durations fall back to the cached frames when the manifest has none.
    no_durations = [{k: v for k, v in r.items() if k != "duration"} for r in records]
    cache.fill(encoder, no_durations[:4], base_dir=clips.parent)
    fallback = CachedEncoderDataset(no_durations, cache, base_dir=clips.parent).durations
    assert fallback[:4] == [n / encoder.frame_rate for n in lengths] and fallback[4] == 0.0
