#!/usr/bin/env python
"""The spread of an ASR table: each system's corpus CER and WER with a 95% bootstrap interval
over the utterances, and its paired difference from the first system (the same utterances
resampled together for both).

    python tools/asr_spread.py scratch=runs/a/test_hyps.jsonl whisper=runs/b/test_hyps.jsonl \
        [--ref embedded:es/test --lang es] [--json]

Each input is a JSONL of {id, text} lines: a CTC run's {dev,test}_hyps.jsonl (which carries
the normalised reference as `ref`) or `speechlm infer --out` (then give --ref MANIFEST, and
--lang to normalise both sides). Systems are compared on the utterances they all have.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _counts(ref: str, hyp: str) -> tuple[int, int, int, int]:
    """(char errors, ref chars, word errors, ref words) of one utterance (CER counts spaces,
    as speechlm.eval.metrics.cer does)."""
    from speechlm.eval.metrics import edit_distance

    return (edit_distance(ref, hyp), len(ref), edit_distance(ref.split(), hyp.split()),
            len(ref.split()))


def read_system(path: Path, refs: dict[str, str] | None, lang: str | None) -> dict[str, tuple]:
    """id -> per-utterance counts for one hypotheses file."""
    from speechlm.text.normalize import normalize_transcript

    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        rid = str(row["id"])
        ref = refs.get(rid) if refs is not None else row.get("ref")
        if ref is None:
            raise SystemExit(f"{path}: utterance {rid!r} has no reference (no `ref` field; "
                             "give --ref MANIFEST)")
        hyp = row.get("text") or ""
        if lang is not None:
            hyp = normalize_transcript(hyp, lang)
        out[rid] = _counts(ref, " ".join(hyp.split()))
    return out


def spread(systems: dict[str, dict[str, tuple]], resamples: int = 1000,
           seed: int = 0) -> list[dict]:
    """Per system: cer, wer (percent) with [low, high] 95% intervals, n, and (all but the
    first) the paired difference from the first system with its interval."""
    ids = sorted(set.intersection(*(set(items) for items in systems.values())))
    if not ids:
        raise SystemExit("the systems share no utterance id")
    rng = random.Random(seed)
    draws = [[rng.choice(ids) for _ in ids] for _ in range(resamples)]

    def rates(items, chosen):
        sums = [sum(items[i][k] for i in chosen) for k in range(4)]
        return 100.0 * sums[0] / max(sums[1], 1), 100.0 * sums[2] / max(sums[3], 1)

    def interval(values):
        values = sorted(values)
        return values[int(0.025 * len(values))], values[int(0.975 * len(values))]

    first = next(iter(systems.values()))
    out = []
    for n, (name, items) in enumerate(systems.items()):
        cer, wer = rates(items, ids)
        samples = [rates(items, d) for d in draws]
        row = {"system": name, "n": len(ids), "cer": cer, "wer": wer,
               "cer_ci": interval(s[0] for s in samples),
               "wer_ci": interval(s[1] for s in samples)}
        if n:
            base = [rates(first, d) for d in draws]
            base_cer, base_wer = rates(first, ids)
            pairs = list(zip(samples, base, strict=True))
            row.update(cer_diff=cer - base_cer, wer_diff=wer - base_wer,
                       cer_diff_ci=interval(s[0] - b[0] for s, b in pairs),
                       wer_diff_ci=interval(s[1] - b[1] for s, b in pairs))
        out.append(row)
    return out


def _refs(manifest: str, lang: str | None) -> dict[str, str]:
    from speechlm.data.manifest import read_manifest
    from speechlm.recipes.sources import resolve_manifest
    from speechlm.text.normalize import normalize_transcript

    path = resolve_manifest(manifest, progress=False)
    return {str(r["id"]): normalize_transcript(r.get("text") or "", lang)
            for r in read_manifest(path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("systems", nargs="+", metavar="NAME=HYPS.jsonl")
    parser.add_argument("--ref", help="reference manifest (when the hyps have no `ref`)")
    parser.add_argument("--lang", help="normalisation language of --ref and the hyps")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    refs = _refs(args.ref, args.lang) if args.ref else None
    systems = {}
    for spec in args.systems:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"{spec}: give NAME=HYPS.jsonl")
        systems[name] = read_system(Path(path), refs, args.lang if refs else None)
    result = spread(systems, args.resamples)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for r in result:
        text = (f"{r['system']:<34} CER {r['cer']:5.1f} [{r['cer_ci'][0]:.1f}, "
                f"{r['cer_ci'][1]:.1f}]  WER {r['wer']:5.1f} [{r['wer_ci'][0]:.1f}, "
                f"{r['wer_ci'][1]:.1f}]  n={r['n']}")
        if "cer_diff" in r:
            text += (f"  vs first: CER {r['cer_diff']:+.1f} [{r['cer_diff_ci'][0]:+.1f}, "
                     f"{r['cer_diff_ci'][1]:+.1f}]")
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
