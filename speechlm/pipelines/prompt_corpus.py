"""PCP (arXiv 2305.01711): unlabeled domain text put into the instruction templates a recipe
trains with, for continued training of the LLM before alignment.

PCP's finding is that continued pre-training helps prompt-based fine-tuning when the
unlabeled text is presented *in the task's prompt format*, not as plain text. Here the
formats are the task catalogue's (speechlm.data.instructions.TASKS), with their own
instruction wordings, so an LLM trained on the corpus sees its domain in exactly the
prompts BLSP and the transfer table use:

- `continue`: a sentence (or a few, up to `max_input_words`) as input, the sentences that
  follow it in the same document (up to `max_response_words`) as the response - BLSP's
  stage-1 prompt answered by the text itself;
- `repeat`: a sentence, repeated (the ASR prompt);
- `translate_es`: a sentence and its Spanish, for records that carry a `translation`.

Inputs: plain text (a document per blank-line-separated paragraph block; sentences split at
. ! ? before an upper-case letter or a digit), and JSONL (.gz too) with `sentences` (what
`speechlm build clean-text` writes), or `text` (split the same way), optionally
`translation`. A bad JSONL line is skipped and listed with its file and line.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.instructions import TASKS, Example
from ..errors import ConfigError

__all__ = ["PCP_TASKS", "PromptCorpusSummary", "build_prompt_corpus", "read_prompt_corpus"]

PCP_TASKS = ("continue", "repeat", "translate_es")
_SENTENCE_END = re.compile(r"([.!?][\"'”’)]?)\s+(?=[\"“‘(]?[A-Z0-9])")


@dataclass
class Document:
    source: str  # file:line (JSONL) or file:first line (text)
    sentences: list[str]
    translation: str | None = None


@dataclass
class PromptCorpusSummary:
    documents: int = 0
    examples: dict[str, int] = field(default_factory=dict)
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"

    def summary(self) -> str:
        counts = ", ".join(f"{n} {task}" for task, n in self.examples.items())
        bad = f"; {len(self.bad_lines)} bad line(s) skipped" if self.bad_lines else ""
        return f"{self.documents} documents -> {counts}{bad}"


def split_sentences(text: str) -> list[str]:
    marked = _SENTENCE_END.sub("\\1\n", " ".join(text.split()))  # no newline is left before
    return [s.strip() for s in marked.split("\n") if s.strip()]


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else \
        open(path, encoding="utf-8")


def _files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{spec}: no such file or directory")
    return files


def read_documents(inputs: Sequence[str], bad: list[str]) -> Iterator[Document]:
    for path in _files(inputs):
        jsonl = ".jsonl" in path.name
        with _open(path) as f:
            if jsonl:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record.get("sentences") or record.get("text")
                        if isinstance(text, str):
                            text = split_sentences(text)
                        if not text or not all(isinstance(s, str) for s in text):
                            raise ValueError("no 'sentences' list or 'text' string")
                    except (ValueError, AttributeError, TypeError) as e:
                        bad.append(f"{path}:{n}: {e}")
                        continue
                    translation = record.get("translation")
                    yield Document(f"{path}:{n}", [s for s in text if s.strip()],
                                   translation if isinstance(translation, str) else None)
            else:
                block, first = [], 1
                for n, line in enumerate([*f, "\n"], 1):
                    if line.strip():
                        block.append(line)
                        continue
                    if block:
                        yield Document(f"{path}:{first}", split_sentences(" ".join(block)))
                    block, first = [], n + 1


def _take_words(sentences: Sequence[str], start: int, max_words: int,
                stop: int | None = None) -> tuple[str, int]:
    """Whole sentences from `start` (before `stop`) while they fit in `max_words` (at least
    one); the text and the index after the last one taken."""
    taken, words, i = [], 0, start
    while i < (len(sentences) if stop is None else stop):
        n = len(sentences[i].split())
        if taken and words + n > max_words:
            break
        taken.append(sentences[i])
        words, i = words + n, i + 1
    return " ".join(taken), i


def document_examples(doc: Document, tasks: Sequence[str], rng: random.Random, *,
                      max_input_words: int = 40, max_response_words: int = 39
                      ) -> list[Example]:
    """The PCP examples of one document (see the module doc)."""
    out: list[Example] = []

    def example(task: str, text: str, response: str) -> Example:
        wordings = TASKS[task].instructions
        k = rng.randrange(len(wordings))
        return Example(task=task, instruction=wordings[k], input=text, response=response,
                       lang=TASKS[task].lang, target_lang=TASKS[task].target_lang,
                       ref=doc.source, wording=k)

    s = doc.sentences
    if "continue" in tasks:
        i = 0
        while i < len(s) - 1:  # the input leaves at least one sentence to continue with
            text, j = _take_words(s, i, max_input_words, stop=len(s) - 1)
            response, _ = _take_words(s, j, max_response_words)
            if len(response.split()) <= max_response_words:
                out.append(example("continue", text, response))
            i = j
    if "repeat" in tasks:
        out += [example("repeat", x, x) for x in s if len(x.split()) <= max_input_words]
    if "translate_es" in tasks and doc.translation:
        text = " ".join(s)
        if len(text.split()) <= max_input_words:
            out.append(example("translate_es", text, doc.translation))
    return out


def build_prompt_corpus(inputs: Sequence[str], out: str | Path, *,
                        tasks: Sequence[str] = ("continue", "repeat"),
                        max_input_words: int = 40, max_response_words: int = 39,
                        seed: int = 0) -> PromptCorpusSummary:
    """Write the PCP examples of `inputs` to `out` (JSONL, shuffled; written atomically)."""
    from ..jsonl import write_jsonl

    unknown = [t for t in tasks if t not in PCP_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"prompt corpus tasks must be among {', '.join(PCP_TASKS)}; got "
                          f"{', '.join(tasks) or 'none'}")
    summary = PromptCorpusSummary(examples={t: 0 for t in tasks})
    rng = random.Random(seed)
    examples: list[Example] = []
    for doc in read_documents(inputs, summary.bad_lines):
        summary.documents += 1
        for e in document_examples(doc, tasks, rng, max_input_words=max_input_words,
                                   max_response_words=max_response_words):
            summary.examples[e.task] += 1
            examples.append(e)
    rng.shuffle(examples)
    write_jsonl(out, (asdict(e) for e in examples))
    return summary


def read_prompt_corpus(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a prompt corpus written by build_prompt_corpus (the first `limit`)."""
    from ..jsonl import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: prompt corpus not found; write it with `speechlm build "
                          "prompt-corpus IN... --out FILE`")
    examples = []
    for n, record in iter_jsonl(path):
        if record.get("task") not in TASKS or not all(
                isinstance(record.get(k), str) for k in ("instruction", "input", "response")):
            raise ConfigError(f"{path}:{n}: not a prompt-corpus example (task, instruction, "
                              "input and response); rebuild it with speechlm build prompt-corpus")
        examples.append(Example(**{k: record[k] for k in Example.__dataclass_fields__
                                   if k in record}))
        if limit is not None and len(examples) >= limit:
            break
    return examples
