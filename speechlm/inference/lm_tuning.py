"""Tune the LM weight and word score of CTC beam search on a dev set.

The acoustic model runs once: its log-probs are kept and decoded again for
every (lm_weight, word_score) pair of a grid, sharing one loaded LM. The
pair with the lowest corpus WER wins (ties: lower CER, then the earlier grid
point). Greedy decoding of the same log-probs is reported as the baseline,
so the table shows what the LM buys. Tune on dev, never on test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from speechlm.errors import SpeechLMError
from speechlm.eval.metrics import edit_distance

DEFAULT_LM_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DEFAULT_WORD_SCORES = (-2.0, -1.0, 0.0, 1.0, 2.0)


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> tuple[float, float]:
    """Corpus (WER, CER): edit distance over all words / characters (spaces between words
    count as characters), divided by the reference length. Empty references add no length."""
    word_errors = word_total = char_errors = char_total = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        r, h = ref.split(), hyp.split()
        word_errors += edit_distance(r, h)
        word_total += len(r)
        rc, hc = " ".join(r), " ".join(h)
        char_errors += edit_distance(rc, hc)
        char_total += len(rc)
    return word_errors / max(1, word_total), char_errors / max(1, char_total)


@dataclass
class TuneResult:
    """The best (lm_weight, word_score) on dev and every grid point's WER/CER."""

    lm_weight: float
    word_score: float
    wer: float
    cer: float
    greedy_wer: float
    greedy_cer: float
    utterances: int
    grid: list[dict] = field(default_factory=list)  # {"lm_weight", "word_score", "wer", "cer"}

    def table(self) -> str:
        """The WER grid as text: one row per lm_weight, one column per word_score (%)."""
        weights = sorted({g["lm_weight"] for g in self.grid})
        scores = sorted({g["word_score"] for g in self.grid})
        cell = {(g["lm_weight"], g["word_score"]): g["wer"] for g in self.grid}
        lines = ["WER % (rows lm_weight, columns word_score)",
                 "lm_weight " + "".join(f"{s:>8g}" for s in scores)]
        for w in weights:
            row = "".join(f"{100 * cell[(w, s)]:8.2f}" if (w, s) in cell else f"{'':>8}"
                          for s in scores)
            lines.append(f"{w:>9g} " + row)
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"best lm_weight={self.lm_weight:g} word_score={self.word_score:g}: WER "
                f"{100 * self.wer:.2f}% CER {100 * self.cer:.2f}% on {self.utterances} "
                f"utterances (greedy: WER {100 * self.greedy_wer:.2f}% CER "
                f"{100 * self.greedy_cer:.2f}%)")

    def to_json(self) -> dict:
        return {"lm_weight": self.lm_weight, "word_score": self.word_score, "wer": self.wer,
                "cer": self.cer, "greedy_wer": self.greedy_wer, "greedy_cer": self.greedy_cer,
                "utterances": self.utterances, "grid": self.grid}


def _as_batches(log_probs_list, lengths) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(log_probs [B,T,V], lengths [B] or None)]; a 2-D entry is a batch of one."""
    if lengths is None:
        lengths = [None] * len(log_probs_list)
    if len(lengths) != len(log_probs_list):
        raise SpeechLMError(f"{len(log_probs_list)} log-prob batches but {len(lengths)} length "
                            "entries; pass one lengths tensor (or None) per batch")
    batches = []
    for lp, ln in zip(log_probs_list, lengths, strict=True):
        lp = torch.as_tensor(lp)
        if lp.dim() == 2:
            lp = lp.unsqueeze(0)
            ln = None if ln is None else torch.as_tensor(ln).reshape(1)
        batches.append((lp.detach().to("cpu", torch.float32),
                        None if ln is None else torch.as_tensor(ln).reshape(-1).cpu()))
    return batches


def tune_lm_weights(
    log_probs_list: Sequence[torch.Tensor],
    lengths: Sequence[torch.Tensor | None] | None,
    refs: Sequence[str],
    tokens: Sequence[str],
    lm_path: str | os.PathLike,
    lexicon_path: str | os.PathLike | None = None,
    *,
    lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
    word_scores: Sequence[float] = DEFAULT_WORD_SCORES,
    beam_size: int = 50,
    beam_threshold: float = 25.0,
    blank: str = "<pad>",
    word_delimiter: str = "|",
    progress: bool = False,
) -> TuneResult:
    """Grid-search lm_weight x word_score for `BeamSearchCTCDecoder` on precomputed log-probs.

    `log_probs_list`: batches [B, T, V] (or single utterances [T, V]) of CTC
    log-probs; `lengths`: the valid frame counts per batch (None entries, or
    None, mean all frames); `refs`: reference transcripts (normalised like the
    LM text), in the same order as the flattened batches.
    """
    from speechlm.inference.ctc import GreedyCTCDecoder
    from speechlm.inference.ctc_beam import BeamSearchCTCDecoder

    from ..progress import progress_bar

    batches = _as_batches(log_probs_list, lengths)
    total = sum(lp.shape[0] for lp, _ in batches)
    if total != len(refs):
        raise SpeechLMError(f"{total} utterances of log-probs but {len(refs)} references; "
                            "pass one reference per utterance, in batch order")
    if total == 0:
        raise SpeechLMError("no dev utterances to tune on")
    if not lm_weights or not word_scores:
        raise SpeechLMError("the grid is empty: give at least one lm_weight and one word_score")

    greedy = GreedyCTCDecoder(tokens, blank=blank, word_delimiter=word_delimiter)
    greedy_hyps = [text for lp, ln in batches for text in greedy.decode(lp, ln)]
    greedy_wer, greedy_cer = error_rates(refs, greedy_hyps)

    base = BeamSearchCTCDecoder(tokens, blank=blank, word_delimiter=word_delimiter,
                                lm_path=lm_path, lexicon_path=lexicon_path, beam_size=beam_size,
                                beam_threshold=beam_threshold)
    points = [(float(w), float(s)) for w in lm_weights for s in word_scores]
    grid: list[dict] = []
    best = None
    for w, s in progress_bar(points, desc="lm grid", disable=not progress, dynamic_ncols=True):
        decoder = base.with_weights(w, s)
        hyps = [text for lp, ln in batches for text in decoder.decode(lp, ln)]
        wer, cer = error_rates(refs, hyps)
        grid.append({"lm_weight": w, "word_score": s, "wer": wer, "cer": cer})
        if best is None or (wer, cer) < (best["wer"], best["cer"]):
            best = grid[-1]
    return TuneResult(lm_weight=best["lm_weight"], word_score=best["word_score"], wer=best["wer"],
                      cer=best["cer"], greedy_wer=greedy_wer, greedy_cer=greedy_cer,
                      utterances=total, grid=grid)
