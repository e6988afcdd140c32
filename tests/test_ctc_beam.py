"""CTC beam search (flashlight-text via torchaudio): equals greedy without an LM, lets a
word LM fix acoustic ambiguity, builds lexicons, and tunes LM weights on dev."""

import pytest
import torch

from speechlm.errors import SpeechLMError
from speechlm.inference.ctc import GreedyCTCDecoder
from speechlm.inference.ctc_beam import (
    BeamSearchCTCDecoder,
    build_lexicon,
    load_lexicon,
    tokens_to_text,
)
from speechlm.inference.lm_tuning import error_rates, tune_lm_weights
from speechlm.testing.tiny_tokenizers import CTC_CHARACTERS, ctc_vocab
from speechlm.text.ngram import build_arpa

VOCAB = ctc_vocab(CTC_CHARACTERS)
TOKENS = list(VOCAB)


def emissions(text: str, *, confusions: dict | None = None, noise: float = 0.0, seed: int = 0,
              trailing_delimiter: bool = False) -> torch.Tensor:
    """Peaked CTC log-probs [T, V] spelling `text`: 2 frames per character, a blank after each.

    confusions: {character index: (other character, its probability)} makes those frames
    ambiguous between the true character and another.
    """
    frames = [(0, None)]
    for i, ch in enumerate(text):
        token = VOCAB["|" if ch == " " else ch]
        frames += [(token, i), (token, i), (0, None)]
    if trailing_delimiter:
        frames += [(VOCAB["|"], None), (0, None)]
    probs = torch.full((len(frames), len(TOKENS)), 1e-4)
    for f, (token, i) in enumerate(frames):
        if confusions and i in confusions:
            other, p = confusions[i]
            probs[f, token], probs[f, VOCAB[other]] = 1 - p, p
        else:
            probs[f, token] = 1.0
    logits = probs.log()
    if noise:
        logits = logits + noise * torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    return logits.log_softmax(-1)


def batch(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([r.shape[0] for r in rows])
    out = torch.full((len(rows), int(lengths.max()), len(TOKENS)), -30.0)
    out[..., 0] = 0.0  # padding frames: blank
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths


@pytest.fixture(scope="module")
def cat_lm(tmp_path_factory):
    """An LM that has seen 'the cat sat' often and knows 'cot' only from one other sentence."""
    sentences = (["the cat sat on the mat"] * 20 + ["a cot is a small bed"]
                 + ["the dog sat on the rug", "my cat is black", "the mat is red"] * 3)
    path = tmp_path_factory.mktemp("lm") / "cat.arpa"
    build_arpa(sentences, 3, out_path=path)
    return path


def test_lexicon_free_beam_equals_greedy_on_peaked_emissions():
    texts = ["hello world", "the cat sat on the mat", "a", "bookkeeper all ill", "zz top"]
    log_probs, lengths = batch([emissions(t, noise=0.5, seed=i) for i, t in enumerate(texts)])
    greedy = GreedyCTCDecoder(TOKENS).decode(log_probs, lengths)
    beam = BeamSearchCTCDecoder(TOKENS).decode(log_probs, lengths)
    assert greedy == texts
    assert beam == greedy


def test_lm_resolves_acoustic_ambiguity(cat_lm):
    # The acoustics say "cot" (0.6) more than "cat" (0.4); both are words the LM knows.
    log_probs = emissions("the cot sat on the mat", confusions={5: ("a", 0.4)}).unsqueeze(0)
    assert GreedyCTCDecoder(TOKENS).decode(log_probs) == ["the cot sat on the mat"]
    with_lm = BeamSearchCTCDecoder(TOKENS, lm_path=cat_lm, lm_weight=1.0)
    assert with_lm.decode(log_probs) == ["the cat sat on the mat"]
    # Weight 0: only the acoustics (and the lexicon) count again.
    assert with_lm.with_weights(0.0, 0.0).decode(log_probs) == ["the cot sat on the mat"]
    # The emissions have no final "|"; the last word is still decoded, and the same as with one.
    padded = emissions("the cot sat on the mat", confusions={5: ("a", 0.4)},
                       trailing_delimiter=True).unsqueeze(0)
    assert with_lm.decode(padded) == ["the cat sat on the mat"]


def test_lexicon_restricts_output_to_known_words(tmp_path, cat_lm):
    lexicon = build_lexicon(["the", "cat", "sat"], TOKENS)
    path = lexicon.write(tmp_path / "lexicon.txt")
    assert path.read_text().splitlines()[1] == "cat\tc a t |"
    decoder = BeamSearchCTCDecoder(TOKENS, lexicon_path=path)  # no LM: the lexicon alone
    log_probs = emissions("the cet sat", confusions={5: ("a", 0.3)}).unsqueeze(0)
    assert decoder.decode(log_probs) == ["the cat sat"]
    # An LM with a lexicon file: the file decides which words can be output.
    both = BeamSearchCTCDecoder(TOKENS, lm_path=cat_lm, lexicon_path=path, lm_weight=1.0)
    assert both.decode(emissions("the cat sat").unsqueeze(0)) == ["the cat sat"]


def test_build_lexicon_spells_with_tokens_and_reports_missing(tmp_path):
    lexicon = build_lexicon(["niño", "x-ray", "<unk>", "ok", "ok"], ["<pad>", "|", "n", "i", "ñ",
                                                                     "o", "k", "ll"])
    assert lexicon.entries == {"niño": ["n", "i", "ñ", "o", "|"], "ok": ["o", "k", "|"]}
    assert lexicon.skipped == {"x-ray": "x-ray"}
    assert "1 words left out" in lexicon.summary()
    multi = build_lexicon(["llano"], ["ll", "l", "a", "n", "o", "|"])
    assert multi.entries["llano"] == ["ll", "a", "n", "o", "|"]  # longest token first
    assert load_lexicon(lexicon.write(tmp_path / "lex.txt")).entries == lexicon.entries
    (tmp_path / "bad.txt").write_text("word\n")
    with pytest.raises(SpeechLMError, match="bad.txt:1: a lexicon line needs"):
        load_lexicon(tmp_path / "bad.txt")


def test_tokens_to_text_matches_greedy_conventions():
    assert tokens_to_text(["|", "h", "i", "<unk>", "|", "|", "y", "o", "</s>", "|"]) == "hi yo"


def test_bad_configuration_messages(tmp_path, cat_lm):
    with pytest.raises(SpeechLMError, match="blank token '-' is not in the CTC vocabulary"):
        BeamSearchCTCDecoder(TOKENS, blank="-")
    decoder = BeamSearchCTCDecoder(TOKENS)
    with pytest.raises(SpeechLMError, match="10 classes but the decoder has 39 tokens"):
        decoder.decode(torch.zeros(1, 5, 10))
    with pytest.raises(SpeechLMError, match="missing.arpa: language model file not found"):
        BeamSearchCTCDecoder(TOKENS, lm_path=tmp_path / "missing.arpa")
    (tmp_path / "greek.txt").write_text("λόγος\tλ ό γ ο ς |\n")
    with pytest.raises(SpeechLMError, match="spellings use tokens the CTC vocabulary lacks"):
        BeamSearchCTCDecoder(TOKENS, lexicon_path=tmp_path / "greek.txt")


def test_tuning_finds_a_weight_that_beats_greedy(cat_lm):
    sentences = ["the cat sat on the mat", "my cat is black", "the dog sat on the rug",
                 "the mat is red"]
    refs, rows = [], []
    for i, s in enumerate(sentences):
        # Confuse the vowel of "cat"/"mat"/"sat" with "o": greedy reads the wrong word.
        at = next(k for k, ch in enumerate(s) if ch == "a")
        rows.append(emissions(s, confusions={at: ("o", 0.6)}, noise=0.1, seed=i))
        refs.append(s)
    log_probs, lengths = batch(rows)
    result = tune_lm_weights([log_probs[:2], log_probs[2:]], [lengths[:2], lengths[2:]], refs,
                             TOKENS, cat_lm, lm_weights=(0.0, 1.0, 2.0), word_scores=(-1.0, 0.0))
    assert len(result.grid) == 6 and result.utterances == 4
    assert result.greedy_wer > 0.1
    assert result.lm_weight > 0 and result.wer == 0.0 < result.greedy_wer
    cell = {(g["lm_weight"], g["word_score"]): g["wer"] for g in result.grid}
    assert cell[(0.0, 0.0)] > 0  # without the LM the confusions stay
    table = result.table().splitlines()
    assert len(table) == 5 and table[1].split()[1:] == ["-1", "0"]
    with pytest.raises(SpeechLMError, match="4 utterances of log-probs but 3 references"):
        tune_lm_weights([log_probs], [lengths], refs[:3], TOKENS, cat_lm)


def test_error_rates():
    wer, cer = error_rates(["a b c", "d e"], ["a x c", ""])
    assert wer == pytest.approx(3 / 5)
    assert cer == pytest.approx((1 + 3) / (5 + 3))
