"""Page furniture removal (easytune/data/clean.py ``remove_furniture``): running headers and footers of a paged
document go, body text stays.

Reference: each synthetic document is built twice from the same pages, with and without its header and footer
lines; the cleaned text must equal the version built without them, line for line.
"""

import json

import pytest

from easytune.data import clean, raw, sources

HEADER = "RFC 2616                        HTTP/1.1                       June 1999"
FOOTER = "Fielding, et al.            Standards Track                   [Page {n}]"
TWICE = "   Status-Line = HTTP-Version SP Status-Code SP Reason-Phrase CRLF"  # a body line on two pages
HALF = "   The following rules are used throughout this specification."  # a body line on half the pages (not
# alternating: a line on every other page is an alternating running head, see test_alternating_running_heads)


TOPICS = ["Introduction", "Notational Conventions", "Protocol Parameters", "HTTP Message", "Request", "Response",
          "Entity", "Connections"]


def _body(n: int) -> list[str]:
    # body lines differ between pages by their words (lines differing only in numbers compare equal)
    topic = TOPICS[n - 1]
    lines = [f"{n}.  {topic}", "", f"   The {topic.lower()} part of this document covers the {topic.lower()}.",
             f"   It continues over a few more lines about the {topic.lower()},", f"   ending with {topic}."]
    if n in (2, 5):
        lines.insert(0, TWICE)  # at the page's top edge, where headers live: kept, as only 2 of 8 pages hold it
    if n in (1, 2, 7, 8):
        lines.append(HALF)  # at the bottom edge on 4 of 8 pages (2 of the 4 odd, 2 of the 4 even): kept
    return lines


def _document(pages: int, furniture: bool, trailing_ff: bool = False) -> str:
    out = []
    for n in range(1, pages + 1):
        lines = [HEADER, "", ""] if furniture else ["", ""]
        lines += _body(n) + ["", "", ""] + ([FOOTER.format(n=n)] if furniture else [])
        out.append("\n".join(lines) + "\n")
    return "\f".join(out) + ("\f" if trailing_ff else "")


def _r(text, source="rfc.txt:1", **extra):
    return {"text": text, "_source": source, **extra}


CFG = dict(remove_furniture=True)


def test_headers_and_footers_of_a_paged_document_are_removed():
    doc, expected = _document(8, True), _document(8, False)
    assert doc.count("\f") == 7 and doc.count(TWICE) == 2 and doc.count(HALF) == 4
    out, steps = clean.clean_records([_r(doc), _r("an unpaged record\nwith lines", "rfc.txt:2")], CFG)
    assert out[0]["text"] == expected  # TWICE and HALF kept; form feeds and blank lines too
    assert out[1]["text"] == "an unpaged record\nwith lines"
    assert steps == [{"step": "remove_furniture", "changed": 1, "dropped": 0, "examples": [], "lines_removed": 16}]
    assert "remove_furniture: 1 changed, 16 lines removed, 0 dropped" in clean.describe_steps(steps)


def test_keys_match_page_numbers_and_spacing():
    key = clean.furniture_key("RFC 2616   June 1999   [Page 12]")
    assert key == clean.furniture_key(" RFC 2616 June 1999 [Page 3]") == "rfc 0 june 0 [page 0]"
    assert clean.furniture_key("Page 3") == clean.furniture_key("page 4") == "page 0"
    assert clean.furniture_key("   ----  ") == ""  # no letter or digit: never furniture


def test_pdftotext_style_trailing_form_feed_and_then_the_other_steps():
    doc = _document(6, True, trailing_ff=True)  # the empty page after the last form feed does not count
    out, _ = clean.clean_records([_r(doc)], CFG)
    assert out[0]["text"] == _document(6, False, trailing_ff=True)
    tidy = dict(CFG, remove_control_chars=True, normalize_whitespace=True)
    out, _ = clean.clean_records([_r(doc)], tidy)
    ref, _ = clean.clean_records([_r(_document(6, False, trailing_ff=True))],
                                 dict(remove_control_chars=True, normalize_whitespace=True))
    assert out[0]["text"] == ref[0]["text"] and HEADER not in out[0]["text"] and "\f" not in out[0]["text"]


def test_fewer_than_three_pages_and_the_threshold():
    two = _document(2, True)
    assert clean.clean_records([_r(two)], CFG)[0][0]["text"] == two
    # 4 pages: the header on all 4 goes; a line on 2 of 4 (= 0.5) stays at 0.5 and goes at 0.4
    pages = [f"Head\nbody {c}\n{'Note' if i < 2 else 'x' + c}" for i, c in enumerate("abcd")]
    doc = "\f".join(pages)
    assert clean.find_furniture(pages, 0.5) == {"head"}
    assert clean.find_furniture(pages, 0.4) == {"head", "note"}
    out, _ = clean.clean_records([_r(doc)], dict(CFG, furniture_min_fraction=0.4))
    assert out[0]["text"] == "\f".join(["body a", "body b", "body c\nxc", "body d\nxd"])


def test_edge_lines_limit_where_furniture_is_looked_for():
    # a line inside every page's body (5th of 9 non-blank lines) is not furniture with 3 edge lines, is with 0
    pages = ["\n".join([HEADER, *(f"line {c}{j}" for j in "pqr"), "return result;", *(f"end {c}{j}" for j in "stu"),
                        f"[Page {i}]"]) for i, c in enumerate("abcde")]
    doc = "\f".join(pages)
    out, steps = clean.clean_records([_r(doc)], CFG)
    assert "return result;" in out[0]["text"] and HEADER not in out[0]["text"] and steps[0]["lines_removed"] == 10
    out, steps = clean.clean_records([_r(doc)], dict(CFG, furniture_edge_lines=0))
    assert "return result;" not in out[0]["text"] and steps[0]["lines_removed"] == 15


def test_pages_as_records_grouped_by_source_file_in_any_batches():
    pages = _document(6, True).split("\f")
    plain = _document(6, False).split("\f")
    records = [_r(p, f"book.jsonl:{i + 1}") for i, p in enumerate(pages)]
    records += [_r(p, f"other.jsonl:{i + 1}") for i, p in enumerate(pages[:2])]  # its own group: 2 pages, kept
    cfg = dict(CFG, furniture_group="source_file")
    ref, steps = clean.clean_records(records, cfg)
    assert [r["text"] for r in ref] == plain + pages[:2]
    assert steps[0]["lines_removed"] == 12 and steps[0]["changed"] == 6
    # ungrouped, each record is a one-page document: nothing removed
    assert clean.clean_records(records, CFG)[0] == records
    for size in (1, 2, 5):
        cleaner, out = clean.Cleaner(cfg), []
        for start in range(0, len(records), size):
            out += cleaner.clean(records[start:start + size])
        out += cleaner.flush()
        assert out == ref and cleaner.steps == steps, size
    cleaner = clean.Cleaner(cfg)
    assert cleaner.clean(records[:3]) == []  # held until the group ends
    held = cleaner.flush()  # a group of those 3 pages (the HALF line on 2 of them goes too)
    assert held == clean.clean_records(records[:3], cfg)[0] and HALF not in held[0]["text"]
    assert HEADER not in held[0]["text"] and cleaner.flush() == []


def test_html_pages_of_one_site_grouped_by_folder(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for i, topic in enumerate(["apples", "pears", "plums", "figs"]):
        (site / f"p{i}.html").write_text(
                f"<html><body><div class='content'><p>Example Fruit Co. - page {i + 1} of 4</p><h1>{topic}</h1>"
                f"<p>All about {topic}: they grow on trees.</p><p>Copyright 2024 Example Fruit Co.</p>"
                f"</div></body></html>", encoding="utf-8")
    records = sources.read_records(str(site))
    out, steps = clean.clean_records(records, dict(CFG, furniture_group="source_dir"))
    assert [r["text"] for r in out] == [f"{t}\nAll about {t}: they grow on trees."
                                        for t in ["apples", "pears", "plums", "figs"]]
    assert steps[0]["lines_removed"] == 8


def test_group_by_field_and_its_errors():
    rows = [{"text": f"ACME manual, page {n}\nStep {n}: turn the knob {n} times.", "doc": d,
             "_source": f"m.csv:row {n}"} for n, d in enumerate(["a", "a", "a", "b", "b"], start=1)]
    out, steps = clean.clean_records(rows, dict(CFG, furniture_group="field:doc"))
    # group "a" has 3 pages: its header (and its "Step N: turn the knob N times." line, the same with digits
    # replaced) goes, which leaves its records empty: dropped, named; group "b" has 2 pages: nothing removed. The
    # group field "doc" is not cleaned, nor a page
    assert out == rows[3:]
    assert steps == [{"step": "remove_furniture", "changed": 3, "dropped": 3, "lines_removed": 6,
                      "examples": ["m.csv:row 1", "m.csv:row 2", "m.csv:row 3"]}]
    with pytest.raises(ValueError, match=r"m\.csv:row 1: no field 'book' to group pages by"):
        clean.clean_records(rows, dict(CFG, furniture_group="field:book"))
    with pytest.raises(ValueError, match="furniture_group"):
        clean.Cleaner(dict(CFG, furniture_group="site"))
    with pytest.raises(ValueError, match="furniture_min_fraction"):
        clean.Cleaner(dict(CFG, furniture_min_fraction=1.0))
    with pytest.raises(ValueError, match="furniture_edge_lines"):
        clean.Cleaner(dict(CFG, furniture_edge_lines=-1))


def test_prepare_releases_held_groups_and_reports(tmp_path, llama2_tok):
    """Through ``prepare_dataset`` in batches of 2 records: the same sequences as the pages written without their
    furniture and prepared with no cleaning step."""
    import numpy as np

    from easytune.config import defaults
    from easytune.data import prepare
    from easytune.data import report as report_lib

    def run(pages, name, **clean_keys):
        f = tmp_path / name
        f.write_text("".join(json.dumps({"text": p}) + "\n" for p in pages), encoding="utf-8")
        d = defaults().data
        d.train_files, d.format, d.val_set_size, d.sequence_len, d.batch_records = [str(f)], "text", 0, 64, 2
        d.dataset_prepared_path = ""
        for k, v in clean_keys.items():
            d.clean[k] = v
        train, _, report = prepare.prepare_dataset(d, llama2_tok)
        return train.gather(np.arange(len(train))), report

    got, report = run(_document(6, True).split("\f"), "book.jsonl", remove_furniture=True,
                      furniture_group="source_file")
    ref, ref_report = run(_document(6, False).split("\f"), "plain.jsonl")
    assert report["records_read"] == report["records"] == 6
    assert report["clean_steps"] == [{"step": "remove_furniture", "changed": 6, "dropped": 0, "examples": [],
                                      "lines_removed": 12}]
    assert report["tokens"] == ref_report["tokens"] and got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert "remove_furniture: 6 changed, 12 lines removed, 0 dropped" in report_lib.describe(report)


# ------------------------------------------------------------------ fields, page numbers, short pages, parity, drops

FRUITS = ["apples", "pears", "plums", "figs", "cherries", "quinces"]
SITE_HEAD = "Example Fruit Co. - fruit facts since 1990"
SITE_FOOT = "Copyright 2024 Example Fruit Co. All rights reserved."


def _fruit_body(fruit: str) -> list[str]:
    return [fruit.capitalize(), f"All about {fruit}: where {fruit} grow and how.", f"Eat {fruit} fresh or dried."]


def test_grouped_furniture_is_found_per_field_one_line_fields_are_no_pages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    for i, fruit in enumerate(FRUITS):
        body = "".join(f"<p>{line}</p>" for line in _fruit_body(fruit))
        (site / f"p{i}.html").write_text(
                f"<html><head><title>{fruit.capitalize()} - Example Fruit Co.</title></head><body>"
                f"<div class='content'><p>{SITE_HEAD}</p>{body}<p>{SITE_FOOT}</p></div></body></html>",
                encoding="utf-8")
    records = [r for i in range(6) for r in raw.read_html(site / f"p{i}.html")]
    assert [r["title"] for r in records] == [f"{f.capitalize()} - Example Fruit Co." for f in FRUITS]
    out, steps = clean.clean_records(records, dict(CFG, furniture_group="source_dir"))  # default fields: all
    assert [r["text"] for r in out] == ["\n".join(_fruit_body(f)) for f in FRUITS]
    assert [r["title"] for r in out] == [r["title"] for r in records]  # a one-line field is not cleaned
    assert steps[0]["lines_removed"] == 12 and steps[0]["changed"] == 6
    # JSON Lines pages with an id and a document field beside the text: the text's pages alone decide
    rows = [{"id": f"m-{n}", "doc": "manual", "text": "\n".join([SITE_HEAD, *_fruit_body(f), SITE_FOOT]),
             "_source": f"m.jsonl:{n}"} for n, f in enumerate(FRUITS, start=1)]
    out, steps = clean.clean_records(rows, dict(CFG, furniture_group="source_file"))
    assert [r["text"] for r in out] == ["\n".join(_fruit_body(f)) for f in FRUITS]
    assert [(r["id"], r["doc"]) for r in out] == [(r["id"], r["doc"]) for r in rows]
    # a multi-line field of its own (a summary on every row) is its own document: it does not dilute the text's
    rows2 = [dict(r, summary=f"Summary of {f}\nshort") for r, f in zip(rows, FRUITS)]
    out2, _ = clean.clean_records(rows2, dict(CFG, furniture_group="source_file"))
    assert [r["text"] for r in out2] == [r["text"] for r in out]
    assert [r["summary"] for r in out2] == [f"Summary of {f}" for f in FRUITS]  # "short" ends every summary


def _roman(n: int) -> str:
    return ["", "i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x", "xi", "xii"][n]


TOPICS2 = ["widgets", "gears", "springs", "levers", "pulleys", "wheels", "axles", "screws"]


def _report_page(n: int, value: int, head: bool, foot: str | None) -> str:
    topic = TOPICS2[n - 1]
    lines = (["ACME Quarterly Report", ""] if head else []) + [
        f"Sales of {topic} rose in the north.", f"Stock of {topic} fell in the south.", f"Units of {topic} sold:",
        str(value)] + (["", foot] if foot is not None else [])
    return "\n".join(lines)


def test_letterless_lines_are_furniture_only_as_increasing_page_numbers():
    values = [391, 749, 304, 568, 313, 385]  # body values at the bottom edge, on every page: not page numbers
    for footers in ([f"- {_roman(n)} -" for n in range(1, 7)], [f"- {_roman(n).upper()} -" for n in range(1, 7)],
                    ["3", "4", "7", "9", "10", "12"], ["xi", "xii", "1", "2", "3", "4"]):
        doc = "\f".join(_report_page(n, v, True, f) for n, v, f in zip(range(1, 7), values, footers))
        ref = "\f".join(_report_page(n, v, False, None) for n, v in zip(range(1, 7), values))
        out, steps = clean.clean_records([_r(doc)], CFG)
        # removed lines leave their blank neighbours: compare the non-blank lines, page by page
        got = [[line for line in p.split("\n") if line.strip()] for p in out[0]["text"].split("\f")]
        assert got == [[line for line in p.split("\n") if line.strip()] for p in ref.split("\f")], footers
        assert steps[0]["lines_removed"] == 12
    assert clean.furniture_key("- xiv -") == clean.furniture_key("- 3 -") == "- 0 -"
    assert clean.furniture_key("Page iv") == "page iv"  # with another letter, a roman numeral is a word
    # page numbers that do not increase (a value column) stay, even where a header goes
    doc = "\f".join(_report_page(n, v, True, str(v)) for n, v in zip(range(1, 7), values))
    assert clean.find_furniture(doc.split("\f")) == {"acme quarterly report"}


def test_short_pages_keep_their_middle_line_and_edge_lines_go_whatever_they_are():
    # 3 non-blank lines a page: only the first and last are edges, so a middle line on every page stays
    pages = [f"Exercise on {t}\nSolution follows below.\nAnswer about {t}" for t in TOPICS2[:5]]
    out, steps = clean.clean_records([_r("\f".join(pages))], CFG)
    assert out[0]["text"] == "\f".join(pages) and steps[0]["lines_removed"] == 0
    pages = [f"Lesson on {t}\nSolution follows below.\nAnswer about {t}\nreturn 0;" for t in TOPICS2[:5]]
    assert clean.find_furniture(pages) == {"return 0;"}  # at the edge on every page: removed, whatever it is
    assert clean.find_furniture(pages, edge_lines=0) == {"solution follows below.", "return 0;"}
    assert clean._edge_indices(["a", "", "b", "c", "d", "e", "f"], 3) == [0, 2, 6, 5]  # 6 lines: 2 each end


def test_alternating_running_heads():
    heads = ["THE ART OF COMPUTER PROGRAMMING", "2.3 TREES"]  # left pages, right pages
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()

    def page(i, furniture):
        body = [f"{words[i]} {w} paragraph text" for w in ("first", "second", "third")]
        return "\n".join(([heads[i % 2], ""] if furniture else []) + body + (["", str(100 + i)] if furniture else []))
    doc = "\f".join(page(i, True) for i in range(10))
    out, steps = clean.clean_records([_r(doc)], CFG)
    got = [[line for line in p.split("\n") if line.strip()] for p in out[0]["text"].split("\f")]
    assert got == [page(i, False).split("\n") for i in range(10)] and steps[0]["lines_removed"] == 20
    # a line on 2 of the 3 odd pages of a 6-page document is no running head (3 pages at least)
    pages = [page(i, False) + ("\nSee also the index." if i in (1, 3) else "") for i in range(6)]
    assert clean.find_furniture(pages) == set()


def test_a_record_left_blank_is_dropped_and_named():
    only = "\f".join(f"{HEADER}\n\n{FOOTER.format(n=n)}" for n in range(1, 5))
    records = [_r(only, "a.txt:1"), _r(_document(4, True), "b.txt:1"), _r(only + "\f", "c.txt:1")]
    out, steps = clean.clean_records(records, CFG)
    assert [r["_source"] for r in out] == ["b.txt:1"] and out[0]["text"] == _document(4, False)
    assert steps == [{"step": "remove_furniture", "changed": 3, "dropped": 2, "examples": ["a.txt:1", "c.txt:1"],
                      "lines_removed": 24}]
    assert "remove_furniture: 3 changed, 24 lines removed, 2 dropped (e.g. a.txt:1, c.txt:1)" in \
        clean.describe_steps(steps)
