"""SpeechLM: a frozen speech encoder, a trainable adapter and a causal LLM, with save/load.

    config = SpeechLMConfig(encoder_path="whisper-small", llm_path="Qwen2.5-0.5B-Instruct",
                            adapter="blsp", template="chat", instruction="Transcribe the audio.")
    model = SpeechLM.build(config)
    out = model(batch["audio"], batch["audio_lengths"], responses=batch["texts"])
    out.loss.backward()                               # only the adapter (+ LoRA) has grads
    model.generate(audio, lengths, max_new_tokens=32)  # -> list[str]
    model.save_pretrained("ckpt")                     # trained weights only + speechlm_config.json
    model = SpeechLM.from_pretrained("ckpt")          # rebuilds encoder + LLM from their dirs

Checkpoint directory (`save_pretrained`):
- `model.safetensors`: exactly the parameters that train (requires_grad):
  adapter, LoRA / PLoRA matrices, weighted-layer weights, anything unfrozen.
- `speechlm_config.json`: the SpeechLMConfig (adapter and prompt settings,
  LoRA settings, base model paths) plus the config.json hashes of the base
  encoder and LLM and the list of saved tensors.
- `llm/`: only after merging LoRA (`merge_lora=True`): the merged LLM and
  its tokenizer; the config then points at it.
Loading reads safetensors only and never runs remote code unless
`trust_remote_code=True` is passed to `from_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, SpeechLMError
from ..pretrained.resolve import resolve_model_dir
from .adapters import AdapterOutput, build_adapter
from .encoders import (
    EncoderOutput,
    SpeechEncoder,
    config_sha256,
    load_encoder,
    quiet_transformers,
    warn_missing_weights,
)
from .lora import LoraSettings, apply_encoder_lora, apply_llm_lora, has_llm_lora, merge_llm_lora
from .plora import apply_plora
from .prompts import (
    EncodedPrompt,
    LMInputs,
    PromptTemplate,
    build_inputs,
    get_template,
    pick_pad_id,
)
from .shared_prefix import (
    cache_kwarg,
    prefix_cache,
    prefix_first,
    rows_prefill_cache,
    shared_prefix_length,
)

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "SpeechLM", "SpeechLMConfig", "SpeechLMOutput", "load_llm"]

CONFIG_FILE = "speechlm_config.json"
WEIGHTS_FILE = "model.safetensors"
MERGED_LLM_DIR = "llm"
FORMAT_VERSION = 1


@dataclass
class SpeechLMConfig:
    """Everything that defines a SpeechLM besides its weights (a recipe's `model` section).

    encoder_path / llm_path: any model name the resolver takes (a local directory, a
    hub id already in the local HF cache, `models:NAME`, `zoo:NAME`). encoder: "auto"
    or a registered kind. encoder_pad_to_window: a Whisper encoder pads every clip to
    its 30 s window instead of encoding the clip's own length. encoder_layer:
    None (last), an int index into hidden_states, or "weighted". adapter /
    adapter_options: a registered adapter and its options. adapter_output_scale: the
    starting scale of the adapter's output norm: "llm" (the RMS of the LLM's input
    embeddings, so speech embeddings start as large as token embeddings), a number, or
    None (the norm's default 1.0, as BLSP's code). template: "blsp" or
    "chat" (with system_prompt, speech_first). instruction: the default
    instruction when none is given per item. lora / plora / encoder_lora: LoRA
    settings or None (lora and plora are exclusive). freeze_llm /
    freeze_encoder: False trains the whole model part (saved whole).
    """

    encoder_path: str
    llm_path: str
    encoder: str = "auto"
    encoder_layer: int | str | None = None
    encoder_max_window_s: float | None = None
    encoder_unpadded: bool = False
    encoder_pad_to_window: bool = False
    freeze_encoder: bool = True
    adapter: str = "blsp"
    adapter_options: dict[str, Any] = field(default_factory=dict)
    adapter_output_scale: str | float | None = None
    template: str = "blsp"
    system_prompt: str | None = None
    speech_first: bool = False
    instruction: str = ""
    freeze_llm: bool = True
    lora: LoraSettings | None = None
    plora: LoraSettings | None = None
    encoder_lora: LoraSettings | None = None

    def template_options(self) -> dict:
        if self.template == "chat":
            return {"system_prompt": self.system_prompt, "speech_first": self.speech_first}
        return {}


@dataclass
class SpeechLMOutput:
    """loss (mean cross-entropy over response tokens; None without responses), logits
    [B, L, V] and the LMInputs they came from (labels, masks)."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    inputs: LMInputs


def load_llm(path: str | os.PathLike, *, trust_remote_code: bool = False,
             dtype: torch.dtype | None = None):
    """(causal LM, tokenizer) from a local directory (or a hub id in the local cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(path, what="LLM")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        llm, info = AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=trust_remote_code,
            output_loading_info=True, **({"dtype": dtype} if dtype is not None else {}))
    warn_missing_weights(info, model_dir, "LLM")
    return llm.eval(), tokenizer


def causal_lm_of(llm):
    """The transformers CausalLM inside `llm` (a peft model's base model keeps its LoRA
    layers, which run in place)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def _as_list(value: str | Sequence[str] | None, n: int, default: str, what: str) -> list[str]:
    if value is None:
        return [default] * n
    if isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{len(value)} {what} for a batch of {n}")
    return [default if v is None else v for v in value]


class SpeechLM(nn.Module):
    """Encoder -> adapter -> LLM, with prompt building, loss, generation and save/load.

    The constructor freezes the LLM (unless config.freeze_llm is False) and
    applies the LoRA / PLoRA / encoder LoRA that `config` names.
    """

    def __init__(self, encoder: SpeechEncoder, adapter: nn.Module, llm: nn.Module, tokenizer,
                 config: SpeechLMConfig, *, template: PromptTemplate | None = None):
        super().__init__()
        if config.lora is not None and config.plora is not None:
            raise ConfigError("lora and plora are exclusive: PLoRA is LoRA restricted to speech "
                              "positions; set one of them to null")
        self.encoder = encoder
        self.adapter = adapter
        self.config = config
        self.tokenizer = tokenizer
        self.template = template or get_template(config.template, **config.template_options())
        if config.template == "chat":
            type(self.template).check(tokenizer, config.llm_path)
        self.pad_id = pick_pad_id(tokenizer)
        self.base_hashes: dict[str, str | None] = {"encoder": None, "llm": None}
        self.llm_in_checkpoint = False  # True once a merged LLM is saved inside a checkpoint

        for p in llm.parameters():
            p.requires_grad_(not config.freeze_llm)
        self._plora = None
        self._speed_up_undo = None  # what speed_up_frozen_llm changed, for restore_frozen_llm
        if config.lora is not None:
            llm = apply_llm_lora(llm, config.lora)
        if config.plora is not None:
            self._plora = apply_plora(llm, config.plora)
        self.llm = llm
        if config.encoder_lora is not None:
            apply_encoder_lora(encoder, config.encoder_lora)
        self.train(self.training)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def build(cls, config: SpeechLMConfig, *, trust_remote_code: bool = False,
              dtype: torch.dtype | None = None) -> SpeechLM:
        """A fresh SpeechLM (new adapter, fresh LoRA) from the base models `config` names.

        dtype: weights dtype of the encoder and LLM (e.g. torch.bfloat16); the
        adapter and LoRA weights stay float32.
        """
        encoder_options: dict[str, Any] = {}
        if config.encoder_max_window_s is not None:
            encoder_options["max_window_s"] = config.encoder_max_window_s
        if config.encoder_unpadded:
            encoder_options["unpadded"] = True
        if config.encoder_pad_to_window:
            encoder_options["pad_to_window"] = True
        encoder = load_encoder(config.encoder, config.encoder_path, layer=config.encoder_layer,
                               frozen=config.freeze_encoder, dtype=dtype, **encoder_options)
        llm, tokenizer = load_llm(config.llm_path, trust_remote_code=trust_remote_code, dtype=dtype)
        adapter = build_adapter(config.adapter, encoder.output_dim,
                                llm.get_input_embeddings().embedding_dim,
                                input_rate=encoder.frame_rate, **config.adapter_options)
        scale = config.adapter_output_scale
        if isinstance(scale, str) and scale != "llm":
            raise ConfigError(f"model.adapter_output_scale must be 'llm', a number or null, "
                              f"got {scale!r}")
        if scale is not None:
            if scale == "llm":
                weight = llm.get_input_embeddings().weight.detach().float()
                scale = float(weight.pow(2).mean().sqrt())
            adapter.set_output_scale(float(scale))
        model = cls(encoder, adapter, llm, tokenizer, config)
        model.base_hashes = {
            "encoder": config_sha256(resolve_model_dir(config.encoder_path)),
            "llm": config_sha256(resolve_model_dir(config.llm_path)),
        }
        return model

    # -- modes and parameters -------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        # a frozen LLM stays in eval mode; with LoRA / PLoRA / unfrozen it follows `mode`
        self.llm.train(mode and any(p.requires_grad for p in self.llm.parameters()))
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def speed_up_frozen_llm(self, amp_dtype: torch.dtype | None, device_type: str) -> list[str]:
        """Make a frozen LLM cheaper to train through; returns what changed (nothing when
        any LLM weight trains: LoRA, PLoRA, unfrozen).

        - Under bf16 autocast its weights are stored in bf16: nothing updates them, so no
          fp32 master copy is needed, and autocast would otherwise cast every frozen weight
          again on every call (it caches casts only of weights that train).
        - On a CPU its attention runs eagerly: PyTorch's CPU flash-attention backward is
          slower than plain matmuls at these lengths (~160 positions)."""
        if self._plora is not None or any(p.requires_grad for p in self.llm.parameters()):
            return []
        changes = []
        config = getattr(self.llm, "config", None)
        undo = {"attention": getattr(config, "_attn_implementation", None)}
        if amp_dtype == torch.bfloat16 and self.llm.dtype == torch.float32:
            self.llm.to(torch.bfloat16)
            undo["reload_from"] = self.config.llm_path
            changes.append("LLM weights in bf16")
        if device_type == "cpu" and hasattr(self.llm, "set_attn_implementation") and \
                undo["attention"] not in (None, "eager"):
            self.llm.set_attn_implementation("eager")
            changes.append("eager attention")
        if changes:
            self._speed_up_undo = undo
        return changes

    def restore_frozen_llm(self) -> None:
        """Undo `speed_up_frozen_llm`, so that what is evaluated after training is the model
        as it is saved and loaded: the LLM's own fp32 weights, read again from where they came
        from (casting the bf16 copy back would keep its rounding), and its attention."""
        undo = self._speed_up_undo
        if undo is None:
            return
        if "reload_from" in undo:
            original, _ = load_llm(undo["reload_from"])
            self.llm.to(torch.float32).load_state_dict(original.state_dict())
        if undo["attention"] is not None:
            self.llm.set_attn_implementation(undo["attention"])
        self._speed_up_undo = None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train (requires_grad), by name: what save_pretrained writes."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- speech ------------------------------------------------------------------------

    def encode_speech(self, audio: torch.Tensor | None = None,
                      audio_lengths: torch.Tensor | None = None, *,
                      encoder_output: EncoderOutput | None = None,
                      target_lengths: torch.Tensor | None = None) -> AdapterOutput:
        """Audio (or cached encoder frames) -> LLM-space speech embeddings and lengths.

        target_lengths: each clip's transcript token count, for an adapter that emits one
        embedding per token (CIF, `adapter.emits_per_token`) in training; ignored otherwise."""
        if encoder_output is None:
            if audio is None:
                raise ValueError("give audio (+ audio_lengths) or encoder_output")
            encoder_output = self.encoder(audio, audio_lengths)
        hidden, lengths = encoder_output
        weight = next(self.adapter.parameters())
        extra = {}
        if target_lengths is not None and getattr(self.adapter, "emits_per_token", False):
            extra["target_lengths"] = torch.as_tensor(target_lengths, device=weight.device)
        return self.adapter(hidden.to(weight.device, weight.dtype), lengths.to(weight.device),
                            **extra)

    # -- prompts and inputs ---------------------------------------------------------------

    @contextlib.contextmanager
    def with_template(self, template: PromptTemplate | str | None):
        """Prompts come from `template` (an object or a registered name) inside the block,
        e.g. InSerter's plain interleaved text while training a model that answers in its own
        template. None: no change."""
        if template is None:
            yield self
            return
        saved = self.template
        self.template = get_template(template) if isinstance(template, str) else template
        try:
            yield self
        finally:
            self.template = saved

    def encode_prompts(self, n: int, instructions: str | Sequence[str] | None = None,
                       responses: Sequence[str] | None = None,
                       transcripts: Sequence[str] | None = None) -> list[EncodedPrompt]:
        """n prompts from the template: one speech slot each (or the transcript text)."""
        instructions = _as_list(instructions, n, self.config.instruction, "instructions")
        responses = list(responses) if responses is not None else [None] * n
        transcripts = list(transcripts) if transcripts is not None else [None] * n
        if len(responses) != n or len(transcripts) != n:
            raise ValueError(f"responses/transcripts do not match the batch of {n}")
        return [self.template.encode(self.tokenizer, ins, response=res, transcript=tr)
                for ins, res, tr in zip(instructions, responses, transcripts, strict=True)]

    def build_inputs(self, audio: torch.Tensor | None = None,
                     audio_lengths: torch.Tensor | None = None, *,
                     instructions: str | Sequence[str] | None = None,
                     responses: Sequence[str] | None = None,
                     prompts: Sequence[EncodedPrompt] | None = None,
                     encoder_output: EncoderOutput | None = None,
                     speech: AdapterOutput | None = None,
                     padding_side: str = "right") -> LMInputs:
        """LLM inputs for a speech batch: embeddings with the speech spliced in, mask, labels.

        prompts: ready EncodedPrompts (e.g. multi-turn chat); their speech slots take
        the clips of the batch in order. Otherwise one prompt per clip from the
        template with `instructions` (default config.instruction) and `responses`.
        speech: the adapter's output when the caller already ran `encode_speech`.
        """
        if speech is None:
            speech = self.encode_speech(audio, audio_lengths, encoder_output=encoder_output)
        if prompts is None:
            prompts = self.encode_prompts(speech.hidden.shape[0], instructions, responses)
        return build_inputs(prompts, self.llm.get_input_embeddings(), speech=speech.hidden,
                            speech_lengths=speech.lengths, pad_id=self.pad_id,
                            padding_side=padding_side, with_labels=responses is not None
                            or any(p.response for p in prompts))

    def build_text_inputs(self, transcripts: Sequence[str], *,
                          instructions: str | Sequence[str] | None = None,
                          responses: Sequence[str] | None = None,
                          padding_side: str = "right") -> LMInputs:
        """The same template with each transcript's text in place of the speech (text path,
        e.g. the BLSP-KD teacher). Response tokens equal those of the speech path."""
        prompts = self.encode_prompts(len(transcripts), instructions, responses, transcripts)
        return build_inputs(prompts, self.llm.get_input_embeddings(), pad_id=self.pad_id,
                            padding_side=padding_side, with_labels=responses is not None)

    # -- LLM calls --------------------------------------------------------------------

    @contextlib.contextmanager
    def _llm_context(self, inputs: LMInputs, use_lora: bool) -> Any:
        with contextlib.ExitStack() as stack:
            if self._plora is not None and use_lora:
                stack.enter_context(self._plora.speech_positions(inputs.speech_mask))
            if not use_lora and has_llm_lora(self.llm):
                stack.enter_context(self.llm.disable_adapter())
            yield

    def lm_forward(self, inputs: LMInputs, *, use_lora: bool = True, **kwargs):
        """The LLM on `inputs` (PLoRA gated by its speech mask); use_lora=False runs the
        base LLM. Returns the transformers CausalLMOutput (loss when inputs have labels)."""
        with self._llm_context(inputs, use_lora):
            return self.llm(inputs_embeds=inputs.inputs_embeds,
                            attention_mask=inputs.attention_mask, labels=inputs.labels,
                            use_cache=False, **kwargs)

    def forward(self, audio: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None,
                *, responses: Sequence[str] | None = None,
                instructions: str | Sequence[str] | None = None,
                prompts: Sequence[EncodedPrompt] | None = None,
                encoder_output: EncoderOutput | None = None) -> SpeechLMOutput:
        """Loss on the response tokens only, for a batch of audio and responses."""
        inputs = self.build_inputs(audio, audio_lengths, instructions=instructions,
                                   responses=responses, prompts=prompts,
                                   encoder_output=encoder_output)
        out = self.lm_forward(inputs)
        return SpeechLMOutput(out.loss if inputs.labels is not None else None, out.logits, inputs)

    # -- generation -------------------------------------------------------------------

    def prepare_generation_inputs(self, audio: torch.Tensor | None = None,
                                  audio_lengths: torch.Tensor | None = None, *,
                                  instructions: str | Sequence[str] | None = None,
                                  prompts: Sequence[EncodedPrompt] | None = None,
                                  encoder_output: EncoderOutput | None = None) -> LMInputs:
        """Left-padded prompt embeddings + attention mask for batched `generate`."""
        if prompts is not None and any(p.response for p in prompts):
            prompts = [EncodedPrompt(p.pieces) for p in prompts]
        return self.build_inputs(audio, audio_lengths, instructions=instructions, prompts=prompts,
                                 encoder_output=encoder_output, padding_side="left")

    def stop_token_ids(self) -> list[int]:
        """Token ids that end a response: the template's end of turn, EOS and the
        LLM generation config's eos ids."""
        ids = self.template.stop_token_ids(self.tokenizer)
        generation_config = getattr(self.llm, "generation_config", None)
        extra = getattr(generation_config, "eos_token_id", None)
        for token in [extra] if isinstance(extra, int) else list(extra or []):
            if token not in ids:
                ids.append(int(token))
        return ids

    @torch.no_grad()
    def generate_ids(self, inputs: LMInputs, **generate_kwargs) -> torch.Tensor:
        """New token ids [B, N] from `llm.generate` on left-padded inputs (greedy by default;
        any generate() option, e.g. max_new_tokens, num_beams, do_sample). Rows end with pad
        ids after their stop token."""
        if inputs.padding_side != "left" and bool((inputs.attention_mask[:, -1] == 0).any()):
            raise ValueError("generation needs left-padded inputs (prepare_generation_inputs)")
        kwargs = dict(do_sample=False, max_new_tokens=64, pad_token_id=self.pad_id,
                      eos_token_id=self.stop_token_ids() or None)
        kwargs.update(generate_kwargs)
        with self._llm_context(inputs, True):
            if (self._plora is None and kwargs.get("num_beams", 1) == 1
                    and inputs.padding_side == "left"):
                # the template's opening is the same in every row: prefill it once; on a
                # CPU then each row's rest alone, skipping its padding (shared_prefix)
                base = causal_lm_of(self.llm)
                body = getattr(base, base.base_model_prefix)
                shared, prefix = shared_prefix_length(inputs), None
                if shared:
                    prefix = prefix_cache(body, inputs, shared)
                    inputs = prefix_first(inputs, shared)
                cache = (rows_prefill_cache(body, inputs, shared, prefix)
                         if inputs.inputs_embeds.device.type == "cpu" else prefix)
                if cache is not None:
                    kwargs[cache_kwarg(base)] = cache
            return self.llm.generate(inputs_embeds=inputs.inputs_embeds,
                                     attention_mask=inputs.attention_mask, **kwargs)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Text of generated rows, cut at the first stop token."""
        stops = set(self.stop_token_ids())
        texts = []
        for row in ids.tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    def generate(self, audio: torch.Tensor | None = None, audio_lengths: torch.Tensor | None = None,
                 *, instructions: str | Sequence[str] | None = None,
                 prompts: Sequence[EncodedPrompt] | None = None,
                 encoder_output: EncoderOutput | None = None, **generate_kwargs) -> list[str]:
        """Generated responses (text) for a batch of audio."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                inputs = self.prepare_generation_inputs(audio, audio_lengths,
                                                        instructions=instructions, prompts=prompts,
                                                        encoder_output=encoder_output)
            return self.decode(self.generate_ids(inputs, **generate_kwargs))
        finally:
            self.train(was_training)

    # -- merging ----------------------------------------------------------------------

    def merge_lora(self) -> None:
        """Fold the LLM's LoRA into its weights in place (config.lora becomes None and the
        LLM counts as trained: save_pretrained then writes it whole under llm/)."""
        if self.config.plora is not None:
            raise ConfigError("PLoRA cannot be merged into the LLM: its delta applies only at "
                              "speech positions, so no single weight matrix equals it. Save "
                              "with merge_lora=False (the PLoRA weights are saved separately)")
        if self.config.lora is None:
            raise ConfigError("this SpeechLM has no LLM LoRA to merge (config.lora is null)")
        self.llm = merge_llm_lora(self.llm)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.config = replace(self.config, lora=None)
        self.llm_in_checkpoint = True
        self.train(self.training)

    # -- save / load ------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike, *, merge_lora: bool = False) -> Path:
        """Write the trained weights (safetensors) and speechlm_config.json into `out_dir`.

        merge_lora: first merge the LLM LoRA into the LLM (in place, see merge_lora)
        and save the merged LLM with its tokenizer under `out_dir/llm`.
        """
        from safetensors.torch import save as save_safetensors

        from ..config import config_to_dict
        from ..jsonl import atomic_write

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if merge_lora:
            self.merge_lora()
        config = self.config
        if self.llm_in_checkpoint:
            llm_dir = out_dir / MERGED_LLM_DIR
            if Path(config.llm_path).resolve() != llm_dir.resolve():
                with quiet_transformers():
                    self.llm.save_pretrained(llm_dir)
                    self.tokenizer.save_pretrained(llm_dir)
                self.base_hashes["llm"] = config_sha256(llm_dir)
        tensors = {name: p.detach().to("cpu").contiguous().clone()
                   for name, p in self.trainable_state_dict().items()}
        with atomic_write(out_dir / WEIGHTS_FILE, "wb") as f:
            f.write(save_safetensors(tensors, metadata={"format": "pt"}))
        record = {
            "format": "speechlm",
            "format_version": FORMAT_VERSION,
            "config": config_to_dict(config),
            "llm_in_checkpoint": self.llm_in_checkpoint,
            "base": {
                "encoder": {"path": config.encoder_path, "config_sha256": self.base_hashes["encoder"]},
                "llm": {"path": MERGED_LLM_DIR if self.llm_in_checkpoint else config.llm_path,
                        "config_sha256": self.base_hashes["llm"]},
            },
            "encoder": {"kind": self.encoder.kind, "frame_rate": self.encoder.frame_rate,
                        "output_dim": self.encoder.output_dim},
            "adapter": {"name": config.adapter, "options": self.adapter.options(),
                        "output_frame_rate": self.adapter.output_frame_rate()},
            "trained": sorted(tensors),
        }
        with atomic_write(out_dir / CONFIG_FILE) as f:
            f.write(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        return out_dir

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike, *,
                        encoder_path: str | os.PathLike | None = None,
                        llm_path: str | os.PathLike | None = None,
                        trust_remote_code: bool = False,
                        dtype: torch.dtype | None = None) -> SpeechLM:
        """Rebuild a saved SpeechLM: base encoder and LLM from their directories (or the
        overrides, when they moved), then the trained weights from model.safetensors."""
        from safetensors.torch import load_file

        from ..config import config_from_dict

        ckpt_dir = Path(ckpt_dir)
        config_file = ckpt_dir / CONFIG_FILE
        if not config_file.is_file():
            raise SpeechLMError(f"{ckpt_dir}: not a speechlm checkpoint (no {CONFIG_FILE}); "
                                "give the directory SpeechLM.save_pretrained wrote")
        try:
            record = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SpeechLMError(f"{config_file}: invalid JSON ({e})") from None
        if record.get("format") != "speechlm" or record.get("format_version", 0) > FORMAT_VERSION:
            raise SpeechLMError(f"{config_file}: unsupported checkpoint format "
                                f"{record.get('format')!r} version {record.get('format_version')!r}")
        config = config_from_dict(SpeechLMConfig, record["config"], source=str(config_file))
        in_ckpt = bool(record.get("llm_in_checkpoint"))
        if encoder_path is not None:
            config = replace(config, encoder_path=str(encoder_path))
        if llm_path is not None:
            config = replace(config, llm_path=str(llm_path))
        elif in_ckpt:
            config = replace(config, llm_path=str(ckpt_dir / MERGED_LLM_DIR))
        for role, path, option in (("encoder", config.encoder_path, "encoder_path"),
                                   ("LLM", config.llm_path, "llm_path")):
            try:
                resolve_model_dir(path, what=f"base {role}")
            except ConfigError as e:
                raise ConfigError(
                    f"{e}. The checkpoint {ckpt_dir} was trained on this base {role}; if it moved, "
                    f"pass {option}=NEW_DIR to SpeechLM.from_pretrained (CLI: "
                    f"--{option.replace('_', '-')} NEW_DIR)") from None
        weights = ckpt_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise SpeechLMError(f"{ckpt_dir}: {WEIGHTS_FILE} is missing")

        model = cls.build(config, trust_remote_code=trust_remote_code, dtype=dtype)
        model.llm_in_checkpoint = in_ckpt and llm_path is None
        for role in ("encoder", "llm"):
            saved = record.get("base", {}).get(role, {}).get("config_sha256")
            if saved and model.base_hashes[role] and saved != model.base_hashes[role]:
                logger.warning("%s: the base %s config differs from the one this checkpoint was "
                               "trained on (config.json hash %s, saved %s); outputs may be wrong",
                               ckpt_dir, role, model.base_hashes[role][:12], saved[:12])
        tensors = load_file(str(weights))
        own = dict(model.named_parameters())
        unexpected = sorted(set(tensors) - set(own))
        missing = sorted(set(model.trainable_state_dict()) - set(tensors))
        if unexpected or missing:
            raise SpeechLMError(
                f"{weights} does not fit the model its config describes: "
                f"{len(unexpected)} unknown tensor(s) {unexpected[:3]}, {len(missing)} trained "
                f"parameter(s) missing {missing[:3]}")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if own[name].shape != tensor.shape:
                    raise SpeechLMError(f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                                        f"the model expects {tuple(own[name].shape)}")
                own[name].copy_(tensor)
        return model.eval()
