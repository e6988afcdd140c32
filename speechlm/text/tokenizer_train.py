"""Train SentencePiece tokenizers and save them as Hugging Face (Llama-style) tokenizers.

Used by the tiny test checkpoints (`speechlm.testing.tiny_tokenizers`) and by
the embedded zoo's text LLM (`speechlm.recipes.text_lm`). The model is a
SentencePiece BPE with Llama-2's trainer settings (byte fallback, digits
split, no text normalisation), so any text round-trips, and it is saved as
`tokenizer.model` + `tokenizer.json` + `tokenizer_config.json`, which
`AutoTokenizer.from_pretrained(dir)` loads offline as a `LlamaTokenizer`.

Trained models are cached by a hash of (settings, corpus, library version):
`cached_build` builds into a temporary folder and renames it into place, so a
killed or concurrent build never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = [
    "LLAMA2_SPM_OPTIONS", "cached_build", "corpus_digest", "llama_tokenizer_from_sentencepiece",
    "save_sentencepiece_tokenizer", "train_sentencepiece",
]

# Llama-2's tokenizer.model trainer settings (the ones that shape the pieces).
LLAMA2_SPM_OPTIONS: dict = dict(
    model_type="bpe",
    byte_fallback=True,
    character_coverage=0.99995,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,  # the piece scores are identical either way; one thread keeps it simple
    minloglevel=2,
)


def corpus_digest(lines: Iterable[str]) -> str:
    """A hash of the training text (part of a cache key)."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def cached_build(name: str, settings: dict, build: Callable[[Path], None],
                 roots: Sequence[Path]) -> Path:
    """The folder `<root>/<name>-<hash(settings)>`, built by `build(folder)` if missing.

    The first root holding a finished entry wins; otherwise the entry is built
    under the first writable root (later roots are fallbacks, e.g. the temp
    dir when the cache is read-only).
    """
    if not roots:
        raise ValueError("cached_build needs at least one root folder")
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    for root in roots:
        if (Path(root) / f"{name}-{key}" / "done").exists():
            return Path(root) / f"{name}-{key}"
    for index, root in enumerate(roots):
        try:
            return _build_entry(Path(root) / f"{name}-{key}", settings, build)
        except OSError:
            if index == len(roots) - 1:
                raise
    raise AssertionError("unreachable")


def _build_entry(target: Path, settings: dict, build: Callable[[Path], None]) -> Path:
    """Build in a temporary folder and rename it into place, so a killed or
    parallel build never leaves a half-written cache entry behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True))
        (tmp / "done").write_text("")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "done").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_sentencepiece(lines: Sequence[str], vocab_size: int, *, roots: Sequence[Path],
                        name: str = "sentencepiece", **options) -> Path:
    """Path to a cached SentencePiece model trained on `lines` (Llama-2 settings + `options`).

    With the defaults, pieces 0-2 are <unk>, <s>, </s>, then the 256 byte
    pieces <0x00>..<0xFF>, then merges, exactly like Llama-2's tokenizer.model;
    `pad_id=3, pad_piece="<pad>"` adds a pad piece before the bytes.
    """
    import sentencepiece as spm

    options = {**LLAMA2_SPM_OPTIONS, **options, "vocab_size": vocab_size}
    settings = {"options": options, "corpus": corpus_digest(lines),
                "sentencepiece": spm.__version__}

    def build(folder: Path) -> None:
        with open(folder / "tokenizer.model", "wb") as model_file:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model_file,
                                           **options)

    return cached_build(name, settings, build, roots) / "tokenizer.model"


def llama_tokenizer_from_sentencepiece(model_file: Path, **kwargs):
    """A transformers LlamaTokenizer equivalent to a SentencePiece BPE model.

    Done here rather than by transformers' converter because that converter
    needs `protobuf` to read the model; the sentencepiece runtime gives the
    same pieces and their order, and the merges follow from the piece ranks.
    `kwargs` go to LlamaTokenizer (e.g. pad_token="<pad>", model_max_length).
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    merges = generate_merges(vocab)
    options = dict(add_bos_token=True, add_eos_token=False, legacy=False)
    options.update(kwargs)
    return LlamaTokenizer(vocab=vocab, merges=merges, **options)


def save_sentencepiece_tokenizer(model_file: Path, out_dir, *, chat_template: str | None = None,
                                 **kwargs):
    """Write tokenizer.model + tokenizer.json + tokenizer_config.json (a Llama-style repo).

    `chat_template` (Jinja) is saved with the tokenizer when given; `kwargs`
    go to LlamaTokenizer. Returns the tokenizer.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = llama_tokenizer_from_sentencepiece(model_file, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(model_file, out_dir / "tokenizer.model")
    return tokenizer
