"""The "Your data, format by format" section of docs/guide/data.md: every ``easytune prepare
configs/your_data.py ...`` command it shows runs on its example file in docs/examples/data, and trains what the
section says (stories260K's tokenizer, converted from the shared GGUF).

References: the example files themselves, read here with ``json`` / ``csv`` (the record count, the text of each
assistant turn or output, the labels of the pretokenized file), never easytune's own readers.
"""

from __future__ import annotations

import csv
import json
import pathlib
import re
import shlex

import numpy as np
import pytest

from easytune import cli
from easytune import config as config_lib
from easytune.data import prepare

REPO = pathlib.Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "guide" / "data.md"
EXAMPLES = REPO / "docs" / "examples" / "data"


def doc_commands() -> list[list[str]]:
    """The ``easytune prepare configs/your_data.py ...`` commands of data.md, as argument lists after the config."""
    out = []
    for line in DOC.read_text().splitlines():
        if line.startswith("easytune prepare configs/your_data.py"):
            out.append(shlex.split(line)[3:])
    return out


def _file_of(args: list[str]) -> str:
    files = [a.split("=", 1)[1] for a in args if a.startswith("--config.data.train_files=")]
    return pathlib.Path(files[0]).name if files else "alpaca.jsonl"


@pytest.fixture(scope="module")
def stories_dir(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("stories260K")
    assert cli.main(["convert", str(shared_data / "models" / "stories260K" / "stories260K.gguf"), str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    from easytune.tokenizer import load_tokenizer
    return load_tokenizer(stories_dir)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _trained_and_masked(train, tok) -> tuple[str, str]:
    """Decoded text of the supervised target tokens and of the unsupervised ones (whitespace removed)."""
    tgt, mask = np.asarray(train["target_ids"]), np.asarray(train["loss_mask"]) > 0
    valid = tgt >= 0
    trained = " ".join(tok.decode(row[m]) for row, m in zip(tgt, mask))
    masked = " ".join(tok.decode(row[(~m) & v]) for row, m, v in zip(tgt, mask, valid))
    return _squash(trained), _squash(masked)


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _text_of(content) -> str:
    return content if isinstance(content, str) else "\n".join(p["text"] for p in content)


def _expect(name: str) -> tuple[int, list[str], list[str]]:
    """(examples, texts that must be trained, texts that must not be), from the file itself."""
    if name == "alpaca.jsonl":
        recs = _jsonl(name)
        return len(recs), [r["output"] for r in recs], [r["instruction"] for r in recs]
    if name in ("sharegpt.jsonl", "messages.jsonl", "tools_sharegpt.jsonl", "tools_openai.jsonl"):
        recs = _jsonl(name)
        trained, untrained = [], []
        for r in recs:
            for m in r.get("messages") or r.get("conversations"):
                role = m.get("role") or m.get("from")
                text = _text_of(m.get("content", m.get("value")))
                if role in ("assistant", "gpt") and text:
                    trained.append(text)
                elif role in ("user", "human", "tool", "observation") and text:
                    untrained.append(text)
                if role == "function_call":
                    call = json.loads(text)
                    trained += [call["name"], *map(str, call["arguments"].values())]
                for c in m.get("tool_calls", []):
                    trained += [c["function"]["name"], *map(str, c["function"]["arguments"].values())]
            if "tools" in r:  # the tool descriptions are part of the prompt
                tools = json.loads(r["tools"]) if isinstance(r["tools"], str) else r["tools"]
                untrained += [(t.get("function") or t)["description"] for t in tools]
        return len(recs), trained, untrained
    if name == "completion.jsonl":
        recs = _jsonl(name)
        return len(recs), [r["text"] for r in recs], []
    if name == "notes.txt":
        return 1, [(EXAMPLES / name).read_text().split("\n\n")[1]], []
    if name == "table.csv":
        with open(EXAMPLES / name, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return len(rows), [r["answer"] for r in rows], [r["question"] for r in rows]
    if name == "dump.sql":
        return 3, ["Yesterday by Paul McCartney", "Imagine by John Lennon", "Don't Stop Me Now by Freddie Mercury"], []
    if name == "pretokenized.jsonl":  # checked token by token below
        return len(_jsonl(name)), [], []
    if name == "page.html":
        return 1, ["Reading a file in Python", "print(line.rstrip())"], []
    raise AssertionError(f"no expectation for {name}")


def test_every_example_file_has_a_command():
    names = {_file_of(a) for a in doc_commands()}
    assert names == {p.name for p in EXAMPLES.iterdir()}, "docs/examples/data files without a data.md command"


@pytest.mark.parametrize("args", doc_commands(), ids=_file_of)
def test_doc_command_trains_what_it_says(args, stories_dir, stories_tok, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = config_lib.load_config(REPO / "configs" / "your_data.py")
    config_lib.apply_overrides(config, [a for a in args if a.startswith("--config.")]
                               + [f"--config.model.path={stories_dir}"])
    name = _file_of(args)
    train, _, report = prepare.prepare_dataset(config.data, stories_tok)
    n, trained, untrained = _expect(name)
    assert report["examples"] == n, report
    got_trained, got_masked = _trained_and_masked(train, stories_tok)
    for text in trained:
        assert _squash(text) in got_trained, (name, text)
    for text in untrained:
        assert _squash(text) not in got_trained and _squash(text) in got_masked, (name, text)
    if name == "pretokenized.jsonl":  # labels -100 are masked, the others are the next-token targets
        want = [[t for t in r["labels"][1:] if t != -100] for r in _jsonl(name)]
        tgt, mask = np.asarray(train["target_ids"]), np.asarray(train["loss_mask"]) > 0
        assert sorted(row[m].tolist() for row, m in zip(tgt, mask)) == sorted(want)
