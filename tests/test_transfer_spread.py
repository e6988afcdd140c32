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


def test_per_item_sums_give_the_same_intervals_as_scoring_every_resample(monkeypatch):
    refs = [f"verse {i} says the lord is near" for i in range(30)]
    rows = (_rows("untrained adapter", "repeat", [(r, "the text is") for r in refs])
            + _rows("trained", "repeat", [(r, r.replace("lord", "land") + " and more" * (i % 3))
                                          for i, r in enumerate(refs)])
            + _rows("untrained adapter", "mentions_god", [("yes" if i % 5 == 0 else "no", "no")
                                                          for i in range(30)])
            + _rows("trained", "mentions_god", [("yes" if i % 5 == 0 else "no",
                                                 "yes" if i % 5 == 0 or i % 7 == 0 else "no")
                                                for i in range(30)]))
    for metric in (None, "cer", "word_recall"):
        fast = transfer_spread.spread(rows, "untrained adapter", resamples=50, metric=metric)
        with monkeypatch.context() as m:
            m.setattr(transfer_spread, "_item_stats", lambda *a: None)
            slow = transfer_spread.spread(rows, "untrained adapter", resamples=50, metric=metric)
        assert len(fast) == len(slow) == 4
        for f, s in zip(fast, slow, strict=True):
            assert f.keys() == s.keys() and (f["task"], f["system"]) == (s["task"], s["system"])
            assert [f[k] for k in f if k not in ("task", "system")] == pytest.approx(
                [s[k] for k in s if k not in ("task", "system")]), (metric, f)
        assert any(r.get("diff") for r in fast)
