"""Every shipped recipe (configs/*.py) loads, validates, and says in its docstring the command that runs it.

A recipe's docstring lists the commands to run from the repo root, e.g. ``easytune convert ... models/X``
before ``easytune train configs/X.py``. The commands that make the recipe's inputs (``easytune convert``,
``easytune tokenizer train``) are run here too, with the ``models/...`` paths they write (and the recipe
reads) moved under a temporary directory; the recipe is then validated from the repo root, where its
``../shared/data/...`` paths point. Recipes that need ../shared/data skip when it is absent.
"""

from __future__ import annotations

import ast
import pathlib
import shlex

import pytest

from easytune import cli, config_check
from easytune import config as config_lib
from tests.conftest import SHARED_DATA

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))
INPUT_COMMANDS = (("convert",), ("tokenizer", "train"))  # commands that write a recipe's inputs under models/
OUTPUT_PREFIX = "models/"


def recipe_docstring(path: pathlib.Path) -> str:
    """The recipe's docstring: its module docstring, else the docstring of its ``get_config()``."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    func = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"), None)
    return doc or (ast.get_docstring(func) if func else "") or ""


def docstring_commands(doc: str) -> list[list[str]]:
    """The ``easytune ...`` command lines in ``doc`` (backslash continuations joined), as argv lists."""
    lines, joined = doc.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1].rstrip() + " " + lines[i].strip()
        if line.startswith("easytune "):
            joined.append(shlex.split(line)[1:])
        i += 1
    return joined


def _strings(config, prefix=""):
    """(dotted key, value) of every string value, and of every string inside a list value."""
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _strings(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            yield f"{prefix}{key}", value
        elif isinstance(value, (list, tuple)):
            yield from ((f"{prefix}{key}", v) for v in value if isinstance(v, str))


@pytest.fixture(scope="session")
def made_inputs(tmp_path_factory):
    """Runs a docstring's input-making command once per session; maps the command to its output root."""
    root = tmp_path_factory.mktemp("recipe_inputs")
    done: dict[tuple[str, ...], pathlib.Path] = {}

    def run(argv: list[str]) -> pathlib.Path:
        key = tuple(argv)
        if key not in done:
            moved = [str(root / a) if a.startswith(OUTPUT_PREFIX) else a for a in argv]
            assert cli.main(moved) == 0, f"`easytune {shlex.join(argv)}` failed"
            done[key] = root
        return done[key]

    return run


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_docstring_names_the_command(path):
    doc = recipe_docstring(path)
    assert doc, f"{path.name}: get_config() (or the module) needs a docstring saying what the recipe is for"
    assert f"easytune train configs/{path.name}" in doc, f"{path.name}: the docstring gives the command to run it"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_validates(path, made_inputs, monkeypatch):
    config = config_lib.load_config(path)
    assert config.method in config_lib.METHODS
    commands = [argv for argv in docstring_commands(recipe_docstring(path))
                if any(tuple(argv[:len(c)]) == c for c in INPUT_COMMANDS)]
    needs_shared = any("../shared/data" in value for _, value in _strings(config)) or any(
        "../shared/data" in arg for argv in commands for arg in argv)
    if needs_shared and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, not found at {SHARED_DATA}")
    monkeypatch.chdir(REPO)  # recipes are run from the repo root (their ../shared/data paths are relative to it)
    root = None
    for argv in commands:
        root = made_inputs(argv)
    for key in ("model.path", "tokenizer.path"):  # where the docstring's commands write (models/...)
        value = config[key.split(".")[0]][key.split(".")[1]]
        if value.startswith(OUTPUT_PREFIX):
            assert root is not None, (f"{path.name}: {key}={value!r} is made by no `easytune convert` / "
                                      f"`easytune tokenizer train` command in the docstring")
            config_lib.apply_overrides(config, [f"{key}={root / value}"])
    config_check.validate(config)
