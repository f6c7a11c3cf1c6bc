"""Readers: provenance, globbing and error messages (easytune/data/sources.py)."""

import json
import os
import re

import pytest

from easytune.data import sources


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_provenance_is_file_and_1_based_line(tmp_path):
    f = _write(tmp_path / "a.jsonl", '{"x": 1}\n\n{"x": 2}\n')
    records = sources.read_records([str(f)])
    assert [r["x"] for r in records] == [1, 2]
    assert [r["_source"] for r in records] == [f"{f}:1", f"{f}:3"]  # blank line 2 skipped, lines kept


def test_json_list_provenance_is_file_and_0_based_index(tmp_path):
    f = _write(tmp_path / "a.json", json.dumps([{"x": 1}, {"x": 2}], indent=2))
    records = sources.read_records(str(f))
    assert [r["_source"] for r in records] == [f"{f}:0", f"{f}:1"]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    # datasets.Dataset.to_json writes JSON Lines under a .json name.
    f = _write(tmp_path / "a.json", '{"x": 1}\n{"x": 2}\n')
    assert [r["_source"] for r in sources.read_records(str(f))] == [f"{f}:1", f"{f}:2"]


def test_text_file_is_one_record(tmp_path, shared_data):
    f = shared_data / "corpus" / "tinystories" / "tinystories_sample.txt"
    [record] = sources.read_records([str(f)])
    assert record["text"] == f.read_text(encoding="utf-8")
    assert record["_source"] == str(f)


def test_glob_expands_sorted_and_keeps_pattern_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        _write(tmp_path / name, f'{{"name": "{name}"}}\n')
    extra = _write(tmp_path / "z.json", '[{"name": "z"}]')
    records = sources.read_records([str(extra), str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl")])
    assert [r["name"] for r in records] == ["z", "a.jsonl", "b.jsonl"]  # duplicate a.jsonl read once


def test_real_alpaca_files(shared_data):
    tiny = sources.read_records([str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")])
    assert len(tiny) == 100 and tiny[0]["instruction"] == "Give three tips for staying healthy."
    c4 = sources.read_records([str(shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl")])
    assert all(isinstance(r["text"], str) for r in c4) and c4[5]["_source"].endswith("c4_demo.jsonl:6")


def test_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.read_records([missing])


def test_glob_without_match_names_the_glob(tmp_path):
    pattern = str(tmp_path / "data-*.jsonl")
    with pytest.raises(FileNotFoundError, match=r"data-\*\.jsonl"):
        sources.read_records([pattern])


def test_directory_without_data_files_is_rejected_with_a_hint(tmp_path):
    (tmp_path / "notes.bin").write_bytes(b"\0")
    with pytest.raises(IsADirectoryError, match=r"without data files.*\*\.jsonl"):
        sources.expand_paths([str(tmp_path)])


def test_directory_reads_its_data_files_sorted(tmp_path):
    _write(tmp_path / "b.jsonl", '{"x": 2}\n')
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "a.html", "<p>hi</p>")
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert [p.name for p in sources.expand_paths(str(tmp_path))] == ["b.jsonl", "a.html"]


def test_invalid_json_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "bad.jsonl", '{"x": 1}\n{"x": 2}\n{"x": 3,}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON at line 3"):
        sources.read_records([str(f)])


def test_invalid_json_file_names_line(tmp_path):
    f = _write(tmp_path / "bad.json", '[\n  {"x": 1},\n  {"x": }\n]\n')
    with pytest.raises(ValueError, match=r"bad\.json:3: invalid JSON at line 3"):
        sources.read_records([str(f)])


def test_non_object_record_names_line_or_index(tmp_path):
    f = _write(tmp_path / "bad.jsonl", '{"x": 1}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record is a JSON array, expected a JSON object"):
        sources.read_records([str(f)])
    g = _write(tmp_path / "bad.json", '[{"x": 1}, "text"]')
    with pytest.raises(ValueError, match=r"bad\.json:1: record 1 \(0-based index in the list\) is a JSON string"):
        sources.read_records([str(g)])


def test_single_conversation_object_is_one_record(tmp_path):
    f = _write(tmp_path / "conv.json", '{"conversations": [{"from": "human", "value": "hi"}]}\n')
    assert sources.read_records(str(f)) == [{"conversations": [{"from": "human", "value": "hi"}],
                                             "_source": f"{f}:0"}]


def test_top_level_object_is_rejected(tmp_path):
    f = _write(tmp_path / "obj.json", '{\n "data": []\n}\n')
    with pytest.raises(ValueError, match=r"obj\.json: top-level JSON is a JSON object, expected a list"):
        sources.read_records([str(f)])


def test_utf8_bom_is_ignored(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + '{"x": "é"}\n'.encode())
    assert sources.read_records([os.fspath(f)])[0]["x"] == "é"


@pytest.mark.parametrize("name, content, line", [
        ("latin1.jsonl", b'{"x": "ok"}\n{"x": "caf\xe9"}\n', 2),
        ("latin1.json", b'[\n  {"x": "ok"},\n  {"x": "caf\xe9"}\n]\n', 3),
        ("latin1.txt", b"line one\nline two\nna\xefve\n", 3),
        ("bom.jsonl", b'\xef\xbb\xbf{"x": 1}\n\n{"x": "\xe9"}\n', 3),  # a BOM does not shift the line count
])
def test_non_utf8_bytes_name_file_and_line(tmp_path, name, content, line):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}:{line}: file is not valid UTF-8: byte 0x"
                                         rf"[0-9a-f]{{2}} at line {line}.*re-encode the file to UTF-8") as info:
        sources.read_records([str(f)])
    assert str(info.value).startswith(f"{f}:{line}: ")


@pytest.mark.parametrize("name, content", [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", ""),
        ("blank.json", "\n\n"),
        ("list.json", "[]\n"),
        ("empty.txt", ""),
        ("blank.txt", " \n\n"),
])
def test_file_without_records_is_named(tmp_path, name, content):
    good = _write(tmp_path / "good.jsonl", '{"x": 1}\n')
    f = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=rf"no records in {re.escape(str(f))}: "):
        sources.read_records([str(good), str(f)])
