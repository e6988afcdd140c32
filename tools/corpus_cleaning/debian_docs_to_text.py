"""Debian documentation packages -> messy text corpus (one .txt per HTML page; man pages as
JSONL.gz, one file per package and section)."""
import gzip
import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path("/work/exp/corpus/root")
OUT = Path("/work/exp/corpus/text")
BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd",
         "table", "section", "title", "blockquote"}

class Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")
        if tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(path):
    parser = Text()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    out, blank = [], False
    for line in (" ".join(x.split()) for x in "".join(parser.parts).splitlines()):
        if line:
            out.append(line)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    return "\n".join(out).strip() + "\n"


n = 0
for html in sorted(ROOT.rglob("*.html")):
    rel = html.relative_to(ROOT / "usr/share")
    dst = OUT / "html" / rel.with_suffix(".txt")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(html_to_text(html), encoding="utf-8")
    n += 1
print("html pages", n, flush=True)

env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8")
groups = {}
for man in sorted((ROOT / "usr/share/man").rglob("*.gz")):
    rel = man.relative_to(ROOT / "usr/share/man")
    lang = rel.parts[0] if not rel.parts[0].startswith("man") else "en"
    section = [p for p in rel.parts if p.startswith("man")][0]
    try:
        r = subprocess.run(["man", "-l", "-E", "UTF-8", str(man)], capture_output=True, env=env, timeout=20)
        text = subprocess.run(["col", "-b"], input=r.stdout, capture_output=True).stdout.decode("utf-8", "replace")
    except Exception as e:
        print("skip", man, e)
        continue
    if text.strip():
        groups.setdefault((lang, section), []).append({"id": str(rel), "text": text})
for (lang, section), recs in groups.items():
    dst = OUT / "man" / f"{lang}_{section}.jsonl.gz"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(dst, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
print("man pages", sum(map(len, groups.values())), flush=True)
