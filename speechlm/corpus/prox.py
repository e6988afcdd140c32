"""ProX-style refinement (arXiv 2409.17115): a writer turns each document into a small
program, and an executor runs it.

The writer reads the document with its lines numbered (`[007] some text`, blank lines left
out of the view but counted) and answers with one call per line:

    drop_doc()                                    the document is not worth keeping
    keep_doc()                                    keep it as it is
    remove_lines(line_start=3, line_end=5)        remove lines 3..5 (inclusive)
    normalize(source_str="&amp;", target_str="&") replace every occurrence

Programs are parsed with Python's `ast` (literals only: nothing is evaluated), so a writer
that produces anything else makes a *malformed operation*, counted, never run. The
executor applies the paper's guard: a program with `max_error_ops` or more malformed
operations is ignored (the document is kept as it was), and a refinement that leaves fewer
than `min_words` words, or less than `min_kept_fraction` of them, drops the document.

Writers: `rules_program` (patterns for navigation, copyright, link and symbol-only lines
and HTML entities; the reference), and `LlmProgramWriter` (a local instruct LLM shown two
examples of the rules' programs).
"""

from __future__ import annotations

import ast
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Guard", "Operation", "Program", "Refinement", "execute", "number_lines",
           "parse_program", "rules_program"]

OPERATIONS = {"drop_doc": (), "keep_doc": (), "remove_lines": ("line_start", "line_end"),
              "normalize": ("source_str", "target_str")}


@dataclass(frozen=True)
class Operation:
    name: str
    args: tuple = ()


@dataclass
class Program:
    operations: list[Operation] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per malformed operation

    def text(self) -> str:
        return "\n".join(format_operation(op) for op in self.operations)


@dataclass(frozen=True)
class Guard:
    max_error_ops: int = 2  # this many malformed operations: ignore the program (ProX: 2)
    min_words: int = 10  # fewer words left: drop the document
    min_kept_fraction: float = 0.05  # less of the words left: drop the document (ProX: 5%)


@dataclass
class Refinement:
    text: str | None  # None: dropped
    outcome: str  # kept | refined | dropped | dropped_by_guard | ignored
    removed_lines: set[int] = field(default_factory=set)
    normalized: int = 0  # replacements made
    errors: int = 0


def format_operation(op: Operation) -> str:
    names = OPERATIONS[op.name]
    return f"{op.name}({', '.join(f'{n}={v!r}' for n, v in zip(names, op.args, strict=True))})"


def number_lines(text: str, start: int = 0, stop: int | None = None,
                 max_chars: int | None = None) -> str:
    """The writer's view of lines [start, stop): `[NNN] line`, blank lines left out."""
    lines = text.split("\n")
    out = []
    for i in range(start, len(lines) if stop is None else min(stop, len(lines))):
        line = lines[i]
        if line.strip():
            out.append(f"[{i:03d}] {line[:max_chars] if max_chars else line}")
    return "\n".join(out)


def _parse_operation(line: str, n_lines: int) -> Operation:
    """One call, or ValueError saying why it is malformed."""
    try:
        node = ast.parse(line.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError("not a call") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError("not a call")
    name = node.func.id
    if name not in OPERATIONS:
        raise ValueError(f"unknown operation {name!r}")
    names = OPERATIONS[name]
    if len(node.args) + len(node.keywords) != len(names):
        raise ValueError(f"{name} takes {len(names)} argument(s)")
    values: dict[str, object] = {}
    try:
        for n, arg in zip(names, node.args, strict=False):  # fewer positionals: keywords follow
            values[n] = ast.literal_eval(arg)
        for kw in node.keywords:
            if kw.arg not in names or kw.arg in values:
                raise ValueError(f"{name}: unexpected argument {kw.arg!r}")
            values[kw.arg] = ast.literal_eval(kw.value)
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(str(e) or "arguments are not literals") from None
    args = tuple(values[n] for n in names)
    if name == "remove_lines":
        a, b = args
        if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b < n_lines):
            raise ValueError(f"remove_lines({a!r}, {b!r}) is not a range of the "
                             f"{n_lines} lines")
    if name == "normalize":
        src, dst = args
        if not (isinstance(src, str) and isinstance(dst, str)) or not src.strip() \
                or "\n" in src or "\n" in dst:
            raise ValueError("normalize needs a non-blank one-line source and a one-line target")
    return Operation(name, args)


def parse_program(program: str, n_lines: int) -> Program:
    """The operations of `program` for a document of `n_lines` lines; malformed lines are
    listed in `errors`, never run."""
    parsed = Program()
    for line in program.splitlines():
        if not line.strip():
            continue
        try:
            parsed.operations.append(_parse_operation(line, n_lines))
        except ValueError as e:
            parsed.errors.append(f"{line.strip()[:80]}: {e}")
    return parsed


def execute(text: str, program: Program, guard: Guard | None = None) -> Refinement:
    """Run `program` on `text` under `guard` (default: the paper's; see the module doc)."""
    guard = guard or Guard()
    errors = len(program.errors)
    if errors >= guard.max_error_ops:
        return Refinement(text, "ignored", errors=errors)
    if any(op.name == "drop_doc" for op in program.operations):
        return Refinement(None, "dropped", errors=errors)
    lines = text.split("\n")
    removed: set[int] = set()
    normalized = 0
    for op in program.operations:
        if op.name == "remove_lines":
            removed.update(range(op.args[0], op.args[1] + 1))
    kept = [line for i, line in enumerate(lines) if i not in removed]
    for op in program.operations:
        if op.name == "normalize":
            src, dst = op.args
            for i, line in enumerate(kept):
                if src in line:
                    normalized += line.count(src)
                    kept[i] = line.replace(src, dst)
    refined = "\n".join(kept)
    words_before, words_after = len(text.split()), len(refined.split())
    if words_after < guard.min_words or words_after < guard.min_kept_fraction * words_before:
        return Refinement(None, "dropped_by_guard", removed, normalized, errors)
    outcome = "refined" if removed or normalized else "kept"
    return Refinement(refined, outcome, removed, normalized, errors)


# -- the rules writer -------------------------------------------------------------------

_BOILERPLATE = re.compile(
    r"^\s*(?:"
    r"(?:©|\(c\)|copyright\b).*|.*\ball rights reserved\b.*"
    r"|.*\b(?:privacy policy|terms of (?:use|service)|cookie (?:policy|settings))\b.*"
    r"|(?:click|tap) here\b.*|share (?:this|on)\b.*|skip to (?:main )?content"
    r"|(?:subscribe|sign up|sign in|log in|log out)(?: now)?[.!]?"
    r"|back to top|(?:previous|next)(?: topic| page| chapter| section)?(?:\s*:.{0,60})?"
    r"|page \d+(?: of \d+)?|last (?:updated|modified)\b.*|created using sphinx.*"
    r"|(?:table of )?contents|quick search|(?:show|view) (?:page )?source|report a bug"
    r"|this page|navigation|found a bug\?.*|edit (?:this page|on github)"
    r")\s*$", re.IGNORECASE)
_LINK_ONLY = re.compile(r"^\s*(?:(?:https?://|www\.)\S+|\S+@\S+\.\w+)\s*$")
_MENU_SEPARATORS = re.compile(r"\s(?:\||»|·|•|>)\s")
_ENTITY = re.compile(r"&(?:amp|lt|gt|quot|apos|nbsp|#\d{1,5}|#x[0-9a-fA-F]{1,4});")
_CITATION = re.compile(r"\[(?:\d{1,3}|edit|citation needed)\]")


def boilerplate_line(line: str) -> bool:
    """Navigation, copyright, link-only, symbol-only or menu lines."""
    stripped = line.strip()
    if not stripped:
        return False
    if not any(c.isalpha() for c in stripped):
        return True
    # a pattern names a short line: "Copyright law protects..." in a long one is content
    if len(stripped.split()) <= 15 and _BOILERPLATE.match(stripped) or _LINK_ONLY.match(stripped):
        return True
    items = _MENU_SEPARATORS.split(stripped)
    return len(items) >= 3 and all(len(item.split()) <= 3 for item in items)


def _ranges(indices: Sequence[int], lines: Sequence[str]) -> list[tuple[int, int]]:
    """Consecutive boilerplate lines (blank lines between them included) as ranges."""
    ranges: list[list[int]] = []
    for i in indices:
        if ranges and all(not lines[j].strip() for j in range(ranges[-1][1] + 1, i)):
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return [(a, b) for a, b in ranges]


def rules_program(text: str, max_boilerplate_fraction: float = 0.7) -> str:
    """The rules' program for `text`: drop a page that is mostly boilerplate, else remove its
    boilerplate lines and unescape HTML entities and citation marks; keep_doc() when clean."""
    lines = text.split("\n")
    content = [i for i, line in enumerate(lines) if line.strip()]
    bad = [i for i in content if boilerplate_line(lines[i])]
    if content and len(bad) / len(content) > max_boilerplate_fraction:
        return "drop_doc()"
    ops = [Operation("remove_lines", r) for r in _ranges(bad, lines)]
    dropped = set(bad)
    body = "\n".join(line for i, line in enumerate(lines) if i not in dropped)
    for entity in sorted(set(_ENTITY.findall(body))):
        ops.append(Operation("normalize", (entity, html.unescape(entity).replace("\xa0", " "))))
    for mark in sorted(set(_CITATION.findall(body))):
        ops.append(Operation("normalize", (mark, "")))
    return "\n".join(format_operation(op) for op in ops) or "keep_doc()"
