"""Batched greedy generation from token-id prompts (a text LLM, no speech).

    ids = [tokenizer("Hello")["input_ids"], tokenizer("A longer prompt")["input_ids"]]
    new = greedy_generate(llm, ids, pad_id=pick_pad_id(tokenizer),
                          stop_ids=[tokenizer.eos_token_id], max_new_tokens=32)
    texts = [tokenizer.decode(n, skip_special_tokens=True) for n in new]

Prompts are sorted by length so each batch pads little, left-padded (the new
tokens of every row start at the same column) with an attention mask, and
run through `model.generate` greedily with the KV cache. Each prompt gets its
new token ids cut before the first stop id, in input order. Left padding is
masked out of attention and positions, so a prompt's output does not depend
on which other prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["greedy_generate", "stop_ids_of"]


def stop_ids_of(model, ids: Iterable[int] = ()) -> list[int]:
    """`ids` plus the eos id(s) of the model's generation config, without repeats."""
    out = [int(t) for t in ids]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in [extra] if isinstance(extra, int) else list(extra or []):
        if int(token) not in out:
            out.append(int(token))
    return out


def _cut(row: list[int], stops: set[int]) -> list[int]:
    return next((row[:i] for i, t in enumerate(row) if t in stops), row)


def greedy_generate(model, prompts_ids: Sequence[Sequence[int]], *, pad_id: int,
                    stop_ids: Iterable[int], max_new_tokens: int = 64,
                    batch_size: int = 32) -> list[list[int]]:
    """New token ids for each prompt (greedy, batched, KV cache), cut before the first stop
    id, in input order. Raises ValueError for an empty prompt (nothing to continue from)."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and "
                         f"{max_new_tokens}")
    empty = [i for i, ids in enumerate(prompts_ids) if len(ids) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty[:5]} are empty; every prompt needs at least one token")
    stops = [int(t) for t in stop_ids]
    stop_set = set(stops)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts_ids)), key=lambda i: len(prompts_ids[i]))
    out: list[list[int]] = [[] for _ in prompts_ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts_ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = prompts_ids[i]
            input_ids[row, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
            attention[row, width - len(ids):] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                eos_token_id=stops or None, pad_token_id=int(pad_id))
        for row, i in enumerate(chunk):
            out[i] = _cut(generated[row, width:].tolist(), stop_set)
    return out
