"""Speech units in an LLM's vocabulary (GLM-4-Voice style).

    vocab = add_unit_tokens(model, tokenizer, 16384, tokenizer_identity="glm4-voice-tok")
    ids = vocab.units_to_ids([3, 0, 17])   # <|begin_of_audio|> <|audio_3|> ... <|end_of_audio|>

`add_unit_tokens` adds `<|begin_of_audio|>`, `<|end_of_audio|>` and `<|audio_0|>` ...
`<|audio_{num_codes-1}|>` to a Hugging Face tokenizer as special, non-splitting tokens with
contiguous ids (`<|audio_i|>` = `unit_base + i`, so turning units into ids is one addition),
and gives the model embedding rows for them. What was added is recorded in the tokenizer
(`tokenizer_config.json`) and the model config (`config.json`), so both carry it through
`save_pretrained`; calling again on an extended pair returns the same mapping, and a
different `num_codes` or speech tokenizer is refused. `UnitVocab.save(dir)` writes
`unit_vocab.json` beside a saved model for readers that need no tokenizer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["BEGIN_OF_AUDIO", "END_OF_AUDIO", "NOISE_SCALE", "UNIT_VOCAB_NAME", "UnitVocab",
           "add_unit_tokens", "unit_token"]

BEGIN_OF_AUDIO = "<|begin_of_audio|>"
END_OF_AUDIO = "<|end_of_audio|>"
UNIT_VOCAB_NAME = "unit_vocab.json"
RECORD_KEY = "speechlm_unit_vocab"   # in tokenizer.init_kwargs and model.config
_UNIT_RE = re.compile(r"<\|audio_(\d+)\|>")

# New rows = mean of the old rows + NOISE_SCALE * (per-dimension std) * N(0, 1). Near the mean,
# so the LM's next-token distribution over the old vocabulary barely moves (Hewitt 2021, the
# reason for transformers' mean_resizing); but transformers' own mean_resizing samples with
# covariance 1e-9 * cov, which makes all 16k unit rows practically the same vector, so the
# output head starts unable to tell units apart. A few percent of the spread breaks that
# symmetry while staying far closer to the mean than any two real tokens are to each other;
# per-dimension std also avoids a d x d covariance and its Cholesky for a 4096-wide model.
NOISE_SCALE = 0.05


def unit_token(code: int) -> str:
    return f"<|audio_{code}|>"


@dataclass(frozen=True)
class UnitVocab:
    """Where the speech-unit tokens sit in a tokenizer's ids."""

    begin_id: int
    end_id: int
    unit_base: int              # id of <|audio_0|>; <|audio_i|> = unit_base + i
    num_codes: int
    tokenizer_identity: str     # the speech tokenizer whose codes these are

    @property
    def last_id(self) -> int:
        return max(self.begin_id, self.end_id, self.unit_base + self.num_codes - 1)

    def unit_id(self, code: int) -> int:
        if not 0 <= code < self.num_codes:
            raise ValueError(f"speech unit {code} is outside [0, {self.num_codes})")
        return self.unit_base + code

    def is_unit(self, token_id: int) -> bool:
        return self.unit_base <= token_id < self.unit_base + self.num_codes

    def code_of(self, token_id: int) -> int:
        if not self.is_unit(token_id):
            raise ValueError(f"token id {token_id} is not a speech unit (units are ids "
                             f"{self.unit_base}..{self.unit_base + self.num_codes - 1})")
        return token_id - self.unit_base

    def units_to_ids(self, units: Iterable[int]) -> list[int]:
        """<|begin_of_audio|>, the units' ids, <|end_of_audio|>."""
        units = list(units)
        if units and not (0 <= min(units) and max(units) < self.num_codes):
            bad = next(u for u in units if not 0 <= u < self.num_codes)
            raise ValueError(f"speech unit {bad} is outside [0, {self.num_codes})")
        return [self.begin_id, *(self.unit_base + u for u in units), self.end_id]

    def save(self, directory) -> Path:
        from ..jsonl import atomic_write

        path = Path(directory) / UNIT_VOCAB_NAME
        with atomic_write(path) as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, directory) -> UnitVocab:
        path = Path(directory)
        path = path if path.name == UNIT_VOCAB_NAME else path / UNIT_VOCAB_NAME
        if not path.is_file():
            raise ConfigError(f"{path}: not found; this directory has no speech-unit vocabulary "
                              "(it is written by `add_unit_tokens` users such as "
                              "`speechlm build interleave`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in ("begin_id", "end_id", "unit_base", "num_codes",
                                               "tokenizer_identity")})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a valid unit vocabulary ({e})") from None

    def record(self) -> dict:
        return asdict(self)


def add_unit_tokens(model, tokenizer, num_codes: int, *, tokenizer_identity: str,
                    noise_scale: float = NOISE_SCALE, seed: int = 0) -> UnitVocab:
    """Add the speech-unit tokens to `tokenizer` and, unless `model` is None, embedding rows
    for them to `model` (module doc). Idempotent for the same `num_codes` and
    `tokenizer_identity`; a ConfigError for a pair extended with other units."""
    if not isinstance(num_codes, int) or num_codes < 1:
        raise ConfigError(f"num_codes must be a positive integer, got {num_codes!r}")
    if not tokenizer_identity or not isinstance(tokenizer_identity, str):
        raise ConfigError("tokenizer_identity must name the speech tokenizer the units come from")
    vocab = _extend_tokenizer(tokenizer, num_codes, tokenizer_identity)
    if model is not None:
        _extend_model(model, vocab, noise_scale, seed)
    return vocab


# -- the tokenizer ------------------------------------------------------------------------------


def _check_record(record: dict | None, num_codes: int, identity: str, where: str) -> None:
    if not record:
        return
    for field, want in (("num_codes", num_codes), ("tokenizer_identity", identity)):
        if record.get(field) != want:
            raise ConfigError(
                f"{where} already holds speech units with {field}={record.get(field)!r}, not "
                f"{want!r}; units of another speech tokenizer would silently mean other sounds. "
                "Start from the base LLM, or use the speech tokenizer it was extended with")


def _extend_tokenizer(tokenizer, num_codes: int, identity: str) -> UnitVocab:
    from tokenizers import AddedToken

    existing = tokenizer.get_vocab()
    record = tokenizer.init_kwargs.get(RECORD_KEY)
    present = [t for t in existing if _UNIT_RE.fullmatch(t)]
    if BEGIN_OF_AUDIO in existing or present:
        _check_record(record, num_codes, identity, "the tokenizer")
        if len(present) != num_codes or END_OF_AUDIO not in existing \
                or BEGIN_OF_AUDIO not in existing:
            raise ConfigError(
                f"the tokenizer already has {len(present)} <|audio_i|> tokens "
                f"({'with' if BEGIN_OF_AUDIO in existing else 'without'} {BEGIN_OF_AUDIO}), "
                f"not the {num_codes} asked for (num_codes); start from the base LLM")
    else:
        tokens = [BEGIN_OF_AUDIO, END_OF_AUDIO, *(unit_token(i) for i in range(num_codes))]
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens],
                             special_tokens=True)
        existing = None
    ids = tokenizer.convert_tokens_to_ids([BEGIN_OF_AUDIO, END_OF_AUDIO, unit_token(0),
                                           unit_token(num_codes - 1)])
    vocab = UnitVocab(begin_id=ids[0], end_id=ids[1], unit_base=ids[2], num_codes=num_codes,
                      tokenizer_identity=identity)
    # Packing turns a unit into an id with one addition: that needs contiguous ids.
    contiguous = ids[3] == vocab.unit_base + num_codes - 1 and (
        existing is None or all(existing[unit_token(i)] == vocab.unit_base + i
                                for i in range(num_codes)))
    if not contiguous:
        raise ConfigError(f"the tokenizer's <|audio_i|> ids are not contiguous from "
                          f"{vocab.unit_base}; rebuild its extension from the base LLM")
    tokenizer.init_kwargs[RECORD_KEY] = vocab.record()
    return vocab


# -- the model ----------------------------------------------------------------------------------


def _extend_model(model, vocab: UnitVocab, noise_scale: float, seed: int) -> None:
    import torch

    record = getattr(model.config, RECORD_KEY, None)
    _check_record(record, vocab.num_codes, vocab.tokenizer_identity, "the model")
    if record and record.get("unit_base") != vocab.unit_base:
        raise ConfigError(f"the model's unit rows start at {record.get('unit_base')}, the "
                          f"tokenizer's at {vocab.unit_base}; load both from the same directory")
    inputs = model.get_input_embeddings()
    rows_before = inputs.weight.shape[0]
    if record and rows_before > vocab.last_id:
        return  # already extended and initialised
    first_new = min(vocab.begin_id, vocab.unit_base)
    if rows_before <= vocab.last_id:
        # Our own init follows; transformers' would only be overwritten (and warns).
        model.resize_token_embeddings(vocab.last_id + 1, mean_resizing=False)
    # Rows of the tokens that existed before: a checkpoint may have spare (untrained) rows past
    # the tokenizer (Qwen2.5 has ~270), which must not count towards the mean.
    known = min(first_new, rows_before)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_rows(model.get_input_embeddings().weight, known, first_new, vocab.last_id + 1,
                   noise_scale, generator)
        head = model.get_output_embeddings()
        tied = head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        if not tied:
            _init_rows(head.weight, known, first_new, vocab.last_id + 1, noise_scale, generator)
            if getattr(head, "bias", None) is not None:
                head.bias[first_new:vocab.last_id + 1] = head.bias[:known].float().mean()
    setattr(model.config, RECORD_KEY, vocab.record())


def _init_rows(weight, known: int, start: int, stop: int, noise_scale: float, generator) -> None:
    """weight[start:stop] = mean + noise_scale * std * N(0, 1), statistics of weight[:known]."""
    import torch

    old = weight[:known].float()
    mean, std = old.mean(dim=0), old.std(dim=0)
    noise = torch.randn(stop - start, weight.shape[1], generator=generator).to(weight.device)
    weight[start:stop] = (mean + noise_scale * std * noise).to(weight.dtype)
