"""Prompt templates with speech slots, and the LLM inputs built from them.

A template turns (instruction, response) into an `EncodedPrompt`: runs of
token ids with speech slots between them, plus the response tokens that
carry the loss. `build_inputs` then embeds the tokens, splices each item's
speech embeddings into its slots and pads the batch:

    template = get_template("blsp")
    prompts = [template.encode(tokenizer, "Please transcribe the audio.", response="hello")]
    inputs = build_inputs(prompts, llm.get_input_embeddings(), speech=adapter_out, pad_id=pad_id)
    llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, labels=inputs.labels)

Templates (TEMPLATES registry):
- "blsp": `###[Human]:{instruction}` <speech> `\\n\\n\\n###[Assistant]:` {response} EOS
  (BLSP, cwang621/blsp: the prefix is tokenized with the tokenizer's special
  tokens (BOS), suffix and response without, EOS appended to the response).
- "interleaved": InSerter's plain text, BOS {text before} <speech> {text after}
  EOS: no instruction markup; the loss is on the text after the speech.
- "chat": the tokenizer's own chat template; the user message holds the
  instruction and a placeholder string that is split out into a speech slot.
  The response ends with the template's end-of-turn token (e.g. `<|im_end|>`).

Labels: only response tokens (and the closing EOS / end-of-turn) carry
labels; every prompt, speech and padding position is -100. The BLSP
original once put non -100 labels on speech positions; tests check ours.
The text-only path (`transcript=`) puts the transcript text where the
speech would be (the teacher input of BLSP-KD); its response tokens are the
same ids as in the speech prompt, so response positions align.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..config import Registry
from ..errors import ConfigError

__all__ = [
    "BLSP_SUFFIX", "IGNORE_INDEX", "SPEECH_PLACEHOLDER", "TEMPLATES", "BlspTemplate",
    "ChatTemplate", "EncodedPrompt", "LMInputs", "PromptTemplate", "build_inputs",
    "get_template", "pick_pad_id",
]

IGNORE_INDEX = -100
SPEECH_PLACEHOLDER = "<|speechlm:speech|>"  # never produced by tokenizing ordinary text
BLSP_PREFIX = "###[Human]:"
BLSP_SUFFIX = "\n\n\n###[Assistant]:"

TEMPLATES: Registry[type[PromptTemplate]] = Registry("prompt template")


@dataclass
class EncodedPrompt:
    """One item: `pieces` are token-id runs or None (a speech slot), in order; `response`
    holds the tokens that carry the loss (empty when generating)."""

    pieces: list[list[int] | None]
    response: list[int] = field(default_factory=list)

    @property
    def num_speech(self) -> int:
        return sum(piece is None for piece in self.pieces)

    def prompt_ids(self) -> list[int]:
        """Prompt tokens with the speech slots left out (for inspection and length checks)."""
        return [t for piece in self.pieces if piece is not None for t in piece]


def pick_pad_id(tokenizer) -> int:
    """Token id used to fill padding: pad, else eos, else unk, else 0. Padding is always
    masked by the attention mask and -100 labels, so its value never matters."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_continuing(tokenizer, text: str) -> list[int]:
    """Ids of `text` as they are inside a longer string, i.e. right after other text: a
    SentencePiece tokenizer would otherwise start it with a dummy-prefix "▁" token that the
    LLM never saw there (after the speech, the LLM should see what it saw after text)."""
    anchor = _encode(tokenizer, "a")
    ids = _encode(tokenizer, "a" + text)
    if anchor and ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return _encode(tokenizer, text)


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token; the "
                          "response needs one to end on. Set eos_token in tokenizer_config.json")
    return int(eos)


class PromptTemplate:
    """Base class: `encode(tokenizer, instruction, response=, transcript=) -> EncodedPrompt`."""

    name = ""

    def encode(self, tokenizer, instruction: str = "", *, response: str | None = None,
               transcript: str | None = None) -> EncodedPrompt:
        raise NotImplementedError

    def stop_token_ids(self, tokenizer) -> list[int]:
        """Tokens that end a generated response."""
        eos = tokenizer.eos_token_id
        return [int(eos)] if eos is not None else []

    def options(self) -> dict:
        return {}


@TEMPLATES.register("blsp")
class BlspTemplate(PromptTemplate):
    """BLSP: `###[Human]:{instruction}` + speech + `\\n\\n\\n###[Assistant]:` + response + EOS."""

    name = "blsp"

    def encode(self, tokenizer, instruction="", *, response=None, transcript=None):
        prefix = f"{BLSP_PREFIX}{instruction}"
        if transcript is None:
            pieces = [_encode(tokenizer, prefix, special=True), None,
                      encode_continuing(tokenizer, BLSP_SUFFIX)]
        else:
            # one string, as the LLM read text in BLSP's stage 1: `{instruction} {transcript}`
            joined = f"{prefix} {transcript}" if instruction else prefix + transcript
            pieces = [_encode(tokenizer, joined + BLSP_SUFFIX, special=True)]
        answer = [] if response is None else _encode(tokenizer, response) + [_eos_id(tokenizer)]
        return EncodedPrompt(pieces, answer)


@TEMPLATES.register("interleaved")
class InterleavedTemplate(PromptTemplate):
    """InSerter's plain interleaved text: BOS `{instruction}` + speech + response + EOS, where
    the "instruction" is the text before the speech (often empty) and the response the text
    that continues it, joined by spaces as in the corpus the LLM read. No chat markup."""

    name = "interleaved"

    def encode(self, tokenizer, instruction="", *, response=None, transcript=None):
        bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
        if transcript is None:
            pieces = [bos + _encode(tokenizer, instruction), None]
        else:
            joined = f"{instruction} {transcript}" if instruction else transcript
            pieces = [bos + _encode(tokenizer, joined)]
        answer = [] if response is None else \
            encode_continuing(tokenizer, " " + response) + [_eos_id(tokenizer)]
        return EncodedPrompt(pieces, answer)


@TEMPLATES.register("chat")
class ChatTemplate(PromptTemplate):
    """The tokenizer's chat template; the user turn is `{instruction}\\n<speech>`
    (`speech_first=True`: `<speech>\\n{instruction}`), with an optional system prompt."""

    name = "chat"

    def __init__(self, system_prompt: str | None = None, speech_first: bool = False):
        self.system_prompt = system_prompt
        self.speech_first = bool(speech_first)

    def options(self) -> dict:
        return {"system_prompt": self.system_prompt, "speech_first": self.speech_first}

    @staticmethod
    def check(tokenizer, source: str = "") -> None:
        if not getattr(tokenizer, "chat_template", None):
            where = f" of {source}" if source else ""
            raise ConfigError(
                f"the tokenizer{where} has no chat template, so template 'chat' cannot be used; "
                "use template 'blsp' (the ###[Human]: / ###[Assistant]: format) or an "
                "instruct model whose tokenizer_config.json has a chat_template")

    def user_content(self, instruction: str, speech: str) -> str:
        parts = [speech, instruction] if self.speech_first else [instruction, speech]
        return "\n".join(p for p in parts if p)

    def messages(self, instruction: str, speech: str = SPEECH_PLACEHOLDER) -> list[dict]:
        out = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return out + [{"role": "user", "content": self.user_content(instruction, speech)}]

    def encode(self, tokenizer, instruction="", *, response=None, transcript=None):
        speech = SPEECH_PLACEHOLDER if transcript is None else transcript
        return self.encode_messages(tokenizer, self.messages(instruction, speech),
                                    response=response)

    def encode_messages(self, tokenizer, messages: Sequence[dict], *,
                        response: str | None = None) -> EncodedPrompt:
        """Any conversation (multi-turn included): every SPEECH_PLACEHOLDER in a message's
        content becomes a speech slot; the generation prompt for the assistant follows."""
        self.check(tokenizer)
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
        parts = text.split(SPEECH_PLACEHOLDER)
        pieces: list[list[int] | None] = [_encode(tokenizer, parts[0])]
        for part in parts[1:]:
            pieces += [None, _encode(tokenizer, part)]
        answer = [] if response is None else _encode(tokenizer, response) + self._end_of_turn(tokenizer)
        return EncodedPrompt(pieces, answer)

    def _end_of_turn(self, tokenizer) -> list[int]:
        """The special token the template closes an assistant turn with (else EOS)."""
        cache = getattr(self, "_eot_cache", None)
        if cache is not None and cache[0] is tokenizer:
            return list(cache[1])
        marker = "speechlm-response-marker"
        ids = [_eos_id(tokenizer)]
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                tokenize=False)
            after = text.split(marker, 1)[1]
            special = set(tokenizer.all_special_ids) | {
                i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            for token in _encode(tokenizer, after):
                if token in special:
                    ids = [token]
                    break
        except Exception:  # noqa: BLE001 - templates that reject this probe: fall back to EOS
            pass
        self._eot_cache = (tokenizer, ids)
        return list(ids)

    def stop_token_ids(self, tokenizer) -> list[int]:
        ids = self._end_of_turn(tokenizer)
        eos = tokenizer.eos_token_id
        return ids + ([int(eos)] if eos is not None and eos not in ids else [])


def get_template(name: str, **options) -> PromptTemplate:
    """Template `name` ("blsp" or "chat") with its options (chat: system_prompt, speech_first)."""
    cls = TEMPLATES.get(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"prompt template '{name}': {e}") from None


# -- inputs ------------------------------------------------------------------------------


@dataclass
class LMInputs:
    """A padded batch for the LLM.

    inputs_embeds [B, L, D]; attention_mask [B, L] int64 (0 = padding);
    labels [B, L] int64 (-100 everywhere but response tokens) or None;
    speech_mask [B, L] bool (True at spliced speech frames);
    input_ids [B, L] int64 (token ids; pad id at speech and padding positions);
    padding_side "right" (training) or "left" (generation).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    speech_mask: torch.Tensor
    input_ids: torch.Tensor
    padding_side: str = "right"

    def to(self, device) -> LMInputs:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return LMInputs(move(self.inputs_embeds), move(self.attention_mask), move(self.labels),
                        move(self.speech_mask), move(self.input_ids), self.padding_side)

    @property
    def response_mask(self) -> torch.Tensor:
        """Bool [B, L]: positions holding response tokens (labels != -100)."""
        if self.labels is None:
            return torch.zeros_like(self.speech_mask)
        return self.labels != IGNORE_INDEX


def build_inputs(prompts: Sequence[EncodedPrompt], embed_tokens: Callable[[torch.Tensor], torch.Tensor],
                 *, speech: torch.Tensor | None = None, speech_lengths: torch.Tensor | None = None,
                 pad_id: int = 0, padding_side: str = "right", with_labels: bool = True
                 ) -> LMInputs:
    """Embed and pad a batch of prompts, splicing speech frames into their slots.

    speech [N, F, D] / speech_lengths [N]: one clip per speech slot, consumed in
    order (item 0's slots first). Each slot takes exactly its clip's valid
    frames. with_labels: labels on the response tokens (else labels is None).
    padding_side: "right" for training, "left" for batched generation.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    n_slots = sum(p.num_speech for p in prompts)
    if n_slots and speech is None:
        raise ValueError(f"the prompts have {n_slots} speech slot(s) but no speech was given")
    clip_lengths: list[int] = []
    if speech is not None:
        if speech_lengths is None:
            speech_lengths = torch.full((speech.shape[0],), speech.shape[1], dtype=torch.long)
        clip_lengths = [int(n) for n in speech_lengths.tolist()]
        if len(clip_lengths) != n_slots:
            raise ValueError(f"{len(clip_lengths)} speech clip(s) for {n_slots} speech slot(s)")

    rows: list[tuple[list[int], list[bool], list[int]]] = []  # ids, is_speech, labels
    clip = 0
    for prompt in prompts:
        ids: list[int] = []
        is_speech: list[bool] = []
        for piece in prompt.pieces:
            if piece is None:
                n = clip_lengths[clip]
                clip += 1
                ids += [pad_id] * n
                is_speech += [True] * n
            else:
                ids += piece
                is_speech += [False] * len(piece)
        labels = [IGNORE_INDEX] * len(ids)
        if prompt.response:
            ids += prompt.response
            is_speech += [False] * len(prompt.response)
            labels += list(prompt.response) if with_labels else [IGNORE_INDEX] * len(prompt.response)
        rows.append((ids, is_speech, labels))

    batch = len(rows)
    width = max((len(r[0]) for r in rows), default=0)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    label_t = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    speech_mask = torch.zeros((batch, width), dtype=torch.bool)
    for i, (ids, is_speech, labels) in enumerate(rows):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention[i, span] = 1
        label_t[i, span] = torch.tensor(labels, dtype=torch.long)
        speech_mask[i, span] = torch.tensor(is_speech, dtype=torch.bool)

    weight = getattr(embed_tokens, "weight", None)
    device = weight.device if weight is not None else (speech.device if speech is not None else "cpu")
    input_ids, attention = input_ids.to(device), attention.to(device)
    label_t, speech_mask = label_t.to(device), speech_mask.to(device)
    embeds = embed_tokens(input_ids)
    if n_slots:
        lengths = torch.as_tensor(clip_lengths, device=speech.device)
        valid = torch.arange(speech.shape[1], device=speech.device) < lengths[:, None]
        frames = speech[valid]  # row-major: clip by clip, frame by frame = slot order
        embeds = embeds.masked_scatter(speech_mask[..., None], frames.to(embeds.device, embeds.dtype))
    return LMInputs(embeds, attention, label_t if with_labels else None, speech_mask, input_ids,
                    padding_side)
