"""Whisper's own decoder fine-tuned with LoRA: the ASR prompt, where LoRA goes, the forward
from cached encoder frames, and the merged save.

    model, tokenizer = load_whisper(directory)               # WhisperForConditionalGeneration
    prompt = asr_prompt(model.generation_config, "es", directory)
    apply_whisper_lora(model, LoraSettings(r=16, alpha=32), encoder_top_layers=0)
    inputs, labels = prompt.sequence(prompt.text_ids(tokenizer, "hola mundo"))
    states = states_from_cache(model, cached, start_layer=None)  # [B, 1500, D]
    merge_lora(model); save_whisper(model, tokenizer, out_dir)   # a plain Whisper directory

The training sequence is Whisper's own: `<|startoftranscript|> <|es|> <|transcribe|>
<|notimestamps|> text <|endoftext|>` (an English-only checkpoint has no language and task
tokens), teacher-forced, with labels only on the text and `<|endoftext|>`. The text is
encoded with a leading space, as Whisper writes its first word.

LoRA (peft, injected in place so the model stays a WhisperForConditionalGeneration that
`generate` and `save_pretrained` know) goes on the decoder's projections and, with
`encoder_top_layers=k`, on the top k encoder layers. The encoder layers below never change,
so their output can be cached on disk (speechlm.pipelines.encoder_cache, the encoder loaded
with `full_window=True`: all 1500 frames of Whisper's 30 s window, the padding's included,
which is what the decoder cross-attends to at inference). `states_from_cache` runs the rest.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .lora import LoraSettings, matching_linear_modules

__all__ = ["DECODER_TARGETS", "AsrPrompt", "NewTokenEmbedding", "add_language_token",
           "apply_whisper_lora", "asr_prompt", "fold_new_tokens", "greedy_decode",
           "load_whisper", "merge_lora", "save_whisper", "states_from_audio", "states_from_cache"]

# attention (self and cross) and MLP projections of Whisper's layers
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class AsrPrompt:
    """Whisper's transcription prompt for one language, and how a transcript becomes a
    teacher-forced (decoder inputs, labels) pair."""

    prefix: list[int]          # <|startoftranscript|> [<|lang|> <|transcribe|>] <|notimestamps|>
    eot: int                   # <|endoftext|>: end of the transcript, and the padding
    max_positions: int         # the decoder's window (448 tokens for every Whisper)
    language: str | None       # None: an English-only checkpoint (no language token)

    def text_ids(self, tokenizer, text: str) -> list[int]:
        """The transcript's tokens, with the leading space Whisper writes."""
        return tokenizer(" " + " ".join(str(text).split()), add_special_tokens=False).input_ids

    def length(self, text_ids: list[int]) -> int:
        """Decoder positions the pair takes: the prompt, the text (the EOT is a label only)."""
        return len(self.prefix) + len(text_ids)

    def sequence(self, text_ids: list[int]) -> tuple[list[int], list[int]]:
        """(decoder input ids, labels): labels -100 where the input is still the prompt."""
        full = [*self.prefix, *text_ids, self.eot]
        labels = [-100] * (len(self.prefix) - 1) + [*text_ids, self.eot]
        return full[:-1], labels


def _find_codes_hint(directory) -> str:
    return (f"the valid codes are the <|xx|> keys of lang_to_id in {directory}/"
            "generation_config.json (or: python -c \"from transformers.models.whisper."
            "tokenization_whisper import LANGUAGES; print(LANGUAGES)\")")


def asr_prompt(generation_config, language: str | None, directory, *,
               field: str = "model.language", max_positions: int = 448) -> AsrPrompt:
    """The prompt of `language` for a checkpoint's generation config; ConfigError naming
    `field` for an unknown code, a missing one, or a language an English-only model lacks."""
    config = generation_config
    sot = int(config.decoder_start_token_id)
    eot = config.eos_token_id
    eot = int(eot[0] if isinstance(eot, (list, tuple)) else eot)
    no_timestamps = getattr(config, "no_timestamps_token_id", None)
    if no_timestamps is None:
        raise ConfigError(f"{directory}/generation_config.json has no no_timestamps_token_id; "
                          "is this a Whisper checkpoint? (a WhisperForConditionalGeneration "
                          "directory saved by transformers has one)")
    if not getattr(config, "is_multilingual", False):
        if language not in (None, "en"):
            raise ConfigError(
                f"{field}={language}: model.init ({directory}) is an English-only Whisper "
                "checkpoint: it has no language tokens and only transcribes English. To "
                f"fine-tune for {language!r} start from a multilingual checkpoint, e.g. "
                "model.init: models:whisper-base (not whisper-base.en)")
        return AsrPrompt([sot, int(no_timestamps)], eot, max_positions, None)
    known = dict(getattr(config, "lang_to_id", None) or {})
    if not language:
        raise ConfigError(f"{field} is required: the language token the decoder is trained to "
                          f"follow, e.g. {field}: es; {_find_codes_hint(directory)}")
    if f"<|{language}|>" not in known:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        codes = [k[2:-2] for k in known]
        code = TO_LANGUAGE_CODE.get(str(language).lower())
        if code in codes:
            hint = f" ({language!r} is a language name; its code is {code!r})"
        else:
            close = difflib.get_close_matches(str(language), codes, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"{field}={language!r} is not one of the {len(codes)} languages of {directory}"
            f"{hint}; give a Whisper language code such as es, fr, de; "
            f"{_find_codes_hint(directory)}. For a language Whisper lacks, reuse the token of "
            "a related one")
    task_ids = dict(getattr(config, "task_to_id", None) or {})
    if "transcribe" not in task_ids:
        raise ConfigError(f"{directory}/generation_config.json has no task_to_id['transcribe']")
    return AsrPrompt([sot, int(known[f"<|{language}|>"]), int(task_ids["transcribe"]),
                      int(no_timestamps)], eot, max_positions, language)


class NewTokenEmbedding(nn.Module):
    """The decoder's token table, frozen, with the rows of `ids` replaced by trainable vectors:
    a new language token learns its embedding while nothing else of the table changes (and
    weight decay touches only the new rows). `fold_new_tokens` writes them into a plain table."""

    def __init__(self, base: nn.Embedding, ids: list[int], rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(rows.detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        out = self.base(input_ids.clamp(max=n - 1))
        for j, token in enumerate(self.ids.tolist()):
            out = torch.where((input_ids == token)[..., None], self.rows[j].to(out.dtype), out)
        return out


def add_language_token(model, tokenizer, code: str, init_from: str | None) -> int:
    """Give a multilingual Whisper the language token `<|code|>` (its id returned): added to
    the tokenizer and the generation config's lang_to_id, its embedding starting as
    `<|init_from|>`'s (a related language) or, with None, the mean of every language
    token's, and trainable (NewTokenEmbedding) while the rest of the table stays fixed."""
    import re

    config = model.generation_config
    known = dict(getattr(config, "lang_to_id", None) or {})
    if not getattr(config, "is_multilingual", False) or not known:
        raise ConfigError("model.new_language needs a multilingual Whisper (it has language "
                          "tokens to extend), e.g. model.init: models:whisper-base")
    token = f"<|{code}|>"
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,15}", str(code)):
        raise ConfigError(f"model.new_language.code={code!r}: give a short lower-case code "
                          "(letters, digits, - or _), e.g. ain")
    if token in known:
        raise ConfigError(f"model.new_language.code={code}: {token} is already a language of "
                          f"this Whisper; reuse it with model.language: {code} and no "
                          "new_language")
    table = model.model.decoder.embed_tokens
    if isinstance(table, NewTokenEmbedding):
        raise ConfigError("this model already has a new language token")
    with torch.no_grad():
        if init_from is None:
            row = table.weight[sorted(known.values())].mean(0)
        elif f"<|{init_from}|>" in known:
            row = table.weight[known[f"<|{init_from}|>"]]
        else:
            close = difflib.get_close_matches(str(init_from), [k[2:-2] for k in known], n=3)
            raise ConfigError(f"model.new_language.init_from={init_from!r} is not a language "
                              "of this Whisper" + (f" (did you mean {', '.join(close)}?)"
                                                   if close else "")
                              + "; name a related language's code, or null for the mean of all")
    tokenizer.add_special_tokens({"additional_special_tokens": [token]},
                                 replace_extra_special_tokens=False)
    new_id = int(tokenizer.convert_tokens_to_ids(token))
    model.model.decoder.embed_tokens = NewTokenEmbedding(table, [new_id], row[None])
    config.lang_to_id = {**known, token: new_id}
    return new_id


def fold_new_tokens(model) -> int:
    """Write NewTokenEmbedding's rows into a plain token table (grown, with the tied output
    layer, when a new id lies beyond it) and put that table back; returns the rows folded."""
    decoder = model.model.decoder
    wrapper = decoder.embed_tokens
    if not isinstance(wrapper, NewTokenEmbedding):
        return 0
    decoder.embed_tokens = wrapper.base
    ids = wrapper.ids.tolist()
    if max(ids) >= wrapper.base.num_embeddings:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    with torch.no_grad():
        weight = model.model.decoder.embed_tokens.weight
        weight[ids] = wrapper.rows.to(weight.dtype)
    return len(ids)


def load_whisper(directory):
    """(WhisperForConditionalGeneration in fp32, its fast tokenizer) from a local directory;
    ConfigError when it is not a Whisper checkpoint with a decoder."""
    import json

    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from .encoders import quiet_transformers

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init: {directory} has no readable config.json ({e})") from None
    if config.get("model_type") != "whisper" or \
            "WhisperForConditionalGeneration" not in (config.get("architectures") or []):
        raise ConfigError(
            f"model.init: {directory} is not a Whisper checkpoint with its decoder (config.json "
            f"says model_type {config.get('model_type')!r}, architectures "
            f"{config.get('architectures')}); give a WhisperForConditionalGeneration directory "
            "such as models:whisper-base (a CTC model on a Whisper encoder is `task: ctc`)")
    with quiet_transformers():
        model = WhisperForConditionalGeneration.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32)
        tokenizer = WhisperTokenizerFast.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def apply_whisper_lora(model, settings: LoraSettings, encoder_top_layers: int = 0) -> list[str]:
    """Inject LoRA into the decoder (and the top `encoder_top_layers` encoder layers) of a
    WhisperForConditionalGeneration in place; everything else is frozen. Returns the adapted
    module names."""
    from peft import LoraConfig, inject_adapter_in_model

    settings.validate("lora")
    targets = list(settings.target_modules or DECODER_TARGETS)
    decoder, encoder = model.model.decoder, model.model.encoder
    depth = len(encoder.layers)
    if not 0 <= encoder_top_layers <= depth:
        raise ConfigError(f"lora.encoder_top_layers={encoder_top_layers}: the encoder has "
                          f"{depth} layers; give 0..{depth}")
    if not matching_linear_modules(decoder, targets):
        names = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules()
                        if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora.target_modules {targets} match no linear layer of the Whisper "
                          f"decoder; its linear layers are named: {', '.join(names)}")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [("model.decoder", decoder)] + [
        (f"model.encoder.layers.{i}", encoder.layers[i]) for i in range(depth - encoder_top_layers,
                                                                        depth)]
    names = []
    for prefix, module in modules:
        names += [f"{prefix}.{n}" for n in matching_linear_modules(module, targets)]
        inject_adapter_in_model(config, module)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    for module in model.modules():  # a new language token's embedding (add_language_token)
        if isinstance(module, NewTokenEmbedding):
            module.rows.requires_grad_(True)
    return names


def cache_layer(model, encoder_top_layers: int) -> int | None:
    """The encoder hidden state to cache below the LoRA layers: None (the normed last state)
    when the whole encoder is fixed, else the index of layer depth-k's output."""
    depth = len(model.model.encoder.layers)
    return None if encoder_top_layers == 0 else depth - encoder_top_layers


def states_from_cache(model, hidden: torch.Tensor, start_layer: int | None) -> torch.Tensor:
    """Encoder output for the decoder from cached frames [B, 1500, D]: as they are (start_layer
    None: the normed last state), or run through layers start_layer.. and the final norm."""
    encoder = model.model.encoder
    x = hidden.to(encoder.conv1.weight.dtype)
    if start_layer is None:
        return x
    for layer in encoder.layers[start_layer:]:
        x = layer(x, None)  # a full window: nothing to mask, as Whisper was trained
        x = x[0] if isinstance(x, tuple) else x
    return encoder.layer_norm(x)


def states_from_audio(model, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Encoder output for the decoder from 16 kHz audio [B, T] (each clip padded to 30 s)."""
    from ..audio.features import log_mel_spectrogram

    config = model.config
    window = int(config.max_source_positions) * 2 * 160
    features = log_mel_spectrogram(audio, int(config.num_mel_bins), lengths=lengths,
                                   pad_to=window)
    return model.model.encoder(features.to(audio.device, model.dtype)).last_hidden_state


@torch.no_grad()
def greedy_decode(model, states: torch.Tensor, prompt: AsrPrompt, max_new_tokens: int = 200
                  ) -> list[list[int]]:
    """Greedy transcripts (token ids, without the prompt and the end token) of encoder states
    [B, F, D], with a KV cache and the checkpoint's token suppression (`suppress_tokens`
    always, `begin_suppress_tokens` at the first position), as Whisper's `generate` decodes
    without timestamps. (transformers' `generate(encoder_outputs=...)` fails once one item
    of a batch ends before the others, so the cached-frames path decodes here.)"""
    from transformers.modeling_outputs import BaseModelOutput

    config = model.generation_config
    batch = states.shape[0]
    device = states.device
    vocab = int(model.config.vocab_size)

    def ids_tensor(ids) -> torch.Tensor:
        ids = [int(i) for i in (ids or []) if 0 <= int(i) < vocab]
        return torch.tensor(ids, dtype=torch.long, device=device)

    suppress, begin = ids_tensor(config.suppress_tokens), ids_tensor(config.begin_suppress_tokens)
    encoder_outputs = BaseModelOutput(last_hidden_state=states)
    inputs = torch.tensor([prompt.prefix] * batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    past = None
    for step in range(max(0, min(max_new_tokens, prompt.max_positions - len(prompt.prefix)))):
        result = model(encoder_outputs=encoder_outputs, decoder_input_ids=inputs, cache=past,
                       use_cache=True)
        logits = result.logits[:, -1].float()
        if suppress.numel():
            logits[:, suppress] = -float("inf")
        if step == 0 and begin.numel():
            logits[:, begin] = -float("inf")
        token = logits.argmax(-1).masked_fill(finished, prompt.eot)
        out.append(token)
        finished |= token == prompt.eot
        if bool(finished.all()):
            break
        inputs, past = token[:, None], result.cache
    if not out:
        return [[] for _ in range(batch)]
    rows = torch.stack(out, dim=1).tolist()
    return [row[: row.index(prompt.eot)] if prompt.eot in row else row for row in rows]


def merge_lora(model) -> int:
    """Fold every injected LoRA delta into its base layer and put the plain nn.Linear back;
    returns how many layers were merged. The model is a plain Whisper again."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, LoraLayer):
                continue
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.get_base_layer())
            merged += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return merged


def save_whisper(model, tokenizer, out_dir, *, source_dir=None) -> Path:
    """Save a (merged) Whisper, its tokenizer and feature extractor as a transformers
    directory that `speechlm infer` / WhisperTranscriber load; written to a temporary name
    and renamed."""
    import shutil

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar only adds noise
    try:
        model.save_pretrained(tmp)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    if source_dir is not None:
        for name in ("preprocessor_config.json",):
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
