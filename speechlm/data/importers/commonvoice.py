"""Mozilla Common Voice: <locale dir>/{train,dev,test,validated,...}.tsv + clips/*.mp3.

The TSVs have a header row naming the columns (client_id, path, sentence,
and depending on the release sentence_id, up_votes, down_votes, age, gender,
accents/accent, variant, locale, segment). Fields are separated by tabs and
never quoted: a sentence may contain a bare `"`, so the file is read with
QUOTE_NONE (a default csv reader would swallow text up to the next quote).
id = clip file name without extension, speaker = client_id, lang = locale.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError
from .common import Candidate, ImportReport, Skip, run_import

REQUIRED_COLUMNS = ("path", "sentence")
# Names people use for a split -> the TSV that holds it.
SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "eval": "dev"}


def find_tsv(source, split: str | None) -> Path:
    """The TSV to read: `source` itself if it is a .tsv file, else `<source>/<split>.tsv`."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise ConfigError(f"{source}: not found; expected a Common Voice language directory "
                          "(with clips/ and train.tsv, dev.tsv, ...) or one of its .tsv files")
    split = split or "train"
    tsv = source / f"{SPLIT_ALIASES.get(split, split)}.tsv"
    if not tsv.is_file():
        available = ", ".join(p.stem for p in sorted(source.glob("*.tsv"))) or "none"
        raise ConfigError(f"{tsv}: not found; Common Voice splits in {source}: {available} "
                          "(choose one with --split)")
    return tsv


def iter_commonvoice(tsv: Path, clips_dir: Path) -> Iterator[Candidate | Skip]:
    """Candidates of one Common Voice TSV, in file order."""
    with open(tsv, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{tsv}: empty file; expected a header row with "
                              f"{', '.join(REQUIRED_COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ConfigError(f"{tsv}:1: missing column(s) {', '.join(missing)} in the header "
                              f"({', '.join(header)}); is this a Common Voice TSV?")
        column = {name: i for i, name in enumerate(header)}
        for row in reader:
            lineno = reader.line_num
            where = f"{tsv}:{lineno}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) > len(header):
                yield Skip("malformed_line", where, f"{len(row)} tab-separated fields, the header "
                           f"has {len(header)} (a tab inside a field?)")
                continue
            row = row + [""] * (len(header) - len(row))  # old releases drop empty tail fields
            values = {name: row[i].strip() for name, i in column.items()}
            clip = values["path"]
            if not clip:
                yield Skip("malformed_line", where, "empty path field")
                continue
            yield Candidate(id=Path(clip).stem, where=where, audio=clips_dir / clip,
                            text=values["sentence"], speaker=values.get("client_id") or None,
                            lang=values.get("locale") or None)


def import_commonvoice(source, out_manifest, *, split: str | None = None,
                       clips_dir=None, **options) -> ImportReport:
    """Import one Common Voice split.

    source: the language directory (split picks `<split>.tsv`, default train;
        "validation" means dev) or a .tsv file. clips_dir defaults to `clips/`
        beside the TSV. `options` are those of `run_import`; `lang` overrides
        the locale column.
    """
    tsv = find_tsv(source, split)
    clips = Path(clips_dir) if clips_dir is not None else tsv.parent / "clips"
    if not clips.is_dir():
        raise ConfigError(f"{clips}: clips directory not found; Common Voice audio lives in "
                          "clips/ beside the TSV files (or pass clips_dir)")
    return run_import(iter_commonvoice(tsv, clips), out_manifest, fmt="commonvoice",
                      source=tsv, **options)
