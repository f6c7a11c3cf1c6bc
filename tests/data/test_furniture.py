"""Page furniture removal (easytune/data/clean.py ``remove_furniture``): running headers and footers of a paged
document go, body text stays.

Reference: each synthetic document is built twice from the same pages, with and without its header and footer
lines; the cleaned text must equal the version built without them, line for line.
"""

import json

import pytest

from easytune.data import clean, sources

HEADER = "RFC 2616                        HTTP/1.1                       June 1999"
FOOTER = "Fielding, et al.            Standards Track                   [Page {n}]"
TWICE = "   Status-Line = HTTP-Version SP Status-Code SP Reason-Phrase CRLF"  # a body line on two pages
HALF = "   The following rules are used throughout this specification."  # a body line on half the pages


TOPICS = ["Introduction", "Notational Conventions", "Protocol Parameters", "HTTP Message", "Request", "Response",
          "Entity", "Connections"]


def _body(n: int) -> list[str]:
    # body lines differ between pages by their words (lines differing only in numbers compare equal)
    topic = TOPICS[n - 1]
    lines = [f"{n}.  {topic}", "", f"   The {topic.lower()} part of this document covers the {topic.lower()}.",
             f"   It continues over a few more lines about the {topic.lower()},", f"   ending with {topic}."]
    if n in (2, 5):
        lines.insert(0, TWICE)  # at the page's top edge, where headers live: kept, as only 2 of 8 pages hold it
    if n % 2:
        lines.append(HALF)  # at the bottom edge on 4 of 8 pages: not more than half, kept
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
    # replaced) goes; group "b" has 2 pages: nothing removed
    assert [r["text"] for r in out] == ["", "", "", rows[3]["text"], rows[4]["text"]]
    assert steps[0]["lines_removed"] == 6
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
