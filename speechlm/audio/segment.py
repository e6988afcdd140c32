"""Cut long recordings into utterance-sized pieces: energy VAD, and CTC forced alignment.

Energy VAD (`split_on_silence`), with IndicWav2Vec's settings by default:
1. the wave is cut into 30 ms frames and each frame's RMS level taken in dBFS;
2. frames above a threshold are speech. The default threshold adapts to the
   recording: 30 % of the way from its noise floor (5th percentile level,
   floored at -70 dBFS) to its speech level (95th percentile); a recording
   with under 10 dB between the two has no silence to find and counts as
   speech wherever it is within 30 dB of its loud frames;
3. runs of speech separated by less than `min_silence_s` merge, runs with
   under `min_speech_s` of speech (clicks) are dropped, and each run gets
   `pad_ms` of context on both sides (where two paddings would overlap, the
   gap is split at its middle: segments never overlap);
4. a segment longer than `max_segment_s` is cut at its quietest frame in the
   second half of the allowed length when that frame is a real dip (6 dB
   below the segment's median level); with no dip (continuous speech, music,
   noise) it is cut into `max_segment_s` chunks, as IndicWav2Vec cuts files
   over 25 s without silence into 20 s chunks.

Forced alignment (`align_transcript`): torchaudio's CTC forced aligner puts a
known transcript on a CTC model's emissions, giving each word its frames and
a confidence; `group_words` turns those into utterances no longer than
`max_segment_s`, split at the longest pauses, for cutting long labelled
recordings into training utterances.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from speechlm.errors import SpeechLMError

_FLOOR_DB = -100.0  # level of an all-zero frame
_NOISE_FLOOR_LIMIT_DB = -70.0  # digital silence must not pull the adaptive threshold down
_DIP_DB = 6.0


def frame_levels_db(wave: torch.Tensor, sample_rate: int, frame_ms: float = 30.0) -> torch.Tensor:
    """RMS level in dBFS of each whole `frame_ms` frame of a 1-D wave (a last partial
    frame counts as one frame), floored at -100 dBFS."""
    wave = torch.as_tensor(wave).detach().reshape(-1).to(torch.float64)
    frame = max(1, int(round(sample_rate * frame_ms / 1000.0)))
    n = wave.numel()
    frames = max(1, math.ceil(n / frame))
    padded = torch.zeros(frames * frame, dtype=torch.float64)
    padded[:n] = wave
    power = padded.view(frames, frame).square().sum(-1)
    counts = torch.full((frames,), float(frame), dtype=torch.float64)
    counts[-1] = n - (frames - 1) * frame if n else 1
    rms = (power / counts).sqrt()
    return (20.0 * torch.log10(rms.clamp_min(1e-10))).clamp_min(_FLOOR_DB)


def adaptive_threshold_db(levels_db: torch.Tensor) -> float:
    """Speech/silence threshold in dBFS for one recording's frame levels (see the module doc)."""
    if levels_db.numel() == 0:
        return 0.0
    lo = max(float(torch.quantile(levels_db, 0.05)), _NOISE_FLOOR_LIMIT_DB)
    hi = float(torch.quantile(levels_db, 0.95))
    if hi - lo < 10.0:
        return hi - 30.0
    return lo + 0.3 * (hi - lo)


def _runs(mask: list[bool]) -> list[list[int]]:
    """[start, end) index runs where mask is True."""
    runs, start = [], None
    for i, on in enumerate(mask):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append([start, i])
            start = None
    if start is not None:
        runs.append([start, len(mask)])
    return runs


def _cut_long(start: int, end: int, levels: list[float], max_frames: int) -> list[tuple[int, int]]:
    """Split frames [start, end) into pieces of at most max_frames (see the module doc, step 4)."""
    pieces = []
    typical = sorted(levels[start:end])[(end - start) // 2]  # the segment's median level
    while end - start > max_frames:
        window = range(start + max(1, max_frames // 2), start + max_frames + 1)
        quietest = min(window, key=lambda f: (levels[f], -f))  # latest of equally quiet frames
        cut = quietest if levels[quietest] <= typical - _DIP_DB else start + max_frames
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def split_on_silence(
    wave: torch.Tensor,
    sample_rate: int,
    *,
    max_segment_s: float = 20.0,
    min_silence_s: float = 0.3,
    frame_ms: float = 30.0,
    pad_ms: float = 300.0,
    threshold_db: float | None = None,
    min_speech_s: float = 0.1,
) -> list[tuple[int, int]]:
    """Sample ranges [start, end) covering the speech of a 1-D wave, in order, not overlapping.

    Each range is at most `max_segment_s` long. `threshold_db` (dBFS) fixes
    the speech level; None adapts it to the recording. An all-silent wave
    gives []. See the module doc for the steps.
    """
    wave = torch.as_tensor(wave).reshape(-1)
    n = wave.numel()
    if n == 0:
        return []
    if max_segment_s <= 0 or frame_ms <= 0:
        raise SpeechLMError(f"max_segment_s and frame_ms must be > 0 (got {max_segment_s}, "
                            f"{frame_ms})")
    frame = max(1, int(round(sample_rate * frame_ms / 1000.0)))
    levels_t = frame_levels_db(wave, sample_rate, frame_ms)
    threshold = adaptive_threshold_db(levels_t) if threshold_db is None else float(threshold_db)
    levels = levels_t.tolist()
    speech = [lv > threshold and lv > _FLOOR_DB for lv in levels]
    runs = _runs(speech)
    # Bridge short pauses, then drop runs too short to be speech.
    gap_frames = int(round(min_silence_s * 1000.0 / frame_ms))
    merged: list[list[int]] = []
    for run in runs:
        if merged and run[0] - merged[-1][1] < gap_frames:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    min_frames = max(1, int(math.ceil(min_speech_s * 1000.0 / frame_ms - 1e-9)))
    merged = [r for r in merged if sum(speech[r[0]:r[1]]) >= min_frames]
    if not merged:
        return []
    # Pad; where neighbours' paddings would overlap, meet in the middle of the gap.
    pad = int(round(pad_ms / frame_ms))
    total = len(levels)
    padded = []
    for i, (s, e) in enumerate(merged):
        lo = max(0, s - pad)
        hi = min(total, e + pad)
        if i > 0:
            lo = max(lo, (merged[i - 1][1] + s + 1) // 2)
        if i + 1 < len(merged):
            hi = min(hi, (e + merged[i + 1][0] + 1) // 2)
        padded.append((lo, hi))
    max_frames = max(1, int(max_segment_s * 1000.0 / frame_ms + 1e-9))
    ranges = []
    for s, e in padded:
        for a, b in _cut_long(s, e, levels, max_frames):
            ranges.append((min(n, a * frame), min(n, b * frame)))
    return [(a, b) for a, b in ranges if b > a]


# ---------------------------------------------------------------------------
# Forced alignment


@dataclass(frozen=True)
class WordSpan:
    """One transcript word placed on the emissions: frames [start_frame, end_frame), seconds,
    and `score`, the geometric mean probability of its tokens' aligned frames (0..1)."""

    word: str
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    score: float


@dataclass(frozen=True)
class Utterance:
    """A group of consecutive aligned words: [start_s, end_s) seconds, text, mean word score."""

    start_s: float
    end_s: float
    text: str
    score: float
    words: int


def transcript_token_ids(text: str, vocab: Mapping[str, int], *, word_delimiter: str = "|") -> list[int]:
    """CTC target ids for a normalised transcript: characters, with the delimiter between words.

    Raises SpeechLMError listing the characters the vocabulary lacks (normalise
    the text for the model, e.g. with `speechlm.text.normalize_transcript`).
    """
    words = text.split()
    missing = sorted({c for w in words for c in w if c not in vocab})
    if missing:
        raise SpeechLMError(f"the transcript has characters the CTC vocabulary lacks: "
                            f"{''.join(missing)!r} (in {text[:60]!r}); normalise it like the "
                            "training transcripts")
    if word_delimiter not in vocab:
        raise SpeechLMError(f"the word delimiter {word_delimiter!r} is not in the CTC vocabulary")
    ids: list[int] = []
    for i, w in enumerate(words):
        if i:
            ids.append(vocab[word_delimiter])
        ids.extend(vocab[c] for c in w)
    return ids


# forced_align keeps a [frames x (2 * tokens + 1)] int8 back-pointer table in memory.
MAX_ALIGN_TABLE_BYTES = 2_000_000_000


def align_transcript(
    emissions: torch.Tensor,
    token_ids: Sequence[int],
    *,
    blank: int = 0,
    word_delimiter_id: int | None = None,
    words: Sequence[str] | None = None,
    frame_shift_s: float = 0.02,
    frame_times: Sequence[float] | torch.Tensor | None = None,
) -> list[WordSpan]:
    """Place a transcript's tokens on CTC log-probs [T, V] (or [1, T, V]); one WordSpan per word.

    `token_ids` is the target sequence (e.g. from `transcript_token_ids`);
    words are the runs between `word_delimiter_id` tokens and are named by
    `words` (default: their token ids joined). Times are `frame_times[f]`
    (seconds at which frame f starts) when given, else f * frame_shift_s.
    Raises SpeechLMError when the audio has too few frames for the text or
    is too long to align in one piece.
    """
    import torchaudio.functional as F

    log_probs = emissions.detach().float().cpu()
    if log_probs.dim() == 3:
        log_probs = log_probs[0]
    frames = log_probs.shape[0]
    targets = [int(t) for t in token_ids]
    if not targets:
        return []
    if blank in targets:
        raise SpeechLMError("the transcript's token ids contain the blank id; map text with "
                            "transcript_token_ids")
    repeats = sum(1 for a, b in itertools.pairwise(targets) if a == b)
    if frames < len(targets) + repeats:
        raise SpeechLMError(f"the audio has {frames} CTC frames but the transcript needs at "
                            f"least {len(targets) + repeats}; the transcript does not fit the "
                            "recording (wrong text, or audio cut short)")
    if frames * (2 * len(targets) + 1) > MAX_ALIGN_TABLE_BYTES:
        raise SpeechLMError(
            f"aligning {frames} frames with {len(targets)} tokens needs "
            f"{frames * (2 * len(targets) + 1) / 1e9:.1f} GB; split the recording and its "
            "transcript into parts (e.g. chapters) of at most ~10 minutes")
    path, scores = F.forced_align(log_probs.unsqueeze(0),
                                  torch.tensor([targets], dtype=torch.int32), blank=blank)
    path, scores = path[0].tolist(), scores[0].tolist()

    # Token spans: a new span starts where the label changes to a non-blank.
    spans: list[list] = []  # [start, end, sum_logp]
    previous = blank
    for f, (label, logp) in enumerate(zip(path, scores, strict=True)):
        if label != blank and label != previous:
            spans.append([f, f + 1, logp])
        elif label != blank:
            spans[-1][1] = f + 1
            spans[-1][2] += logp
        previous = label
    if len(spans) != len(targets):  # pragma: no cover - forced_align guarantees this
        raise SpeechLMError("forced alignment returned a path that does not match the transcript")

    if frame_times is not None:
        times = [float(t) for t in frame_times]
        if len(times) < frames:
            raise SpeechLMError(f"frame_times has {len(times)} entries for {frames} frames")
        shift = times[1] - times[0] if len(times) > 1 else frame_shift_s

        def time_of(f):
            return times[f] if f < len(times) else times[-1] + shift
    else:
        def time_of(f):
            return f * frame_shift_s

    result: list[WordSpan] = []
    current: list[int] = []  # indices into spans/targets
    groups: list[list[int]] = []
    for i, t in enumerate(targets):
        if word_delimiter_id is not None and t == word_delimiter_id:
            if current:
                groups.append(current)
            current = []
        else:
            current.append(i)
    if current:
        groups.append(current)
    if words is not None and len(words) != len(groups):
        raise SpeechLMError(f"{len(words)} words given for {len(groups)} delimited token runs")
    for k, group in enumerate(groups):
        start, end = spans[group[0]][0], spans[group[-1]][1]
        nframes = sum(spans[i][1] - spans[i][0] for i in group)
        logp = sum(spans[i][2] for i in group)
        name = words[k] if words is not None else " ".join(str(targets[i]) for i in group)
        result.append(WordSpan(name, start, end, round(time_of(start), 4), round(time_of(end), 4),
                               math.exp(logp / max(1, nframes))))
    return result


def group_words(
    words: Sequence[WordSpan],
    *,
    max_segment_s: float = 20.0,
    pad_s: float = 0.2,
    total_s: float | None = None,
) -> list[Utterance]:
    """Group aligned words into utterances of at most `max_segment_s` (pad included when it
    fits), splitting at the longest pause first; a single word longer than that stays whole.

    Each utterance is widened by `pad_s` on both sides without crossing the
    middle of the pause to its neighbours (or 0 and `total_s`).
    """
    if not words:
        return []

    def split(group: list[WordSpan]) -> list[list[WordSpan]]:
        if len(group) == 1 or group[-1].end_s - group[0].start_s + 2 * pad_s <= max_segment_s:
            return [group]
        gaps = [(group[i + 1].start_s - group[i].end_s, i) for i in range(len(group) - 1)]
        _, at = max(gaps, key=lambda g: (g[0], -abs(g[1] - len(group) / 2)))
        return split(group[:at + 1]) + split(group[at + 1:])

    groups = split(list(words))
    utterances = []
    for k, group in enumerate(groups):
        lo = group[0].start_s - pad_s
        hi = group[-1].end_s + pad_s
        if k > 0:
            lo = max(lo, (groups[k - 1][-1].end_s + group[0].start_s) / 2)
        if k + 1 < len(groups):
            hi = min(hi, (group[-1].end_s + groups[k + 1][0].start_s) / 2)
        lo = max(0.0, lo)
        if total_s is not None:
            hi = min(total_s, hi)
        utterances.append(Utterance(round(lo, 4), round(hi, 4), " ".join(w.word for w in group),
                                    sum(w.score for w in group) / len(group), len(group)))
    return utterances
