"""Metrics against hand-computed values, and scoring a hypothesis file against a manifest."""

import json

import pytest

from speechlm.errors import ManifestError, SpeechLMError
from speechlm.eval.metrics import (
    accuracy,
    bleu,
    cer,
    chrf,
    edit_counts,
    exact_match,
    score_manifest,
    wer,
)


def test_wer_is_corpus_level_edits_over_reference_words():
    # "a b c" -> "a c": 1 deletion; "x y" -> "x y z": 1 insertion; 5 reference words
    assert wer(["a b c", "x y"], ["a c", "x y z"]) == pytest.approx(2 / 5)
    assert edit_counts(["a b c", "x y"], ["a c", "x y z"]) == {
        "substitutions": 0, "deletions": 1, "insertions": 1, "hits": 4, "ref_len": 5}
    # one substitution out of three words
    assert wer(["the cat sat"], ["the hat sat"]) == pytest.approx(1 / 3)


def test_cer_counts_spaces_as_characters():
    assert cer(["ab c"], ["abc"]) == pytest.approx(1 / 4)  # the space was deleted
    assert cer(["abcd"], ["abxd"]) == pytest.approx(1 / 4)


def test_empty_references():
    assert wer([""], [""]) == 0.0
    assert wer([""], ["x y"]) == 1.0  # insertions against nothing
    assert wer(["", "a b"], ["x", "a b"]) == pytest.approx(1 / 2)  # 1 insertion, 2 ref words
    assert cer([], []) == 0.0


def test_lang_normalises_both_sides():
    assert wer(["Hello, World!"], ["hello world"]) == pytest.approx(1.0)
    assert wer(["Hello, World!"], ["hello world"], lang="en") == 0.0
    assert cer(["¿Qué pasó?"], ["que paso"], lang="es") == pytest.approx(2 / 8)


def test_bleu_and_chrf():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["the cat sat on the mat"], [""]) == 0.0
    assert chrf(["the cat"], ["the cat"]) == pytest.approx(100.0)
    assert 0 < chrf(["the cat sat on the mat"], ["the cat sat on a mat"]) < 100


def test_exact_match_and_accuracy():
    assert exact_match(["The Cat.", "a dog"], ["cat", "dogs"]) == pytest.approx(0.5)  # SQuAD rules
    assert exact_match(["The Cat."], ["the cat"], lang="en") == 1.0
    assert exact_match(["The Cat."], ["cat"], lang="en") == 0.0
    assert accuracy(["A", "B", 3], ["A ", " b", 3]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        accuracy(["a", "b"], ["a"])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    ref = _write(tmp_path / "ref.jsonl", [
        {"id": "u1", "audio": "u1.wav", "text": "Hello world.", "lang": "en"},
        {"id": "u2", "audio": "u2.wav", "text": "the cat sat", "lang": "en"},
        {"id": "u3", "audio": "u3.wav", "text": "good night", "lang": "en"},
    ])
    hyp = _write(tmp_path / "hyp.jsonl", [
        {"id": "u2", "text": "the hat sat"},
        {"id": "u1", "text": "hello world"},
        {"id": "u9", "text": "extra"},
    ])
    return ref, hyp


def test_score_manifest_aligns_by_id_and_reports_missing_and_extra(files):
    ref, hyp = files
    result = score_manifest(hyp, ref, ["wer", "cer"])
    # u1 exact after normalisation, u2 one substitution, u3 missing -> 2 deletions; 7 words
    assert result.scores["wer"] == pytest.approx(3 / 7)
    assert result.missing == ["u3"] and result.extra == ["u9"]
    assert result.num_scored == 3 and result.empty_hypotheses == 1
    skipped = score_manifest(hyp, ref, ["wer"], missing="skip")
    assert skipped.scores["wer"] == pytest.approx(1 / 5) and skipped.num_scored == 2


def test_score_manifest_errors_name_the_file_and_line(tmp_path, files):
    ref, _ = files
    bad = _write(tmp_path / "bad.jsonl", [{"id": "u1", "text": "x"}, {"text": "no id"}])
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: id: missing"):
        score_manifest(bad, ref)
    with pytest.raises(SpeechLMError, match="unknown metric"):
        score_manifest(bad, ref, ["wer", "rouge"])
    with pytest.raises(SpeechLMError, match="nope.jsonl: hypothesis file not found"):
        score_manifest(tmp_path / "nope.jsonl", ref)


def test_word_recall_counts_reference_words_found_in_any_order_once_each():
    from speechlm.eval.metrics import word_recall

    refs = ["the lord is my shepherd", "amen amen"]
    hyps = ["my shepherd is the lord and he said many things to them", "amen"]
    assert word_recall(refs, hyps) == pytest.approx(6 / 7)  # the second "amen" is missing
    assert word_recall(["In the Beginning,"], ["in the beginning"], lang="en") == 1.0
    assert word_recall(["a b"], [""]) == 0.0
