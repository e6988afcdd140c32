#!/usr/bin/env python
"""The spread of a transfer table: each system's score with a 95% bootstrap interval over
the items, and its paired difference from a baseline system (same items resampled together).

    python tools/transfer_spread.py RUN_DIR/transfer_hyps.jsonl [--baseline "untrained adapter"]
        [--metric word_recall]

The input is what the BLSP / InSerter runners and `speechlm transfer --out` write: one
{system, task, id, reference, hypothesis} line per item. Scores are the tasks' own metrics
(corpus WER for repeat, accuracy for the questions); the interval resamples utterances, so
it shows whether a difference between two rows is larger than the items' noise. `--metric`
picks another of a task's scores where it has it (e.g. word_recall or cer for repeat).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


_PERCENT = ("wer", "cer", "word_recall", "exact", "accuracy", "balanced_accuracy")


def _score(task, refs, hyps, metric: str | None = None) -> float:
    scores = task.score(refs, hyps, refs)
    if metric is None or metric not in scores:
        # yes/no questions: balanced accuracy (the items' mix of answers is not 50/50)
        metric = "balanced_accuracy" if "balanced_accuracy" in scores else task.metric
    return 100.0 * scores[metric] if metric in _PERCENT else scores[metric]


def _item_stats(task, metric: str | None, pairs: dict) -> tuple[str, dict] | None:
    """Per-item sufficient statistics of a corpus-level score, so that a resample's score is a
    sum over its items instead of a fresh corpus scoring (1000 resamples of jiwer over 100
    answers took minutes): id -> (errors or hits, reference length) for WER / CER / word
    recall, id -> (answer class, correct) for (balanced) accuracy. None: the score does not
    decompose (BLEU, chrF) and each resample is scored in full."""
    from collections import Counter

    from speechlm.data.instructions import _answer_key
    from speechlm.eval.metrics import _prepare, edit_counts

    ref0, hyp0 = next(iter(pairs.values()))
    names = task.score([ref0], [hyp0])
    if metric is None or metric not in names:
        metric = "balanced_accuracy" if "balanced_accuracy" in names else task.metric
    stats = {}
    for item, (ref, hyp) in pairs.items():
        if metric in ("wer", "cer"):
            c = edit_counts([ref], [hyp], unit="word" if metric == "wer" else "char",
                            lang=task.target_lang)
            stats[item] = (c["substitutions"] + c["deletions"] + c["insertions"], c["ref_len"])
        elif metric == "word_recall":
            (r,), (h,) = _prepare([ref], task.target_lang), _prepare([hyp], task.target_lang)
            want, have = Counter(r.split()), Counter(h.split())
            stats[item] = (sum(min(n, have[w]) for w, n in want.items()), sum(want.values()))
        elif metric in ("accuracy", "balanced_accuracy"):
            stats[item] = (_answer_key(ref), task.score([ref], [hyp])["accuracy"])
        else:
            return None
    return metric, stats


def _from_stats(metric: str, stats: list[tuple]) -> float:
    if metric == "balanced_accuracy":
        from collections import defaultdict

        by_class = defaultdict(list)
        for key, correct in stats:
            by_class[key].append(correct)
        return 100.0 * sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)
    if metric == "accuracy":
        return 100.0 * sum(c for _, c in stats) / len(stats)
    counted, total = sum(e for e, _ in stats), sum(n for _, n in stats)
    if metric == "word_recall":
        return 100.0 * (counted / total if total else 0.0)
    return 100.0 * (counted / total if total else float(counted > 0))


def spread(rows: list[dict], baseline: str, resamples: int = 1000, seed: int = 0,
           metric: str | None = None) -> list[dict]:
    from speechlm.data.instructions import TASKS

    by = defaultdict(dict)  # (task, system) -> id -> (ref, hyp)
    for r in rows:
        by[(r["task"], r["system"])][r["id"]] = (r["reference"], r["hypothesis"])
    out = []
    rng = random.Random(seed)
    for (task_name, system), items in by.items():
        task = TASKS[task_name]
        ids = sorted(items)
        base = by.get((task_name, baseline))
        draws = [[rng.choice(ids) for _ in ids] for _ in range(resamples)]

        tables = [t for t in (items, base) if t is not None]
        fast = {id(t): _item_stats(task, metric, t) for t in tables}

        def score_of(table, chosen, task=task, fast=fast):
            decomposed = fast.get(id(table))
            if decomposed is not None:
                name, stats = decomposed
                return _from_stats(name, [stats[i] for i in chosen])
            return _score(task, [table[i][0] for i in chosen], [table[i][1] for i in chosen],
                          metric)

        for table in tables:
            # the sums must give the corpus score itself, else score every resample in full
            every = sorted(table)
            full = _score(task, [table[i][0] for i in every], [table[i][1] for i in every],
                          metric)
            if fast[id(table)] is not None and abs(score_of(table, every) - full) > 1e-6:
                fast[id(table)] = None

        value = score_of(items, ids)
        samples = sorted(score_of(items, d) for d in draws)
        row = {"task": task_name, "system": system, "value": value, "n": len(ids),
               "low": samples[int(0.025 * resamples)], "high": samples[int(0.975 * resamples)]}
        if base is not None and system != baseline and set(base) == set(items):
            diffs = sorted(score_of(items, d) - score_of(base, d) for d in draws)
            row.update(diff=value - score_of(base, ids), diff_low=diffs[int(0.025 * resamples)],
                       diff_high=diffs[int(0.975 * resamples)])
        out.append(row)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hyps", type=Path)
    parser.add_argument("--baseline", default="untrained adapter")
    parser.add_argument("--metric", default=None,
                        help="a task score to use where the task has it (default: its own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.hyps.read_text().splitlines() if line.strip()]
    result = spread(rows, args.baseline, metric=args.metric)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for r in result:
        text = (f"{r['task']:<14}{r['system']:<40}{r['value']:7.1f}  "
                f"[{r['low']:.1f}, {r['high']:.1f}]  n={r['n']}")
        if "diff" in r:
            text += f"   vs {args.baseline}: {r['diff']:+.1f} [{r['diff_low']:+.1f}, " \
                    f"{r['diff_high']:+.1f}]"
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
