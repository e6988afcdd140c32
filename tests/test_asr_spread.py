"""tools/asr_spread.py: CER/WER with bootstrap intervals over utterances, paired differences."""

import importlib.util
import json
from pathlib import Path

import pytest

from speechlm.eval.metrics import cer, wer

SPEC = importlib.util.spec_from_file_location(
    "asr_spread", Path(__file__).resolve().parents[1] / "tools" / "asr_spread.py")
asr_spread = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(asr_spread)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rates_match_the_metrics_and_a_real_difference_excludes_zero(tmp_path, capsys):
    refs = [f"el versiculo numero {i} del libro" for i in range(40)]
    bad = ["el versiculo" for _ in refs]
    good = [r if i % 4 else "el libro" for i, r in enumerate(refs)]
    a = _write(tmp_path / "a.jsonl", [{"id": f"u{i}", "text": h, "ref": r}
                                      for i, (r, h) in enumerate(zip(refs, bad, strict=True))])
    b = _write(tmp_path / "b.jsonl", [{"id": f"u{i}", "text": h, "ref": r}
                                      for i, (r, h) in enumerate(zip(refs, good, strict=True))])
    systems = {"bad": asr_spread.read_system(a, None, None),
               "good": asr_spread.read_system(b, None, None)}
    out = {r["system"]: r for r in asr_spread.spread(systems, resamples=200)}
    assert out["good"]["cer"] == pytest.approx(100 * cer(refs, good))
    assert out["good"]["wer"] == pytest.approx(100 * wer(refs, good))
    assert out["good"]["cer_ci"][0] <= out["good"]["cer"] <= out["good"]["cer_ci"][1]
    assert out["good"]["cer_diff"] < 0 and out["good"]["cer_diff_ci"][1] < 0
    assert "cer_diff" not in out["bad"] and out["bad"]["n"] == 40
    assert asr_spread.main([f"bad={a}", f"good={b}", "--resamples", "50"]) == 0
    assert "vs first: CER -" in capsys.readouterr().out
