"""Benchmark: real-time factor of CTC beam search with a 4-gram word LM on CPU, vs greedy.

Emissions are synthetic but shaped like a character CTC model's on 60 s of
read speech: 50 frames/s, the 39-token vocabulary of our tiny CTC models,
about 15 characters per second (each character 1-3 frames, blanks between),
log-probs peaked on the right token with Gaussian logit noise, so greedy
decoding makes realistic character errors. The text is held-out sentences
of the embedded Bible corpus (English side); the 4-gram LM is built with
`speechlm.text.ngram.build_arpa` from the rest of it. The audio is decoded
as 10 s utterances with beam 50, lm_weight 1.0, word_score 0.

Rows: beam+LM real-time factor (decode seconds / audio seconds, lower is
faster; baseline greedy, ratio = greedy RTF / beam RTF, so < 1 means slower),
WER of each (ratio = greedy WER / beam WER, > 1 means the LM helps), and the
one-off costs of building and loading the LM.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FRAME_RATE = 50
UTTERANCE_S = 10.0


def _sentences(limit: int | None) -> list[str]:
    import itertools

    from speechlm.text.ngram import iter_text
    from speechlm.text.normalize import normalize_transcript

    source = iter_text("embedded:en")
    if limit is not None:
        source = itertools.islice(source, limit)
    return [s for s in (normalize_transcript(t, "en") for t in source) if s]


def _emissions(texts: list[str], vocab: dict[str, int], seconds: float, *, noise: float, seed: int):
    """([T, V] log-prob tensors, reference texts), one per UTTERANCE_S of speech."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    frames_per_utt = int(UTTERANCE_S * FRAME_RATE)
    utterances, refs = [], []
    text_iter = iter(texts)
    while len(utterances) * UTTERANCE_S < seconds:
        labels: list[int] = [0]
        words: list[str] = []
        for sentence in text_iter:
            for word in sentence.split():
                spelled = []
                for ch in word + "|":
                    token = vocab[ch]
                    gap = int(torch.randint(0, 2, (1,), generator=gen))
                    if (spelled[-1:] or labels[-1:]) == [token]:
                        gap = 1  # CTC needs a blank between repeated letters
                    repeat = int(torch.randint(1, 4, (1,), generator=gen))
                    spelled += [0] * gap + [token] * repeat
                if len(labels) + len(spelled) > frames_per_utt:
                    break
                labels += spelled
                words.append(word)
            else:
                continue
            break
        labels += [0] * (frames_per_utt - len(labels))
        logits = noise * torch.randn(frames_per_utt, len(vocab), generator=gen)
        logits[torch.arange(frames_per_utt), torch.tensor(labels)] += 5.0
        utterances.append(logits.log_softmax(-1))
        refs.append(" ".join(words))
    return utterances, refs


def run(quick: bool = False) -> list[dict]:
    import torch

    from speechlm.inference.ctc import GreedyCTCDecoder
    from speechlm.inference.ctc_beam import BeamSearchCTCDecoder
    from speechlm.inference.lm_tuning import error_rates
    from speechlm.testing.tiny_tokenizers import CTC_CHARACTERS, ctc_vocab
    from speechlm.text.ngram import build_arpa

    torch.set_num_threads(1)  # flashlight decodes on one thread; keep greedy comparable
    vocab = ctc_vocab(CTC_CHARACTERS)
    tokens = list(vocab)
    sentences = _sentences(6000 if quick else None)
    held_out, train = sentences[-200:], sentences[:-200]
    seconds = 20.0 if quick else 60.0
    utterances, refs = _emissions(held_out, vocab, seconds, noise=1.2, seed=0)
    audio_s = len(utterances) * UTTERANCE_S

    with tempfile.TemporaryDirectory() as tmp:
        lm_path = Path(tmp) / "4gram.arpa"
        start = time.perf_counter()
        stats = build_arpa(train, 4, out_path=lm_path)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        beam = BeamSearchCTCDecoder(tokens, lm_path=lm_path, lm_weight=1.0, word_score=0.0,
                                    beam_size=50, beam_threshold=25.0)
        load_s = time.perf_counter() - start

        greedy = GreedyCTCDecoder(tokens)
        start = time.perf_counter()
        greedy_hyps = [greedy.decode(u.unsqueeze(0))[0] for u in utterances]
        greedy_s = time.perf_counter() - start
        start = time.perf_counter()
        beam_hyps = [beam.decode(u.unsqueeze(0))[0] for u in utterances]
        beam_s = time.perf_counter() - start

    greedy_wer, _ = error_rates(refs, greedy_hyps)
    beam_wer, _ = error_rates(refs, beam_hyps)
    beam_rtf, greedy_rtf = beam_s / audio_s, greedy_s / audio_s
    setting = (f"{audio_s:.0f} s of synthetic 50 fps emissions, vocab {len(tokens)}, "
               f"{len(utterances)} x {UTTERANCE_S:.0f} s utterances; 4-gram LM "
               f"{'/'.join(map(str, stats.ngrams))} n-grams from {stats.sentences} sentences")
    return [
        {"benchmark": "ctc_beam_rtf", "metric": "real-time factor, beam 50 + 4-gram LM (CPU, 1 thread)",
         "value": beam_rtf, "baseline": greedy_rtf, "ratio": greedy_rtf / beam_rtf,
         "note": f"baseline greedy; {setting}"},
        {"benchmark": "ctc_beam_rtf", "metric": "WER, beam 50 + 4-gram LM", "value": beam_wer,
         "baseline": greedy_wer, "ratio": greedy_wer / beam_wer if beam_wer else None,
         "note": "baseline greedy on the same emissions (noisy logits: realistic character errors)"},
        {"benchmark": "ctc_beam_rtf", "metric": "4-gram ARPA build seconds (pure Python KN)",
         "value": build_s, "baseline": None, "ratio": None,
         "note": f"{stats.words} words; one-off"},
        {"benchmark": "ctc_beam_rtf", "metric": "LM + lexicon load seconds (KenLM via flashlight)",
         "value": load_s, "baseline": None, "ratio": None,
         "note": f"{stats.vocab_size} words; once per decoder"},
    ]


if __name__ == "__main__":
    import json

    quick = "--quick" in sys.argv
    for row in run(quick=quick):
        print(json.dumps(row))
