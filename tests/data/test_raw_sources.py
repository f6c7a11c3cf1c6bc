"""Raw sources: HTML (BeautifulSoup), CSV/TSV (pandas), SQL dumps (sqlparse), Parquet and ``datasets`` files.

References: the SQL rows are checked against SQLite itself (``sqlite3`` executes the Chinook dump); CSV rows
against Python's ``csv`` module; HTML against hand-written pages whose visible text is known.
"""

import csv
import gzip
import json
import os
import sqlite3

import pytest

from easytune.data import sources


def _write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# ------------------------------------------------------------------------------------ HTML

PAGE = """<!doctype html><html><head><title>T</title><style>p {color: red}</style>
<script>var x = "script text";</script></head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<header>Site header</header>
<div class="navbox">Navigation box</div>
<main><h1>Heading</h1><p>First <b>bold</b>   paragraph<sup class="reference">[1]</sup>
 continues.</p><ul><li>one</li><li>two</li></ul><p hidden>hidden text</p>
<span style="display: none">invisible</span><p>Last<br>line: 10<sup>6</sup></p><!-- a comment --></main>
<footer>Copyright footer</footer></body></html>"""


def test_html_keeps_visible_text_with_one_line_per_block(tmp_path):
    f = _write(tmp_path / "page.html", PAGE)
    [record] = sources.read_records(str(f))
    assert record == {"text": "Heading\nFirst bold paragraph continues.\none\ntwo\nLast\nline: 106", "title": "T",
                      "_source": str(f)}


def test_html_selector_chooses_the_content(tmp_path):
    f = _write(tmp_path / "page.html", PAGE)
    opts = sources.ReadOptions(html_selector="li")
    assert sources.read_records(str(f), opts)[0]["text"] == "one\ntwo"
    with pytest.raises(ValueError, match=r"page\.html: data\.html_selector '#nope' matches no element"):
        sources.read_records(str(f), sources.ReadOptions(html_selector="#nope"))


def test_html_folder_reads_every_page(tmp_path):
    _write(tmp_path / "a.html", "<body><p>A</p></body>")
    _write(tmp_path / "b.htm", "<body><p>B</p></body>")
    assert [r["text"] for r in sources.read_records(str(tmp_path))] == ["A", "B"]


def test_html_without_visible_text_is_named(tmp_path):
    f = _write(tmp_path / "empty.html", "<html><body><script>x()</script><nav>menu</nav></body></html>")
    with pytest.raises(ValueError, match=r"no records in .*empty\.html: the page has no visible text"):
        sources.read_records(str(f))


def test_real_wikipedia_pages(shared_data):
    d = shared_data / "raw" / "html"
    opts = sources.ReadOptions(html_selector="#mw-content-text")
    herm, moz = sorted(sources.read_records(str(d), opts), key=lambda r: r["title"])
    assert moz["title"] == "Mozilla - Wikipedia" and herm["title"] == "Hermitian matrix - Wikipedia"
    text = moz["text"]
    assert "Mozilla is a free-software community, created in 1998 by members of Netscape." in text
    for boiler in ("Jump to navigation", "[edit]", "function(", "From Wikipedia, the free", "Privacy policy"):
        assert boiler not in text, boiler
    # each paragraph on its own line, no run of spaces inside a line
    assert "\nHistory\n" in text and "  " not in text
    # the TeX of Wikipedia's formulas is kept from the images' alt text
    assert r"{\displaystyle A^{\mathsf {H}}}" in herm["text"]


# ------------------------------------------------------------------------------------ CSV / TSV


def test_csv_columns_map_to_fields_and_rows_are_named(tmp_path):
    f = tmp_path / "qa.csv"
    f.write_bytes("\ufeffQuestion,Best Answer,Other\nWhat?,\"That, with a comma\",x\nWhy?,\"Line one\nline two\",\n"
                  .encode("utf-8"))
    records = sources.read_records(str(f), sources.ReadOptions(columns=sources.parse_columns(
            "instruction=Question, output=Best Answer")))
    assert records == [
            {"instruction": "What?", "output": "That, with a comma", "_source": f"{f}:row 1"},
            {"instruction": "Why?", "output": "Line one\nline two", "_source": f"{f}:row 2"}]
    # without a mapping every column is kept, the BOM is not part of the first name, empty cells are ""
    assert sources.read_records(str(f))[1] == {"Question": "Why?", "Best Answer": "Line one\nline two", "Other": "",
                                               "_source": f"{f}:row 2"}


def test_csv_missing_column_lists_the_available_ones(tmp_path):
    f = _write(tmp_path / "qa.csv", "Question,Answer\nq,a\n")
    with pytest.raises(ValueError, match=r"qa\.csv: no column 'Best Answer' \(available: Question, Answer\)"):
        sources.read_records(str(f), sources.ReadOptions(columns={"output": "Best Answer"}))


def test_tsv_and_latin1_encoding(tmp_path):
    f = tmp_path / "data.tsv"
    f.write_bytes("name\ttext\nb\u00e9\tcaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data\.tsv: not valid utf-8 .*data\.csv_encoding"):
        sources.read_records(str(f))
    [r] = sources.read_records(str(f), sources.ReadOptions(csv_encoding="latin-1"))
    assert r == {"name": "b\u00e9", "text": "caf\u00e9", "_source": f"{f}:row 1"}


def test_real_truthfulqa_csv_matches_python_csv(shared_data):
    f = shared_data / "raw" / "csv" / "TruthfulQA.csv"
    with open(f, encoding="utf-8-sig", newline="") as fh:
        ref = list(csv.DictReader(fh))
    records = sources.read_records(str(f), sources.ReadOptions(columns={"instruction": "Question",
                                                                        "output": "Best Answer"}))
    assert len(records) == len(ref) == 817
    assert [(r["instruction"], r["output"]) for r in records] == [(x["Question"], x["Best Answer"]) for x in ref]


# ------------------------------------------------------------------------------------ SQL

DUMP = """-- a MySQL-style dump
CREATE TABLE `notes` (
  `id` int NOT NULL,
  `title` varchar(80),
  `body` text,
  PRIMARY KEY (`id`)
);
/* rows */
INSERT INTO `notes` VALUES (1,'It''s here','a\\nb'),
  (2, 'semi; colon', NULL),
  (3,'back\\\\slash \\'q\\'', 'x');
INSERT INTO other (k) VALUES ('v');
"""


def test_sql_multirow_insert_with_escapes_and_create_table_columns(tmp_path):
    f = _write(tmp_path / "dump.sql", DUMP)
    records = sources.read_records(str(f), sources.ReadOptions(sql_table="notes"))
    assert records == [
            {"id": 1, "title": "It's here", "body": "a\nb", "_source": f"{f}:9"},
            {"id": 2, "title": "semi; colon", "body": None, "_source": f"{f}:10"},
            {"id": 3, "title": "back\\slash 'q'", "body": "x", "_source": f"{f}:11"}]
    mapped = sources.read_records(str(f), sources.ReadOptions(sql_table="notes", columns={"text": "title"}))
    assert [r["text"] for r in mapped] == ["It's here", "semi; colon", "back\\slash 'q'"]


def test_sql_errors_name_file_and_table(tmp_path):
    f = _write(tmp_path / "dump.sql", DUMP)
    with pytest.raises(ValueError, match=r"dump\.sql: several tables have INSERT rows \(notes, other\); "
                                         r"choose one with data\.sql_table"):
        sources.read_records(str(f))
    with pytest.raises(ValueError, match=r"dump\.sql: no INSERT rows for table 'users' \(data\.sql_table\); "
                                         r"tables with INSERT rows: notes, other"):
        sources.read_records(str(f), sources.ReadOptions(sql_table="users"))
    with pytest.raises(ValueError, match=r"dump\.sql: table 'notes' has no column 'text' "
                                         r"\(available: id, title, body\)"):
        sources.read_records(str(f), sources.ReadOptions(sql_table="notes", columns={"x": "text"}))
    g = _write(tmp_path / "schema.sql", "CREATE TABLE t (a int);\n")
    with pytest.raises(ValueError, match=r"schema\.sql: no INSERT \.\.\. VALUES statement"):
        sources.read_records(str(g))
    h = _write(tmp_path / "bad.sql", "INSERT INTO t (a, b) VALUES\n (1, 'x'),\n (2);\n")
    with pytest.raises(ValueError, match=r"bad\.sql:3: row has 1 values but table t has 2 columns"):
        sources.read_records(str(h))


@pytest.fixture(scope="module")
def chinook_tracks(shared_data):
    return sources.read_records(str(shared_data / "raw" / "sql" / "Chinook_Sqlite.sql"),
                                sources.ReadOptions(sql_table="Track"))


def test_real_chinook_rows_equal_sqlite(shared_data, chinook_tracks):
    """SQLite executes the same dump; every Track row must come out identical, NULLs and quotes included."""
    db = sqlite3.connect(":memory:")
    db.executescript((shared_data / "raw" / "sql" / "Chinook_Sqlite.sql").read_text(encoding="utf-8"))
    cur = db.execute("SELECT * FROM Track ORDER BY TrackId")
    names = [d[0] for d in cur.description]
    ref = [dict(zip(names, row)) for row in cur.fetchall()]
    assert len(chinook_tracks) == len(ref) == 3503
    assert [{k: v for k, v in r.items() if k != "_source"} for r in chinook_tracks] == ref
    first = chinook_tracks[0]["_source"]
    assert first.endswith("Chinook_Sqlite.sql:909")  # the line of the first tuple (the INSERT is on 908)
    lines = (shared_data / "raw" / "sql" / "Chinook_Sqlite.sql").read_text(encoding="utf-8").splitlines()
    line = int(chinook_tracks[2000]["_source"].rsplit(":", 1)[1])
    assert lines[line - 1].lstrip().startswith(f"({chinook_tracks[2000]['TrackId']},")


# ------------------------------------------------------------------------------------ Parquet / datasets


def test_parquet_and_compressed_jsonl(tmp_path):
    import pandas as pd
    pd.DataFrame({"q": ["a", "b"], "n": [1.0, float("nan")]}).to_parquet(tmp_path / "t.parquet")
    records = sources.read_records(str(tmp_path / "t.parquet"), sources.ReadOptions(columns={"text": "q"}))
    assert records == [{"text": "a", "_source": f"{tmp_path / 't.parquet'}:row 0"},
                       {"text": "b", "_source": f"{tmp_path / 't.parquet'}:row 1"}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert [r["text"] for r in sources.read_records(str(tmp_path / "d.jsonl.gz"))] == ["x", "y"]


def test_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch):
    f = _write(tmp_path / "secret.jsonl", '{"x": 1}\n')
    if os.geteuid() != 0:
        f.chmod(0)
    else:  # root reads anything: simulate the permission error (whole-file reads and streamed opens)
        import pathlib
        real, real_open = pathlib.Path.read_bytes, pathlib.Path.open
        monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (_ for _ in ()).throw(
                PermissionError(13, "Permission denied")) if self.name == "secret.jsonl" else real(self))
        monkeypatch.setattr(pathlib.Path, "open", lambda self, *a, **k: (_ for _ in ()).throw(
                PermissionError(13, "Permission denied")) if self.name == "secret.jsonl" else real_open(self, *a, **k))
    with pytest.raises(ValueError, match=r"secret\.jsonl: cannot read the file \(Permission denied\)") as info:
        sources.read_records(str(f))
    assert "\n" not in str(info.value)
