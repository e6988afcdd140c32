"""AudioDataset + AudioCollator + SkipReport: bad items skipped and counted, also with workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from speechlm.data.collate import AudioCollator, SkippedItem
from speechlm.data.dataset import AudioDataset, SkipReport
from speechlm.data.manifest import write_manifest
from speechlm.data.sampler import DurationBucketSampler, padded_duration
from speechlm.errors import AudioDecodeError, AudioMissingError, ManifestError

SR = 16000


def tone(seconds: float, freq: float = 200.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.25 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def ten_item_manifest(tmp_path):
    """10 utterances; item 3's file is corrupt and item 7's is missing."""
    wav = tmp_path / "wav"
    wav.mkdir()
    records = []
    for i in range(10):
        seconds = 0.2 + 0.05 * i
        if i == 3:
            (wav / "u3.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
        elif i != 7:
            sf.write(wav / f"u{i}.wav", tone(seconds, 100.0 + 10 * i), SR)
        records.append({"id": f"u{i}", "audio": f"wav/u{i}.wav", "text": f"text {i}",
                        "duration": seconds, "lang": "en" if i % 2 else "es", "units": [i, i + 1]})
    path = tmp_path / "m.jsonl"
    write_manifest(path, records)
    return path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_items_are_skipped_and_counted_in_main_process(ten_item_manifest, tmp_path,
                                                           num_workers):
    dataset = AudioDataset(ten_item_manifest)
    loader = DataLoader(dataset, batch_size=3, collate_fn=AudioCollator(),
                        num_workers=num_workers)
    report = SkipReport()
    seen = []
    for batch in loader:
        report.add(batch)
        seen.extend(batch["ids"])
        for row, item_id in enumerate(batch["ids"]):
            i = int(item_id[1:])
            length = int(batch["audio_lengths"][row])
            expected = tone(0.2 + 0.05 * i, 100.0 + 10 * i)
            assert length == len(expected)
            assert torch.allclose(batch["audio"][row, :length], torch.from_numpy(expected),
                                  atol=1e-4)
            assert batch["texts"][row] == f"text {i}" and batch["units"][row] == [i, i + 1]
    assert sorted(seen) == [f"u{i}" for i in range(10) if i not in (3, 7)]
    assert report.count == 2
    assert report.by_reason == {"unreadable or corrupt audio": 1, "file not found": 1}
    by_id = {item["id"]: item for item in report.items}
    assert by_id["u7"]["audio"] == str(tmp_path / "wav" / "u7.wav")
    assert by_id["u7"]["error"] == "AudioMissingError"
    assert by_id["u3"]["error"] == "AudioDecodeError"
    out = report.write(tmp_path / "skips.json")
    saved = json.loads(out.read_text())
    assert saved["count"] == 2 and {i["id"] for i in saved["items"]} == {"u3", "u7"}
    assert "skipped 2 item(s)" in report.summary()


def test_strict_mode_raises_the_audio_error(ten_item_manifest):
    dataset = AudioDataset(ten_item_manifest, strict=True)
    assert dataset[0]["id"] == "u0"
    with pytest.raises(AudioDecodeError, match="u3.wav"):
        dataset[3]
    with pytest.raises(AudioMissingError, match="u7.wav: file not found"):
        dataset[7]


def test_item_fields_offsets_and_duration_limits(tmp_path):
    wave = tone(2.0)
    sf.write(tmp_path / "long.wav", wave, SR)
    sf.write(tmp_path / "quiet.wav", np.zeros(SR, dtype=np.float32), SR)
    sf.write(tmp_path / "nan.wav", np.full(SR, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    sf.write(tmp_path / "hi.wav", tone(1.0, sr=8000), 8000)
    records = [
        {"id": "seg", "audio": "long.wav", "offset": 0.5, "duration": 1.0, "question": "q?",
         "extra": {"k": 1}},
        {"id": "silent", "audio": "quiet.wav"},
        {"id": "nan", "audio": "nan.wav"},
        # Stated duration out of range: rejected without opening the (missing) file.
        {"id": "too_long", "audio": "absent.wav", "duration": 30.0},
        {"id": "too_short", "audio": "long.wav", "duration": 0.05},
        {"id": "resampled", "audio": "hi.wav"},
    ]
    dataset = AudioDataset(records, base_dir=tmp_path, min_duration=0.1, max_duration=10.0)
    item = dataset[0]
    assert item["id"] == "seg" and item["question"] == "q?" and item["extra"] == {"k": 1}
    assert item["audio_path"] == str(tmp_path / "long.wav") and "audio" in item
    assert torch.allclose(item["audio"], torch.from_numpy(wave[8000:24000]), atol=1e-4)
    reasons = {dataset[i].id: dataset[i].reason for i in range(1, 5)}
    assert reasons == {"silent": "audio is silent", "nan": "audio contains NaN or Inf samples",
                       "too_long": "audio is longer than the limit",
                       "too_short": "audio is shorter than the limit"}
    assert dataset[5]["audio"].shape[0] == SR  # 1 s at 8 kHz resampled to 16 kHz
    with pytest.raises(ManifestError, match=r"record 1 \(id 'silent'\) has no duration"):
        _ = dataset.durations


def test_records_are_checked_on_construction(tmp_path):
    with pytest.raises(ManifestError, match=r"record 1 \(id 'b'\): audio: missing required field"):
        AudioDataset([{"id": "a", "audio": "a.wav"}, {"id": "b"}])


def test_collator_padding_mask_and_skipped():
    items = [
        {"id": "a", "audio": torch.ones(3), "text": "x", "lang": "en"},
        SkippedItem(index=1, id="b", audio="/b.wav", reason="file not found"),
        {"id": "c", "audio": torch.full((5,), 2.0), "units": [4]},
    ]
    batch = AudioCollator(pad_value=-1.0, pad_to_multiple_of=4)(items)
    assert batch["ids"] == ["a", "c"] and batch["texts"] == ["x", None]
    assert batch["audio"].tolist() == [[1, 1, 1, -1, -1, -1, -1, -1], [2, 2, 2, 2, 2, -1, -1, -1]]
    assert batch["audio_lengths"].tolist() == [3, 5]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["lang"] == ["en", None] and batch["units"] == [None, [4]]
    assert batch["skipped"] == [{"index": 1, "id": "b", "audio": "/b.wav",
                                 "reason": "file not found", "detail": "", "error": ""}]
    empty = AudioCollator()([SkippedItem(index=0, id="z", audio="/z.wav", reason="audio is silent")])
    assert empty["audio"].shape == (0, 0) and empty["ids"] == [] and len(empty["skipped"]) == 1


def test_dataset_with_bucket_sampler_in_dataloader(ten_item_manifest):
    dataset = AudioDataset(ten_item_manifest)
    sampler = DurationBucketSampler(dataset.durations, max_batch_duration=1.5, num_buckets=3)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=AudioCollator())
    report, ids = SkipReport(), []
    for batch in loader:
        report.add(batch)
        ids += batch["ids"]
        # Padded batch duration stays in budget (audio is at 16 kHz).
        assert batch["audio"].shape[0] * batch["audio"].shape[1] <= 1.5 * SR + 1
    assert len(ids) == 8 and report.count == 2
    assert all(padded_duration(b, dataset.durations) <= 1.5 for b in sampler)
