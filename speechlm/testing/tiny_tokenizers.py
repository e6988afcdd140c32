"""Tiny tokenizers in the real Hugging Face formats, trained on the embedded corpus.

Each family gets the tokenizer kind its real checkpoints ship, because
transformers 5 rebuilds the tokenizer pipeline from the model family's class
(LlamaTokenizer: Metaspace + byte fallback; Qwen2Tokenizer, WhisperTokenizer:
byte-level BPE) and only takes the vocabulary and merges from tokenizer.json:

- Llama: a SentencePiece BPE model (Llama-2 trainer settings, byte fallback)
  saved as tokenizer.model and converted to tokenizer.json.
- Qwen2: a byte-level BPE trained with `tokenizers` using Qwen2's pre-tokenizer
  regex, plus ChatML special tokens and chat template.
- Whisper: a GPT-2 style byte-level BPE plus Whisper's special tokens laid out
  as in the real multilingual vocabulary (language tokens right after
  <|startoftranscript|>, timestamp tokens last).
- wav2vec2 CTC: a character vocab.json.

Trained models are cached under `cache_dir()/tiny_tokenizers`, keyed by the
corpus subset, the settings and the library version, so a test session trains
each once (well under a second each) and reuses it afterwards.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..jsonl import iter_jsonl
from ..paths import cache_dir, resource
from ..text.tokenizer_train import cached_build, llama_tokenizer_from_sentencepiece
from ..text.tokenizer_train import corpus_digest as _corpus_digest
from ..text.tokenizer_train import train_sentencepiece as _train_sentencepiece

CORPUS_RESOURCE = "bible_en_es.jsonl.gz"

# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML as Qwen2.5 writes it (without the tool-calling branches).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CTC_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# A character set covering the English and Spanish sides of the corpus, lower-cased.
CTC_CHARACTERS = "abcdefghijklmnopqrstuvwxyzáéíóúüñ'"
CTC_WORD_DELIMITER = "|"


@functools.lru_cache(maxsize=4)
def corpus_lines(every: int = 10) -> tuple[str, ...]:
    """English and Spanish sides of every `every`-th verse of the embedded corpus.

    The default (about 3,100 verse pairs, 0.8 MB of text) is enough for a
    1-2k vocabulary and trains in well under a second.
    """
    english, spanish = [], []
    for index, (_, record) in enumerate(iter_jsonl(resource(CORPUS_RESOURCE))):
        if index % every == 0:
            english.append(record["en"])
            spanish.append(record["es"])
    return tuple(english + spanish)


def _cached(name: str, settings: dict, build: Callable[[Path], None], root: Path | None) -> Path:
    """The cache folder for (name, settings), built by `build(folder)` if missing.

    Looks under `root`, else `cache_dir()/tiny_tokenizers`, falling back to the
    temp dir when the cache is not writable (read-only home in some sandboxes).
    """
    return cached_build(name, settings, build, _roots(root))


def _roots(root: Path | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    return [cache_dir() / "tiny_tokenizers", Path(tempfile.gettempdir()) / "speechlm-tiny-tokenizers"]


# --- Llama: SentencePiece ---------------------------------------------------


def train_sentencepiece(vocab_size: int = 1024, *, every: int = 10, root: Path | None = None) -> Path:
    """Path to a cached SentencePiece BPE model (Llama-2 trainer settings, byte fallback).

    Pieces 0-2 are <unk>, <s>, </s>, then the 256 byte pieces <0x00>..<0xFF>,
    then merges, exactly like Llama-2's tokenizer.model.
    """
    return _train_sentencepiece(corpus_lines(every), vocab_size, roots=_roots(root))


def save_llama_tokenizer(out_dir: Path, vocab_size: int = 1024, *, root: Path | None = None):
    """Write tokenizer.model + tokenizer.json + tokenizer_config.json like a Llama-2 repo.

    No pad token and no chat template, on purpose: code built on it must cope
    with a base LLM that has neither.
    """
    model_file = train_sentencepiece(vocab_size, root=root)
    tokenizer = llama_tokenizer_from_sentencepiece(model_file)
    tokenizer.save_pretrained(out_dir)
    (Path(out_dir) / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    return tokenizer


# --- byte-level BPE (Qwen2, Whisper) ------------------------------------------


def _byte_level_pipeline(style: str):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.decoder = decoders.ByteLevel()
    if style == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise ValueError(f"unknown byte-level style {style!r}; expected 'qwen2' or 'gpt2'")
    return tokenizer


def train_byte_level_bpe(
    style: str, vocab_size: int = 1024, *, every: int = 10, root: Path | None = None
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a cached byte-level BPE with the `style` pre-tokenizer.

    `style` is "qwen2" (NFC + Qwen2 regex split) or "gpt2" (Whisper). The
    vocabulary holds the 256 byte symbols and merges only; special tokens are
    added by the caller after it, as in the real checkpoints.
    """
    import tokenizers
    from tokenizers import pre_tokenizers, trainers

    lines = corpus_lines(every)
    settings = {
        "style": style,
        "vocab_size": vocab_size,
        "corpus": _corpus_digest(lines),
        "tokenizers": tokenizers.__version__,
    }

    def build(folder: Path) -> None:
        tokenizer = _byte_level_pipeline(style)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(lines, trainer)
        model = json.loads(tokenizer.to_str())["model"]
        data = {"vocab": model["vocab"], "merges": model["merges"]}
        (folder / "bpe.json").write_text(json.dumps(data, ensure_ascii=False))

    folder = _cached(f"bytebpe-{style}", settings, build, root)
    data = json.loads((folder / "bpe.json").read_text())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    return data["vocab"], merges


def save_qwen2_tokenizer(out_dir: Path, vocab_size: int = 1024, *, root: Path | None = None):
    """Write a Qwen2.5-Instruct style tokenizer: byte-level BPE + ChatML.

    Special tokens follow the BPE vocabulary: <|endoftext|> (pad), <|im_start|>,
    <|im_end|> (eos); no bos, no unk, like Qwen2.5.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = train_byte_level_bpe("qwen2", vocab_size, root=root)
    endoftext, im_start, im_end = QWEN2_SPECIAL_TOKENS
    # Give the special tokens their ids up front (the constructor would add eos first).
    full_vocab = {**vocab, **{t: len(vocab) + i for i, t in enumerate(QWEN2_SPECIAL_TOKENS)}}
    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=im_end,
        pad_token=endoftext,
        errors="replace",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS]}
    )
    _check_ids(tokenizer, QWEN2_SPECIAL_TOKENS, len(vocab))
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# A few entries of Whisper's normalizer.json (British -> American spelling).
WHISPER_SPELLING_SAMPLE = {
    "colour": "color",
    "favour": "favor",
    "honour": "honor",
    "labour": "labor",
    "neighbour": "neighbor",
    "centre": "center",
    "theatre": "theater",
    "realise": "realize",
    "organise": "organize",
    "travelled": "traveled",
}


def whisper_special_tokens(num_languages: int, *, v3: bool = False) -> list[str]:
    """Whisper's special tokens in vocabulary order after the BPE pieces."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    languages = [f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]]
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *languages,
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>" if v3 else "<|nocaptions|>",
        "<|notimestamps|>",
    ]


def whisper_timestamp_tokens(max_seconds: float = 30.0, step: float = 0.02) -> list[str]:
    """<|0.00|> ... <|30.00|>: 1501 tokens, added as ordinary (non-special) tokens."""
    count = round(max_seconds / step) + 1
    return [f"<|{i * step:.2f}|>" for i in range(count)]


def save_whisper_tokenizer(out_dir: Path, vocab_size: int = 1024, *, num_languages: int = 99,
                           v3: bool = False, root: Path | None = None):
    """Write a multilingual Whisper tokenizer with the real special-token layout.

    The language tokens must follow <|startoftranscript|> in
    `tokenization_whisper.LANGUAGES` order (transformers computes a language
    id as sot + 1 + index), so all `num_languages` of them are present (99 for
    whisper-small, 100 for large-v3).
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocab, merges = train_byte_level_bpe("gpt2", vocab_size, root=root)
    specials = whisper_special_tokens(num_languages, v3=v3)
    tokenizer = WhisperTokenizer(
        vocab=dict(vocab), merges=merges, pad_token="<|endoftext|>", model_max_length=448
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in specials[1:]]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in whisper_timestamp_tokens()])
    _check_ids(tokenizer, specials, len(vocab))
    tokenizer.save_pretrained(out_dir)
    # `tokenizer.normalize()` (English WER) needs the spelling map real checkpoints ship;
    # save_pretrained does not write it, from_pretrained does read it.
    (Path(out_dir) / "normalizer.json").write_text(json.dumps(WHISPER_SPELLING_SAMPLE, indent=1, sort_keys=True))
    return tokenizer


def _check_ids(tokenizer, tokens: Iterable[str], first_id: int) -> None:
    for offset, token in enumerate(tokens):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != first_id + offset:
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected {first_id + offset}")


# --- wav2vec2 CTC -----------------------------------------------------------


def ctc_vocab(symbols: str | Iterable[str]) -> dict[str, int]:
    """A Wav2Vec2CTCTokenizer vocab: <pad> (the CTC blank) 0, <s>, </s>, <unk>, "|", then symbols.

    `symbols` is a string of characters or an iterable of tokens; spaces are
    dropped (the word delimiter "|" stands for them), duplicates are kept once
    in first-seen order.
    """
    vocab = {token: index for index, token in enumerate((*CTC_SPECIAL_TOKENS, CTC_WORD_DELIMITER))}
    for symbol in symbols:
        if symbol.strip() and symbol not in vocab:
            vocab[symbol] = len(vocab)
    return vocab


def save_ctc_tokenizer(out_dir: Path, symbols: str | Iterable[str]):
    """Write vocab.json + tokenizer config of a Wav2Vec2CTCTokenizer (character CTC)."""
    from transformers import Wav2Vec2CTCTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    vocab_file.write_text(json.dumps(ctc_vocab(symbols), ensure_ascii=False, indent=1))
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        word_delimiter_token=CTC_WORD_DELIMITER,
        do_lower_case=False,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
