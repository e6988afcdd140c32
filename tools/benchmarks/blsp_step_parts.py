"""Benchmark: what each of the BLSP training step's speed-ups buys, on the real models.

One BLSP-KD update (student forward and backward, teacher forward; no optimizer
step) on the same 16-utterance batches of cached Whisper base outputs, SmolLM2-135M-
Instruct frozen, bf16 autocast, in four configurations that add one change each:

A. fp32 LLM weights, PyTorch's SDPA attention, every row runs its whole prompt
   (what the loop did before these changes);
B. + the prompt opening every row shares runs once per batch (shared_prefix);
C. + the frozen LLM stored in bf16 (no per-call weight casts);
D. + eager attention (what `SpeechLM.speed_up_frozen_llm` sets on a CPU).

The configurations run interleaved in rounds in one process, so load from other
processes hits all alike. Reported: seconds per update of each, and its speed-up
over A. Needs `speechlm models get whisper-base smollm2-135m-instruct` (offline).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

INSTRUCTION = ("Continue the following text in a coherent and engaging style with less "
               "than 40 words.")


def run(quick: bool = False) -> list[dict]:
    import torch

    from speechlm.data.dataset import AudioDataset
    from speechlm.data.sampler import DurationBucketSampler
    from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
    from speechlm.pipelines.encoder_cache import (
        CachedEncoderDataset,
        EncoderCache,
        collate_encoder_batch,
    )
    from speechlm.pretrained.resolve import resolve_model_dir
    from speechlm.training.objectives.blsp import BlspObjective
    from tools.benchmarks.blsp_training import _records

    rounds, n_batches = (2, 2) if quick else (3, 3)
    encoder_dir = str(resolve_model_dir("models:whisper-base"))
    config = SpeechLMConfig(encoder_path=encoder_dir,
                            llm_path=str(resolve_model_dir("models:smollm2-135m-instruct")),
                            adapter="stack", adapter_options={"stack_factor": 4},
                            template="chat", instruction=INSTRUCTION)
    torch.manual_seed(0)
    fp32 = SpeechLM.build(config).train()
    torch.manual_seed(0)
    bf16 = SpeechLM.build(config).train()
    bf16.llm.to(torch.bfloat16)
    records = _records(200)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EncoderCache.for_encoder(Path(tmp) / "cache", fp32.encoder, encoder_dir)
        cache.fill(fp32.encoder, records)
        dataset = CachedEncoderDataset(records, cache)
        sampler = DurationBucketSampler(AudioDataset(records).durations,
                                        max_batch_duration=10_000.0, max_batch_size=16, seed=0)
        batches = [collate_encoder_batch([dataset[i] for i in b]) for b in sampler
                   if len(b) == 16][:n_batches]

    def update(model, share_prefix, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = BlspObjective(model, loss="kd", share_prefix=share_prefix).loss(batch)
        model.zero_grad()
        loss.backward()

    arms = {"A: fp32 LLM weights, SDPA, whole prompt per row": (fp32, "sdpa", False),
            "B: + shared prompt opening": (fp32, "sdpa", True),
            "C: + frozen LLM in bf16": (bf16, "sdpa", True),
            "D: + eager attention": (bf16, "eager", True)}
    seconds = dict.fromkeys(arms, 0.0)
    for model, attention, share in arms.values():  # warm-up: first-call allocations
        model.llm.set_attn_implementation(attention)
        update(model, share, batches[0])
    for _ in range(rounds):
        for name, (model, attention, share) in arms.items():
            model.llm.set_attn_implementation(attention)
            start = time.perf_counter()
            for batch in batches:
                update(model, share, batch)
            seconds[name] += time.perf_counter() - start
    per_update = {name: s / (rounds * len(batches)) for name, s in seconds.items()}
    base = per_update[next(iter(arms))]
    note = (f"BLSP-KD update (T=2, teacher pass included), {len(batches)} batches of 16 "
            f"utterances x {rounds} rounds, bf16 autocast, {torch.get_num_threads()} threads")
    return [{"benchmark": "blsp_step_parts", "metric": f"s per update, {name}",
             "value": value, "baseline": base, "ratio": base / value, "note": note}
            for name, value in per_update.items()]


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
