"""SLTrain and SPDF (model.sparse_lowrank) against the dense text LM, at equal updates.

    python -m tools.benchmarks.sparse_lowrank memory          # one update per arm
    python -m tools.benchmarks.sparse_lowrank train --steps 300 --seed 0

`memory`: the zoo text LM's model (recipes/tiny/llm_en_es.yaml: width 128, 4 layers, vocab
4096) on 16 sequences of 128 tokens, each arm in a fresh process on one thread. It reports
trainable parameters; the bytes autograd saves for backward (saved_tensors_hooks, each
storage counted once); the bytes of parameters + gradients + AdamW state; the process's peak
resident memory during one update (forward, backward, AdamW step) above its resident memory
before it (Linux VmHWM after resetting it through /proc/self/clear_refs); and the median CPU
time of an update over 5 (time.process_time).

`train`: the recipe itself, shortened: `--steps` updates with the copy-only warm-up phase
removed, dev loss (teacher-forced, every task of the mixture, 32 dev verses each) at the
end, generation scoring cut to 5 items per task (not reported). Same seed, data and batches
in every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ARMS = {
    "dense": None,
    "sltrain": {"kind": "sltrain", "rank": 32, "alpha": 32.0, "density": 0.03},
    "spdf": {"kind": "spdf", "sparsity": 0.75},
}
RECIPE = "recipes/tiny/llm_en_es.yaml"


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_arm(arm: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechlm.config import load_config
    from speechlm.models.sparse_lowrank import SparseLowRankConfig, apply_sparse_lowrank
    from speechlm.recipes.text_lm import Config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    fields = load_config(Config, RECIPE).model.config
    model = LlamaForCausalLM(LlamaConfig(**fields, vocab_size=4096))
    model.set_attn_implementation("eager")
    if ARMS[arm] is not None:
        apply_sparse_lowrank(model, SparseLowRankConfig(**ARMS[arm]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(4, 4096, (16, 128), generator=torch.Generator().manual_seed(0))

    def update():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _vm("VmRSS")
        update()
        peak = _vm("VmHWM") - before
    except OSError:
        peak = None
    times = []
    for _ in range(5):
        start = time.process_time()
        update()
        times.append(time.process_time() - start)
    n = sum(p.numel() for p in params)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return {"arm": arm, "trainable": n, "saved_for_backward_mb": sum(saved.values()) / 2**20,
            "params_grads_adam_mb": (2 * 4 * n + state) / 2**20,
            "update_peak_rss_mb": None if peak is None else peak / 2**20,
            "cpu_s_per_update": statistics.median(times)}


def train_arm(arm: str, steps: int, seed: int, out_root: str) -> dict:
    from speechlm.recipes import run_recipe

    overrides = [f"train.max_steps={steps}", f"train.eval_every={steps}",
                 f"train.save_every={steps}", f"train.seed={seed}", "threads=1",
                 "train.progress=false", "train.tensorboard=false",
                 "data.warmup.steps=0", "data.warmup.mixture={}",
                 "eval.max_items=5", "eval.paraphrases=false", "eval.examples=0",
                 f"train.output_dir={out_root}/{arm}-s{seed}"]
    if ARMS[arm] is not None:
        overrides.append("model.sparse_lowrank=" + json.dumps(ARMS[arm]))
    started = time.time()
    results = run_recipe(RECIPE, overrides)
    dev = results["train"]["dev"]
    return {"arm": arm, "seed": seed, "steps": results["train"]["steps"],
            "dev_loss": dev["loss"], "final_train_loss": results["train"]["final_train_loss"],
            "trainable": results["model"].get("sparse_lowrank", {}).get(
                "trainable", results["model"]["parameters"]),
            "train_seconds": results["train"]["train_seconds"],
            "wall_seconds": time.time() - started}


def _memory_in_fresh_process(arm: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tools.benchmarks.sparse_lowrank", "_memory_arm",
                          "--arm", arm], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """tools/bench.py's rows: the `memory` numbers of each arm against the dense one."""
    arms = {arm: _memory_in_fresh_process(arm) for arm in ARMS}
    rows = []
    for arm in ("sltrain", "spdf"):
        for key, metric in (("trainable", "trainable parameters"),
                            ("update_peak_rss_mb", "peak RSS of an update above before, MB"),
                            ("cpu_s_per_update", "CPU s / update")):
            value, base = arms[arm][key], arms["dense"][key]
            rows.append({"benchmark": f"text LM, {arm}", "metric": metric, "value": value,
                         "baseline": base, "ratio": None if not base or value is None
                         else value / base,
                         "note": "zoo text LM 1.4M, 16x128 tokens; one process per arm"})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["memory", "train", "_memory_arm"])
    parser.add_argument("--arm", choices=list(ARMS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/sparse_lowrank")
    args = parser.parse_args(argv)
    if args.what == "_memory_arm":
        print(json.dumps(memory_arm(args.arm)))
    elif args.what == "memory":
        for arm in args.arms:  # a fresh process each: the peak is this arm's alone
            print(json.dumps(_memory_in_fresh_process(arm)), flush=True)
    else:
        for arm in args.arms:
            print(json.dumps(train_arm(arm, args.steps, args.seed, args.out)), flush=True)


if __name__ == "__main__":
    main()
