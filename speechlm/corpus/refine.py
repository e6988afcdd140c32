"""ProX refinement as a datatrove filter: each document's program, written by the rules or a
local LLM (speechlm.corpus.prox, prox_llm), run under the paper's guard.

A dropped document goes to the exclusion writer (removed/refine/, with its reason); a
refined one continues with its new text and `metadata["prox_program"]`, so the output says
what was done to it. The stats (outcomes, lines removed, replacements, malformed operations)
feed the report.
"""

from __future__ import annotations

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from .prox import Guard, execute, parse_program, rules_program

__all__ = ["ProxRefiner"]


class ProxRefiner(BaseFilter):
    name = "🛠 ProX refine"

    def __init__(self, writer: str = "rules", *, llm: str = "models:smollm2-135m-instruct",
                 chunk_lines: int = 24, guard: Guard | None = None,
                 max_boilerplate_fraction: float = 0.7, batch_size: int = 8,
                 exclusion_writer=None):
        if writer not in ("rules", "llm"):
            raise ValueError(f"refine.writer must be rules or llm, got {writer!r}")
        super().__init__(exclusion_writer, batch_size=batch_size if writer == "llm" else 1)
        self.writer, self.llm, self.chunk_lines = writer, llm, chunk_lines
        self.guard, self.max_boilerplate_fraction = guard or Guard(), max_boilerplate_fraction
        self._llm_writer = None  # loaded in the worker, not pickled with the pipeline

    def _programs(self, texts: list[str]) -> list[str]:
        if self.writer == "rules":
            return [rules_program(t, self.max_boilerplate_fraction) for t in texts]
        if self._llm_writer is None:
            from .prox_llm import LlmProgramWriter

            self._llm_writer = LlmProgramWriter(self.llm, chunk_lines=self.chunk_lines,
                                                batch_size=self.batch_size)
        return self._llm_writer.programs(texts)

    def _apply(self, doc: Document, program_text: str) -> bool | tuple[bool, str]:
        program = parse_program(program_text, len(doc.text.split("\n")))
        result = execute(doc.text, program, self.guard)
        self.stat_update(f"outcome_{result.outcome}")
        self.stat_update("lines_removed", value=len(result.removed_lines))
        self.stat_update("replacements", value=result.normalized)
        self.stat_update("malformed_ops", value=result.errors)
        if result.text is None:
            return False, ("program_drop_doc" if result.outcome == "dropped"
                           else "too_little_left")
        if result.outcome == "refined":
            doc.text = result.text
            doc.metadata["prox_program"] = program.text()
        return True

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self._apply(doc, self._programs([doc.text])[0])

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        programs = self._programs([doc.text for doc in batch])
        return [self._apply(doc, p) for doc, p in zip(batch, programs, strict=True)]
