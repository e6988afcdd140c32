"""Character CTC models: the vocabulary, loading/initialising the model, saving it as an HF dir.

Vocabulary layout (that of Wav2Vec2CTCTokenizer checkpoints such as
facebook/wav2vec2-base-960h): `<pad>` = 0 is the CTC blank (and the
config's pad_token_id), then `<s>` 1, `</s>` 2, `<unk>` 3, the word
delimiter `|` 4 (a space in the text), then the characters in code-point
order. Characters are Unicode code points of the *normalised* transcript
(`speechlm.text.normalize_transcript`), so a Devanagari vowel sign or virama
is its own token, exactly as Wav2Vec2CTCTokenizer splits text.

`build_char_vocab` counts characters over manifests or texts (several
languages share one vocabulary); characters seen fewer than `min_count`
times are left out and become `<unk>`. `unseen_characters` lists characters
of dev/test transcripts the vocabulary lacks (they can never be recognised).

`load_ctc_model(init, vocab)` gives a `*ForCTC` model (wav2vec2, HuBERT,
WavLM, ... via AutoModelForCTC) from a local HF directory or hub id already
in the local HF cache (never downloaded): a pre-training checkpoint
(Wav2Vec2ForPreTraining), a bare encoder (Wav2Vec2Model / HubertModel) or a
CTC checkpoint with another vocabulary, whose output rows are carried over
for the tokens both vocabularies share. `init="scratch"` builds a
Wav2Vec2ForCTC from a config dict (the embedded zoo's models).
`save_ctc_model` writes a normal HF directory (model + Wav2Vec2Processor:
feature extractor and CTC tokenizer), loadable with
`Wav2Vec2ForCTC.from_pretrained(dir)` / `AutoModelForCTC` and by `speechlm infer`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, SpeechLMError

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
WORD_DELIMITER = "|"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
VOCAB_FILE = "vocab.json"
METADATA_FILE = "speechlm.json"


# -- vocabulary ----------------------------------------------------------------------


class CharVocab:
    """A character CTC vocabulary: token list (index = id) plus the training counts."""

    def __init__(self, chars: Iterable[str], *, counts: Mapping[str, int] | None = None,
                 langs: Sequence[str] = (), dropped: Mapping[str, int] | None = None):
        self.tokens: list[str] = [*SPECIAL_TOKENS, WORD_DELIMITER]
        for char in chars:
            if char in self.tokens or not char or char.isspace():
                continue
            self.tokens.append(char)
        self.ids: dict[str, int] = {token: i for i, token in enumerate(self.tokens)}
        self.counts: dict[str, int] = dict(counts or {})
        self.langs = list(langs)
        self.dropped: dict[str, int] = dict(dropped or {})  # below min_count -> <unk>

    blank_id = 0
    unk_id = 3
    delimiter_id = 4

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, char: str) -> bool:
        return char in self.ids

    def __eq__(self, other) -> bool:
        return isinstance(other, CharVocab) and self.tokens == other.tokens

    @property
    def chars(self) -> list[str]:
        """The character tokens (everything after the specials and the word delimiter)."""
        return self.tokens[5:]

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        """(token ids, characters not in the vocabulary) for a *normalised* transcript.

        Spaces become the word delimiter; unknown characters become `<unk>`.
        """
        ids: list[int] = []
        unknown: list[str] = []
        for char in " ".join(text.split()):
            if char == " ":
                ids.append(self.delimiter_id)
            elif char in self.ids:
                ids.append(self.ids[char])
            else:
                ids.append(self.unk_id)
                unknown.append(char)
        return ids, unknown

    def decode(self, ids: Iterable[int]) -> str:
        """Text of label ids (no CTC collapsing): delimiter -> space, special tokens dropped."""
        out = []
        for i in ids:
            token = self.tokens[int(i)]
            if token == WORD_DELIMITER:
                out.append(" ")
            elif token not in SPECIAL_TOKENS:
                out.append(token)
        return " ".join("".join(out).split())

    def to_dict(self) -> dict[str, int]:
        """The vocab.json mapping (token -> id)."""
        return dict(self.ids)

    def save(self, path) -> Path:
        """Write vocab.json (plus the counts beside it as vocab_counts.json)."""
        from ..jsonl import atomic_write

        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / VOCAB_FILE
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
        with atomic_write(path.with_name("vocab_counts.json")) as f:
            json.dump({"langs": self.langs, "counts": self.counts, "dropped": self.dropped},
                      f, ensure_ascii=False, indent=1)
        return path

    @classmethod
    def load(cls, path) -> CharVocab:
        """Read a vocab.json written by `save` (or any Wav2Vec2CTCTokenizer vocab.json with
        the same special-token layout)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.is_file():
            raise SpeechLMError(f"{path}: vocabulary file not found")
        mapping = json.loads(path.read_text(encoding="utf-8"))
        tokens = [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        if tokens[:5] != [*SPECIAL_TOKENS, WORD_DELIMITER] or \
                [mapping[t] for t in tokens] != list(range(len(tokens))):
            raise SpeechLMError(
                f"{path}: not a speechlm CTC vocabulary (expected <pad> <s> </s> <unk> | "
                f"as ids 0-4 then characters, got {tokens[:6]}...)")
        counts_file = path.with_name("vocab_counts.json")
        extra = json.loads(counts_file.read_text(encoding="utf-8")) if counts_file.is_file() else {}
        return cls(tokens[5:], counts=extra.get("counts"), langs=extra.get("langs", ()),
                   dropped=extra.get("dropped"))


def _is_manifest(source) -> bool:
    if isinstance(source, os.PathLike):
        return True
    return isinstance(source, str) and source.endswith((".jsonl", ".jsonl.gz"))


def iter_transcripts(sources: Iterable, langs: str | Sequence[str | None] | None,
                     *, text_field: str = "text") -> Iterable[tuple[str | None, str, str | None]]:
    """(id, transcript, normalisation language) from manifests (paths) and/or plain texts.

    `langs`: one language for every source, one per source, or None (use each
    manifest record's `lang`).
    """
    from ..jsonl import iter_jsonl

    sources = list(sources) if not isinstance(sources, (str, os.PathLike)) else [sources]
    if langs is None or isinstance(langs, str):
        langs = [langs] * len(sources)
    if len(langs) != len(sources):
        raise ValueError(f"{len(langs)} languages for {len(sources)} sources")
    for source, lang in zip(sources, langs, strict=True):
        if _is_manifest(source):
            for line, rec in iter_jsonl(source):
                text = rec.get(text_field)
                if isinstance(text, str):
                    yield str(rec.get("id", f"{source}:{line}")), text, lang or rec.get("lang")
        else:
            yield None, str(source), lang


def build_char_vocab(sources, langs: str | Sequence[str | None] | None = None, *,
                     min_count: int = 1, text_field: str = "text") -> CharVocab:
    """A shared character vocabulary over the normalised transcripts of `sources`.

    sources: manifest paths and/or transcript strings (a str ending in
    .jsonl/.jsonl.gz or a PathLike is a manifest). langs: the normalisation
    language(s), see `iter_transcripts`. Characters seen fewer than
    `min_count` times are left out (they become <unk>; `vocab.dropped`).
    """
    from ..text.normalize import normalize_transcript

    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    seen_langs: list[str] = []
    for _, text, lang in iter_transcripts(sources, langs, text_field=text_field):
        counts.update(normalize_transcript(text, lang).replace(" ", ""))
        if lang and lang not in seen_langs:
            seen_langs.append(lang)
    if not counts:
        raise SpeechLMError("no transcript characters to build a vocabulary from: the training "
                            f"manifests have no non-empty '{text_field}' field")
    kept = sorted(c for c, n in counts.items() if n >= min_count)
    dropped = {c: n for c, n in sorted(counts.items()) if n < min_count}
    return CharVocab(kept, counts=dict(sorted(counts.items())), langs=seen_langs,
                     dropped=dropped)


@dataclass
class VocabReport:
    """Rare training characters and dev/test characters the vocabulary cannot produce."""

    vocab_size: int
    rare_below: int
    rare: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    unseen: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> char -> info

    def to_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "rare_below": self.rare_below,
                "rare": self.rare, "dropped_to_unk": self.dropped, "unseen": self.unseen}

    def summary(self) -> str:
        lines = [f"vocabulary: {self.vocab_size} tokens"]
        if self.rare:
            chars = ", ".join(f"{_show(c)} ({n})" for c, n in self.rare.items())
            lines.append(f"  rare characters (< {self.rare_below} in training): {chars}")
        if self.dropped:
            chars = ", ".join(f"{_show(c)} ({n})" for c, n in self.dropped.items())
            lines.append(f"  below data.vocab_min_count, mapped to <unk>: {chars}")
        for split, chars in self.unseen.items():
            if chars:
                shown = ", ".join(
                    f"{_show(c)} ({info['count']}x, e.g. {info['examples'][0]})"
                    for c, info in list(chars.items())[:12])
                lines.append(f"  {split}: {len(chars)} character(s) not in the training "
                             f"vocabulary (never recognisable; check normalisation or add "
                             f"training data): {shown}")
        return "\n".join(lines)

    def write(self, path) -> Path:
        from ..jsonl import atomic_write

        path = Path(path)
        with atomic_write(path) as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
        return path


def _show(char: str) -> str:
    import unicodedata

    name = unicodedata.name(char, "")
    return f"'{char}'" + (f" {name}" if name and not char.isascii() else "")


def unseen_characters(vocab: CharVocab, sources, langs=None, *, text_field: str = "text",
                      max_examples: int = 3) -> dict[str, dict]:
    """Characters of the normalised transcripts of `sources` that `vocab` lacks:
    char -> {"count": n, "examples": [ids]} (most frequent first)."""
    from ..text.normalize import normalize_transcript

    found: dict[str, dict] = {}
    for rid, text, lang in iter_transcripts(sources, langs, text_field=text_field):
        for char in normalize_transcript(text, lang).replace(" ", ""):
            if char not in vocab:
                info = found.setdefault(char, {"count": 0, "examples": []})
                info["count"] += 1
                if len(info["examples"]) < max_examples and rid not in info["examples"]:
                    info["examples"].append(rid if rid is not None else text[:40])
    return dict(sorted(found.items(), key=lambda kv: -kv[1]["count"]))


def vocab_report(vocab: CharVocab, eval_sources: Mapping[str, tuple] | None = None, *,
                 rare_below: int = 5) -> VocabReport:
    """Report on `vocab`: characters seen fewer than `rare_below` times in training, those
    dropped to <unk>, and per split (name -> (sources, langs)) the unseen characters."""
    rare = {c: n for c, n in vocab.counts.items() if n < rare_below and c in vocab}
    unseen = {split: unseen_characters(vocab, sources, langs)
              for split, (sources, langs) in (eval_sources or {}).items()}
    return VocabReport(vocab_size=len(vocab), rare_below=rare_below, rare=rare,
                       dropped=dict(vocab.dropped), unseen=unseen)


def label_frames_needed(ids: Sequence[int]) -> int:
    """Fewest CTC output frames that can emit `ids`: one per label plus a blank between
    every pair of equal neighbours."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:], strict=False) if a == b)


# -- model ---------------------------------------------------------------------------

# The wav2vec2 architecture at a small size: the embedded zoo's default (recipes override).
SCRATCH_DEFAULTS: dict[str, Any] = dict(
    hidden_size=144, num_hidden_layers=4, num_attention_heads=4, intermediate_size=576,
    conv_dim=(64, 64, 64, 64, 64, 64, 64), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2), num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=8, feat_extract_norm="layer", do_stable_layer_norm=True,
    conv_bias=True, layerdrop=0.0,
)


def _ctc_config_fields(vocab: CharVocab, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {**dict(overrides), "vocab_size": len(vocab), "pad_token_id": vocab.blank_id,
            "bos_token_id": 1, "eos_token_id": 2, "ctc_zero_infinity": True}


def _check_masking(config) -> None:
    hidden = getattr(config, "hidden_size", None)
    if getattr(config, "mask_feature_prob", 0) > 0 and hidden is not None \
            and config.mask_feature_length >= hidden:
        raise ConfigError(f"model.mask_feature_length={config.mask_feature_length} must be "
                          f"smaller than the model's hidden size {hidden} (channel masking "
                          "masks spans of hidden channels); lower it or set "
                          "mask_feature_prob=0")


def load_ctc_model(init: str | os.PathLike, vocab: CharVocab, *,
                   overrides: Mapping[str, Any] | None = None,
                   scratch_config: Mapping[str, Any] | None = None):
    """A `*ForCTC` model for `vocab` (see the module doc).

    init: "scratch", a local HF directory, or a hub id in the local HF cache.
    overrides: config fields set on top of the checkpoint's (mask_time_prob,
    mask_time_length, mask_feature_prob, mask_feature_length, layerdrop,
    dropouts, ...). scratch_config: Wav2Vec2Config fields for "scratch"
    (on top of SCRATCH_DEFAULTS). Seed torch first: new weights (all of a
    scratch model, the output layer otherwise) come from its RNG.
    """
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    overrides = dict(overrides or {})
    if str(init) == "scratch":
        fields = {**SCRATCH_DEFAULTS, **dict(scratch_config or {}),
                  **_ctc_config_fields(vocab, overrides)}
        try:
            config = Wav2Vec2Config(**fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.scratch: invalid wav2vec2 config: {e}") from None
        unknown = [k for k in {**dict(scratch_config or {}), **overrides}
                   if not hasattr(Wav2Vec2Config(), k)]
        if unknown:
            raise ConfigError(f"model.scratch / model overrides: Wav2Vec2Config has no field(s) "
                              f"{', '.join(unknown)}")
        _check_masking(config)
        config.architectures = ["Wav2Vec2ForCTC"]
        return Wav2Vec2ForCTC(config)
    if scratch_config:
        raise ConfigError("model.scratch is only used with model.init=scratch; remove it or "
                          "set model.init: scratch")
    from ..pretrained.resolve import resolve_model_dir

    directory = resolve_model_dir(init, what=f"model.init={init}",
                                  hint="or model.init: scratch to train from scratch")
    return _load_pretrained(directory, vocab, overrides)


def _load_pretrained(path: Path, vocab: CharVocab, overrides: dict):
    from transformers import AutoConfig, AutoModelForCTC
    from transformers.utils import logging as hf_logging

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the model config: {e}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CTC_MAPPING_NAMES:
        raise ConfigError(f"{path}: a '{config.model_type}' model has no CTC head class; use a "
                          "wav2vec2 / HuBERT / WavLM / data2vec-audio checkpoint")
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ConfigError(f"model overrides: {type(config).__name__} has no field(s) "
                          f"{', '.join(unknown)}")
    old_vocab = _checkpoint_vocab(path)
    had_head = any("ForCTC" in a for a in (config.architectures or []))
    for key, value in _ctc_config_fields(vocab, overrides).items():
        setattr(config, key, value)
    _check_masking(config)
    config.architectures = [MODEL_FOR_CTC_MAPPING_NAMES[config.model_type]]
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our own message says what was (re)initialised
    try:
        model = AutoModelForCTC.from_pretrained(path, config=config, local_files_only=True,
                                                ignore_mismatched_sizes=True)
    finally:
        hf_logging.set_verbosity(level)
    if had_head and old_vocab is not None and old_vocab != vocab.tokens:
        copied = _carry_over_head(model, path, old_vocab, vocab)
        logger.info("%s: new CTC output layer for %d tokens; %d rows carried over from the "
                    "checkpoint's vocabulary", path, len(vocab), copied)
    elif not had_head:
        logger.info("%s: new CTC output layer for %d tokens", path, len(vocab))
    return model


def _checkpoint_vocab(path: Path) -> list[str] | None:
    file = path / VOCAB_FILE
    if not file.is_file():
        return None
    try:
        mapping = json.loads(file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if not all(isinstance(v, int) for v in mapping.values()):
        return None  # multi-language (target_lang) vocab: do not try to map it
    return [t for t, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def _carry_over_head(model, path: Path, old_tokens: list[str], vocab: CharVocab) -> int:
    """Copy the checkpoint's output rows for tokens both vocabularies have; returns how many."""
    import torch

    weights = _read_tensors(path, ("lm_head.weight", "lm_head.bias"))
    if "lm_head.weight" not in weights:
        return 0
    old_w, old_b = weights["lm_head.weight"], weights.get("lm_head.bias")
    head = model.lm_head
    if old_w.shape[1] != head.weight.shape[1]:
        return 0
    old_ids = {t: i for i, t in enumerate(old_tokens) if i < old_w.shape[0]}
    copied = 0
    with torch.no_grad():
        for new_id, token in enumerate(vocab.tokens):
            old_id = old_ids.get(token)
            if old_id is None:
                continue
            head.weight[new_id] = old_w[old_id].to(head.weight.dtype)
            if old_b is not None and head.bias is not None:
                head.bias[new_id] = old_b[old_id].to(head.bias.dtype)
            copied += 1
    return copied


def _read_tensors(path: Path, names: Sequence[str]) -> dict:
    """Named tensors from a checkpoint dir (safetensors, sharded or not; or a .bin)."""
    import torch

    out = {}
    index = path / "model.safetensors.index.json"
    files = []
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / weight_map[n] for n in names if n in weight_map})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    if name in f.keys():
                        out[name] = f.get_tensor(name)
        return out
    if (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {n: state[n] for n in names if n in state}
    return out


def base_model_prefix(model) -> str:
    """Name of the encoder inside a *ForCTC model ("wav2vec2", "hubert", ...)."""
    return model.base_model_prefix


def uses_attention_mask(model_or_config) -> bool:
    """Whether the model takes an attention mask: layer-norm conv stacks do; group-norm ones
    (wav2vec2-base, HuBERT) were trained without and must be given none (pad with zeros)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "feat_extract_norm", "layer") == "layer"


def normalizes_waveform(model_or_config) -> bool:
    """Whether the model takes waveforms normalised to zero mean / unit variance (the wav2vec2
    family) or raw ones (a Whisper encoder: its log-mel features carry the level)."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "") != "speechlm_whisper_ctc"


def output_lengths(model, input_lengths):
    """CTC output frames for input lengths in samples."""
    return model._get_feat_extract_output_lengths(input_lengths)


def frames_for_samples(config, num_samples: int) -> int:
    """Output frames of the conv stack for `num_samples` input samples (no torch needed)."""
    n = int(num_samples)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        n = (n - kernel) // stride + 1
        if n <= 0:
            return 0
    return n


def write_model_dir(out_dir, model, metadata: Mapping[str, Any],
                    write_preprocessing: Callable[[Path], None]) -> Path:
    """Save `model` (config + safetensors), whatever `write_preprocessing(dir)` writes and
    `speechlm.json` (`metadata`) as one HF directory. Written to `out_dir.tmp` and renamed,
    so `out_dir` is always complete."""
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_preprocessing(tmp)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=1, ensure_ascii=False)
                                     + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def save_ctc_model(model, vocab: CharVocab, out_dir, *, sampling_rate: int = 16000,
                   metadata: Mapping[str, Any] | None = None) -> Path:
    """Save model + Wav2Vec2Processor (feature extractor + CTC tokenizer) as an HF dir,
    atomically (see write_model_dir)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    def processor(tmp: Path) -> None:
        vocab_file = vocab.save(tmp / VOCAB_FILE)
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token=UNK, pad_token=PAD,
                                         bos_token=BOS, eos_token=EOS,
                                         word_delimiter_token=WORD_DELIMITER,
                                         do_lower_case=False)
        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sampling_rate,
                                             padding_value=0.0,
                                             do_normalize=normalizes_waveform(model),
                                             return_attention_mask=uses_attention_mask(model))
        Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(tmp)

    return write_model_dir(out_dir, model, {"kind": "ctc", "langs": vocab.langs,
                                            **dict(metadata or {})}, processor)
