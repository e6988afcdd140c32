"""Benchmark: CTC training throughput with duration-bucketed vs random batches.

One small wav2vec2 CTC model trains on batches from `DurationBucketSampler`
and from `RandomBatchSampler`, in two settings: the same number of utterances
per batch (the issue's comparison: a random batch is padded to its longest
member), and the same padded-duration budget (len(batch) x longest <= budget:
random batches also fit fewer utterances). The metric is audio-seconds of real
(unpadded) speech trained on per second of wall time, forward + backward +
optimizer step + data loading included. Steps of the two samplers alternate in small blocks so that load
from other processes affects both alike.

Data: the embedded English corpus train split when it has been built, else a
synthetic manifest of noise clips with lognormal durations (1-12 s) written
to a temporary directory.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# A small wav2vec2 (50 frames/s): the sampler's effect, not the model, is measured.
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             conv_dim=(32, 64, 64, 64), conv_kernel=(10, 8, 4, 4), conv_stride=(5, 4, 4, 4),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
TEXT = "the quick brown fox jumps over the lazy dog"


def _synthetic_manifest(root: Path, n: int = 300, seed: int = 0) -> Path:
    import soundfile as sf

    from speechlm.jsonl import write_jsonl

    rng = np.random.default_rng(seed)
    durations = np.clip(rng.lognormal(np.log(4.0), 0.5, n), 1.0, 12.0)
    records = []
    for i, duration in enumerate(durations):
        samples = int(duration * 16000)
        sf.write(root / f"{i}.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000)
        words = TEXT.split()[: max(2, int(duration * 2))]
        records.append({"id": f"s{i}", "audio": f"{i}.wav", "duration": round(samples / 16000, 4),
                        "text": " ".join(words)})
    write_jsonl(root / "manifest.jsonl", records)
    return root / "manifest.jsonl"


def _manifest(tmp: Path) -> tuple[Path, str]:
    from speechlm.pipelines.embedded_corpus import embedded_manifest_path

    path = embedded_manifest_path("train", "en")
    if path is not None and path.exists():
        return path, "embedded English train split"
    return _synthetic_manifest(tmp), "synthetic noise clips (embedded corpus not built)"


def run(quick: bool = False, budget: float = 100.0, batch_size: int = 16) -> list[dict]:
    import torch

    from speechlm.data.dataset import AudioDataset
    from speechlm.data.sampler import DurationBucketSampler, RandomBatchSampler, padding_fraction
    from speechlm.models.ctc import build_char_vocab, frames_for_samples, load_ctc_model
    from speechlm.training.objectives.ctc import CTCCollator, CTCObjective, prepare_ctc_records

    with tempfile.TemporaryDirectory() as tmp:
        manifest, source = _manifest(Path(tmp))
        vocab = build_char_vocab([manifest], "en")
        torch.manual_seed(0)
        model = load_ctc_model("scratch", vocab, scratch_config=MODEL,
                               overrides=dict(hidden_dropout=0.0, attention_dropout=0.0,
                                              activation_dropout=0.0, final_dropout=0.0))
        records, _ = prepare_ctc_records(
            manifest, vocab, lang="en", max_duration=budget,
            frames_for_duration=lambda s: frames_for_samples(model.config, int(s * 16000)))
        dataset = AudioDataset(records, silence_dbfs=None)
        durations = dataset.durations
        objective, collate = CTCObjective(model, vocab), CTCCollator()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step(indices) -> tuple[float, float]:
            start = time.perf_counter()
            batch = collate([dataset[i] for i in indices])
            loss, _ = objective.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start, float(batch["audio_lengths"].sum()) / 16000

        steps = 4 if quick else 16
        params = sum(p.numel() for p in model.parameters()) / 1e6
        # The comparison: the same number of utterances per batch, so random batches
        # pad each to its longest member. Then the same padded-duration budget, where random
        # batches also fit fewer utterances (a stricter baseline; bounded by 1 / (1 - padding)).
        longest = max(durations)
        settings = [
            ("train_audio_s_per_s_same_batch_size",
             f"{batch_size} utterances per batch",
             DurationBucketSampler(durations, max_batch_duration=batch_size * longest,
                                   max_batch_size=batch_size, seed=0),
             RandomBatchSampler(durations, max_batch_size=batch_size, seed=0)),
            ("train_audio_s_per_s_same_budget",
             f"{budget:g} s padded audio per batch (fairseq's XLSR fine-tuning uses ~200 s)",
             DurationBucketSampler(durations, max_batch_duration=budget, seed=0),
             RandomBatchSampler(durations, max_batch_duration=budget, seed=0)),
        ]
        rows = []
        for metric, setting, bucketed, random_ in settings:
            throughput, padding = _alternate(step, {"bucket": list(bucketed),
                                                    "random": list(random_)}, steps, durations,
                                             padding_fraction)
            ratio = throughput["bucket"] / throughput["random"]
            verdict = "meets" if ratio >= 1.5 else "MISSES"
            rows.append({
                "benchmark": "ctc_bucketing", "metric": metric, "value": throughput["bucket"],
                "baseline": throughput["random"], "ratio": ratio,
                "note": f"{source}; tiny wav2vec2 CTC ({params:.1f}M params), {setting}, "
                        f"{steps} steps each; padding {padding['bucket']:.0%} bucketed vs "
                        f"{padding['random']:.0%} random; {verdict} the >= 1.5x target; "
                        "baseline = RandomBatchSampler"})
    return rows


def _alternate(step, batches: dict, steps: int, durations, padding_fraction, block: int = 2):
    """Throughput (speech seconds per wall second) and padding of each sampler's batches,
    their steps alternating in blocks so that load from other processes hits both alike."""
    for name in batches:  # warm-up (allocator, oneDNN kernels)
        step(batches[name][0])
    seconds = {name: 0.0 for name in batches}
    audio = {name: 0.0 for name in batches}
    used = {name: [] for name in batches}
    for first in range(1, steps + 1, block):
        for name in batches:
            for i in range(first, min(first + block, steps + 1)):
                indices = batches[name][i % len(batches[name])]
                spent, speech = step(indices)
                seconds[name] += spent
                audio[name] += speech
                used[name].append(indices)
    throughput = {name: audio[name] / seconds[name] for name in batches}
    return throughput, {name: padding_fraction(used[name], durations) for name in batches}


if __name__ == "__main__":
    import json

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
