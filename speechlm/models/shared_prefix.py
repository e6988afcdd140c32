"""Run the prompt text every row of a batch starts with once, not once per row.

A SpeechLM batch repeats the same opening in every row: the chat template's system
prompt, the user turn's header and the instruction before the speech (43 of about 140
positions for SmolLM2 with BLSP's prompt). The LLM computes the same keys and values
for it in every row. Here it runs once, on row 0, and every row attends to that one
copy through a KV cache expanded (not copied) to the batch:

    length = shared_prefix_length(inputs)          # 0: nothing to share
    cache = prefix_cache(base_model, inputs, length)
    hidden = base_model(inputs_embeds=inputs.inputs_embeds[:, length:],
                        attention_mask=inputs.attention_mask, **{cache_kwarg(base_model): cache})

Training batches are right-padded, so the prefix already sits at positions 0..P-1 of
every row. Generation batches are left-padded; `prefix_first` moves each row's padding
to just after the prefix, where the attention mask hides it and transformers' position
ids (the mask's running count) skip it, so every row sees exactly what it saw before.

Generation then prefills the rest of each row alone (`rows_prefill_cache`): every row's
positions but its last, through the shared prefix, gathered into one padded cache from
which batched decoding starts. A prompt's prefill is compute-bound on a CPU, so a batch
gains nothing from running its rows together there, while a padded batch computes its
padding too (16 clips of 2-10 s: 6% of the batched LLM time on SmolLM2). A batched
row's prefill is also exactly the row's alone; decoding steps still run the rows
together, where a float32 matmul may round differently with the batch's size. On a GPU,
where one row's prefill leaves most of the device idle, the rows prefill together.
"""

from __future__ import annotations

import inspect

import torch

from .prompts import LMInputs

__all__ = ["MIN_SHARED_PREFIX", "cache_kwarg", "prefix_cache", "prefix_first",
           "rows_prefill_cache", "shared_prefix_length"]

# Below this the saving is smaller than the bookkeeping.
MIN_SHARED_PREFIX = 4


def _content_starts(inputs: LMInputs) -> torch.Tensor:
    """Where each row's tokens begin: 0 when right-padded, after the padding when left."""
    if inputs.padding_side == "right":
        return torch.zeros(inputs.attention_mask.shape[0], dtype=torch.long,
                           device=inputs.attention_mask.device)
    return (inputs.attention_mask == 0).sum(dim=1)


def shared_prefix_length(inputs: LMInputs, *, min_length: int = MIN_SHARED_PREFIX) -> int:
    """How many leading text tokens every row has in common (each row read from where its
    tokens begin), or 0 when fewer than `min_length`.

    Capped so that every row keeps at least one position of its own, and so that no label
    falls on the prefix or the position right after it (that label is predicted from the
    prefix's last position, which the shared pass does not return)."""
    ids, mask, speech = inputs.input_ids, inputs.attention_mask, inputs.speech_mask
    starts = _content_starts(inputs)
    lengths = mask.sum(dim=1)
    limit = int(lengths.min()) - 1
    if limit < min_length:
        return 0
    offsets = starts[:, None] + torch.arange(limit, device=ids.device)[None]
    aligned = ids.gather(1, offsets)
    same = (aligned == aligned[:1]).all(dim=0) & ~speech.gather(1, offsets).any(dim=0)
    if inputs.labels is not None:
        labelled = (inputs.labels.gather(1, offsets) != -100).any(dim=0)
        # a label at position t is predicted from t - 1: both must stay outside the prefix
        same &= ~labelled & ~torch.cat([labelled[1:], labelled.new_zeros(1)])
    differs = (~same).nonzero()
    length = int(differs[0]) if len(differs) else limit
    return length if length >= min_length else 0


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache: `cache` in recent transformers,
    `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_cache(base_model, inputs: LMInputs, length: int):
    """A DynamicCache holding `base_model`'s keys and values of row 0's first `length`
    positions, expanded to the batch. Gradients flow into it when the model trains
    (LoRA); for a frozen LLM it is built without a graph."""
    from transformers import DynamicCache

    start = int(_content_starts(inputs)[0])
    embeds = inputs.inputs_embeds[:1, start:start + length]
    trains = any(p.requires_grad for p in base_model.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
        out = base_model(inputs_embeds=embeds,
                         attention_mask=torch.ones(1, length, dtype=torch.long,
                                                   device=embeds.device),
                         use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    batch = inputs.inputs_embeds.shape[0]
    layers = [(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
              for keys, values, *_ in cache]
    return DynamicCache(layers)


def prefix_first(inputs: LMInputs, length: int) -> LMInputs:
    """Left-padded inputs rearranged so that every row starts with the shared prefix and
    its padding follows it: [pad.. prefix rest] -> [prefix pad.. rest]."""
    if inputs.padding_side != "left":
        raise ValueError("prefix_first rearranges left-padded (generation) inputs")
    width = inputs.attention_mask.shape[1]
    starts = _content_starts(inputs)
    positions = torch.arange(width, device=starts.device)[None].expand(len(starts), -1)
    # the prefix comes from [start, start + length), the padding from [0, start)
    source = torch.where(positions < length, positions + starts[:, None],
                         torch.where(positions < length + starts[:, None],
                                     positions - length, positions))

    def move(tensor):
        if tensor is None:
            return None
        index = source if tensor.dim() == 2 else source[..., None].expand_as(tensor)
        return tensor.gather(1, index)

    return LMInputs(move(inputs.inputs_embeds), move(inputs.attention_mask), move(inputs.labels),
                    move(inputs.speech_mask), move(inputs.input_ids), "prefix")


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(keys, values) for keys, values, *_ in cache]


@torch.no_grad()
def rows_prefill_cache(base_model, inputs: LMInputs, length: int = 0, prefix=None):
    """A DynamicCache of every row's keys and values at all positions but the last, each
    row run alone: through `prefix` (prefix_cache's, the first `length` positions, inputs
    rearranged by prefix_first) or from its first token. Padding positions hold zeros,
    which the attention mask hides. `generate` given this cache runs only the last
    position of each row, batched, and decodes from there."""
    from transformers import DynamicCache

    if length and prefix is None:
        raise ValueError("a shared prefix length needs its prefix cache")
    mask, embeds = inputs.attention_mask, inputs.inputs_embeds
    batch, width = mask.shape
    shared = _layers(prefix) if length else []
    merged: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for row in range(batch):
        # left-padded (after the prefix): the row's own positions end at the last column
        own = int(mask[row, length:width - 1].sum())
        if not own and not length:  # a one-position row and no prefix: nothing to cache
            continue
        start = width - 1 - own
        cache = DynamicCache([(k[row:row + 1], v[row:row + 1]) for k, v in shared]
                             if length else None)
        if own:
            out = base_model(inputs_embeds=embeds[row:row + 1, start:width - 1],
                             attention_mask=mask.new_ones(1, length + own),
                             **{cache_kwarg(base_model): cache}, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
        layers = _layers(cache)
        if merged is None:
            merged = [(k.new_zeros(batch, k.shape[1], width - 1, k.shape[3]),
                       v.new_zeros(batch, v.shape[1], width - 1, v.shape[3])) for k, v in layers]
        for (keys, values), (k, v) in zip(merged, layers, strict=True):
            keys[row, :, :length], values[row, :, :length] = k[0, :, :length], v[0, :, :length]
            keys[row, :, start:], values[row, :, start:] = k[0, :, length:], v[0, :, length:]
    return DynamicCache(merged) if merged is not None else None
