"""SLTrain and SPDF (model.sparse_lowrank) against the dense text LM, at equal updates.

    python -m tools.benchmarks.sparse_lowrank memory          # one update per arm
    python -m tools.benchmarks.sparse_lowrank train --steps 300 --seed 0
    python -m tools.benchmarks.sparse_lowrank train_t2u --steps 300 --seed 0
    python -m tools.benchmarks.sparse_lowrank train_blsp --steps 150 --arms dense sltrain spdf

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
in every arm. Arms `spdf_dense_q3` / `spdf_dense_h` drop SPDF's masks at 3/4 / 1/2 of the
run (its dense fine-tuning phase).

`train_t2u`, `train_blsp` and `train_tokenizer`: the same arms on the zoo's text-to-token
model, the main job's BLSP adapter and the zoo's speech tokenizer (see their docstrings);
SLTrain's rank is d/4 of each model's width.
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
    # SPDF's second half: the masks go at 3/4 (or 1/2) of the run, dense after
    "spdf_dense_q3": {"kind": "spdf", "sparsity": 0.75, "dense_after_steps": 0.75},
    "spdf_dense_h": {"kind": "spdf", "sparsity": 0.75, "dense_after_steps": 0.5},
}
MEMORY_ARMS = ("dense", "sltrain", "spdf")
RECIPE = "recipes/tiny/llm_en_es.yaml"
T2U_RECIPE = "recipes/tiny/text_to_token.yaml"
BLSP_RECIPE = "speechlm/resources/zoo/blsp_whisper_smollm2_kd.yaml"
TOKENIZER_RECIPE = "recipes/tiny/speech_tokenizer.yaml"


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


def _run_arm(recipe: str, arm: str, steps: int, seed: int, out: str, *, section: str,
             rank: int | None = None, extra: tuple[str, ...] = ()) -> tuple[dict, float]:
    """`recipe` for `steps` updates with `arm`'s config at `section` (the recipe's
    sparse_lowrank key); SLTrain's rank (and alpha) set to `rank`, SPDF's dense phase given
    as a fraction of the run. Returns (results, wall seconds)."""
    from speechlm.recipes import run_recipe

    overrides = [f"train.max_steps={steps}", f"train.eval_every={steps}",
                 f"train.save_every={steps}", f"train.seed={seed}", "train.progress=false",
                 "train.tensorboard=false", f"train.output_dir={out}", *extra]
    if ARMS[arm] is not None:
        arm_config = dict(ARMS[arm])
        if "rank" in arm_config and rank is not None:
            arm_config.update(rank=rank, alpha=float(rank))
        if "dense_after_steps" in arm_config:
            arm_config["dense_after_steps"] = round(arm_config["dense_after_steps"] * steps)
        overrides.append(f"{section}=" + json.dumps(arm_config))
    started = time.time()
    results = run_recipe(recipe, overrides)
    return results, time.time() - started


def train_arm(arm: str, steps: int, seed: int, out_root: str) -> dict:
    results, wall = _run_arm(RECIPE, arm, steps, seed, f"{out_root}/{arm}-s{seed}",
                             section="model.sparse_lowrank", extra=(
                                 "threads=1", "data.warmup.steps=0", "data.warmup.mixture={}",
                                 "eval.max_items=5", "eval.paraphrases=false",
                                 "eval.examples=0"))
    dev = results["train"]["dev"]
    return {"arm": arm, "seed": seed, "steps": results["train"]["steps"],
            "dev_loss": dev["loss"], "final_train_loss": results["train"]["final_train_loss"],
            "trainable": results["model"].get("sparse_lowrank", {}).get(
                "trainable", results["model"]["parameters"]),
            "train_seconds": results["train"]["train_seconds"], "wall_seconds": wall}


def train_t2u_arm(arm: str, steps: int, seed: int, out_root: str) -> dict:
    """The zoo's text-to-token model (recipes/tiny/text_to_token.yaml: real units of
    speech_tokenizer_en) for `steps` updates: teacher-forced dev NLL of both decoders, and
    the units they generate read back through the tokenizer's CTC head (CER)."""
    results, wall = _run_arm(T2U_RECIPE, arm, steps, seed, f"{out_root}/t2u-{arm}-s{seed}",
                             section="sparse_lowrank", rank=32,  # d/4 of its width, 128
                             extra=("threads=1", "eval.examples=0"))
    dev = results["dev"]
    forced = dev["teacher_forced"]
    return {"model": "t2u", "arm": arm, "seed": seed, "steps": results["train"]["steps"],
            "ar_nll": forced["ar_nll"], "maskgit_nll": forced["maskgit_nll"],
            "ar_uer": dev["ar"]["uer"], "maskgit_uer": dev["maskgit"]["uer"],
            "ar_round_trip_cer": dev["round_trip"]["ar"]["cer"],
            "maskgit_round_trip_cer": dev["round_trip"]["maskgit"]["cer"],
            "trainable": results.get("sparse_lowrank", {}).get("trainable",
                                                               results["model"]["parameters"]),
            "train_seconds": results["train"]["train_seconds"], "wall_seconds": wall}


def train_blsp_arm(arm: str, steps: int, seed: int, out_root: str) -> dict:
    """The main job's BLSP-KD adapter (Whisper base + smollm2_verses, the zoo's
    blsp_whisper_smollm2_kd recipe) for `steps` updates, its schedule shortened to them: the
    dev alignment metrics (64 held-out utterances) at the end. Stage 1 runs once, in the
    first arm's directory; every later arm reads those continuations."""
    from pathlib import Path

    extra = ["eval.transfer=null"]
    shared = sorted(Path(out_root).glob("blsp-*/continuations/dev.jsonl"))
    if shared:
        stage1 = shared[0].parent
        extra += [f"data.train_continuations={stage1 / 'train.jsonl'}",
                  f"data.dev_continuations={stage1 / 'dev.jsonl'}"]
    results, wall = _run_arm(BLSP_RECIPE, arm, steps, seed, f"{out_root}/blsp-{arm}-s{seed}",
                             section="sparse_lowrank", rank=144,  # d/4 of the LLM's 576
                             extra=tuple(extra))
    dev = results["alignment"]
    keys = ("align_kl", "align_ce_speech", "align_agreement", "align_gen_chrf")
    return {"model": "blsp adapter", "arm": arm, "seed": seed,
            "steps": results["train"]["steps"], **{k: dev[k] for k in keys if k in dev},
            "trainable": results.get("sparse_lowrank", {}).get("trainable"),
            "train_seconds": results["train"]["train_seconds"], "wall_seconds": wall}


def train_tokenizer_arm(arm: str, steps: int, seed: int, out_root: str) -> dict:
    """The zoo's speech tokenizer from scratch (recipes/tiny/speech_tokenizer.yaml: Whisper-
    style encoder, width 128, 4 layers, 512-code VQ after layer 2) for `steps` updates, its
    VQ warm-up kept at 200: the dev CER of the text its CTC head reads from the units alone,
    and the codebook's use on dev."""
    results, wall = _run_arm(TOKENIZER_RECIPE, arm, steps, seed,
                             f"{out_root}/tok-{arm}-s{seed}", section="sparse_lowrank",
                             rank=32,  # d/4 of its width, 128
                             extra=("data.test=null", "eval.use_best=false"))
    dev = results["dev"]
    return {"model": "speech tokenizer", "arm": arm, "seed": seed, "steps": results["step"],
            "dev_cer": dev["cer"], "dev_wer": dev["wer"],
            "perplexity": dev["usage"]["perplexity"], "used_codes": dev["usage"]["used_codes"],
            "final_train_loss": results["train"].get("loss"),
            "trainable": results.get("sparse_lowrank", {}).get("trainable"),
            "wall_seconds": wall}


def _memory_in_fresh_process(arm: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tools.benchmarks.sparse_lowrank", "_memory_arm",
                          "--arm", arm], env=env, check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(quick: bool = False) -> list[dict]:
    """tools/bench.py's rows: the `memory` numbers of each arm against the dense one."""
    arms = {arm: _memory_in_fresh_process(arm) for arm in MEMORY_ARMS}
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
    parser.add_argument("what", choices=["memory", "train", "train_t2u", "train_blsp",
                                             "train_tokenizer", "_memory_arm"])
    parser.add_argument("--arm", choices=list(ARMS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/sparse_lowrank")
    args = parser.parse_args(argv)
    if args.what == "_memory_arm":
        print(json.dumps(memory_arm(args.arm)))
    elif args.what == "memory":
        for arm in [a for a in args.arms if a in MEMORY_ARMS]:  # a fresh process each
            print(json.dumps(_memory_in_fresh_process(arm)), flush=True)
    else:
        train = {"train": train_arm, "train_t2u": train_t2u_arm,
                 "train_blsp": train_blsp_arm, "train_tokenizer": train_tokenizer_arm
                 }[args.what]
        for arm in args.arms:
            print(json.dumps(train(arm, args.steps, args.seed, args.out)), flush=True)


if __name__ == "__main__":
    main()
