#!/usr/bin/env python
"""How often a local LLM writes valid ProX programs, and how far they agree with the rules.

    python tools/corpus_cleaning/prox_agreement.py DOCS_DIR... [--passages 120]
        [--llm models:smollm2-135m-instruct] [--out prox_agreement.json]

Passages of `--chunk-lines` non-blank lines are drawn (seeded) from the English `.txt`
files under DOCS_DIR (files whose name carries another language code, `x.de.txt` or a
`de-DE/` folder, are skipped); each passage is one document for both writers. Reported:
the LLM's programs with no malformed operation, malformed operations per program, the
decision per passage (drop / edit / keep) and its agreement with the rules' (Cohen's
kappa too), and line-level precision / recall / F1 of the lines the LLM removes against
the lines the rules remove (a drop removes every line). None of the passages is among the
prompt's examples (those are made up, in speechlm.corpus.prox_llm).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

_OTHER_LANGUAGE = re.compile(r"\.(?!en\.)[a-z]{2}(?:[-_][A-Za-z]{2})?\.txt$|/(?!en)[a-z]{2}-[A-Z]{2}/")


def passages(dirs: list[str], n: int, chunk_lines: int, seed: int) -> list[dict]:
    from speechlm.corpus.prox_llm import chunk_ranges

    files = sorted(p for d in dirs for p in Path(d).rglob("*.txt")
                   if not _OTHER_LANGUAGE.search(str(p)))
    pool = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.split("\n")
        for a, b in chunk_ranges(text, chunk_lines):
            part = "\n".join(lines[a:b]).strip("\n")
            if len(part.split()) >= 20:
                pool.append({"file": str(path), "first_line": a, "text": part})
    random.Random(seed).shuffle(pool)
    return pool[:n]


def decision(program) -> str:
    names = {op.name for op in program.operations}
    if "drop_doc" in names:
        return "drop"
    return "edit" if names & {"remove_lines", "normalize"} else "keep"


def removed_lines(program, n_lines: int) -> set[int]:
    if decision(program) == "drop":
        return set(range(n_lines))
    return {i for op in program.operations if op.name == "remove_lines"
            for i in range(op.args[0], op.args[1] + 1)}


def kappa(pairs: list[tuple[str, str]]) -> float:
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(left[k] * right[k] for k in left) / n / n
    return (observed - expected) / (1 - expected) if expected < 1 else 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--passages", type=int, default=120)
    ap.add_argument("--chunk-lines", type=int, default=24)
    ap.add_argument("--llm", default="models:smollm2-135m-instruct")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="prox_agreement.json")
    args = ap.parse_args(argv)

    from speechlm.corpus.prox import Guard, execute, parse_program, rules_program
    from speechlm.corpus.prox_llm import LlmProgramWriter

    items = passages(args.dirs, args.passages, args.chunk_lines, args.seed)
    writer = LlmProgramWriter(args.llm, chunk_lines=args.chunk_lines, batch_size=args.batch_size)
    start = time.perf_counter()
    llm_programs = writer.programs([p["text"] for p in items])
    seconds = time.perf_counter() - start
    rows, pairs = [], []
    tp = fp = fn = 0
    valid = malformed = 0
    outcomes: Counter = Counter()
    for item, llm_text in zip(items, llm_programs, strict=True):
        n = len(item["text"].split("\n"))
        rules = parse_program(rules_program(item["text"]), n)
        llm = parse_program(llm_text, n)
        valid += not llm.errors
        malformed += len(llm.errors)
        outcomes[execute(item["text"], llm, Guard()).outcome] += 1
        pairs.append((decision(rules), decision(llm)))
        want, got = removed_lines(rules, n), removed_lines(llm, n)
        tp, fp, fn = tp + len(want & got), fp + len(got - want), fn + len(want - got)
        rows.append({**item, "rules": rules.text(), "llm": llm_text, "llm_errors": llm.errors})
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    summary = {
        "passages": len(items), "llm": args.llm, "seconds": round(seconds, 1),
        "valid_programs": round(valid / len(items), 4),
        "malformed_ops_per_program": round(malformed / len(items), 3),
        "llm_outcomes_under_guard": dict(outcomes),
        "decisions_rules": dict(Counter(a for a, _ in pairs)),
        "decisions_llm": dict(Counter(b for _, b in pairs)),
        "decision_agreement": round(sum(a == b for a, b in pairs) / len(pairs), 4),
        "decision_kappa": round(kappa(pairs), 4),
        "decision_confusion_rules_vs_llm": {f"{a}->{b}": c for (a, b), c
                                            in sorted(Counter(pairs).items())},
        "removed_lines": {"precision": round(precision, 4), "recall": round(recall, 4),
                          "f1": round(2 * precision * recall / (precision + recall), 4)
                          if precision + recall else 0.0,
                          "rules": tp + fn, "llm": tp + fp},
    }
    Path(args.out).write_text(json.dumps({"summary": summary, "passages": rows}, indent=1,
                                         ensure_ascii=False), encoding="utf-8")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
