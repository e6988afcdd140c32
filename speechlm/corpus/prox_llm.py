"""A local instruct LLM as ProX's program writer (arXiv 2409.17115 fine-tunes a 0.3B model;
ours is prompted: three examples whose programs the rules wrote, then the document).

A long document is shown in chunks of `chunk_lines` non-blank lines; each chunk gets its own
program, and the chunks' programs become one program for the document: `drop_doc()` in a
chunk removes that chunk's lines (the whole document when every chunk says so), and a
line the parser rejects stays in the program, so the executor counts it as malformed.
"""

from __future__ import annotations

from collections.abc import Sequence

from .prox import number_lines, rules_program

__all__ = ["LlmProgramWriter", "chunk_ranges"]

SYSTEM = ("You clean documents for a speech corpus. The user shows numbered lines. Answer "
          "with a program, one call per line, using only: drop_doc(), keep_doc(), "
          "remove_lines(line_start=A, line_end=B), normalize(source_str=\"x\", "
          "target_str=\"y\"). Remove navigation, menus, copyright, link and symbol-only "
          "lines; fix HTML entities; keep the content. Answer keep_doc() when the text is "
          "clean and drop_doc() when nothing is worth keeping.")

EXAMPLES = (
    "Home | Products | About us | Contact\n"
    "Installing the server\n"
    "The server runs on any recent Linux system. Download the archive and unpack it.\n"
    "Then start it with the start script &amp; open the page in a browser.[3]\n"
    "© 2021 Example Corp. All rights reserved.\n"
    "Privacy policy",
    "The river rises in the hills north of the town and flows south for forty miles.\n"
    "In spring the valley floods, and the farmers move their animals to higher ground.\n"
    "The old bridge was built in stone after the flood of the great winter.",
    "Sign in\n"
    "Home | News | Sport | Weather\n"
    "Next page\n"
    "Back to top",
)


def chunk_ranges(text: str, chunk_lines: int) -> list[tuple[int, int]]:
    """[start, stop) line ranges holding `chunk_lines` non-blank lines each."""
    lines = text.split("\n")
    ranges, start, seen = [], 0, 0
    for i, line in enumerate(lines):
        if line.strip():
            seen += 1
            if seen == chunk_lines:
                ranges.append((start, i + 1))
                start, seen = i + 1, 0
    if seen:
        ranges.append((start, len(lines)))
    return ranges or [(0, len(lines))]


def merge_chunk_programs(chunks: Sequence[tuple[int, int]], programs: Sequence[str]) -> str:
    """One document program from per-chunk programs (see the module doc)."""
    out, drops = [], 0
    for (start, stop), program in zip(chunks, programs, strict=True):
        lines = [line.strip() for line in program.splitlines() if line.strip()]
        if any(line.replace(" ", "") == "drop_doc()" for line in lines):
            drops += 1
            out.append(f"remove_lines(line_start={start}, line_end={stop - 1})")
            continue
        out += [line for line in lines if line.replace(" ", "") != "keep_doc()"]
    if drops == len(chunks):
        return "drop_doc()"
    return "\n".join(out) or "keep_doc()"


class LlmProgramWriter:
    """Programs for documents from a local instruct LLM (a directory or models:/zoo: name)."""

    def __init__(self, llm: str = "models:smollm2-135m-instruct", *, chunk_lines: int = 24,
                 max_line_chars: int = 160, max_new_tokens: int = 160, batch_size: int = 8,
                 precision: str = "bf16", device: str = "cpu"):
        self.llm, self.device = llm, device
        self.chunk_lines, self.max_line_chars = chunk_lines, max_line_chars
        self.max_new_tokens, self.batch_size, self.precision = (max_new_tokens, batch_size,
                                                                precision)
        self._model = None

    def _load(self):
        from ..inference.text_generation import stop_ids_of
        from ..models.prompts import pick_pad_id
        from ..models.speech_lm import load_llm
        from ..pretrained.resolve import resolve_model_dir

        directory = resolve_model_dir(self.llm, what="LLM")
        self._model, self.tokenizer = load_llm(directory)
        self._model.to(self.device).eval()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.llm}: the LLM's tokenizer has no chat template; the "
                             "program writer needs an instruct model")
        self.pad_id = pick_pad_id(self.tokenizer)
        self.stop_ids = stop_ids_of(self._model, [self.tokenizer.eos_token_id])
        shots = []
        for example in EXAMPLES:
            shots += [{"role": "user", "content": number_lines(example)},
                      {"role": "assistant", "content": rules_program(example)}]
        self.messages = [{"role": "system", "content": SYSTEM}, *shots]

    def prompt_ids(self, view: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [*self.messages, {"role": "user", "content": view}], add_generation_prompt=True,
            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def chunk_programs(self, views: Sequence[str]) -> list[str]:
        """The LLM's raw answer for each numbered view."""
        import contextlib

        import torch

        from ..inference import text_generation

        if self._model is None:
            self._load()
        prompts = [self.prompt_ids(view) for view in views]
        autocast = (torch.autocast(self.device, dtype=torch.bfloat16)
                    if self.precision == "bf16" else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            new = text_generation.greedy_generate(
                self._model, prompts, pad_id=self.pad_id, stop_ids=self.stop_ids,
                max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]

    def programs(self, texts: Sequence[str]) -> list[str]:
        """One program per document."""
        chunks = [chunk_ranges(text, self.chunk_lines) for text in texts]
        views = [number_lines(text, a, b, self.max_line_chars)
                 for text, ranges in zip(texts, chunks, strict=True) for a, b in ranges]
        answers = iter(self.chunk_programs(views))
        return [merge_chunk_programs(ranges, [next(answers) for _ in ranges])
                for ranges in chunks]
