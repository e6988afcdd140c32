"""tools/transfer_spread.py: bootstrap intervals of a transfer table and paired differences."""

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "transfer_spread", Path(__file__).resolve().parents[1] / "tools" / "transfer_spread.py")
transfer_spread = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(transfer_spread)


def _rows(system, task, pairs):
    return [{"system": system, "task": task, "id": f"u{i}", "reference": ref, "hypothesis": hyp}
            for i, (ref, hyp) in enumerate(pairs)]


def test_intervals_hold_the_score_and_a_real_difference_excludes_zero():
    refs = [f"verse number {i} of the book" for i in range(40)]
    rows = (_rows("untrained adapter", "repeat", [(r, "amen") for r in refs])
            + _rows("trained", "repeat", [(r, r if i % 4 else "amen")
                                          for i, r in enumerate(refs)]))
    out = {r["system"]: r for r in transfer_spread.spread(rows, "untrained adapter",
                                                          resamples=200)}
    trained = out["trained"]
    assert trained["low"] <= trained["value"] <= trained["high"]
    assert trained["value"] == pytest.approx(25.0)  # 10 of 40 verses lose their 6 words
    assert trained["diff"] < 0 and trained["diff_high"] < 0  # clearly better than untrained
    assert "diff" not in out["untrained adapter"]


def test_yes_no_questions_use_balanced_accuracy():
    refs = ["yes"] * 2 + ["no"] * 18
    rows = _rows("always no", "mentions_god", [(r, "no") for r in refs])
    [row] = transfer_spread.spread(rows, "nobody", resamples=50)
    assert row["value"] == pytest.approx(50.0)  # 90% plain accuracy, chance for balanced


def test_another_score_of_the_task_can_be_spread():
    refs = ["the lord is my shepherd"] * 10
    rows = _rows("rambling", "repeat", [(r, r + " and many more words were said then") for r in refs])
    [row] = transfer_spread.spread(rows, "nobody", resamples=50, metric="word_recall")
    assert row["value"] == pytest.approx(100.0)  # every word is there, though WER is 140%
    [row] = transfer_spread.spread(rows, "nobody", resamples=50)
    assert row["value"] == pytest.approx(140.0)
