#!/usr/bin/env python
"""MaskGIT iterations against quality and speed for a trained text-to-token model.

    python tools/t2u_steps_sweep.py [--model zoo:t2u_en] [--steps 1,2,4,8,12,16]
        [--tokenizer zoo:speech_tokenizer_en] [--batch-size 64] [--threads 1] [--json OUT]

Reads the model's held-out utterances from its run (`dev_hyps.jsonl` beside `final/`: text and
the units the tokenizer gave the audio), generates their units with the autoregressive decoder
(greedy, KV cache) and with MaskGIT at each iteration count, and reports for each: units per
second (batches of --batch-size), the unit error rate against the audio's units, and the round
trip: the speech tokenizer's ASR head reading the generated units back to text (CER / WER
against the text). The round trip is the quality that matters on real units, which also carry
the voice (the unit error rate of any decoder is near chance there). One intra-op thread by
default, so a busy machine does not turn the ratios into noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="zoo:t2u_en")
    parser.add_argument("--tokenizer", default="zoo:speech_tokenizer_en")
    parser.add_argument("--steps", default="1,2,4,8,12,16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from speechlm.jsonl import read_jsonl
    from speechlm.models.text_to_token import load_text_to_token
    from speechlm.pretrained.resolve import resolve_model_dir
    from speechlm.recipes.text_to_token import round_trip, unit_error_rate

    torch.set_num_threads(args.threads)
    final = resolve_model_dir(args.model, expect=None, progress=False)
    hyps_file = Path(final).parent / "dev_hyps.jsonl"
    if not hyps_file.is_file():
        raise SystemExit(f"{hyps_file}: not found; --model must be a text_to_token run's "
                         "final/ (its run directory keeps the held-out utterances there)")
    items = list(read_jsonl(hyps_file))
    texts, refs = [it["text"] for it in items], [it["reference"] for it in items]
    model = load_text_to_token(final)
    model.eval()

    def decode(method: str, steps: int | None):
        model.generate(texts[:args.batch_size], method=method, steps=steps,
                       batch_size=args.batch_size)  # warm-up
        start = time.perf_counter()
        out = model.generate(texts, method=method, steps=steps, batch_size=args.batch_size)
        return out, time.perf_counter() - start

    runs = {"ar": decode("ar", None)}
    for steps in (int(s) for s in args.steps.split(",")):
        runs[f"maskgit_{steps}"] = decode("maskgit", steps)
    trips = round_trip(args.tokenizer, texts, {"reference": refs,
                                               **{k: v[0] for k, v in runs.items()}})
    rows = []
    ar_speed = sum(len(h) for h in runs["ar"][0]) / runs["ar"][1]
    for name, (hyps, seconds) in runs.items():
        speed = sum(len(h) for h in hyps) / seconds
        rows.append({"decoder": name, "units_per_s": round(speed, 1),
                     "vs_ar": round(speed / ar_speed, 2),
                     "uer": round(unit_error_rate(refs, hyps), 4),
                     "round_trip_cer": round(trips[name]["cer"], 4),
                     "round_trip_wer": round(trips[name]["wer"], 4)})
    rows.append({"decoder": "reference units", "round_trip_cer": round(trips["reference"]["cer"], 4),
                 "round_trip_wer": round(trips["reference"]["wer"], 4)})
    print(f"{len(texts)} held-out utterances, batches of {args.batch_size}, "
          f"{args.threads} thread(s)")
    print("| decoder | units/s | vs AR | UER | round trip CER / WER |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoder']} | {r.get('units_per_s', '')} | {r.get('vs_ar', '')} | "
              f"{r.get('uer', '')} | {r['round_trip_cer']:.1%} / {r['round_trip_wer']:.1%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
