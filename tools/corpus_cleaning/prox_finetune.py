#!/usr/bin/env python
"""Fine-tune a local instruct LLM (LoRA) into ProX's program writer on the rules' programs.

    python tools/corpus_cleaning/prox_finetune.py DOCS_DIR... --out DIR
        [--held-out 60 --held-out-seed 0] [--passages 800] [--steps 200]

ProX (arXiv 2409.17115) fine-tunes its refiner on programs a larger model wrote; here the
programs are the rules writer's. Training passages are drawn the way prox_agreement.py
draws its passages (the same chunking), but only from files that none of the held-out
passages come from (the first `--held-out` of prox_agreement.py's draw with
`--held-out-seed`), so `prox_agreement.py DOCS_DIR... --passages 60 --llm DIR/final`
scores the fine-tuned writer on documents of files it never saw. The prompt is exactly the
one `LlmProgramWriter` shows (system, the three examples, the numbered passage) and the
target is the rules' program, so DIR/final is a drop-in `--llm` / clean-text `refine.llm`.
The run is the shared Trainer's: resumable, metrics in DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # prox_agreement's draw


def training_passages(dirs, held_out: int, held_out_seed: int, n: int, chunk_lines: int):
    """(training passages, held-out files): passages of files outside the held-out draw."""
    from prox_agreement import passages

    held = passages(dirs, held_out, chunk_lines, held_out_seed)
    excluded = {p["file"] for p in held}
    pool = [p for p in passages(dirs, 10 ** 9, chunk_lines, held_out_seed + 1)
            if p["file"] not in excluded]
    return pool[:n], excluded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--llm", default="models:smollm2-135m-instruct")
    ap.add_argument("--held-out", type=int, default=60)
    ap.add_argument("--held-out-seed", type=int, default=0)
    ap.add_argument("--passages", type=int, default=800)
    ap.add_argument("--chunk-lines", type=int, default=24)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from prox_agreement import decision

    from speechlm.corpus.prox import number_lines, parse_program, rules_program
    from speechlm.corpus.prox_llm import LlmProgramWriter, chunk_ranges
    from speechlm.data.sampler import DurationBucketSampler
    from speechlm.models.lora import LoraSettings, apply_llm_lora, merge_llm_lora
    from speechlm.training.objectives.causal_lm import (
        CausalLMCollator,
        CausalLMObjective,
        TokenDataset,
    )
    from speechlm.training.trainer import TrainConfig, Trainer, seed_everything

    out = Path(args.out)
    items, excluded = training_passages(args.dirs, args.held_out, args.held_out_seed,
                                        args.passages, args.chunk_lines)
    writer = LlmProgramWriter(args.llm, chunk_lines=args.chunk_lines)
    writer._load()
    tokenizer, llm = writer.tokenizer, writer._model
    examples, decisions = [], Counter()
    for item in items:
        text = item["text"]
        # a passage is one chunk (chunk_lines non-blank lines), as in prox_agreement.py
        assert chunk_ranges(text, args.chunk_lines) == [(0, len(text.split("\n")))]
        program = rules_program(text)
        prompt = writer.prompt_ids(number_lines(text, 0, None, writer.max_line_chars))
        response = list(tokenizer(program + tokenizer.eos_token,
                                  add_special_tokens=False)["input_ids"])
        examples.append({"input_ids": prompt + response,
                         "labels": [-100] * len(prompt) + response, "task": "prox"})
        decisions[decision(parse_program(program, len(text.split("\n"))))] += 1
    random.Random(args.seed).shuffle(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    print(f"{len(examples)} training programs from {len(items)} passages (files outside the "
          f"{len(excluded)} held-out files); rules' decisions {dict(decisions)}; "
          f"{min(lengths)}-{max(lengths)} tokens", flush=True)

    seed_everything(args.seed)
    model = apply_llm_lora(llm.train(), LoraSettings(
        r=args.lora_r, alpha=2.0 * args.lora_r, dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    dataset = TokenDataset(examples)
    sampler = DurationBucketSampler(dataset.lengths(), max_batch_duration=args.batch_tokens,
                                    num_buckets=8, shuffle=True, seed=args.seed)
    config = TrainConfig(max_steps=args.steps, lr=args.lr, schedule="cosine",
                         warmup_steps=max(1, min(20, args.steps // 5)), weight_decay=0.0,
                         precision="bf16", log_every=10, save_every=50, eval_every=None,
                         output_dir=str(out), seed=args.seed)
    trainer = Trainer(config, CausalLMObjective(model), dataset, sampler,
                      collate_fn=CausalLMCollator(writer.pad_id))
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    final = out / "final"
    merged = merge_llm_lora(model)
    merged.save_pretrained(final)
    tokenizer.save_pretrained(final)
    summary = {"programs": len(examples), "passages": len(items), "decisions": dict(decisions),
               "steps": result.step, "train_seconds": round(seconds, 1),
               "final_train_loss": result.train_metrics.get("loss"),
               "held_out_files_excluded": len(excluded)}
    (out / "prox_finetune.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), f"\nsaved {final}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
