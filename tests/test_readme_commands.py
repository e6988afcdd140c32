"""Every command the README and docs/ show exists (issue 22).

Each `speechlm ...` line in a shell code block of README.md or docs/**/*.md (and the
`torchrun ... -m speechlm.cli ...` form) is parsed by the real command-line parser, so a
page can never show a command or option the CLI does not have. Inline `speechlm ...` spans
in the README name a real command and only its real options. Recipe paths, `make` targets
and relative links the README shows exist. What the commands do is tested elsewhere
(test_demo_and_cli.py, test_infer_eval_cli.py, ...); this is the guard against drift.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from speechlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```([\w-]*)\n(.*?)^```", text, flags=re.S | re.M)


def _commands(path: Path) -> list[str]:
    """The `speechlm` command lines of a page's shell blocks, continuation lines joined,
    as argument strings after `speechlm` (comments kept: shlex drops them)."""
    found = []
    for lang, body in _code_blocks(path.read_text()):
        if lang not in SHELL_FENCES:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("speechlm "):
                found.append(line)
            elif " -m speechlm.cli " in line:
                found.append("speechlm " + line.split(" -m speechlm.cli ", 1)[1])
    return found


CASES = [(p, line) for p in PAGES for line in _commands(p)]


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_the_readme_shows_the_main_commands():
    shown = {shlex.split(line, comments=True)[1] for line in _commands(README)}
    for command in ("demo", "models", "zoo", "data", "build", "train", "infer", "eval",
                    "transfer", "serve"):
        assert command in shown, f"README.md shows no `speechlm {command}` example"


@pytest.mark.parametrize(
    "page,line", CASES, ids=[f"{p.relative_to(ROOT)}:{line[:60]}" for p, line in CASES])
def test_every_shown_command_parses(parser, page, line):
    argv = shlex.split(line, comments=True)[1:]
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page.relative_to(ROOT)} shows a command the CLI rejects: {line!r}")
    for arg in argv:
        if re.fullmatch(r"recipes/\S+\.yaml", arg):
            assert (ROOT / arg).is_file(), f"{page.relative_to(ROOT)}: no recipe {arg} ({line!r})"


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_inline_commands_in_the_readme_exist(parser):
    spans = re.findall(r"`(speechlm [^`]*)`", README.read_text())
    assert spans
    for span in spans:
        p = parser
        options = set(p._option_string_actions)
        for word in shlex.split(span)[1:]:
            if word == "...":  # `speechlm --debug ...`: any command follows
                continue
            if word.startswith("-"):
                assert word in options, f"README.md: `{span}`: {word} is no option here"
            elif word in _subparsers(p):
                p = _subparsers(p)[word]
                options |= set(p._option_string_actions)
            elif _subparsers(p):
                pytest.fail(f"README.md: `{span}`: no command {word!r}")


def test_recipes_the_readme_names_exist():
    for page in (README, ROOT / "docs" / "recipes.md"):
        for path in re.findall(r"`(recipes/[\w./-]+\.yaml)`", page.read_text()):
            assert (ROOT / path).is_file(), f"{page.relative_to(ROOT)}: no {path}"


def test_every_recipe_is_listed_in_docs_recipes():
    listed = (ROOT / "docs" / "recipes.md").read_text()
    for recipe in sorted((ROOT / "recipes").rglob("*.yaml")):
        rel = recipe.relative_to(ROOT).as_posix()
        assert rel in listed or f"`{recipe.name}`" in listed, f"docs/recipes.md lacks {rel}"


def test_make_targets_shown_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, flags=re.M).group(1).split())
    shown = set(re.findall(r"\bmake (\w+)", README.read_text()))
    assert {"demo", "test"} <= shown
    for target in shown:
        assert target in targets and target in phony, f"README.md shows `make {target}`"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
        if anchor:
            assert anchor in _anchors(dest), f"{page.relative_to(ROOT)}: no anchor {target}"
