"""Every `docs/...` reference in the code and the top-level documents resolves: the file exists, and a cited
section number (`docs/methods.md 3.2`, `docs/building.md section 4`) is a heading of that file; so do the Markdown
links of the documents and the README sections cited by name (`README "Building"`)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED_DIRS = ["fastlt", "csrc", "kernels", "bench", "tests", "tools", "docs", "examples"]
SCANNED_FILES = ["README.md", "BENCHMARKS.md", "RESULTS.md", "Makefile", "setup.py", "CMakeLists.txt",
                 "pyproject.toml", "requirements-dev.txt"]
TEXT_SUFFIXES = (".py", ".h", ".cpp", ".cu", ".cuh", ".md", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".sh")

PATH = re.compile(r"(?<![\w/.-])docs/[\w./-]*[\w/]")
SECTION_NUMBER = r"(?:§\s*|sections?\s+)?\d+(?:\.\d+)*[a-z]?"
CITATION = re.compile(
    r"(?<![\w/.-])docs/([\w/-]+\.md)(?:'s)?\s+(" + SECTION_NUMBER + r"(?:\s*(?:,|and|-|–)\s*" + SECTION_NUMBER + r")*)"
)
# A citation must say where the document is: the methods document cited without its docs/ folder (as the code once
# cited a file outside the repo) does not resolve for a reader of the code.
BARE_METHODS = re.compile(r"(?<![\w/.-])methods\.md")
README_SECTION = re.compile(r'README\s+(?:section\s+)?"([^"]+)"')
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def scanned_files():
    paths = [os.path.join(ROOT, name) for name in SCANNED_FILES if os.path.exists(os.path.join(ROOT, name))]
    for directory in SCANNED_DIRS:
        for folder, subfolders, files in os.walk(os.path.join(ROOT, directory)):
            subfolders[:] = [name for name in subfolders if not name.startswith((".", "__pycache__"))]
            paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(TEXT_SUFFIXES)]
    return sorted(paths)


def sections(markdown: str) -> dict:
    """Section number -> the text under that heading (up to the next numbered heading)."""
    matches = list(HEADING.finditer(markdown))
    return {m.group(1): markdown[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(markdown)]
            for i, m in enumerate(matches)}


def broken_references(text: str, source: str) -> list:
    """The `docs/...` references in `text` (from file `source`) that do not resolve, as readable strings."""
    problems = []
    for match in PATH.finditer(text):
        if not os.path.exists(os.path.join(ROOT, match.group(0))):
            problems.append(f"{source}: {match.group(0)} does not exist")
    for match in CITATION.finditer(text):
        document = os.path.join(ROOT, "docs", match.group(1))
        if not os.path.isfile(document):
            continue  # reported above as a missing path
        with open(document) as handle:
            headings = sections(handle.read())
        for cited in re.findall(r"\d+(?:\.\d+)*[a-z]?", match.group(2)):
            number, letter = re.fullmatch(r"([\d.]+?)([a-z]?)", cited).groups()
            if number not in headings:
                problems.append(f"{source}: docs/{match.group(1)} has no section {number} ({match.group(0)!r})")
            elif letter and f"({letter})" not in headings[number]:
                problems.append(f"{source}: docs/{match.group(1)} {number} has no part ({letter})")
    if not source.startswith("docs" + os.sep):
        for match in BARE_METHODS.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{source}:{line}: cites the methods document without its docs/ folder (docs/methods.md)")
    with open(os.path.join(ROOT, "README.md")) as handle:
        readme_headings = re.findall(r"^#+\s+(.+?)\s*$", handle.read(), re.MULTILINE)
    for match in README_SECTION.finditer(text):
        if not any(heading.startswith(match.group(1)) for heading in readme_headings):
            problems.append(f"{source}: README has no section {match.group(1)!r}")
    if source.endswith(".md"):
        for match in MARKDOWN_LINK.finditer(text):
            target = match.group(1)
            if "://" in target or target.startswith("mailto:"):
                continue
            if not os.path.exists(os.path.normpath(os.path.join(ROOT, os.path.dirname(source), target))):
                problems.append(f"{source}: link target {target} does not exist")
    return problems


def test_every_docs_reference_in_the_tree_resolves():
    problems, citations = [], 0
    for path in scanned_files():
        with open(path, errors="replace") as handle:
            text = handle.read()
        source = os.path.relpath(path, ROOT)
        if source == os.path.join("tests", "test_docs.py"):
            continue  # this file's own examples are deliberately broken
        citations += len(CITATION.findall(text))
        problems += broken_references(text, source)
    assert not problems, "\n".join(problems)
    assert citations >= 20  # the code cites docs/methods.md sections throughout; finding none means a broken scan


BARE_NAME = "methods" + ".md"  # spelled in two parts so that this file itself holds no bare citation


@pytest.mark.parametrize("text, expected", [
    ("see docs/methods.md 3.2 and 6.3", []),
    ("(docs/methods.md §2.4-2.7)", []),
    ("docs/methods.md 3.2b", []),
    ("docs/methods.md 3.3: T_d 1.5, x E", []),
    ("docs/methods.md 9.9", ["no section 9.9"]),
    ("docs/methods.md 3.2, 4.3 and 6.9", ["no section 6.9"]),
    ("docs/methods.md 3.2q", ["no part (q)"]),
    ("docs/nowhere.md", ["does not exist"]),
    ("see " + BARE_NAME + " 3.2", ["without its docs/ folder"]),
    ('see README "Building"', []),
    ('see README "Set-up"', ["README has no section"]),
])
def test_the_checker_finds_what_is_broken(text, expected):
    problems = broken_references(text, os.path.join("fastlt", "example.py"))
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert fragment in problem


def test_readme_quick_start_runs():
    """The README's quick-start block is code a user pastes: it must run as written."""
    with open(os.path.join(ROOT, "README.md")) as handle:
        block = re.search(r"```python\n(.*?)```", handle.read(), re.DOTALL).group(1)
    exec(compile(block, "README.md quick start", "exec"), {})
