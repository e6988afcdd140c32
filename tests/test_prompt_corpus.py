"""PCP prompt corpora: domain text in the task catalogue's templates."""

from __future__ import annotations

import gzip
import json

import pytest

from speechlm import cli
from speechlm.data.instructions import TASKS
from speechlm.errors import ConfigError
from speechlm.pipelines.prompt_corpus import (
    build_prompt_corpus,
    read_prompt_corpus,
    split_sentences,
)
from speechlm.recipes import load_recipe

DOC_A = ("The pump starts when the tank is low. It stops at the upper mark. "
         "Check the filter every month. Replace it when it is grey.")
DOC_B = "Valves open slowly. 2 seconds is enough. The gauge shows the pressure."


def _inputs(tmp_path):
    text = tmp_path / "manual.txt"
    text.write_text(f"{DOC_A}\n\n{DOC_B}\n", encoding="utf-8")
    clean = tmp_path / "clean.jsonl.gz"
    with gzip.open(clean, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "d1", "sentences": ["Oil the hinge.", "Close the lid."]}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"id": "d2", "text": "Turn it off.",
                            "translation": "Apágalo."}) + "\n")
        f.write(json.dumps({"id": "d3", "sentences": 7}) + "\n")
    return [str(text), str(clean)]


def test_sentences_split_before_capitals_and_digits_only():
    assert split_sentences("Valves open slowly. 2 seconds is enough. e.g. not here.") == [
        "Valves open slowly.", "2 seconds is enough. e.g. not here."]


def test_continuations_come_from_the_same_document_in_the_tasks_own_templates(tmp_path):
    out = tmp_path / "pcp.jsonl"
    summary = build_prompt_corpus(_inputs(tmp_path), out,
                                  tasks=["continue", "repeat", "translate_es"],
                                  max_input_words=8, max_response_words=8)
    examples = read_prompt_corpus(out)
    assert summary.documents == 4 and summary.examples == {
        "continue": 5, "repeat": 10, "translate_es": 1}
    assert len(examples) == 16
    cont = {e.input: e.response for e in examples if e.task == "continue"}
    # whole sentences up to the word limits, never across documents
    assert cont["The pump starts when the tank is low."] == "It stops at the upper mark."
    assert cont["It stops at the upper mark."] == "Check the filter every month."
    assert cont["Valves open slowly. 2 seconds is enough."] == "The gauge shows the pressure."
    assert cont["Oil the hinge."] == "Close the lid."
    assert "Replace it when it is grey." not in cont and "Close the lid." not in cont
    for e in examples:
        assert e.instruction in TASKS[e.task].instructions
        if e.task == "repeat":
            assert e.input == e.response
    [tr] = [e for e in examples if e.task == "translate_es"]
    assert (tr.input, tr.response, tr.target_lang) == ("Turn it off.", "Apágalo.", "es")
    assert [b.split(": ", 1)[0].rsplit(":", 1)[1] for b in summary.bad_lines] == ["2", "4"]
    assert read_prompt_corpus(out, limit=3) == examples[:3]


def test_bad_tasks_and_files_are_rejected_with_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="among continue, repeat, translate_es"):
        build_prompt_corpus(_inputs(tmp_path), tmp_path / "x.jsonl", tasks=["summarize"])
    with pytest.raises(ConfigError, match="speechlm build prompt-corpus"):
        read_prompt_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task": "continue", "input": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.jsonl:1: not a prompt-corpus example"):
        read_prompt_corpus(bad)


def test_cli_writes_the_corpus_and_text_skills_takes_it(tmp_path, capsys):
    out = tmp_path / "pcp.jsonl"
    assert cli.main(["build", "prompt-corpus", *_inputs(tmp_path), "--out", str(out)]) == 0
    assert "4 documents ->" in capsys.readouterr().out and out.is_file()
    _, config = load_recipe("recipes/text/smollm2_135m_verse_skills.yaml",
                            [f"data.prompt_corpus={out}", "data.prompt_corpus_examples=5"])
    assert config.data.prompt_corpus == str(out)
    with pytest.raises(ConfigError, match="prompt_corpus_examples must be >= 1"):
        load_recipe("recipes/text/smollm2_135m_verse_skills.yaml",
                    ["data.prompt_corpus_examples=0"])
