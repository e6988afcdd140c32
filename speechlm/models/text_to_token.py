"""Text-to-token (T2U) model: text straight to the discrete units of a speech tokenizer.

GLM-4-Voice's synthetic interleaved data turns text spans of a text corpus into
speech tokens without synthesising audio: a small model trained on the (text,
units) pairs that the supervised VQ tokenizer produced from ASR data. Two
decoders share one character-level transformer text encoder (`decoder:` ar,
maskgit, or both, trained jointly on the shared encoder):

- `ar`: a transformer decoder with cross-attention to the text; units left to
  right between BOS and EOS. Greedy decoding is batched, with a KV cache.
- `maskgit` (Pheme / MaskGIT): a bidirectional transformer over L unit slots
  with cross-attention to the text. Training masks a fraction cos(pi/2 * u),
  u ~ U(0, 1), of the slots and predicts them; decoding starts all-masked and
  over `steps` iterations keeps the most confident predictions, re-masking the
  rest so that `cosine_masked_count(L, t, steps)` slots are still masked after
  step t (none after the last).

A length head predicts a duration (in units) per character; their sum is the
number of units L, trained on the utterance's L alone (smooth L1). MaskGIT
needs L before it decodes. The durations also align units to text (the
`length_regulator`, as in FastSpeech): stretched to L, they say which
character each unit position falls on and how far into it; both decoders add
that character's encoding (and the offset) to the position's input, and the
cross-attention refines the alignment. Without it the decoders must discover
the alignment through attention alone, which takes a small model many more
updates (on the synthetic data of the tests, after 180 updates: unit error
rate 0.21 for AR and 0.42 for MaskGIT without it, 0.0 for both with it).

    model = TextToToken(TextToTokenConfig(decoder="maskgit"), vocab, num_codes=16384,
                        tokenizer_identity="glm4voice-whisper-vq-16k@...")
    loss, metrics = model.loss(collate_pairs(items))       # items: text_ids, units
    save_text_to_token(model, "run/final")
    t2u = load_text_to_token("run/final")
    t2u.generate(["some text"], method="maskgit", steps=16) -> [[17, 3, ...]]

Saved as a directory: `config.json` (model sizes, decoder kind, num_codes,
tokenizer identity, the character vocabulary) and `model.safetensors`,
written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, SpeechLMError
from .ctc import SPECIAL_TOKENS, WORD_DELIMITER, CharVocab

__all__ = [
    "TextToToken", "TextToTokenConfig", "collate_pairs", "cosine_masked_count",
    "load_text_to_token", "save_text_to_token",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "speechlm-text-to-token"
FORMAT_VERSION = 1
DECODERS = ("ar", "maskgit")


@dataclass
class TextToTokenConfig:
    """Sizes and decoder kind; the recipe's `model:` section."""

    decoder: Literal["ar", "maskgit", "both"] = "maskgit"
    d_model: int = 256
    num_heads: int = 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    maskgit_steps: int = 16               # default decoding iterations
    length_loss_weight: float = 0.1       # the length head's loss is in units, CE in nats
    # Add to each unit position the encoding of the character it falls on when the predicted
    # durations are stretched to the utterance's length (FastSpeech's length regulator); off:
    # the decoders find the alignment by cross-attention alone (slower to learn).
    length_regulator: bool = True

    def __post_init__(self):
        sizes = {"d_model": self.d_model, "num_heads": self.num_heads, "ff_dim": self.ff_dim,
                 "encoder_layers": self.encoder_layers, "decoder_layers": self.decoder_layers,
                 "maskgit_steps": self.maskgit_steps}
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {value}")
        if self.d_model % (2 * self.num_heads):
            raise ConfigError(f"model.d_model ({self.d_model}) must be a multiple of 2 x "
                              f"num_heads ({self.num_heads}): even per head, for the "
                              "sinusoidal positions")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.length_loss_weight < 0:
            raise ConfigError("model.length_loss_weight must be >= 0")

    @property
    def decoders(self) -> tuple[str, ...]:
        return DECODERS if self.decoder == "both" else (self.decoder,)


# -- schedule ------------------------------------------------------------------------


def cosine_masked_count(length, step: int, steps: int):
    """Slots still masked after decoding step `step` of `steps`: floor(L cos(pi/2 t/T)).

    L at step 0, 0 after the last step; `length` may be an int or a tensor.
    """
    if not 0 <= step <= steps:
        raise ValueError(f"step must be in [0, {steps}], got {step}")
    if step == steps:  # cos(pi/2) is 6e-17, not 0: make the end exact
        return length * 0
    ratio = math.cos(math.pi / 2 * step / steps)
    if isinstance(length, torch.Tensor):
        return torch.floor(length.double() * ratio).to(length.dtype)
    return int(math.floor(length * ratio))


def training_mask(lengths: torch.Tensor, max_len: int, generator=None) -> torch.Tensor:
    """[B, max_len] bool: ceil(L cos(pi/2 u)) random slots per row (at least 1), u ~ U(0, 1)."""
    batch = lengths.shape[0]
    u = torch.rand(batch, generator=generator).to(lengths.device)
    count = torch.ceil(torch.cos(math.pi / 2 * u) * lengths).long().clamp(min=1)
    count = torch.minimum(count, lengths)
    valid = torch.arange(max_len, device=lengths.device) < lengths[:, None]
    scores = torch.rand(batch, max_len, generator=generator).to(lengths.device)
    rank = scores.masked_fill(~valid, 2.0).argsort(-1).argsort(-1)  # padding ranks last
    return (rank < count[:, None]) & valid


# -- transformer parts (pure torch, SDPA) --------------------------------------------


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., dim] sinusoidal encodings of (possibly fractional) positions."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32)
                      * (-math.log(10000.0) / half))
    angles = positions.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def key_mask(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] bool (True = real) -> the [B, 1, 1, S] mask SDPA takes."""
    return valid[:, None, None, :]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.key_value(source).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x, source=None, *, mask=None, causal=False, kv=None):
        """x [B, T, D] attends to `source` (default x), or to precomputed (k, v)."""
        q = self._split(self.query(x))
        k, v = kv if kv is not None else self.keys_values(x if source is None else source)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, t, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm transformer layer: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float, cross: bool):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, dropout)
        self.cross_norm = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, heads, dropout) if cross else None
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, *, mask=None, causal=False, memory=None, memory_mask=None,
                cache: dict | None = None):
        """`cache` (incremental decoding): keys/values of earlier positions, updated in place."""
        h = self.self_norm(x)
        kv = None
        if cache is not None:
            k, v = self.self_attn.keys_values(h)
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = kv = (k, v)
        x = x + self.drop(self.self_attn(h, mask=mask, causal=causal, kv=kv))
        if self.cross_attn is not None:
            memory_kv = None
            if cache is not None:
                if "memory_k" not in cache:
                    cache["memory_k"], cache["memory_v"] = self.cross_attn.keys_values(memory)
                memory_kv = (cache["memory_k"], cache["memory_v"])
            x = x + self.drop(self.cross_attn(self.cross_norm(x), memory, mask=memory_mask,
                                              kv=memory_kv))
        return x + self.drop(self.ff(self.ff_norm(x)))


class Stack(nn.Module):
    def __init__(self, layers: int, cfg: TextToTokenConfig, *, cross: bool):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.num_heads, cfg.ff_dim, cfg.dropout,
                                          cross) for _ in range(layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, *, caches: list[dict] | None = None, **kwargs):
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=None if caches is None else caches[i], **kwargs)
        return self.norm(x)


# -- the three parts -----------------------------------------------------------------


class TextEncoder(nn.Module):
    """Characters -> encodings [B, S, D] and per-character durations [B, S] (in units)."""

    def __init__(self, vocab_size: int, cfg: TextToTokenConfig):
        super().__init__()
        self.dim = cfg.d_model
        self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=CharVocab.blank_id)
        self.stack = Stack(cfg.encoder_layers, cfg, cross=False)
        self.duration = nn.Linear(cfg.d_model, 1)
        # softplus(0.5413) = 1: about one unit per character at 12.5 units/s to start with
        nn.init.constant_(self.duration.bias, math.log(math.e - 1))

    def forward(self, text: torch.Tensor, valid: torch.Tensor):
        positions = torch.arange(text.shape[1], device=text.device)
        x = self.embed(text) + sinusoidal(positions, self.dim)
        h = self.stack(x, mask=key_mask(valid))
        # float32 even under autocast: positions up to ~1000 units need the precision
        durations = F.softplus(self.duration(h).squeeze(-1).float()) * valid
        return h, durations


class ARDecoder(nn.Module):
    """Units left to right after BOS, ending with EOS; cross-attention to the text."""

    def __init__(self, num_codes: int, cfg: TextToTokenConfig):
        super().__init__()
        self.dim = cfg.d_model
        self.eos, self.bos = num_codes, num_codes + 1
        self.embed = nn.Embedding(num_codes + 2, cfg.d_model)
        self.stack = Stack(cfg.decoder_layers, cfg, cross=True)
        self.head = nn.Linear(cfg.d_model, num_codes + 1)

    def losses(self, units, lengths, aligned, memory, memory_mask) -> dict:
        """`aligned`: [B, longest + 1, D], added to the inputs (the length regulator)."""
        batch, longest = units.shape
        positions = torch.arange(longest + 1, device=units.device)
        after = positions[None, :] >= lengths[:, None]  # EOS and padding
        targets = torch.cat([units, units.new_zeros(batch, 1)], dim=1)
        targets = targets.masked_fill(after, self.eos)
        inputs = torch.cat([targets.new_full((batch, 1), self.bos), targets[:, :-1]], dim=1)
        x = self.embed(inputs) + sinusoidal(positions, self.dim) + aligned
        logits = self.head(self.stack(x, causal=True, memory=memory, memory_mask=memory_mask))
        scored = positions[None, :] <= lengths[:, None]  # the units and one EOS
        nll = F.cross_entropy(logits[scored], targets[scored], reduction="sum")
        correct = (logits[scored].argmax(-1) == targets[scored]).sum()
        count = scored.sum()
        return {"ar_nll": (nll, count), "ar_acc": (correct, count)}

    @torch.no_grad()
    def greedy(self, aligned, memory, memory_mask, max_lengths: torch.Tensor) -> list[list[int]]:
        """Batched greedy decoding with a KV cache; a row stops at EOS or its max length.
        `aligned`: [B, max length, D], added to the inputs (the length regulator)."""
        batch = memory.shape[0]
        caches: list[dict] = [{} for _ in self.stack.layers]
        token = torch.full((batch,), self.bos, dtype=torch.long, device=memory.device)
        done = torch.zeros(batch, dtype=torch.bool, device=memory.device)
        steps: list[torch.Tensor] = []
        for t in range(int(max_lengths.max())):
            position = torch.tensor([t], device=memory.device)
            x = self.embed(token[:, None]) + sinusoidal(position, self.dim) + aligned[:, t:t + 1]
            h = self.stack(x, caches=caches, memory=memory, memory_mask=memory_mask)
            token = self.head(h[:, -1]).argmax(-1)
            steps.append(token)
            done |= (token == self.eos) | (t + 1 >= max_lengths)
            if bool(done.all()):
                break
        rows = torch.stack(steps, dim=1).tolist()
        out = []
        for row, cap in zip(rows, max_lengths.tolist(), strict=True):
            row = row[:cap]
            out.append(row[:row.index(self.eos)] if self.eos in row else row)
        return out


class MaskGITDecoder(nn.Module):
    """Bidirectional transformer over L unit slots; masked slots are predicted."""

    def __init__(self, num_codes: int, cfg: TextToTokenConfig):
        super().__init__()
        self.dim = cfg.d_model
        self.mask_id = num_codes
        self.embed = nn.Embedding(num_codes + 1, cfg.d_model)
        self.stack = Stack(cfg.decoder_layers, cfg, cross=True)
        self.head = nn.Linear(cfg.d_model, num_codes)

    def logits(self, tokens, valid, aligned, memory, memory_mask):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + sinusoidal(positions, self.dim) + aligned
        return self.head(self.stack(x, mask=key_mask(valid), memory=memory,
                                    memory_mask=memory_mask))

    def losses(self, units, lengths, aligned, memory, memory_mask, generator=None) -> dict:
        masked = training_mask(lengths, units.shape[1], generator)
        valid = torch.arange(units.shape[1], device=units.device) < lengths[:, None]
        tokens = units.masked_fill(masked, self.mask_id)
        logits = self.logits(tokens, valid, aligned, memory, memory_mask)[masked]
        targets = units[masked]
        nll = F.cross_entropy(logits, targets, reduction="sum")
        correct = (logits.argmax(-1) == targets).sum()
        return {"maskgit_nll": (nll, masked.sum()), "maskgit_acc": (correct, masked.sum())}

    @torch.no_grad()
    def decode(self, lengths, aligned, memory, memory_mask, steps: int,
               on_step: Callable | None = None) -> list[list[int]]:
        """Iterative parallel decoding: after step t, cosine_masked_count(L, t, steps) slots
        stay masked; slots filled earlier are kept, new predictions compete by confidence."""
        longest = int(lengths.max())
        valid = torch.arange(longest, device=lengths.device) < lengths[:, None]
        tokens = torch.full(valid.shape, self.mask_id, dtype=torch.long, device=lengths.device)
        for step in range(1, steps + 1):
            probs = self.logits(tokens, valid, aligned, memory, memory_mask).softmax(-1)
            confidence, predicted = probs.max(-1)
            masked = (tokens == self.mask_id) & valid
            candidate = torch.where(masked, predicted, tokens)
            confidence = confidence.masked_fill(~masked, math.inf).masked_fill(~valid, -math.inf)
            keep = lengths - cosine_masked_count(lengths, step, steps)
            rank = torch.argsort(confidence, dim=-1, descending=True, stable=True).argsort(-1)
            tokens = torch.where((rank < keep[:, None]) & valid, candidate, self.mask_id)
            if on_step is not None:
                on_step(step, tokens.clone(), lengths.clone())
        return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]


# -- the model -----------------------------------------------------------------------


class TextToToken(nn.Module):
    """Text encoder + length head + the configured decoder(s); see the module doc."""

    def __init__(self, config: TextToTokenConfig, vocab: CharVocab, *, num_codes: int,
                 tokenizer_identity: str, max_units_per_char: float = 4.0):
        super().__init__()
        if num_codes < 1:
            raise ConfigError(f"num_codes must be >= 1, got {num_codes}")
        self.config = config
        self.vocab = vocab
        self.num_codes = int(num_codes)
        self.tokenizer_identity = str(tokenizer_identity)
        # Generation never runs past this many units per character (a training-data bound).
        self.max_units_per_char = float(max_units_per_char)
        self.encoder = TextEncoder(len(vocab), config)
        if config.length_regulator:
            self.unit_offset = nn.Linear(config.d_model, config.d_model)
        self.ar = ARDecoder(num_codes, config) if "ar" in config.decoders else None
        self.maskgit = MaskGITDecoder(num_codes, config) if "maskgit" in config.decoders else None

    @property
    def decoders(self) -> tuple[str, ...]:
        return self.config.decoders

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- text --

    def encode_text(self, text: str) -> tuple[list[int], list[str]]:
        """(character ids, characters not seen in training: mapped to <unk>)."""
        return self.vocab.encode(text)

    def unseen_chars(self, text: str) -> set[str]:
        """Characters of `text` never seen in the training text (spaces aside)."""
        return {c for c in text if not c.isspace() and c not in self.vocab}

    # -- training --

    def _encode(self, batch: dict):
        text, text_valid = batch["text"], batch["text_mask"]
        memory, durations = self.encoder(text, text_valid)
        return memory, key_mask(text_valid), durations

    def _aligned(self, memory, durations, text_valid, lengths, longest: int):
        """[B, longest, D]: for each unit position, the encoding of the character it falls on
        when the (detached) durations are stretched to `lengths` units; past a row's length,
        its last character. Zeros without the length regulator."""
        if not self.config.length_regulator:
            return memory.new_zeros(len(memory), longest, memory.shape[-1])
        spans = durations.detach().clamp_min(1e-3) * text_valid
        spans = spans / spans.sum(-1, keepdim=True) * lengths[:, None].to(spans.dtype)
        ends = spans.cumsum(-1)
        centers = torch.arange(longest, device=memory.device, dtype=ends.dtype) + 0.5
        centers = centers.expand(len(ends), -1).contiguous()
        index = torch.searchsorted(ends.contiguous(), centers, right=True)
        index = torch.minimum(index, text_valid.sum(-1, keepdim=True) - 1)
        # ... and how far into that character it is (which of its units this is)
        offset = centers - (ends - spans).gather(1, index)
        char = memory.gather(1, index[..., None].expand(-1, -1, memory.shape[-1]))
        return char + self.unit_offset(sinusoidal(offset, memory.shape[-1]))

    def losses(self, batch: dict, generator=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(sum, count) per quantity: nll/acc per decoder, length error and loss."""
        units, lengths = batch["units"], batch["unit_lengths"]
        memory, memory_mask, durations = self._encode(batch)
        predicted = durations.sum(-1)
        target = lengths.to(predicted.dtype)
        n = torch.tensor(len(lengths), device=units.device)
        parts = {"length_loss": (F.smooth_l1_loss(predicted, target, reduction="sum"), n),
                 "length_mae": ((predicted.detach() - target).abs().sum(), n)}
        # one position more than the longest utterance: where AR predicts EOS
        aligned = self._aligned(memory, durations, batch["text_mask"], lengths,
                                units.shape[1] + 1)
        if self.ar is not None:
            parts.update(self.ar.losses(units, lengths, aligned, memory, memory_mask))
        if self.maskgit is not None:
            parts.update(self.maskgit.losses(units, lengths, aligned[:, :-1], memory,
                                             memory_mask, generator))
        return parts

    def loss(self, batch: dict, generator=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean cross-entropy of each decoder + length_loss_weight x the length loss."""
        parts = self.losses(batch, generator)
        means = {key: total / count.clamp(min=1) for key, (total, count) in parts.items()}
        loss = self.config.length_loss_weight * means["length_loss"]
        for name in self.decoders:
            loss = loss + means[f"{name}_nll"]
        return loss, {key: value.detach() for key, value in means.items()}

    # -- generation --

    @torch.no_grad()
    def predict_lengths(self, texts: Sequence[str], *, batch_size: int = 64) -> list[float]:
        """The length head's number of units for each text (before rounding)."""
        out: list[float] = [0.0] * len(texts)
        was_training = self.training
        self.eval()
        try:
            for index, batch in self._text_batches(texts, batch_size):
                _, _, durations = self._encode(batch)
                for i, value in zip(index, durations.sum(-1).tolist(), strict=True):
                    out[i] = value
        finally:
            self.train(was_training)
        return out

    @torch.no_grad()
    def generate(self, texts: Sequence[str], *, method: str | None = None,
                 steps: int | None = None, batch_size: int = 64,
                 on_step: Callable | None = None) -> list[list[int]]:
        """Units for each text, in order (greedy; deterministic). An empty text gives [].

        method: "ar" or "maskgit" (None: the model's decoder; maskgit when it has both).
        steps: MaskGIT iterations (None: config.maskgit_steps). on_step(step, tokens,
        lengths): called after each MaskGIT step, for inspecting the schedule.
        """
        method = self._method(method)
        steps = self.config.maskgit_steps if steps is None else int(steps)
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps}")
        out: list[list[int]] = [[] for _ in texts]
        was_training = self.training
        self.eval()
        try:
            for index, batch in self._text_batches(texts, batch_size):
                memory, memory_mask, durations = self._encode(batch)
                chars = batch["text_mask"].sum(-1)
                cap = torch.ceil(chars * self.max_units_per_char).long() + 8
                lengths = torch.minimum(durations.sum(-1).round().long().clamp(min=1), cap)
                if method == "ar":
                    aligned = self._aligned(memory, durations, batch["text_mask"], lengths,
                                            int(cap.max()))
                    rows = self.ar.greedy(aligned, memory, memory_mask, cap)
                else:
                    aligned = self._aligned(memory, durations, batch["text_mask"], lengths,
                                            int(lengths.max()))
                    rows = self.maskgit.decode(lengths, aligned, memory, memory_mask, steps,
                                               on_step)
                for i, row in zip(index, rows, strict=True):
                    out[i] = row
        finally:
            self.train(was_training)
        return out

    def _method(self, method: str | None) -> str:
        if method is None:
            return self.decoders[-1] if len(self.decoders) == 1 else "maskgit"
        if method not in DECODERS:
            raise ConfigError(f"method must be 'ar' or 'maskgit', got {method!r}")
        if method not in self.decoders:
            raise ConfigError(f"this text-to-token model has no '{method}' decoder (trained "
                              f"with decoder: {self.config.decoder}); use method="
                              f"'{self.decoders[0]}' or None")
        return method

    def _text_batches(self, texts: Sequence[str], batch_size: int):
        """(original indices, padded batch) of the non-empty texts, longest first."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        encoded = [(i, self.encode_text(t)[0]) for i, t in enumerate(texts)]
        encoded = sorted((e for e in encoded if e[1]), key=lambda e: -len(e[1]))
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            batch = collate_pairs([{"text_ids": ids} for _, ids in chunk])
            yield [i for i, _ in chunk], {k: v.to(self.device) for k, v in batch.items()}

    # -- saving --

    def describe(self) -> dict:
        """What config.json holds: everything needed to rebuild the model."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": asdict(self.config),
                "num_codes": self.num_codes, "tokenizer_identity": self.tokenizer_identity,
                "max_units_per_char": self.max_units_per_char, "vocab": list(self.vocab.tokens),
                "char_counts": dict(self.vocab.counts)}


def collate_pairs(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad `text_ids` (0 = <pad>) and, when present, `units`: text, text_mask, units,
    unit_lengths."""
    text_lengths = torch.tensor([len(item["text_ids"]) for item in items], dtype=torch.long)
    text = torch.zeros(len(items), max(text_lengths.tolist(), default=1), dtype=torch.long)
    for row, item in enumerate(items):
        text[row, :len(item["text_ids"])] = torch.as_tensor(np.asarray(item["text_ids"]))
    batch = {"text": text, "text_mask": torch.arange(text.shape[1]) < text_lengths[:, None]}
    if items and "units" in items[0]:
        unit_lengths = torch.tensor([len(item["units"]) for item in items], dtype=torch.long)
        units = torch.zeros(len(items), max(unit_lengths.tolist(), default=1), dtype=torch.long)
        for row, item in enumerate(items):
            units[row, :len(item["units"])] = torch.as_tensor(np.asarray(item["units"]))
        batch.update(units=units, unit_lengths=unit_lengths)
    return batch


# -- save / load ---------------------------------------------------------------------


def build_vocab(texts: Iterable[str]) -> CharVocab:
    """Character vocabulary of training texts (every character seen, with counts)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(c for c in text if not c.isspace())
    if not counts:
        raise SpeechLMError("no text characters to build a vocabulary from")
    return CharVocab(sorted(counts), counts=dict(sorted(counts.items())))


def save_text_to_token(model: TextToToken, out_dir, *, metadata: dict | None = None) -> Path:
    """Write config.json + model.safetensors into `out_dir` (a temporary directory renamed
    into place, so `out_dir` is always complete)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    record = {**model.describe(), "metadata": dict(metadata or {})}
    (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_text_to_token(path, *, device: str | torch.device = "cpu") -> TextToToken:
    """A saved text-to-token model (see `save_text_to_token`), in eval mode."""
    from safetensors.torch import load_file

    from ..config import config_from_dict

    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise SpeechLMError(f"{path}: not a text-to-token model directory (needs {CONFIG_FILE} "
                            f"and {WEIGHTS_FILE}); give the `final` directory of a "
                            "`task: text_to_token` run")
    record = json.loads(config_file.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT:
        raise SpeechLMError(f"{config_file}: format is {record.get('format')!r}, not {FORMAT!r}: "
                            "not a text-to-token model")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise SpeechLMError(f"{config_file}: format_version {record['format_version']} is newer "
                            "than this speechlm reads; upgrade speechlm")
    tokens = record["vocab"]
    if tokens[:5] != [*SPECIAL_TOKENS, WORD_DELIMITER]:
        raise SpeechLMError(f"{config_file}: damaged character vocabulary (starts {tokens[:5]})")
    config = config_from_dict(TextToTokenConfig, record["model"], source=str(config_file))
    vocab = CharVocab(tokens[5:], counts=record.get("char_counts"))
    if vocab.tokens != tokens:
        raise SpeechLMError(f"{config_file}: damaged character vocabulary (duplicates or spaces)")
    model = TextToToken(config, vocab, num_codes=record["num_codes"],
                        tokenizer_identity=record["tokenizer_identity"],
                        max_units_per_char=record.get("max_units_per_char", 4.0))
    state = load_file(str(weights_file))
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or extra or wrong:
        raise SpeechLMError(f"{weights_file}: weights do not fit {CONFIG_FILE} ({len(missing)} "
                            f"missing, {len(extra)} unexpected, {len(wrong)} of another shape, "
                            f"e.g. {(missing or extra or wrong)[0]}); the directory is damaged "
                            "or mixed from two runs")
    model.load_state_dict(state)
    return model.to(device).eval()
