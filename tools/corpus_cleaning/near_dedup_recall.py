"""Near-dedup recall on planted pairs and false positives on distinct documents, per run."""
import gzip
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

run = Path(sys.argv[1])
IN = Path("/work/exp/corpus/input")

def read(folder):
    out = {}
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                out[r["id"]] = r
    return out

def shingles(text, n=5):
    w = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}

kept = read(run / "clean")
near = read(run / "removed/near_dedup")
entered = {**kept, **near}  # the documents the near-dedup stage saw
planted = {}
with gzip.open(IN / "zz_planted.jsonl.gz", "rt") as f:
    for line in f:
        r = json.loads(line)
        planted[r["id"]] = (r["original"] + ":1", r["jaccard"])

buckets = defaultdict(lambda: [0, 0])
for pid, (orig, j) in planted.items():
    if pid in entered and orig in entered:
        b = ">=0.9" if j >= 0.9 else ">=0.8" if j >= 0.8 else "0.7-0.8" if j >= 0.7 else "<0.7"
        buckets[b][1] += 1
        buckets[b][0] += (pid in near) or (orig in near)
print("planted pairs that reached near-dedup, detected/total by jaccard:", dict(buckets))
hi = [buckets[">=0.9"], buckets[">=0.8"]]
print("recall at J>=0.8:", sum(a for a, _ in hi), "/", sum(b for _, b in hi))

# max 5-gram Jaccard of every entered document to any other entered document
sh = {i: shingles(r["text"]) for i, r in entered.items()}
post = defaultdict(list)
for i, s in sh.items():
    for g in s:
        post[g].append(i)
best = {}
for i, s in sh.items():
    c = Counter()
    for g in s:
        p = post[g]
        if len(p) <= 300:
            c.update(p)
    c.pop(i, None)
    m = 0.0
    for k, _ in c.most_common(20):
        m = max(m, len(s & sh[k]) / max(1, len(s | sh[k])))
    best[i] = m
distinct = {i for i, m in best.items() if m < 0.5}
fp = [i for i in near if i in distinct]
print(f"entered near-dedup: {len(entered)}; distinct (max J < 0.5 to any other): {len(distinct)}; "
      f"removed by near-dedup: {len(near)}; of them distinct (false positives): {len(fp)} "
      f"-> FPR {len(fp) / max(1, len(distinct)):.4f}")
print("removed by near-dedup, max J to another doc:", Counter(
    ">=0.8" if best[i] >= 0.8 else "0.5-0.8" if best[i] >= 0.5 else "<0.5" for i in near))
for i in fp[:5]:
    print("FP", i, best[i], repr(entered[i]["text"][:150]))
