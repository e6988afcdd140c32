"""CTC beam search with a word n-gram LM and a lexicon (flashlight-text, through torchaudio).

`BeamSearchCTCDecoder` wraps `torchaudio.models.decoder.ctc_decoder`, the
flashlight-text beam search decoder whose PyPI wheel ships KenLM, so ARPA
files (ours from `speechlm build lm`, or KenLM `lmplz` output) load directly.
Three modes, picked from the arguments:

- no LM, no lexicon: lexicon-free beam search over the CTC tokens (on peaked
  emissions it returns what greedy decoding returns);
- LM (+ lexicon): words are spelled through a trie of the lexicon and scored
  as acoustic log-prob + lm_weight * log10 P_LM + word_score * #words. Without
  a lexicon file, one is derived from the LM's vocabulary (each word spelled
  with the CTC tokens, then the word delimiter), skipping words the tokens
  cannot spell;
- lexicon without LM: output restricted to lexicon words.

Token list = the CTC model's vocabulary in id order (Wav2Vec2CTCTokenizer:
<pad> = blank 0, <s>, </s>, <unk>, "|" word delimiter, characters).

The lexicon decoder only emits a word when its spelling, delimiter included,
is complete; CTC models fine-tuned with Hugging Face usually do not emit a
final "|", so one free delimiter frame is appended to each utterance.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speechlm.errors import SpeechLMError

# Log-prob given to the non-delimiter tokens of the appended end frame (finite: flashlight
# adds scores and -inf would poison hypotheses that merge through it).
_IMPOSSIBLE = -1.0e4


@dataclass
class Lexicon:
    """word -> spelling (CTC tokens, ending with the word delimiter) and the words left out."""

    entries: dict[str, list[str]]
    skipped: dict[str, str] = field(default_factory=dict)  # word -> the characters it lacks

    def write(self, path: str | os.PathLike) -> Path:
        """Write the flashlight lexicon format: `word<TAB>t o k e n s |` one word a line."""
        from speechlm.jsonl import atomic_write

        path = Path(path)
        with atomic_write(path) as f:
            for word, spelling in self.entries.items():
                f.write(f"{word}\t{' '.join(spelling)}\n")
        return path

    def summary(self) -> str:
        text = f"lexicon: {len(self.entries)} words"
        if self.skipped:
            sample = ", ".join(f"{w!r} ({c})" for w, c in list(self.skipped.items())[:5])
            text += (f"; {len(self.skipped)} words left out because the CTC vocabulary cannot "
                     f"spell them, e.g. {sample}")
        return text


def build_lexicon(words: Iterable[str], tokens: Sequence[str] | Mapping[str, int], *,
                  word_delimiter: str = "|",
                  special: Iterable[str] = ("<s>", "</s>", "<unk>")) -> Lexicon:
    """Spell each word with the CTC tokens (longest match first) followed by the delimiter.

    Words a token sequence cannot spell are left out and listed in `skipped`
    with the characters that are missing; `special` words are ignored.
    """
    token_set = {t for t in tokens if t}
    longest = max((len(t) for t in token_set), default=1)
    special = set(special)
    entries: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for word in words:
        if word in special or word in entries or word in skipped:
            continue
        spelling, missing, i = [], [], 0
        while i < len(word):
            for size in range(min(longest, len(word) - i), 0, -1):
                piece = word[i:i + size]
                if piece in token_set and piece != word_delimiter:
                    spelling.append(piece)
                    i += size
                    break
            else:
                missing.append(word[i])
                i += 1
        if missing:
            skipped[word] = "".join(dict.fromkeys(missing))
        else:
            entries[word] = [*spelling, word_delimiter]
    return Lexicon(entries, skipped)


def load_lexicon(path: str | os.PathLike) -> Lexicon:
    """Read a flashlight lexicon (`word t o k |` per line; first spelling of a word wins)."""
    path = Path(path)
    if not path.is_file():
        raise SpeechLMError(f"{path}: lexicon file not found; write one with "
                            "`speechlm build lm ... --lexicon-out lexicon.txt --tokens vocab.json`")
    entries: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise SpeechLMError(f"{path}:{lineno}: a lexicon line needs a word and its "
                                    f"spelling (space-separated tokens), got {line.strip()!r}")
            entries.setdefault(fields[0], fields[1:])
    if not entries:
        raise SpeechLMError(f"{path}: the lexicon is empty")
    return Lexicon(entries)


def _is_special(token: str) -> bool:
    return len(token) > 2 and token.startswith("<") and token.endswith(">")


def tokens_to_text(tokens: Iterable[str], *, word_delimiter: str = "|") -> str:
    """Collapsed CTC tokens (no blanks) -> text, as GreedyCTCDecoder writes it: delimiters
    become single spaces and tokens written <like this> (<s>, </s>, <unk>) are dropped."""
    text = "".join(" " if t == word_delimiter else t for t in tokens if not _is_special(t))
    return " ".join(text.split())


class BeamSearchCTCDecoder:
    """Beam search over CTC log-probs, optionally with a word n-gram LM (ARPA) and lexicon.

    `decode(log_probs [B, T, V], lengths [B]) -> list[str]`, like
    `GreedyCTCDecoder`. `with_weights(lm_weight, word_score)` returns a
    decoder sharing the loaded LM (for tuning on dev without reloading).
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        blank: str = "<pad>",
        word_delimiter: str = "|",
        unk: str = "<unk>",
        lm_path: str | os.PathLike | None = None,
        lexicon_path: str | os.PathLike | None = None,
        lm_weight: float = 0.5,
        word_score: float = 0.0,
        beam_size: int = 50,
        beam_threshold: float = 25.0,
        beam_size_token: int | None = None,
        unk_score: float = -math.inf,
        _shared: dict | None = None,
    ):
        self.tokens = list(tokens)
        for role, token in (("blank", blank), ("word delimiter", word_delimiter)):
            if token not in self.tokens:
                raise SpeechLMError(
                    f"the {role} token {token!r} is not in the CTC vocabulary (first tokens: "
                    f"{self.tokens[:6]}); pass the model's vocab in id order, or set "
                    f"{'blank' if role == 'blank' else 'word_delimiter'}=")
        if len(set(self.tokens)) != len(self.tokens):
            raise SpeechLMError("the CTC token list has duplicates; pass the vocab in id order")
        self.blank, self.word_delimiter, self.unk = blank, word_delimiter, unk
        self.lm_weight, self.word_score = float(lm_weight), float(word_score)
        self.beam_size, self.beam_threshold = int(beam_size), float(beam_threshold)
        self.beam_size_token, self.unk_score = beam_size_token, unk_score
        self._delimiter_id = self.tokens.index(word_delimiter)
        self._shared = _shared if _shared is not None else self._load(lm_path, lexicon_path)
        self._decoder = self._build_decoder()

    # -- set-up --------------------------------------------------------------

    def _load(self, lm_path, lexicon_path) -> dict:
        """LM object, lexicon and its file: loaded once, shared by `with_weights` copies."""
        shared: dict = {"lm": None, "lexicon": None, "lexicon_file": None, "tmpdir": None,
                        "lm_path": None}
        if lexicon_path is None and lm_path is None:
            return shared
        if lexicon_path is not None:
            lexicon = load_lexicon(lexicon_path)
            lexicon_file = str(lexicon_path)
            unknown = sorted({t for sp in lexicon.entries.values() for t in sp} - set(self.tokens))
            if unknown:
                raise SpeechLMError(
                    f"{lexicon_path}: spellings use tokens the CTC vocabulary lacks: "
                    f"{unknown[:10]}; rebuild the lexicon with --tokens set to the model's vocab.json")
        else:
            from speechlm.text.ngram import arpa_vocabulary

            lexicon = build_lexicon(arpa_vocabulary(lm_path), self.tokens,
                                    word_delimiter=self.word_delimiter)
            if not lexicon.entries:
                raise SpeechLMError(f"{lm_path}: none of the LM's words can be spelled with the "
                                    f"CTC vocabulary ({lexicon.summary()}); was the LM built "
                                    "from text normalised like the training transcripts?")
            shared["tmpdir"] = tempfile.TemporaryDirectory(prefix="speechlm-lexicon-")
            lexicon_file = str(lexicon.write(Path(shared["tmpdir"].name) / "lexicon.txt"))
        shared["lexicon"], shared["lexicon_file"] = lexicon, lexicon_file
        if lm_path is not None:
            shared["lm_path"] = str(lm_path)
            shared["lm"] = _load_kenlm(lm_path, lexicon_file)
        return shared

    def _build_decoder(self):
        from torchaudio.models.decoder import ctc_decoder

        return ctc_decoder(
            lexicon=self._shared["lexicon_file"],
            tokens=self.tokens,
            lm=self._shared["lm"],
            beam_size=self.beam_size,
            beam_size_token=self.beam_size_token,
            beam_threshold=self.beam_threshold,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
            unk_score=self.unk_score,
            blank_token=self.blank,
            sil_token=self.word_delimiter,
            unk_word=self.unk,
        )

    def with_weights(self, lm_weight: float, word_score: float, **options) -> BeamSearchCTCDecoder:
        """A decoder with other weights (and beam options) that reuses this one's LM and lexicon."""
        kwargs = dict(blank=self.blank, word_delimiter=self.word_delimiter, unk=self.unk,
                      beam_size=self.beam_size, beam_threshold=self.beam_threshold,
                      beam_size_token=self.beam_size_token, unk_score=self.unk_score)
        kwargs.update(options)
        return BeamSearchCTCDecoder(self.tokens, lm_weight=lm_weight, word_score=word_score,
                                    _shared=self._shared, **kwargs)

    @property
    def uses_lexicon(self) -> bool:
        return self._shared["lexicon_file"] is not None

    @property
    def lexicon(self) -> Lexicon | None:
        return self._shared["lexicon"]

    # -- decoding --------------------------------------------------------------

    def _prepare(self, log_probs: torch.Tensor, lengths: torch.Tensor | None):
        if log_probs.dim() != 3:
            raise SpeechLMError(f"log_probs must be [batch, frames, vocab], got shape "
                                f"{tuple(log_probs.shape)}")
        batch, frames, vocab = log_probs.shape
        if vocab != len(self.tokens):
            raise SpeechLMError(
                f"the emissions have {vocab} classes but the decoder has {len(self.tokens)} "
                "tokens; pass the CTC model's vocabulary (vocab.json) in id order")
        emissions = log_probs.detach().to("cpu", torch.float32)
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.int32)
        lengths = lengths.detach().to("cpu", torch.int32).clamp(0, frames)
        if self.uses_lexicon:
            # A free word delimiter after each utterance so the last word can finish.
            padded = torch.full((batch, frames + 1, vocab), _IMPOSSIBLE, dtype=torch.float32)
            padded[:, :frames] = emissions
            rows = torch.arange(batch)
            padded[rows, lengths.long()] = _IMPOSSIBLE
            padded[rows, lengths.long(), self._delimiter_id] = 0.0
            emissions, lengths = padded, lengths + 1
        return emissions.contiguous(), lengths

    def hypotheses(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None):
        """torchaudio `CTCHypothesis` lists (tokens, words, score, timesteps) per utterance."""
        emissions, lengths = self._prepare(log_probs, lengths)
        return self._decoder(emissions, lengths)

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        """Best transcript per utterance: words joined by spaces."""
        texts = []
        for nbest in self.hypotheses(log_probs, lengths):
            if not nbest:
                texts.append("")
            elif self.uses_lexicon:
                texts.append(" ".join(nbest[0].words))
            else:
                texts.append(tokens_to_text(self._decoder.idxs_to_tokens(nbest[0].tokens),
                                            word_delimiter=self.word_delimiter))
        return texts


def _load_kenlm(lm_path, lexicon_file: str):
    """KenLM (from flashlight-text's wheel) over the word dictionary the decoder builds."""
    from flashlight.lib.text.dictionary import create_word_dict, load_words

    try:
        from flashlight.lib.text.decoder.kenlm import KenLM
    except ImportError as e:  # a flashlight-text build without KenLM
        raise SpeechLMError(
            "this flashlight-text build has no KenLM support, so ARPA language models cannot be "
            "loaded; reinstall it from the PyPI wheel (`pip install flashlight-text`)") from e
    path = Path(lm_path)
    if not path.is_file():
        raise SpeechLMError(f"{path}: language model file not found; build one with "
                            "`speechlm build lm --text corpus.txt --out lm.arpa`")
    # The same word dictionary ctc_decoder derives from the lexicon file, so indices agree.
    word_dict = create_word_dict(load_words(lexicon_file))
    try:
        return KenLM(str(path), word_dict)
    except Exception as e:  # noqa: BLE001 - KenLM raises plain RuntimeErrors on bad files
        raise SpeechLMError(f"{path}: KenLM cannot load it ({str(e).splitlines()[0][:200]}); "
                            "is it an ARPA or KenLM binary file?") from e
