"""Streaming readers (sources.iter_records / iter_file / iter_jsonl, raw.iter_parquet, files.iter_lines).

Reference: the whole-file readers (``sources.read_jsonl``, ``read_json``, ``read_text``, ``raw.read_parquet``,
``raw.read_html`` / ``read_csv`` / ``read_sql`` / ``read_with_datasets``), which read a file into memory at once;
the streamed records must equal theirs, in order, ``_source`` included, and every error message must be theirs.
"""

import gzip
import io
import json
import os
import random
import tracemalloc

import pytest

from easytune.data import files, raw, sources


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _gzip(path, data: bytes):
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(data)
    return path


def _reference(path, options=None) -> list[dict]:
    """The records the whole-file readers give (the list-based ``read_file`` before streaming; a ``.jsonl.gz``
    read as the JSON Lines it holds)."""
    options = options or sources.ReadOptions()
    path = os.fspath(path)
    name = path.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        text = files.decode_utf8(gzip.open(path).read(), path)
        return files.map_columns(sources.read_jsonl(path, text), options.columns)
    if name.endswith((".txt.gz", ".md.gz")):
        return [{"text": gzip.open(path).read().decode("utf-8-sig"), "_source": path}]
    suffix = os.path.splitext(name)[1]
    if suffix in (".jsonl", ".ndjson"):
        return files.map_columns(sources.read_jsonl(path), options.columns)
    if suffix == ".json":
        return files.map_columns(sources.read_json(path), options.columns)
    if suffix in (".html", ".htm"):
        return raw.read_html(path, options.html_selector)
    if suffix in (".csv", ".tsv"):
        return raw.read_csv(path, options.columns, delimiter="," if suffix == ".csv" else "\t")
    if suffix == ".sql":
        return raw.read_sql(path, options.sql_table, options.columns)
    if suffix == ".parquet":
        return raw.read_parquet(path, options.columns)
    if suffix == ".arrow":
        return raw.read_with_datasets(path, "arrow", options.columns)
    return sources.read_text(path)


def _error(fn):
    try:
        fn()
    except (ValueError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------ same records as before


@pytest.fixture
def every_kind(tmp_path):
    """One small file of every reader kind."""
    import pandas as pd
    import pyarrow as pa
    rows = [{"q": "a", "n": 1.0}, {"q": "b", "n": float("nan")}, {"q": "c\u00e9", "n": 3.0}]
    jsonl = "\n".join(json.dumps(r if r["n"] == r["n"] else {"q": r["q"], "n": None}) for r in rows) + "\n"
    out = [
        _write(tmp_path / "a.jsonl", '{"q": "x"}\r\n\r\n{"q": "y", "n": [1, 2]}\r{"q": "z"}'),  # CRLF, lone CR, no \n
        _write(tmp_path / "b.ndjson", "\n" + jsonl),
        _write(tmp_path / "c.json", json.dumps(rows[:1] + rows[2:], indent=1)),
        _write(tmp_path / "d.json", jsonl),  # JSON Lines under a .json name
        _write(tmp_path / "e.txt", "line one\nline two\n"),
        _write(tmp_path / "f.md", "# Title\n\nbody\n"),
        _write(tmp_path / "g.html", "<html><title>T</title><body><p>one</p><p>two</p></body></html>"),
        _write(tmp_path / "h.csv", "q,n\na,1\n\"b, c\",2\n"),
        _write(tmp_path / "i.tsv", "q\tn\na\t1\n"),
        _write(tmp_path / "j.sql", "CREATE TABLE t (q TEXT, n INT);\nINSERT INTO t VALUES ('a', 1), ('b''s', 2);\n"),
        _gzip(tmp_path / "k.jsonl.gz", b'\xef\xbb\xbf{"q": "x"}\n\n' + jsonl.encode()),
        _gzip(tmp_path / "l.json.gz", jsonl.encode()),
        _gzip(tmp_path / "m.txt.gz", "gz text\nline two\n".encode()),
        _gzip(tmp_path / "n.md.gz", "# gz markdown\n".encode()),
    ]
    df = pd.DataFrame(rows, index=[7, 8, 9])  # a non-default index: stored as a column, restored by pandas
    df.to_parquet(tmp_path / "o.parquet", row_group_size=2)
    out.append(tmp_path / "o.parquet")
    table = pa.table({"q": ["a", "b"], "n": [1, 2]})
    with pa.ipc.new_stream(str(tmp_path / "p.arrow"), table.schema) as writer:
        writer.write_table(table)
    out.append(tmp_path / "p.arrow")
    return out


def test_every_kind_streams_the_records_of_the_whole_file_readers(every_kind):
    for path in every_kind:
        streamed = list(sources.iter_records(str(path)))
        assert streamed == _reference(path), path.name
        assert streamed == sources.read_file(path) == sources.read_records([path]), path.name
    everything = list(sources.iter_records([str(p) for p in every_kind]))
    assert everything == [r for p in every_kind for r in _reference(p)]
    assert len(everything) == 33


def test_columns_map_while_streaming(tmp_path, every_kind):
    options = sources.ReadOptions(columns={"instruction": "q"})
    for path in [p for p in every_kind if p.suffix in (".jsonl", ".parquet", ".gz") and "txt" not in p.name
                 and "md" not in p.name]:
        assert list(sources.iter_records(path, options)) == _reference(path, options), path.name
    f = _write(tmp_path / "cols.jsonl", '{"q": 1}\n{"other": 2}\n')
    expected = _error(lambda: files.map_columns(sources.read_jsonl(f), options.columns))
    assert expected.startswith(f"ValueError: {f}:2: no column 'q' (available: other)")
    assert _error(lambda: list(sources.iter_records(f, options))) == expected


def test_compressed_jsonl_source_is_the_line(tmp_path):
    """Before streaming, .jsonl.gz went through datasets with ``path:row N``; now ``path:LINE`` as for .jsonl."""
    f = _gzip(tmp_path / "d.jsonl.gz", b'{"text": "x"}\n\n{"text": "y"}\n')
    assert list(sources.iter_records(f)) == [{"text": "x", "_source": f"{f}:1"}, {"text": "y", "_source": f"{f}:3"}]
    old = raw.read_with_datasets(f, "json")  # the old reader: same fields, row i <-> i-th record
    assert [{k: v for k, v in r.items() if k != "_source"} for r in old] == [{"text": "x"}, {"text": "y"}]


def test_compressed_json_list_falls_back_to_datasets(tmp_path):
    f = _gzip(tmp_path / "list.json.gz", b'  [{"text": "x"},\n {"text": "y"}]\n')
    assert list(sources.iter_records(f)) == raw.read_with_datasets(f, "json") == [
            {"text": "x", "_source": f"{f}:row 0"}, {"text": "y", "_source": f"{f}:row 1"}]


def test_parquet_batches_equal_pandas(tmp_path):
    import pandas as pd
    df = pd.DataFrame({"text": [f"row {i}" for i in range(2500)], "x": [i if i % 7 else None for i in range(2500)]})
    df.to_parquet(tmp_path / "t.parquet", row_group_size=600)
    ref = raw.read_parquet(tmp_path / "t.parquet")
    assert ref[7]["x"] is None and ref[2499]["_source"] == f"{tmp_path / 't.parquet'}:row 2499"
    for batch_size in (1, 97, 1024, 10_000):
        assert list(raw.iter_parquet(tmp_path / "t.parquet", batch_size=batch_size)) == ref


def test_parquet_errors_equal_pandas(tmp_path):
    import pandas as pd
    pd.DataFrame({"a": ["x"]}).to_parquet(tmp_path / "t.parquet")
    pd.DataFrame({"a": pd.Series([], dtype=str)}).to_parquet(tmp_path / "empty.parquet")
    _write(tmp_path / "bad.parquet", "not parquet")
    for name, columns in (("t.parquet", {"text": "b"}), ("empty.parquet", None), ("bad.parquet", None)):
        path = tmp_path / name
        expected = _error(lambda: raw.read_parquet(path, columns))
        assert expected is not None and str(path) in expected
        if name == "bad.parquet":  # pyarrow's own words differ between the two calls; the form is the same
            assert _error(lambda: list(raw.iter_parquet(path, columns))).startswith(
                    f"ValueError: {path}: cannot read Parquet (")
        else:
            assert _error(lambda: list(raw.iter_parquet(path, columns))) == expected


def test_real_files_stream_as_before(tmp_path, shared_data):
    import pandas as pd
    paths = sorted(p for d in ("instruct", "corpus", "raw") for p in (shared_data / d).rglob("*")
                   if p.is_file() and p.suffix != ".md")
    assert len(paths) >= 15
    for path in paths:
        expected = _error(lambda: _reference(path))
        if expected is None:
            assert list(sources.iter_records(path)) == _reference(path), path
        else:
            assert _error(lambda: list(sources.iter_records(path))) == expected, path
    c4 = shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl"
    gz = _gzip(tmp_path / "c4_demo.jsonl.gz", c4.read_bytes())
    assert [{**r, "_source": r["_source"].replace(str(gz), str(c4))} for r in sources.iter_records(gz)] == \
        sources.read_jsonl(c4)
    alpaca = shared_data / "instruct" / "llama_factory" / "alpaca_en_demo.json"
    pd.DataFrame(sources.read_json(alpaca)).drop(columns="_source").to_parquet(tmp_path / "alpaca.parquet",
                                                                               row_group_size=100)
    assert list(sources.iter_records(tmp_path / "alpaca.parquet")) == raw.read_parquet(tmp_path / "alpaca.parquet")


def test_folder_mixing_text_jsonl_parquet_and_gzip(tmp_path):
    import pandas as pd
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    _write(d / "a.txt", "plain text\n")
    _write(d / "b.jsonl", '{"text": "jsonl"}\n')
    pd.DataFrame({"text": ["parquet"]}).to_parquet(d / "c.parquet")
    _gzip(d / "sub" / "d.txt.gz", b"gz text\n")
    _gzip(d / "sub" / "e.jsonl.gz", b'{"text": "gz jsonl"}\n')
    _gzip(d / "sub" / "f.md.gz", b"gz markdown\n")
    _gzip(d / "sub" / "g.json.gz", b'{"text": "gz json"}\n')
    (d / "skip.bin").write_bytes(b"\0")
    paths = sources.expand_paths(str(d))
    assert [p.name for p in paths] == ["a.txt", "b.jsonl", "c.parquet", "d.txt.gz", "e.jsonl.gz", "f.md.gz",
                                       "g.json.gz"]
    records = list(sources.iter_records(str(d)))
    assert records == [r for p in paths for r in _reference(p)]
    assert [r["text"] for r in records] == ["plain text\n", "jsonl", "parquet", "gz text\n", "gz jsonl",
                                            "gz markdown\n", "gz json"]
    assert records[3]["_source"] == str(d / "sub" / "d.txt.gz")


def test_missing_file_raises_on_the_call(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.iter_records([str(tmp_path / "nope.jsonl")], on_bad=lambda *a: None)


# ------------------------------------------------------------------------------------ errors and on_bad


@pytest.mark.parametrize("content", [
        b'{"x": 1}\n{"x": 2}\n{"x": 3,}\n',
        b'{"x": 1}\n["not", "an", "object"]\n',
        b'{"x": 1}\n"text"\n',
        b'{"x": "ok"}\n{"x": "caf\xe9"}\n',
        b'\xef\xbb\xbf{"x": "caf\xe9"}\n',  # bad byte on the BOM's line: same byte column
        b'{"x": 1}\n\r\n{"x": "\xc3',  # truncated at the end of the file
        b'{"x": 1}\r\xc2\x85{"x": \n',  # splitlines separators (U+0085) count as lines
        b"", b"\xef\xbb\xbf", b"\n \n\t\n",
])
@pytest.mark.parametrize("compressed", [False, True])
def test_errors_are_the_whole_file_readers(tmp_path, content, compressed):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    expected = _error(lambda: sources.read_jsonl(f))
    assert expected is not None
    if compressed:
        f = _gzip(tmp_path / "bad.jsonl.gz", content)
        expected = expected.replace(str(tmp_path / "bad.jsonl"), str(f)).replace("fixed.jsonl", "fixed.gz")
    assert _error(lambda: list(sources.iter_records(f))) == expected
    assert _error(lambda: sources.read_records(f)) == expected


def test_iter_lines_numbers_lines_as_splitlines(tmp_path):
    f = tmp_path / "lines.txt"
    f.write_bytes("\ufeffa\r\nb\rc\x0bd\x0ce\x1cf\x85g\u2028h\n\ni".encode())
    text = files.read_utf8(f)
    assert list(files.iter_lines(f)) == list(enumerate(text.splitlines(), start=1))
    assert list(files.iter_lines(_gzip(tmp_path / "lines.gz", f.read_bytes()), compressed=True)) == \
        list(enumerate(text.splitlines(), start=1))


def test_on_bad_gets_the_bad_lines_and_they_are_skipped(tmp_path):
    lines = [b'{"x": 1}', b'{"x": 2,}', b'[1, 2]', b'{"x": "caf\xe9"}', b"", b'{"x": 5}']
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    bad = []
    records = list(sources.iter_records(f, on_bad=lambda where, message: bad.append((where, message))))
    assert records == [{"x": 1, "_source": f"{f}:1"}, {"x": 5, "_source": f"{f}:6"}]
    assert [where for where, _ in bad] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    for (where, message), line in zip(bad, lines[1:4]):  # each message is the one the ValueError carries
        lineno = int(where.rsplit(":", 1)[1])
        alone = tmp_path / f"alone{lineno}.jsonl"
        alone.write_bytes(b"\n" * (lineno - 1) + line + b"\n")
        assert message == _error(lambda: list(sources.iter_records(alone))).split(": ", 1)[1].replace(
                str(alone), str(f))
    assert bad[0][1] == f"{f}:2: invalid JSON at line 2, column 9: Expecting property name enclosed in double quotes"
    gz = _gzip(tmp_path / "mixed.jsonl.gz", f.read_bytes())
    gz_bad = []
    assert [r["x"] for r in sources.iter_records(gz, on_bad=lambda *a: gz_bad.append(a))] == [1, 5]
    assert gz_bad == [(w.replace(str(f), str(gz)), m.replace(str(f), str(gz)).replace("fixed.jsonl", "fixed.gz"))
                      for w, m in bad]


def test_on_bad_keeps_file_level_errors(tmp_path):
    f = tmp_path / "allbad.jsonl"
    f.write_bytes(b'{"x": \n[1]\n')
    bad = []
    with pytest.raises(ValueError, match=r"no records in .*allbad\.jsonl: no valid line \(2 bad lines skipped\)"):
        list(sources.iter_records(f, on_bad=lambda *a: bad.append(a)))
    assert len(bad) == 2
    empty = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match=r"no records in .*empty\.jsonl: the file is empty"):
        list(sources.iter_records(empty, on_bad=lambda *a: None))
    notgz = _write(tmp_path / "not.jsonl.gz", '{"x": 1}\n')
    with pytest.raises(ValueError, match=r"not\.jsonl\.gz: cannot read the gzip file \(BadGzipFile"):
        list(sources.iter_records(notgz, on_bad=lambda *a: None))


# ------------------------------------------------------------------------------------ memory


def _big_jsonl(path, megabytes: int):
    """~``megabytes`` MB of 1 kB JSON lines, random hex text (so gzip cannot shrink it much)."""
    rng = random.Random(0)
    block = "".join(json.dumps({"text": rng.randbytes(500).hex()}) + "\n" for _ in range(1000)).encode()
    with open(path, "wb") as fh:
        for _ in range(megabytes * 2**20 // len(block) + 1):
            fh.write(block)
    return path


class _CountingReader(io.FileIO):
    """A raw file that counts the bytes read from it."""
    read_total = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        type(self).read_total += n or 0
        return n


def test_first_record_arrives_before_the_file_is_read(tmp_path, monkeypatch):
    f = _big_jsonl(tmp_path / "big.jsonl", 50)
    gz = _gzip(tmp_path / "big.jsonl.gz", f.read_bytes()[:10 * 2**20])
    monkeypatch.setattr(files, "open_binary", lambda path: io.BufferedReader(_CountingReader(path)))
    for path in (f, gz):
        _CountingReader.read_total = 0
        records = sources.iter_records(path)
        assert next(records)["_source"] == f"{path}:1"
        assert 0 < _CountingReader.read_total < 2**20 < os.path.getsize(path) // 2
        records.close()


def test_memory_stays_bounded_while_iterating_50_mb(tmp_path):
    f = _big_jsonl(tmp_path / "big.jsonl", 50)
    assert os.path.getsize(f) > 50 * 2**20
    tracemalloc.start()
    try:
        n = sum(1 for _ in sources.iter_records(f))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == os.path.getsize(f) // len(f.open().readline())
    assert peak < 5 * 2**20, f"peak {peak / 2**20:.1f} MiB while streaming a {os.path.getsize(f) / 2**20:.0f} MiB file"


def test_parquet_holds_one_row_group(tmp_path):
    import pandas as pd
    import pyarrow as pa
    pd.DataFrame({"text": [f"{i:08d}" + "x" * 2000 for i in range(10_000)]}).to_parquet(
            tmp_path / "big.parquet", row_group_size=500, compression="none")
    before = pa.total_allocated_bytes()
    records = raw.iter_parquet(tmp_path / "big.parquet", batch_size=100)
    assert next(records)["text"].startswith("00000000")
    assert pa.total_allocated_bytes() - before < 4 * 2**20  # the file's text is 20 MB; a row group 1 MB
    assert sum(1 for _ in records) == 9_999
