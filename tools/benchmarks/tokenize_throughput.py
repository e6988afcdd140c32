"""Benchmark: `build_tokenize` throughput, batched (120 s of padded audio per batch, shortest
first) vs one file at a time.

A speech tokenizer of the tiny recipe's size (Whisper-style encoder d_model 128, VQ after
layer 2 of 4, 512 codes; random weights: speed does not depend on training) tokenizes eSpeak
utterances of verses (1-9 s). Baseline: the same job with a batch budget below one
utterance, so every batch holds one file; ours: the default budget. Each run writes a fresh
unit file; runs alternate and the median of 3 is reported. Reported: audio seconds
tokenized per second of wall time; ratio = batched / one at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

TINY = {"d_model": 128, "encoder_layers": 4, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 512, "num_mel_bins": 80, "max_source_positions": 1500,
        "decoder_layers": 1, "decoder_attention_heads": 4, "decoder_ffn_dim": 128}


def _setup(root: str, n: int) -> tuple[str, str]:
    import torch

    from speechlm.data.text_corpus import load_verses
    from speechlm.models.ctc import CharVocab
    from speechlm.models.speech_tokenizer import (
        SpeechTokenizer,
        TokenizerSettings,
        save_speech_tokenizer,
    )
    from speechlm.pipelines.synth import synthesize_corpus

    torch.manual_seed(0)
    tok = SpeechTokenizer.build("scratch", CharVocab(list("abcdefghijklmnopqrstuvwxyz'")),
                                TokenizerSettings(vq_layer=2, num_codes=512),
                                scratch_config=TINY)
    tok_dir = save_speech_tokenizer(tok.eval(), os.path.join(root, "tok"))
    verses = [v.en for v in load_verses()[:n]]
    items = [{"id": f"v{i}", "text": text, "voice": ("en-us+m1", "en-us+f3")[i % 2],
              "lang": "en"} for i, text in enumerate(verses)]
    synthesize_corpus(items, os.path.join(root, "speech"), rate=175, progress=False)
    return str(tok_dir), os.path.join(root, "speech", "manifest.jsonl")


def _timed(tok_dir: str, manifest: str, batch_duration: float, root: str) -> tuple[float, float]:
    from speechlm.pipelines.tokenize import build_tokenize

    out = tempfile.mkdtemp(dir=root)
    start = time.perf_counter()
    summary = build_tokenize(tok_dir, manifest, os.path.join(out, "units.jsonl"),
                             batch_duration=batch_duration, device="cpu", rank=0, world_size=1,
                             say=lambda message: None)
    wall = time.perf_counter() - start
    shutil.rmtree(out)
    return wall, summary.audio_seconds


def run(quick: bool = False) -> list[dict]:
    n = 40 if quick else 200
    repeats = 1 if quick else 3
    root = tempfile.mkdtemp(prefix="speechlm-bench-tokenize-")
    try:
        tok_dir, manifest = _setup(root, n)
        _timed(tok_dir, manifest, 120.0, root)  # warm up: imports, kernels
        runs: dict[str, list] = {"one": [], "batched": []}
        for _ in range(repeats):
            runs["one"].append(_timed(tok_dir, manifest, 0.1, root))
            runs["batched"].append(_timed(tok_dir, manifest, 120.0, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    (w1, a1), (w2, _) = (sorted(runs[k])[len(runs[k]) // 2] for k in ("one", "batched"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (f"{n} eSpeak utterances ({a1:.0f} s of audio), tiny-recipe-size tokenizer, "
            f"120 s batches vs one file per batch, {os.cpu_count()} CPUs (load average "
            f"{load:.1f})")
    return [{"benchmark": "tokenize_throughput", "metric": "audio_s_per_s", "value": a1 / w2,
             "baseline": a1 / w1, "ratio": w1 / w2, "note": note}]


if __name__ == "__main__":
    import json

    for row in run():
        print(json.dumps(row))
