"""Assemble the measurement input (/work/exp/corpus/input) and plant near-duplicates."""
import gzip
import json
import random
import re
import shutil
from pathlib import Path

T = Path("/work/exp/corpus/text")
IN = Path("/work/exp/corpus/input")
shutil.rmtree(IN, ignore_errors=True)
IN.mkdir(parents=True)
py = T / "html/doc/python3.11/html"
hb = T / "html/doc/debian-handbook/html"
sources = {
    "python-docs": [py / d for d in ("tutorial", "howto", "library", "whatsnew", "reference")]
                   + [py / "genindex-all.txt", py / "contents.txt"],
    "debian-handbook": [hb / lang for lang in ("en-US", "de-DE", "fr-FR", "da-DK", "zh-TW")],
    "debian-reference": [T / "html/debian-reference"],
    "manpages": [T / "man" / f for f in ("en_man2.jsonl.gz", "en_man7.jsonl.gz", "de_man1.jsonl.gz")],
}
for name, paths in sources.items():
    for p in paths:
        dst = IN / name / p.relative_to(T)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, dst)
        else:
            shutil.copy(p, dst)

def shingles(text, n=5):
    w = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

rng = random.Random(0)
# near-duplicates of prose pages (handbook en-US, 1-20 kB): a fraction of words replaced
cands = [p for p in sorted((hb / "en-US").glob("*.txt")) if 1000 < p.stat().st_size < 20000]
cands += [p for p in sorted((py / "tutorial").glob("*.txt")) + sorted((py / "howto").glob("*.txt"))
          if 1000 < p.stat().st_size < 40000]
rng.shuffle(cands)
vocab = "system package file user server network data service option command value".split()
planted = []
for i, p in enumerate(cands[:150]):
    text = p.read_text(encoding="utf-8")
    words = text.split(" ")
    frac = [0.002, 0.005, 0.01, 0.02, 0.04][i % 5]
    for j in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[j] = rng.choice(vocab)
    copy = " ".join(words)
    a, b = shingles(text), shingles(copy)
    planted.append({"id": f"planted-{i}", "text": copy, "original": str(IN / "python-docs" / p.relative_to(T)) if "python3.11" in str(p) else str(IN / "debian-handbook" / p.relative_to(T)),
                    "jaccard": round(len(a & b) / len(a | b), 4)})
with gzip.open(IN / "zz_planted.jsonl.gz", "wt", encoding="utf-8") as f:
    for r in planted:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
total = 0
for p in IN.rglob("*"):
    if p.is_file():
        total += len(gzip.open(p).read()) if p.suffix == ".gz" else p.stat().st_size
print("files", sum(1 for p in IN.rglob('*') if p.is_file()), "MB", round(total / 1e6, 1))
print("planted jaccard", sorted(r["jaccard"] for r in planted)[::15])
