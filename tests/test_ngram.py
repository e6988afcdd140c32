"""Kneser-Ney ARPA builder and reader: normalised distributions, consistent backoffs,
perplexity, round trips, agreement with KenLM, and the `speechlm build lm` command."""

import itertools
import json
import math

import pytest

from speechlm.errors import SpeechLMError
from speechlm.text.ngram import (
    FALLBACK_DISCOUNTS,
    ArpaFormatError,
    ArpaModel,
    arpa_vocabulary,
    build_arpa,
    iter_text,
)
from speechlm.text.normalize import normalize_transcript


@pytest.fixture(scope="module")
def corpus():
    sentences = [normalize_transcript(t, "en") for t in itertools.islice(iter_text("embedded:en"), 2600)]
    return sentences[:2400], sentences[2400:]


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    train, _ = corpus
    root = tmp_path_factory.mktemp("lm")
    out = {}
    for order in (1, 2, 4):
        path = root / f"{order}gram.arpa"
        stats = build_arpa(train, order, out_path=path)
        out[order] = (path, stats, ArpaModel.load(path))
    return out


def _contexts(model):
    """Seen, partly seen and unseen contexts of every length up to order - 1."""
    seen = [g[:-1] for g in itertools.islice(model.ngrams(model.order), 0, 400, 97)] \
        if model.order > 1 else []
    return [(), ("<s>",), ("the",), ("<s>", "and"), ("of", "the"), ("zzyzx", "the"),
            ("and", "god", "said"), ("unheard", "of", "words"), *seen]


@pytest.mark.parametrize("order", [1, 2, 4])
def test_every_distribution_sums_to_one(models, order):
    _, _, model = models[order]
    vocab = sorted(w for w in model.vocab if w != "<s>")
    for context in _contexts(model):
        total = sum(10.0 ** model.log10_prob(w, context) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-6), context


def test_backoff_weights_are_the_leftover_mass(models):
    """bo(h) = (1 - sum of p(w|h) over listed hw) / (1 - sum of p(w|h') over the same w)."""
    _, _, model = models[4]
    for n in (2, 3, 4):
        by_context: dict = {}
        for gram in model.ngrams(n):
            by_context.setdefault(gram[:-1], []).append(gram[-1])
        for context in list(by_context)[:: max(1, len(by_context) // 40)]:
            words = by_context[context]
            listed = sum(10.0 ** model.log10_prob(w, context) for w in words)
            lower = sum(10.0 ** model.log10_prob(w, context[1:]) for w in words)
            expected = math.log10((1.0 - listed) / (1.0 - lower))
            assert model.backoff(context) == pytest.approx(expected, abs=1e-4), context


def test_kneser_ney_probabilities_by_hand(tmp_path):
    """Toy corpus small enough for the fallback discounts: check p by the formula."""
    stats = build_arpa(["a b", "a c", "b"], 2, out_path=tmp_path / "toy.arpa")
    assert stats.fallback_orders == [1, 2] and stats.discounts[1] == FALLBACK_DISCOUNTS
    model = ArpaModel.load(tmp_path / "toy.arpa")
    d1 = FALLBACK_DISCOUNTS[0]
    # Unigram continuation counts: a:1 (<s>), b:2 (a, <s>), c:1 (a), </s>:2 (b, c); total 6.
    # Vocabulary predicted: <unk> a b c </s> (5); gamma = 0.5 * (1 + 1) + 1.0 * 2 over 6.
    gamma = (d1 * 2 + FALLBACK_DISCOUNTS[1] * 2) / 6
    p_b = (2 - FALLBACK_DISCOUNTS[1]) / 6 + gamma / 5
    assert 10 ** model.log10_prob("b") == pytest.approx(p_b, abs=1e-6)
    assert 10 ** model.log10_prob("<unk>") == pytest.approx(gamma / 5, abs=1e-6)
    # Bigram after "a": raw counts b:1, c:1 -> p(b|a) = (1 - d1)/2 + (2 d1 / 2) p(b).
    assert 10 ** model.log10_prob("b", ["a"]) == pytest.approx((1 - d1) / 2 + d1 * p_b, abs=1e-6)


def test_higher_order_beats_unigram_on_held_out_text(models, corpus):
    _, held_out = corpus
    ppl = {order: models[order][2].perplexity(held_out) for order in (1, 2, 4)}
    assert ppl[4] < ppl[2] < ppl[1]
    assert ppl[4] < 0.7 * ppl[1]


def test_arpa_header_and_round_trip(models, tmp_path):
    path, stats, model = models[4]
    assert [len(model.ngrams(n)) for n in range(1, 5)] == stats.ngrams
    assert {"<s>", "</s>", "<unk>"} <= model.vocab
    assert model.ngrams(1)[("<s>",)] == -99.0
    assert arpa_vocabulary(path) == [g[0] for g in model.ngrams(1)]
    again = ArpaModel.load(model.save(tmp_path / "copy.arpa"))
    for n in range(1, 5):
        assert again.ngrams(n) == model.ngrams(n)
    sentence = "and god said let there be light"
    assert again.score(sentence) == model.score(sentence)
    assert model.score("qwxz frobnicate") == model.score("<unk> <unk>")  # OOV words are <unk>


def test_kenlm_scores_our_arpa_the_same(models):
    kenlm = pytest.importorskip("flashlight.lib.text.decoder.kenlm")
    from flashlight.lib.text.dictionary import Dictionary

    path, _, model = models[4]
    words = Dictionary()
    for w in sorted(model.vocab):
        words.add_entry(w)
    words.set_default_index(words.get_index("<unk>"))
    lm = kenlm.KenLM(str(path), words)
    for sentence in ["in the beginning god created the heaven and the earth",
                     "and the lord spake unto moses saying", "the", "zebra quantum and the lord"]:
        state, total = lm.start(False), 0.0
        for w in sentence.split():
            state, score = lm.score(state, words.get_index(w))
            total += score
        total += lm.finish(state)[1]
        assert total == pytest.approx(model.score(sentence), abs=1e-4), sentence


def test_vocab_limit_maps_rare_words_to_unk(tmp_path):
    text = ["the cat sat", "the cat ran", "a dog sat", "the owl"]
    stats = build_arpa(text, 2, out_path=tmp_path / "lm.arpa", vocab_limit=3)
    model = ArpaModel.load(tmp_path / "lm.arpa")
    assert model.vocab == {"<s>", "</s>", "<unk>", "the", "cat", "sat"}
    assert stats.oov_words == 4 and stats.vocab_size == 6
    assert ("<unk>", "sat") in model.ngrams(2)  # "dog sat" became "<unk> sat"


def test_bad_input_messages(tmp_path):
    with pytest.raises(SpeechLMError, match="no text"):
        build_arpa(["", "   "], 3, out_path=tmp_path / "x.arpa")
    with pytest.raises(SpeechLMError, match="reserved word '<s>'"):
        build_arpa(["a <s> b"], 2, out_path=tmp_path / "x.arpa")
    bad = tmp_path / "bad.arpa"
    bad.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\t<unk>\nnot-a-number\tword\n\\end\\\n")
    with pytest.raises(ArpaFormatError, match=rf"{bad}:6: not a number"):
        ArpaModel.load(bad)
    short = tmp_path / "short.arpa"
    short.write_text("\\data\\\nngram 1=3\n\n\\1-grams:\n-1.0\t<unk>\n-1.0\ta\n\\end\\\n")
    with pytest.raises(ArpaFormatError, match="declares 3 1-grams but the file has 2"):
        ArpaModel.load(short)
    with pytest.raises(SpeechLMError, match="not found"):
        ArpaModel.load(tmp_path / "missing.arpa")


def test_build_lm_command_writes_lm_and_lexicon(tmp_path, capsys):
    from speechlm.cli import main

    manifest = tmp_path / "train.jsonl"
    lines = ["The cat sat, on the mat!", "The dog sat on the mat.", "Naïve café ß words"] * 3
    manifest.write_text("".join(json.dumps({"id": str(i), "audio": "x.wav", "text": t}) + "\n"
                                for i, t in enumerate(lines)))
    dev = tmp_path / "dev.txt"
    dev.write_text("the dog sat on the mat\n")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
             **{c: 5 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "vocab.json").write_text(json.dumps(vocab))
    rc = main(["build", "lm", "--text", str(manifest), "--lang", "en", "--order", "3",
               "--exclude", str(dev), "--out", str(tmp_path / "lm.arpa"),
               "--lexicon-out", str(tmp_path / "lexicon.txt"), "--tokens", str(tmp_path / "model")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "excluded 3 sentences" in out and "left out" in out
    model = ArpaModel.load(tmp_path / "lm.arpa")
    assert "dog" not in model.vocab and {"cat", "naive", "cafe"} <= model.vocab  # en strips accents
    lexicon = dict(line.split("\t") for line in (tmp_path / "lexicon.txt").read_text().splitlines())
    assert lexicon["cat"] == "c a t |" and lexicon["naive"] == "n a i v e |"
    assert "ß" not in lexicon and "<unk>" not in lexicon and "<s>" not in lexicon
    assert main(["build", "lm", "--text", str(tmp_path / "nope.txt"), "--out",
                 str(tmp_path / "x.arpa")]) == 2
    assert "nope.txt: text file not found" in capsys.readouterr().err
