"""SALT on `task: text_lm` (see speechlm.training.salt): the teacher, and the KD phase's data.

`load_teacher` resolves `salt.teacher` and checks that it shares the student's tokenizer.
`kd_phase_sampler` (only with `salt.selection`) scores the training sequences with the
teacher once, keeps the challenging-yet-learnable ones, and returns a sampler that draws
the first `kd_steps` updates from them and then hands over to the recipe's own sampler at
the same point of its schedule (a warm-up phase keeps its length). The selection is saved
in `output_dir/salt_selection.json` and read back on resume, so a killed run trains on the
same selection without scoring again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..training.salt import SALTConfig, select_sequences, sequence_scores

SELECTION_FILE = "salt_selection.json"


def load_teacher(config: SALTConfig, tokenizer, attn_implementation: str, *, progress: bool):
    """The teacher LM (eval mode), after checking its vocabulary is the student's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pretrained.resolve import resolve_model_dir

    path = resolve_model_dir(config.teacher, what="salt.teacher", progress=progress,
                             hint="train the smaller teacher with this recipe first "
                                  "(e.g. fewer layers and a smaller hidden_size)")
    fix = ("SALT needs the student's vocabulary: train the teacher with the same tokenizer "
           "settings (tokenizer.vocab_size, tokenizer.every)")
    if (path / "tokenizer_config.json").is_file():
        if AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"salt.teacher={config.teacher}: its tokenizer ({path}) differs "
                              f"from the student's; {fix}")
    teacher = AutoModelForCausalLM.from_pretrained(path)
    if teacher.config.vocab_size != len(tokenizer):
        raise ConfigError(f"salt.teacher={config.teacher}: vocabulary of "
                          f"{teacher.config.vocab_size} tokens, the student's has "
                          f"{len(tokenizer)}; {fix}")
    teacher.set_attn_implementation(attn_implementation)
    return teacher.eval()


def score_items(teacher, items: Sequence[dict], pad_id: int, top_k: int, *,
                max_batch_tokens: int) -> torch.Tensor:
    """SALT_DS score of each encoded item (float64 [len(items)]; NaN: nothing learnable)."""
    from ..training.objectives.causal_lm import CausalLMCollator, learned_logits

    collate = CausalLMCollator(pad_id)
    device = next(teacher.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    scores = torch.full((len(items),), float("nan"), dtype=torch.float64)
    start = 0
    with torch.no_grad():
        while start < len(order):
            end = start + 1
            # sorted by length: the batch's last item is its longest, padded to by the rest
            while end < len(order) and (end - start + 1) * len(
                    items[order[end]]["input_ids"]) <= max_batch_tokens:
                end += 1
            chosen = order[start:end]
            batch = collate([items[i] for i in chosen])
            logits, targets, rows = learned_logits(
                teacher, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                batch["labels"].to(device))
            scores[chosen] = sequence_scores(logits, targets, rows.cpu(), len(chosen), top_k)
            start = end
    return scores


def _fingerprint(config: SALTConfig, items: Sequence[dict], pools: dict) -> dict:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item["input_ids"], item["labels"]]).encode())
    return {"teacher": config.teacher, "top_k": config.selection.top_k,
            "keep_fraction": config.selection.keep_fraction, "items": len(items),
            "pools": pools, "data_sha256": digest.hexdigest()}


def selection(config: SALTConfig, teacher, items: Sequence[dict], pools: dict[str, range],
              pad_id: int, out: Path, *, max_batch_tokens: int, is_main: bool,
              say: Callable[[str], None]) -> list[bool]:
    """Kept flag of each item: each scored pool (name -> its item range) is selected on its
    own; items outside the pools are kept. Read from out/salt_selection.json when it holds
    this selection (resume), else scored and written there (main process)."""
    from ..jsonl import atomic_write
    from ..training import distributed

    path = out / SELECTION_FILE
    stamp = _fingerprint(config, items, {k: [r.start, r.stop] for k, r in pools.items()})
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("fingerprint") == stamp:
            say(f"SALT selection: read back from {path}")
            return [bool(k) for k in saved["keep"]]
    keep = [True] * len(items)
    report = {}
    for name, span in pools.items():
        scores = score_items(teacher, [items[i] for i in span], pad_id,
                             config.selection.top_k, max_batch_tokens=max_batch_tokens)
        kept = select_sequences(scores, config.selection.keep_fraction)
        for offset, flag in zip(span, kept.tolist(), strict=True):
            keep[offset] = flag
        finite = scores[~torch.isnan(scores)]
        report[name] = {"items": len(span), "kept": int(kept.sum()),
                        "not_learnable": int(torch.isnan(scores).sum()),
                        "median_score": float(finite.median()) if finite.numel() else None}
        if not bool(kept.any()):
            raise ConfigError(f"salt.selection keeps no {name} sequence (none has a gold token "
                              f"in the teacher's top-{config.selection.top_k}); raise "
                              "salt.selection.top_k, or set salt.selection: null")
        say(f"SALT selection ({name}): kept {report[name]['kept']} of {len(span)} sequences "
            f"({report[name]['not_learnable']} with nothing learnable)")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            json.dump({"fingerprint": stamp, "report": report, "keep": [int(k) for k in keep]},
                      f)
    distributed.barrier()
    return keep


def kd_phase_sampler(recipe_sampler, build: Callable[[Sequence[bool]], object],
                     keep: Sequence[bool], *, kd_batches: int):
    """The recipe's sampler with its first `kd_batches` batches drawn from the kept items:
    `build(keep)` makes the recipe's sampler over the kept items alone (yielding positions
    among them)."""
    from ..data.switch_sampler import IndexMapBatchSampler, SwitchBatchSampler

    kept_indices = [i for i, flag in enumerate(keep) if flag]
    first = IndexMapBatchSampler(build(keep), kept_indices)
    return SwitchBatchSampler(first, recipe_sampler, switch_batches=kd_batches)
