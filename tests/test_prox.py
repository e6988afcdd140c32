"""ProX refinement: the program format, its executor and guard, the rules writer, the LLM
writer's chunking, and the clean-text stage that runs them."""

from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("datatrove")

from speechlm.corpus.config import load_clean_text_config  # noqa: E402
from speechlm.corpus.prox import (  # noqa: E402
    Guard,
    execute,
    number_lines,
    parse_program,
    rules_program,
)
from speechlm.corpus.prox_llm import (  # noqa: E402
    LlmProgramWriter,
    chunk_ranges,
    merge_chunk_programs,
)
from speechlm.corpus.run import run_clean_text  # noqa: E402

CONTENT = ("The river rises in the hills north of the town and flows south for forty miles "
           "through farmland, woods and two small villages before it meets the sea.")
PAGE = "\n".join([
    "Home | News | About us | Contact",          # 0 menu
    "",
    "A short history of the river",              # 2
    CONTENT,                                     # 3
    "Fish &amp; birds live along its banks.[4]",  # 4 entity and citation
    "",
    "© 2024 Example Press. All rights reserved.",  # 6
    "Privacy policy",                            # 7
    "https://example.org/river",                 # 8
])


def test_parse_program_accepts_keyword_and_positional_calls_and_counts_malformed_lines():
    program = parse_program("remove_lines(line_start=0, line_end=1)\n"
                            "remove_lines(2, 2)\n"
                            'normalize(source_str="&amp;", target_str="&")\n'
                            "keep_doc()\n"
                            "remove_lines(line_start=5, line_end=99)\n"   # out of range
                            'os.system("rm -rf /")\n'                      # not an operation
                            "delete_everything()\n"                        # unknown
                            "normalize(source_str=x, target_str='y')\n"    # not a literal
                            "remove_lines(line_start=0\n", n_lines=9)      # syntax
    assert [op.name for op in program.operations] == ["remove_lines", "remove_lines",
                                                      "normalize", "keep_doc"]
    assert program.operations[1].args == (2, 2)
    assert len(program.errors) == 5
    assert "not a range of the 9 lines" in program.errors[0]
    assert "unknown operation 'delete_everything'" in program.errors[2]


def test_executor_removes_lines_then_normalizes_and_guard_decides():
    text = "\n".join(["menu | a | b", CONTENT, "x &amp; y " + CONTENT])
    ok = parse_program("remove_lines(line_start=0, line_end=0)\n"
                       'normalize(source_str="&amp;", target_str="&")', n_lines=3)
    result = execute(text, ok)
    assert result.outcome == "refined" and result.removed_lines == {0}
    assert result.text == CONTENT + "\nx & y " + CONTENT and result.normalized == 1

    assert execute(text, parse_program("drop_doc()", 3)).outcome == "dropped"
    assert execute(text, parse_program("keep_doc()", 3)).text == text
    # two malformed operations: the paper's guard ignores the whole program
    bad = parse_program("remove_lines(line_start=1, line_end=2)\nfoo()\nbar(", 3)
    ignored = execute(text, bad)
    assert ignored.outcome == "ignored" and ignored.text == text and ignored.errors == 2
    # one malformed operation: the rest runs
    assert execute(text, parse_program("remove_lines(0, 0)\nfoo()", 3)).outcome == "refined"
    # too little left: dropped by the guard, not kept as a stub
    stub = execute(text, parse_program("remove_lines(1, 2)", 3))
    assert stub.outcome == "dropped_by_guard" and stub.text is None
    assert execute(text, parse_program("remove_lines(1, 1)", 3),
                   Guard(min_kept_fraction=0.9)).outcome == "dropped_by_guard"


def test_rules_remove_boilerplate_fix_entities_and_keep_or_drop_whole_pages():
    program = rules_program(PAGE)
    result = execute(PAGE, parse_program(program, len(PAGE.split("\n"))))
    assert result.outcome == "refined"
    assert result.text.split("\n") == ["", "A short history of the river", CONTENT,
                                       "Fish & birds live along its banks.", ""]
    assert rules_program(CONTENT) == "keep_doc()"
    assert rules_program("Sign in\nHome | News | Sport | Weather\nBack to top\n"
                         + CONTENT) == "drop_doc()"
    # a pattern names a short line only: content that mentions copyright stays
    long_line = "Copyright law in the kingdom protected printers for fourteen years " \
                "and could be renewed once by a living author."
    assert rules_program(long_line + "\n" + CONTENT) == "keep_doc()"


def test_numbered_view_skips_blank_lines_but_keeps_their_numbers():
    assert number_lines("a\n\nb", 0) == "[000] a\n[002] b"
    assert number_lines("a\n\nbcdef", 1, 3, max_chars=2) == "[002] bc"


def test_llm_writer_chunks_merge_into_one_document_program(monkeypatch):
    text = "\n".join(f"line {i} " + CONTENT for i in range(7))
    assert chunk_ranges(text, 3) == [(0, 3), (3, 6), (6, 7)]
    assert merge_chunk_programs([(0, 3), (3, 6)], ["drop_doc()", "keep_doc()"]) == \
        "remove_lines(line_start=0, line_end=2)"
    assert merge_chunk_programs([(0, 3), (3, 6)], ["drop_doc()", "drop_doc() "]) == "drop_doc()"
    assert merge_chunk_programs([(0, 3)], ["keep_doc()\n"]) == "keep_doc()"

    writer = LlmProgramWriter("unused", chunk_lines=3)
    seen = []

    def answers(views):  # what a model would answer: drop the first line it is shown
        seen.extend(views)
        return [f"remove_lines(line_start={int(v[1:4])}, line_end={int(v[1:4])})\nnonsense("
                for v in views]

    monkeypatch.setattr(writer, "chunk_programs", answers)
    [program] = writer.programs([text])
    assert seen[1].startswith("[003] line 3") and len(seen) == 3
    parsed = parse_program(program, 7)
    assert [op.args for op in parsed.operations] == [(0, 0), (3, 3), (6, 6)]
    assert len(parsed.errors) == 3  # each chunk's malformed line stays, and is counted


def test_clean_text_refine_stage_cleans_pages_and_reports_it(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    pages = [PAGE.replace("A short history of the river", f"The river, part {k}")
             for k in range(3)]
    nav = "Sign in\nHome | News | Sport | Weather\nNext page\nBack to top\n" + CONTENT
    with open(inp / "pages.jsonl", "w", encoding="utf-8") as f:
        for k, text in enumerate([*pages, nav]):
            f.write(json.dumps({"id": f"p{k}", "text": text}) + "\n")
    only_refine = [f"{stage}.enabled=false" for stage in
                   ("gopher_repetition", "gopher_quality", "c4", "fineweb", "near_dedup",
                    "tts", "language")]
    cfg = load_clean_text_config(None, [*only_refine, "refine.enabled=true"])
    report = run_clean_text([str(inp)], tmp_path / "out", cfg, progress=False,
                            log=lambda *a: None)
    records = []
    for path in sorted((tmp_path / "out" / "clean").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == ["p0", "p1", "p2"]
    for r in records:
        assert "Home |" not in r["text"] and "©" not in r["text"] and "&amp;" not in r["text"]
        assert "remove_lines(line_start=0, line_end=0)" in r["prox_program"]
    [stage] = [s for s in report["stages"] if s["stage"] == "refine"]
    assert stage["docs_removed"] == 1 and stage["docs_refined"] == 3
    # ftfy (the unicode stage, first) already turned &amp; into &: the citation mark is left
    assert stage["lines_removed"] == 3 * 4 and stage["replacements"] == 3
