"""Benchmark: batched SpeechLM generation (16 utterances, one batch) vs one at a time.

Same model, same 16 clips, greedy decoding, asr task; the texts must be
identical (asserted). Reported: end-to-end throughput (utterances/s, encoder
included; ratio = batched / one-at-a-time), LLM generation throughput (tokens/s
over the LLM's prefill + decoding time only: the part batching speeds up;
issue target >= 4x on CPU), and the ASR real-time factor (wall seconds per
second of audio; ratio = one-at-a-time RTF / batched RTF, > 1 is better).
The encoder costs about the same either way on a CPU (clips are encoded in
groups of similar length, so batching adds little padding but saves little
compute), which bounds the end-to-end ratio below the LLM's.

Audio: 16 clips of about 2-10 s (evenly spread) spoken by eSpeak NG (en-us)
from the embedded Bible corpus, so durations and speech rate are realistic.

Model: `run(model_dir=DIR)` (or SPEECHLM_BENCH_SPEECH_LM=DIR) benchmarks a
saved SpeechLM checkpoint, e.g. a trained zoo model. Without one, a
SpeechLM with random weights is built and saved to a temporary directory,
then loaded back through `SpeechLMGenerator.from_pretrained`: a wav2vec2
encoder (4 layers, width 256, the real 320x conv stride), the BLSP adapter and
a Llama LLM (8 layers, width 512, 8 heads, ~30 M parameters; quick: 4 layers,
width 256). The tiny test checkpoints (width 64) would make each decoding
step pure Python overhead and flatter batching; this size gives per-token
matmuls that cost something on a CPU while keeping the run to about a
minute. An untrained adapter never emits EOS, so every row generates exactly
`max_new_tokens` (32; quick 12): batching wastes nothing on finished rows
here, while a trained model's rows end at different lengths (the batch runs to
its longest).

Threads: one intra-op thread by default (`threads=`, or SPEECHLM_BENCH_THREADS).
On a busy 2-core machine two threads spin against other processes: the same
one-at-a-time run measured 20-30x slower with 2 threads than with 1, which
would turn the ratio into noise.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

N_CLIPS = 16
WORDS_PER_SECOND = 3.3  # eSpeak NG en-us at its default rate, measured


def _texts(n: int) -> list[str]:
    """n texts whose spoken length spreads evenly over about 2-10 s."""
    from speechlm.data.text_corpus import load_verses

    words = " ".join(v.en for v in load_verses()[:400]).split()
    texts, pos = [], 0
    for i in range(n):
        target_s = 2.0 + 8.0 * i / max(n - 1, 1)
        count = max(3, round(target_s * WORDS_PER_SECOND))
        texts.append(" ".join(words[pos : pos + count]))
        pos += count
    return texts


def _clips(n: int):
    """(waves, texts): eSpeak NG speech at 16 kHz for n texts."""
    import torch

    from speechlm.tts import get_backend

    tts = get_backend("espeak:en-us", sample_rate=16000)
    texts = _texts(n)
    waves = [torch.from_numpy(tts.synthesize(t)).float() for t in texts]
    return waves, texts


def _random_model(out_dir: Path, quick: bool) -> Path:
    """Write base checkpoints and a saved SpeechLM with random weights; return its dir."""
    import torch

    from speechlm.models.speech_lm import SpeechLM, SpeechLMConfig
    from speechlm.testing.tiny_checkpoints import write_tiny_checkpoint

    width, layers = (256, 4) if quick else (512, 8)
    encoder = write_tiny_checkpoint(
        "wav2vec2", out_dir / "encoder", hidden_size=256, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=1024, conv_dim=(64,) * 7)
    llm = write_tiny_checkpoint(
        "llama", out_dir / "llm", hidden_size=width, intermediate_size=width * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = SpeechLM.build(SpeechLMConfig(encoder_path=str(encoder), llm_path=str(llm),
                                          adapter="blsp"))
    return model.save_pretrained(out_dir / "speech_lm")


def _timed(generator, requests):
    start = time.perf_counter()
    results = generator.generate(requests)
    return results, time.perf_counter() - start


def run(quick: bool = False, model_dir: str | os.PathLike | None = None,
        threads: int | None = None) -> list[dict]:
    import torch

    threads = threads or int(os.environ.get("SPEECHLM_BENCH_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, model_dir)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, model_dir) -> list[dict]:
    import torch

    from speechlm.inference.speech_lm import GenerationOptions, Request, SpeechLMGenerator

    model_dir = model_dir or os.environ.get("SPEECHLM_BENCH_SPEECH_LM")
    max_new_tokens = 12 if quick else 32
    waves, _ = _clips(N_CLIPS)
    audio_s = sum(w.numel() for w in waves) / 16000
    with tempfile.TemporaryDirectory() as tmp:
        source = "a saved checkpoint" if model_dir else "random weights"
        if not model_dir:
            model_dir = _random_model(Path(tmp), quick)
        options = GenerationOptions(max_new_tokens=max_new_tokens)
        batched_gen = SpeechLMGenerator.from_pretrained(model_dir, device="cpu", batch_size=16,
                                                        options=options)
        single_gen = SpeechLMGenerator(batched_gen.model, batch_size=1, options=options)
        params = sum(p.numel() for p in batched_gen.model.llm.parameters()) / 1e6
        requests = [Request(f"clip{i:02d}", w) for i, w in enumerate(waves)]
        single_gen.generate(requests[:1])  # warm-up: first-call allocations, lazy imports
        single, single_s = _timed(single_gen, requests)
        batched, batched_s = _timed(batched_gen, requests)

    texts = [r.text for r in batched]
    if texts != [r.text for r in single]:
        diff = sum(a != r.text for a, r in zip(texts, single, strict=True))
        raise AssertionError(f"batched and one-at-a-time outputs differ for {diff} of {N_CLIPS}")
    tokens = sum(r.n_tokens for r in batched)
    # LLM time only (prefill + decoding), without the encoder both runs pay alike
    llm_batched = sum(r.generate_s for r in batched)
    llm_single = sum(r.generate_s for r in single)
    enc_batched = sum(r.encode_s for r in batched)
    enc_single = sum(r.encode_s for r in single)
    note = (f"{N_CLIPS} eSpeak clips {min(w.numel() for w in waves) / 16000:.1f}-"
            f"{max(w.numel() for w in waves) / 16000:.1f} s ({audio_s:.0f} s), asr, greedy, "
            f"{max_new_tokens} new tokens, {source} (LLM {params:.0f} M params), CPU "
            f"{torch.get_num_threads()} threads; outputs identical")
    return [
        {"benchmark": "speech_lm_generation", "metric": "throughput_utt_per_s_batch16",
         "value": N_CLIPS / batched_s, "baseline": N_CLIPS / single_s,
         "ratio": single_s / batched_s, "note": note + "; baseline = one at a time"},
        {"benchmark": "speech_lm_generation", "metric": "llm_tokens_per_s_batch16",
         "value": tokens / llm_batched, "baseline": tokens / llm_single,
         "ratio": llm_single / llm_batched,
         "note": f"{tokens} generated tokens; LLM time only (prefill + decoding: "
                 f"{llm_batched:.1f} s vs {llm_single:.1f} s); encoder + adapter "
                 f"{enc_batched:.1f} s vs {enc_single:.1f} s"},
        {"benchmark": "speech_lm_generation", "metric": "asr_real_time_factor_batch16",
         "value": batched_s / audio_s, "baseline": single_s / audio_s,
         "ratio": single_s / batched_s,
         "note": "wall s per audio s (lower is faster); baseline = one at a time"},
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", help="a saved SpeechLM directory (default: random weights)")
    args = parser.parse_args()
    for row in run(quick=args.quick, model_dir=args.model):
        print(row)
