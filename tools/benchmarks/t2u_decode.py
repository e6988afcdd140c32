"""Benchmark: text-to-token decoding, MaskGIT (parallel) vs autoregressive, at equal quality.

Two text-to-token models (`speechlm.models.text_to_token`) are trained in this process with
the same seed, sizes and updates on synthetic (text, units) pairs: every character maps to one
to three fixed unit ids (64 codes), so a sentence of 4-9 words gives 20-120 units, the length
of 2-10 s of speech at 12.5 units/s. Quick: d_model 64, 200 updates; full: d_model 128, 500
updates (about 5 minutes on 2 busy cores). Then, on 128 held-out texts:

- AR: greedy decoding, batched, with a KV cache (one decoder pass per unit);
- MaskGIT: the fewest iterations among 2, 4, 8, 12, 16, 24, 32 whose unit error rate is
  no worse than AR's + 0.01 ("equal quality"; the best one when none is, said in the note);
  one pass over all slots per iteration.

The mapping is a function of the text, so with enough updates both decoders learn it almost
exactly (full run: UER about 0 for both, MaskGIT matching AR at 2 steps); the quick run stops
earlier, where the two differ. Real units also carry what the text does not say (speaker,
prosody), where MaskGIT needs more of its iterations; the step search above still applies.

Reported: units generated per second with batches of 64 texts and with one text at a time
(ratio = MaskGIT / AR; > 1: MaskGIT faster), and the unit error rate of both (baseline = AR).
Threads: one intra-op thread (`threads=`, or SPEECHLM_BENCH_THREADS), so a busy machine does
not turn the ratio into noise.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

NUM_CODES = 64
CANDIDATE_STEPS = (2, 4, 8, 12, 16, 24, 32)
LETTERS = "abcdefghijklmnopqrstuvwxyz "


def _unit_count(char: str) -> int:
    return 3 if char in "aeo" else 2 if char in "iulmnr" else 1


def synthetic_pairs(n: int, seed: int) -> list[tuple[str, list[int]]]:
    """Texts of 4-9 random words; each character -> its fixed 1-3 unit ids."""
    rng = random.Random(0)
    unit_map = {c: [rng.randrange(NUM_CODES) for _ in range(_unit_count(c))] for c in LETTERS}
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = ["".join(rng.choice(LETTERS[:-1]) for _ in range(rng.randint(2, 7)))
                 for _ in range(rng.randint(4, 9))]
        text = " ".join(words)
        pairs.append((text, [u for c in text for u in unit_map[c]]))
    return pairs


def train(decoder: str, pairs, steps: int, *, d_model: int, layers: int, batch: int = 32):
    import torch

    from speechlm.models.text_to_token import (
        TextToToken,
        TextToTokenConfig,
        build_vocab,
        collate_pairs,
    )

    vocab = build_vocab(t for t, _ in pairs)
    torch.manual_seed(0)
    config = TextToTokenConfig(decoder=decoder, d_model=d_model, num_heads=4,
                               encoder_layers=layers, decoder_layers=layers,
                               ff_dim=4 * d_model, dropout=0.0)
    model = TextToToken(config, vocab, num_codes=NUM_CODES, tokenizer_identity="synthetic",
                        max_units_per_char=4.0)
    items = [{"text_ids": vocab.encode(t)[0], "units": u} for t, u in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps,
                                                   pct_start=0.1)
    rng = random.Random(0)
    for _ in range(steps):
        loss, _ = model.loss(collate_pairs(rng.sample(items, batch)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def timed(model, texts, refs, method: str, batch_size: int, steps: int = 16):
    from speechlm.recipes.text_to_token import unit_error_rate

    model.generate(texts[:batch_size], method=method, steps=steps, batch_size=batch_size)  # warm
    start = time.perf_counter()
    hyps = model.generate(texts, method=method, steps=steps, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return sum(len(h) for h in hyps) / seconds, unit_error_rate(refs, hyps)


def run(quick: bool = False, threads: int | None = None) -> list[dict]:
    import torch

    threads = threads or int(os.environ.get("SPEECHLM_BENCH_THREADS", "1"))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, threads)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, threads: int) -> list[dict]:
    from speechlm.recipes.text_to_token import unit_error_rate

    train_pairs = synthetic_pairs(2000, seed=1)
    test = synthetic_pairs(32 if quick else 128, seed=2)
    texts, refs = [t for t, _ in test], [u for _, u in test]
    steps = 200 if quick else 500
    size = dict(d_model=64, layers=2) if quick else dict(d_model=128, layers=2)
    start = time.perf_counter()
    ar = train("ar", train_pairs, steps, **size)
    maskgit = train("maskgit", train_pairs, steps, **size)
    train_seconds = time.perf_counter() - start

    ar_speed, ar_uer = timed(ar, texts, refs, "ar", 64)
    uers = {}
    for iterations in CANDIDATE_STEPS:
        uers[iterations] = unit_error_rate(refs, maskgit.generate(texts, steps=iterations))
        if uers[iterations] <= ar_uer + 0.01:
            break
    matched = uers[iterations] <= ar_uer + 0.01
    chosen = iterations if matched else min(uers, key=uers.get)
    mg_speed, mg_uer = timed(maskgit, texts, refs, "maskgit", 64, chosen)
    ar_single, _ = timed(ar, texts[:16], refs[:16], "ar", 1)
    mg_single, _ = timed(maskgit, texts[:16], refs[:16], "maskgit", 1, chosen)

    units = sum(len(r) for r in refs) / len(refs)
    common = (f"d_model {size['d_model']}, {size['layers']}+{size['layers']} layers, {steps} "
              f"updates each ({train_seconds:.0f} s); {len(texts)} held-out texts of "
              f"{units:.0f} units on average; {threads} thread(s)")
    quality = (f"MaskGIT {chosen} steps: UER {mg_uer:.3f} vs AR {ar_uer:.3f}"
               + ("" if matched else f" (no step count up to {CANDIDATE_STEPS[-1]} matched AR)"))
    return [
        {"benchmark": "t2u_decode", "metric": "units_per_s_batch64", "value": mg_speed,
         "baseline": ar_speed, "ratio": mg_speed / ar_speed,
         "note": f"{quality}; AR greedy with KV cache; {common}"},
        {"benchmark": "t2u_decode", "metric": "units_per_s_batch1", "value": mg_single,
         "baseline": ar_single, "ratio": mg_single / ar_single,
         "note": f"one text at a time (16 texts); {quality}"},
        {"benchmark": "t2u_decode", "metric": "unit_error_rate", "value": mg_uer,
         "baseline": ar_uer, "ratio": mg_uer / ar_uer if ar_uer else None,
         "note": f"MaskGIT at {chosen} steps vs AR greedy (lower is better)"},
    ]


if __name__ == "__main__":
    import json

    for row in run(quick="--quick" in sys.argv):
        print(json.dumps(row))
