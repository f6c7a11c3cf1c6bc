"""Docs: the generated config reference is current, the README stays short, every relative link resolves
(file and heading)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
MARKDOWN = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])

# [text](target) and ![alt](target); the target ends at whitespace or ')' (an optional "title" follows).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")


def _links(text: str):
    """(line number, target) of every markdown link outside fenced code blocks and inline code."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield number, match.group(1)


# a repository file named in the text (inline code, commands): easytune/..., tests/..., configs/..., ...
REPO_FILE = re.compile(r"(?<![\w./~-])((?:easytune|tests|configs|bench|tpu_setup|launch|docs)/"
                       r"[\w./-]*\w\.(?:py|md|ipynb|sh))\b")


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a markdown page: lower case, punctuation dropped, spaces -> '-',
    repeats numbered ``-1``, ``-2`` ..."""
    seen: dict[str, int] = {}
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
        if in_fence or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        yield slug if not count else f"{slug}-{count}"


def test_config_reference_is_current():
    """docs/reference/config.md equals a fresh `python docs/make_config_reference.py` output."""
    result = subprocess.run([sys.executable, str(REPO / "docs" / "make_config_reference.py"), "--check"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr + result.stdout


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES}, the rest in docs/"


def test_readme_keeps_the_three_commands():
    text = (REPO / "README.md").read_text()
    for command in ("pip install -e '.[test]'", "easytune train configs/quickstart.py", "pytest -q"):
        assert command in text, command


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_relative_links_resolve(path):
    broken = []
    for number, target in _links(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto: ...
        file_part, _, anchor = target.partition("#")
        target_path = (path.parent / file_part) if file_part else path
        if not target_path.exists():
            broken.append(f"{path.relative_to(REPO)}:{number}: {target} (no such file)")
        elif anchor and target_path.suffix == ".md" and anchor not in set(_anchors(target_path.read_text())):
            broken.append(f"{path.relative_to(REPO)}:{number}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_named_repository_files_exist(path):
    """A file the docs name (``easytune/models/llama.py``, ``tests/test_quant.py``, ``bench/throughput.py``) exists,
    so moving a module or a test shows up here."""
    missing = sorted({f"{path.relative_to(REPO)}: {name}" for name in REPO_FILE.findall(path.read_text())
                      if not (REPO / name).exists()})
    assert not missing, "files named in the docs but not in the repository:\n" + "\n".join(missing)
