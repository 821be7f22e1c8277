"""What the docs say about the suite is checked here: every test file and test a doc names exists, and
every `uv run pytest ...` command a doc gives selects at least one test.

A doc that points a reader at a test that was renamed or merged away (two method pages cited resume
tests that had been folded into the contract matrix) makes a claim nobody can check.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
# a test file, optionally with ::name; later `::name` items in the same sentence belong to the last file
REF = re.compile(r"(tests/[\w/]+\.py)|::(\w+)")
COMMAND = re.compile(r"`(uv run pytest[^`]*)`")


def _text(doc: Path) -> str:
    # A test name wrapped across two lines ("..._runs_with_a_\nmessage...") is one name again.
    return re.sub(r"_\n\s*(\w)", r"_\1", doc.read_text(encoding="utf-8"))


def _references() -> list[tuple[str, str, str]]:
    """(doc, test file, test name or "") for every reference in the docs."""
    refs = []
    for doc in DOCS:
        for sentence in re.split(r"\n\n|\|", _text(doc)):  # a paragraph or a table cell
            current = ""
            for m in REF.finditer(sentence):
                if m.group(1):
                    current = m.group(1)
                    refs.append((doc.relative_to(REPO).as_posix(), current, ""))
                elif current:
                    refs.append((doc.relative_to(REPO).as_posix(), current, m.group(2)))
    return refs


def test_the_docs_cite_tests_at_all() -> None:
    refs = _references()
    assert len({r[1] for r in refs}) >= 10 and sum(1 for r in refs if r[2]) >= 10, refs


def test_every_test_file_and_test_a_doc_names_exists() -> None:
    missing = []
    for doc, path, name in _references():
        file = REPO / path
        if not file.is_file():
            missing.append(f"{doc}: {path} does not exist")
            continue
        if name and not re.search(rf"^\s*(async )?def {re.escape(name)}\w*\(", file.read_text(encoding="utf-8"),
                                  re.MULTILINE):
            missing.append(f"{doc}: {path}::{name} is not a test in that file")
    assert not missing, "\n".join(missing)


def _commands() -> list[tuple[str, list[str]]]:
    """The commands that narrow the suite (a file or -k); the README's two layer commands are CI's own."""
    found = []
    for doc in DOCS:
        for m in COMMAND.finditer(_text(doc)):
            args = shlex.split(m.group(1))[3:]
            if "-k" in args or any(a.startswith("tests/") for a in args):
                found.append((doc.relative_to(REPO).as_posix(), args))
    return found


def test_the_docs_give_test_commands() -> None:
    assert any("-k" in args for _, args in _commands())


@pytest.mark.slow
@pytest.mark.parametrize("doc,args", _commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_test_command_in_the_docs_selects_tests(doc: str, args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 0 and selected, f"{doc}: `uv run pytest {' '.join(args)}` selects nothing\n{out.stdout}"
