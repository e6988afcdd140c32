"""`speechlm build clean-text`: the datatrove pipeline's behaviour on planted data.

Three pipeline runs are shared by the tests (module fixtures): one task, two tasks
on two workers, and the two-task run killed and resumed.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil

import pytest

pytest.importorskip("datatrove")

from speechlm import cli  # noqa: E402
from speechlm.corpus.config import load_clean_text_config  # noqa: E402
from speechlm.corpus.run import run_clean_text  # noqa: E402
from speechlm.errors import ConfigError  # noqa: E402

_VOCAB = ("time people year way day man thing woman life child world school state family "
          "student group country problem hand part place case week company system program "
          "question work government number night point home water room mother area money "
          "story fact month lot right study book eye job word business issue side kind head "
          "house service friend father power hour game line end member law car city community "
          "name president team minute idea body information back parent face level office "
          "door health person art war history party result change morning reason research "
          "girl moment air teacher force education river garden letter window winter summer "
          "village market bridge doctor engine island forest animal machine picture").split()

GERMAN = ("Der Fluss fließt ruhig durch das kleine Dorf, und die Kinder spielen am Ufer. "
          "Im Sommer kommen viele Besucher aus der Stadt, um die Wälder und die Berge zu sehen. "
          "Die Bäckerei am Marktplatz verkauft jeden Morgen frisches Brot und Kuchen. "
          "Am Abend sitzen die Leute vor ihren Häusern und erzählen sich Geschichten. "
          "Im Winter ist es sehr kalt, und der Schnee bedeckt die Straßen und die Felder. "
          "Die Schule liegt neben der Kirche, und der Lehrer kennt jedes Kind beim Namen.")

NUMBERS = "In 1999 the 3 doctors paid $5 for 12% of the land and the house of the mayor."


def _sentence(rng: random.Random) -> str:
    # Gopher wants stop words; C4 wants terminal punctuation; both hold for every sentence
    words = [rng.choice(_VOCAB) for _ in range(9)]
    return f"The {words[0]} of the {' '.join(words[1:5])} and {' '.join(words[5:])}."


def _document(rng: random.Random, sentences: int = 16) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _mutate(text: str, rng: random.Random, changes: int) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changes):
        words[i] = rng.choice(_VOCAB) + ("." if words[i].endswith(".") else "")
    return " ".join(words)


def _shingles(text: str, n: int = 5) -> set:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Input files with planted duplicates, junk, a German text and bad inputs."""
    root = tmp_path_factory.mktemp("corpus")
    inp = root / "in"
    inp.mkdir()
    rng = random.Random(7)
    distinct = [_document(rng) for _ in range(40)]
    distinct[0] = NUMBERS + " " + distinct[0]
    originals = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(distinct)]
    # a_ sorts first: the originals are read before their copies in any task layout, so the
    # copy is the one removed (datatrove keeps the duplicate met first)
    _jsonl(inp / "a_originals.jsonl", originals)
    near = [{"id": f"near-{i}", "text": _mutate(distinct[i], rng, 1 + i % 3)}
            for i in range(1, 21)]
    with gzip.open(inp / "b_near.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in near)
    exact = [{"id": f"exact-{i}", "text": "  " + distinct[i].replace(" ", "  ", 3) + "\n"}
             for i in range(21, 26)]
    junk = [{"id": "repeated", "text": "\n".join(["Buy now and save big today!"] * 30)},
            {"id": "short", "text": "Rivers flow quietly to the sea, and the children play "
                                    "happily beside the water every summer morning."},
            {"id": "german", "text": GERMAN}]
    _jsonl(inp / "c_more.jsonl", exact + junk)
    (inp / "d_plain.txt").write_text(_document(rng) + "\n", encoding="utf-8")
    bad = inp / "e_bad"
    bad.mkdir()
    (bad / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" + bytes(range(256)) * 4)
    (bad / "invalid_utf8.txt").write_bytes(_document(rng).encode() + b"\nbad \xff\xfe bytes\n")
    (bad / "huge_line.txt").write_bytes(b"word " * 600_000 + b"\n")  # 3 MB > 1 MB limit
    (bad / "empty.txt").write_bytes(b"")
    (bad / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate")
    (bad / "not_json.jsonl").write_text('{"text": "fine but short"}\n{oops\n', encoding="utf-8")
    pairs = [(f"orig-{i}", f"near-{i}", jaccard(distinct[i], near[i - 1]["text"]))
             for i in range(1, 21)]
    return {"dir": inp, "pairs": pairs, "distinct": [f"orig-{i}" for i in range(21, 40)]}


def _config(**executor):
    overrides = [f"executor.{k}={v}" for k, v in executor.items()]
    return load_clean_text_config(None, overrides)


def _outputs(out) -> list[dict]:
    records = []
    for path in sorted((out / "clean").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f)
    return records


def _removed_ids(out, stage) -> set[str]:
    ids = set()
    for path in (out / "removed" / stage).glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            ids.update(json.loads(line)["id"] for line in f)
    return ids


@pytest.fixture(scope="module")
def one_task(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    report = run_clean_text([str(corpus["dir"])], out, _config(), progress=False,
                            log=lambda *a: None)
    return out, report


@pytest.fixture(scope="module")
def two_tasks(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "out"
    report = run_clean_text([str(corpus["dir"])], out, _config(tasks=2, workers=2),
                            progress=False, log=lambda *a: None)
    return out, report


def test_planted_near_duplicates_are_removed_and_distinct_documents_kept(corpus, one_task):
    out, report = one_task
    kept = {r["id"] for r in _outputs(out)}
    pairs = [(a, b) for a, b, j in corpus["pairs"] if j >= 0.8]
    assert len(pairs) >= 15  # the planted pairs really are near-duplicates
    found = sum((a in kept) != (b in kept) for a, b in pairs)
    assert found / len(pairs) >= 0.95
    assert all(a in kept for a, _ in pairs)  # the copy goes, the first-read original stays
    false_positives = [d for d in corpus["distinct"] if d not in kept
                       and d not in _removed_ids(out, "exact_dedup")]
    assert false_positives == []
    stage = {s["stage"]: s for s in report["stages"]}
    assert stage["near_dedup"]["docs_removed"] == found


def test_exact_duplicates_are_removed_whatever_their_whitespace(one_task):
    out, _ = one_task
    kept = {r["id"] for r in _outputs(out)}
    removed = _removed_ids(out, "exact_dedup")
    for i in range(21, 26):
        assert (f"orig-{i}" in kept) != (f"exact-{i}" in kept)
        assert {f"orig-{i}", f"exact-{i}"} & removed


def test_language_filter_drops_german_when_config_keeps_english(one_task):
    out, report = one_task
    assert "german" in _removed_ids(out, "language")
    assert "german" not in {r["id"] for r in _outputs(out)}
    stage = {s["stage"]: s for s in report["stages"]}["language"]
    assert stage["reasons"]["language_de"] == 1
    assert {r["language"] for r in _outputs(out)} == {"en"}


def test_gopher_filters_remove_repeated_and_tiny_documents(one_task):
    out, report = one_task
    assert "repeated" in _removed_ids(out, "gopher_repetition")
    # 16 words: any of its 3-grams is a large share of it (Gopher's repetition test fires
    # before the quality filter's 50-word minimum)
    assert "short" in _removed_ids(out, "gopher_repetition")
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["gopher_repetition"]["reasons"] == {"dup_line_frac": 1, "top_3_gram": 1}


def test_tts_sentences_have_numbers_written_out(one_task):
    out, _ = one_task
    record = next(r for r in _outputs(out) if r["id"] == "orig-0")
    first = record["sentences"][0]
    assert first.startswith("In nineteen ninety-nine the three doctors paid five dollars for "
                            "twelve percent of the land")
    assert not any(re.search(r"\d", s) for s in record["sentences"])
    assert record["text"].startswith(NUMBERS)  # the text itself is kept as written
    assert len(record["sentences"]) == 17


def test_bad_inputs_are_skipped_and_counted_with_file_and_line(corpus, one_task):
    out, report = one_task
    records = {(r["file"].rsplit("/", 1)[-1], r["line"]): r["reason"]
               for r in report["bad_input"]["records"]}
    assert records[("binary.txt", 0)].startswith("binary file")
    assert records[("invalid_utf8.txt", 2)].startswith("invalid UTF-8")
    assert records[("huge_line.txt", 1)].startswith("line longer than input.max_line_bytes")
    assert records[("empty.txt", 0)].startswith("empty file")
    assert records[("corrupt.txt.gz", 0)].startswith("unreadable file")
    assert records[("not_json.jsonl", 2)].startswith("not JSON")
    assert report["input"]["bad_input"] == len(records) == 6
    # the file holding an invalid line is dropped whole (file = document), the rest is read
    kept = {r["id"] for r in _outputs(out)}
    assert not any("invalid_utf8" in k for k in kept)
    assert any(k.endswith("d_plain.txt:1") for k in kept)


def test_two_tasks_give_the_same_output_as_one(one_task, two_tasks):
    one = {(r["id"], r["text"]) for r in _outputs(one_task[0])}
    two_records = _outputs(two_tasks[0])
    assert len(list((two_tasks[0] / "clean").glob("*.jsonl.gz"))) == 2
    assert {(r["id"], r["text"]) for r in two_records} == one
    assert len(two_records) == len(one)


def test_killed_and_resumed_run_has_no_duplicates(corpus, two_tasks, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_tasks[0], out)
    before = _outputs(out)
    # task 1 of the last job died half-way through its output; task 0 of the first job died
    # before it marked itself complete (its outputs are whole but will be rewritten)
    (out / "_work/logs/final/completions/00001").unlink()
    clean = out / "clean" / "00001.jsonl.gz"
    clean.write_bytes(clean.read_bytes()[: clean.stat().st_size // 2])
    (out / "_work/logs/filter/completions/00000").unlink()
    report = run_clean_text([str(corpus["dir"])], out, _config(tasks=2, workers=1),
                            progress=False, log=lambda *a: None)
    after = _outputs(out)
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(r["id"] for r in before)
    assert report["output"] == two_tasks[1]["output"]
    assert report["input"] == two_tasks[1]["input"]


def test_resume_with_other_settings_is_refused(corpus, two_tasks):
    with pytest.raises(ConfigError, match=r"executor\.tasks \(2 -> 3\)"):
        run_clean_text([str(corpus["dir"])], two_tasks[0], _config(tasks=3), progress=False,
                       log=lambda *a: None)


def test_unknown_config_key_is_rejected_naming_it_and_the_valid_ones(tmp_path, capsys):
    path = tmp_path / "corpus.yaml"
    path.write_text("language:\n  keep: [en]\n  min_scor: 0.3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_clean_text_config(path)
    message = str(info.value)
    assert f"{path}:3" in message and "'language.min_scor'" in message
    assert "did you mean 'min_score'" in message and "keep, min_score" in message
    assert cli.main(["build", "clean-text", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--config", str(path)]) == 2
    assert "language.min_scor" in capsys.readouterr().err


def test_paragraph_and_line_units(tmp_path):
    from speechlm.corpus.reader import TextCorpusReader

    path = tmp_path / "t.txt"
    path.write_text("first para\nstill first\n\n\nsecond para\n", encoding="utf-8")
    paragraphs = list(TextCorpusReader([str(path)], str(tmp_path / "bad"), "paragraph").run())
    assert [(d.id.rsplit(":", 1)[1], d.text) for d in paragraphs] == [
        ("1", "first para\nstill first"), ("5", "second para")]
    lines = list(TextCorpusReader([str(path)], str(tmp_path / "bad"), "line").run())
    assert [d.text for d in lines] == ["first para", "still first", "second para"]


@pytest.mark.parametrize("text,lang,expected", [
    ("Dr. Smith paid $1,250.50 on the 21st.", "en",
     "Doctor Smith paid one thousand, two hundred and fifty point five dollars on the "
     "twenty-first."),
    ("El Sr. García pagó 3,50 € por el 20 %.", "es",
     "El señor García pagó tres punto cinco euros por el veinte por ciento."),
    ("Es kostet 1.000 €, z.B. heute.", "de", "Es kostet eintausend Euro, zum Beispiel heute."),
    ("१२ and 12", "hi", "१२ and 12"),  # num2words has no Hindi: digits stay for the TTS
    ("Python 3.11.2 uses X.509, see section 10.2.", "en",
     "Python three dot eleven dot two uses X dot five hundred and nine, see section ten point "
     "two."),
    ("Block 10.0.0.0/8 now.", "en", "Block ten dot zero dot zero dot zero slash eight now."),
    ("Versión 3.11.2 y 1.234.567 personas.", "es",
     "Versión tres punto once punto dos y un millón doscientos treinta y cuatro mil quinientos "
     "sesenta y siete personas."),
])
def test_verbalize_writes_numbers_symbols_and_abbreviations_out(text, lang, expected):
    from speechlm.text.verbalize import verbalize

    assert verbalize(text, lang) == expected


def test_shipped_config_lists_every_key_with_its_default():
    from pathlib import Path

    path = Path(__file__).parent.parent / "recipes" / "corpus" / "clean_text.yaml"
    assert load_clean_text_config(path) == load_clean_text_config()


def test_transcript_normaliser_spells_numbers_out_only_when_asked():
    from speechlm.text.normalize import normalize_transcript

    assert normalize_transcript("Mark 3:25 costs $1,000", "en") == "mark 3 25 costs 1 000"
    assert (normalize_transcript("Mark 3:25 costs $1,000", "en", spell_out=True)
            == "mark three twenty five costs one thousand dollars")


def test_perplexity_buckets_keep_text_that_reads_like_the_reference(tmp_path):
    """CCNet-style: documents in the reference's words score near its own held-out lines
    (cut-offs: their terciles), word salad of unknown words far above; keep: [head, middle]
    removes what falls in the tail, and the report counts the buckets."""
    rng = random.Random(3)
    reference = tmp_path / "reference.txt"
    reference.write_text("\n".join(_sentence(rng) for _ in range(600)) + "\n", encoding="utf-8")
    inp = tmp_path / "in"
    inp.mkdir()
    salad = " ".join("".join(rng.choice("qxzjkvwy") for _ in range(7)) for _ in range(120))
    _jsonl(inp / "docs.jsonl", [{"id": f"good-{i}", "text": _document(rng)} for i in range(6)]
           + [{"id": "salad", "text": salad + "."}])
    cfg = load_clean_text_config(None, [
        "perplexity.enabled=true", f"perplexity.reference={reference}",
        "perplexity.keep=[head, middle]", "language.enabled=false",
        "gopher_quality.enabled=false", "gopher_repetition.enabled=false", "c4.enabled=false",
        "fineweb.enabled=false"])
    out = tmp_path / "out"
    report = run_clean_text([str(inp)], out, cfg, progress=False, log=lambda *a: None)
    kept = {r["id"]: r for r in _outputs(out)}
    removed = {}
    for path in (out / "removed" / "perplexity").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            removed.update((r["id"], r["metadata"]) for r in map(json.loads, f))
    scores = {i: m["ngram_perplexity"] for i, m in removed.items()}
    scores.update((i, r["ngram_perplexity"]) for i, r in kept.items())
    assert sorted([*kept, *removed]) == sorted([*(f"good-{i}" for i in range(6)), "salad"])
    assert removed["salad"]["ngram_bucket"] == "tail"
    assert all(r["ngram_bucket"] in ("head", "middle") for r in kept.values())
    assert len(kept) >= 3  # reference-like text is mostly head or middle
    assert scores["salad"] > 20 * max(v for i, v in scores.items() if i != "salad")
    stage = next(s for s in report["stages"] if s["stage"] == "perplexity")
    assert stage["buckets"]["tail"] == len(removed) and sum(stage["buckets"].values()) == 7
    assert (out / "_work" / "perplexity" / "perplexity_lm.arpa").is_file()


def test_perplexity_without_a_reference_or_lm_is_a_config_error(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.\n", encoding="utf-8")
    cfg = load_clean_text_config(None, ["perplexity.enabled=true"])
    with pytest.raises(ConfigError, match="perplexity is enabled but names no LM"):
        run_clean_text([str(tmp_path / "a.txt")], tmp_path / "out", cfg, progress=False,
                       log=lambda *a: None)


@pytest.mark.parametrize("overrides, missing, message", [
    (["executor.kind=slurm"], None, r"executor\.slurm\.partition is empty"),
    (["executor.kind=slurm", "executor.slurm.partition=cpu"], "sbatch",
     r"no sbatch on PATH: run on a Slurm login node"),
    (["executor.kind=ray"], "ray", r"Ray is not installed: pip install ray"),
])
def test_cluster_executor_without_its_cluster_is_refused_with_the_fix(
        corpus, tmp_path, monkeypatch, overrides, missing, message):
    import importlib.util
    import shutil as shutil_module

    if missing == "sbatch":
        monkeypatch.setattr(shutil_module, "which", lambda name, *a, **k: None)
    if missing == "ray":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=message):
        run_clean_text([str(corpus["dir"])], tmp_path / "out",
                       load_clean_text_config(None, overrides), progress=False,
                       log=lambda *a: None)
    assert not (tmp_path / "out" / "clean").exists()  # refused before any job ran
