"""HTML ``<pre>`` / ``<code>`` keep their line breaks and indentation (easytune/data/raw.py ``html_to_text``).

Reference: BeautifulSoup's own ``get_text()`` of each ``<pre>`` element (less the newline right after the start
tag, which the HTML spec says a ``<pre>`` ignores, and whitespace-only lines at its ends) must appear verbatim, as
consecutive lines, in the page text; the rest of a real Wikipedia page must read as it did without the block.
"""

import pytest

from easytune.data import raw, sources

bs4 = pytest.importorskip("bs4")

# an RFC-like page: the plain-text RFC inside <pre>, with indentation, a tab, blank lines, a form feed at the page
# break, links and spans inside (as rfc-editor.org's HTML renderings have)
RFC_PRE = """
Network Working Group                                      R. Fielding
Request for Comments: 2616                                   UC Irvine
Category: Standards Track                                    June 1999


             Hypertext Transfer Protocol -- <a href="#sec1">HTTP/1.1</a>

Table of Contents

   1   Introduction ...................................................<a href="#p7">7</a>
   1.1    Purpose......................................................7
\tindented by a tab &lt;tag&gt; &amp; <span class="grey">grey text</span>

Fielding, et al.            Standards Track                     [Page 1]
\f
RFC 2616                        HTTP/1.1                       June 1999


   Request       = Request-Line              ; Section 5.1
                   *(( general-header        ; Section 4.5
                    | request-header )       ; Section 5.3

"""
RFC_PAGE = f"""<!doctype html><html><head><title>RFC 2616</title></head><body>
<nav>Home | Search</nav>
<main><h1>RFC 2616</h1><p>An   introduction   paragraph.</p><pre>{RFC_PRE}</pre>
<p>Run <code>make   all\tnow</code> then   stop.</p>
<div class="highlight"><code>def f(x):
    if x:
        return  1
</code></div>
<pre>one<br>two</pre>
<p>After the block.</p></main></body></html>"""


def _reference(pre) -> list[str]:
    """BeautifulSoup's text of the element, first newline dropped (HTML spec), whitespace-only end lines cut."""
    text = pre.get_text()
    text = text[1:] if text.startswith("\n") else text
    lines = text.split("\n")
    while lines and not lines[0].strip(" \t"):
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _contains_run(lines: list[str], run: list[str]) -> bool:
    return any(lines[i:i + len(run)] == run for i in range(len(lines) - len(run) + 1))


def test_pre_text_is_verbatim_as_beautifulsoup_gives_it(tmp_path):
    f = tmp_path / "rfc2616.html"
    f.write_text(RFC_PAGE, encoding="utf-8")
    [record] = sources.read_records(str(f))
    lines = record["text"].split("\n")
    pre = bs4.BeautifulSoup(RFC_PAGE, "html.parser").find("pre")
    ref = _reference(pre)
    assert len(ref) == RFC_PRE.count("\n") - 2  # every line of the block but the first newline and the last
    assert _contains_run(lines, ref)
    # the details the reference holds: indentation, the tab, a blank line, the form feed, entities decoded
    assert "   1.1    Purpose......................................................7" in lines
    assert "\tindented by a tab <tag> & grey text" in lines
    assert "\f" in lines and "" in lines
    assert "                   *(( general-header        ; Section 4.5" in lines
    # outside preformatted text, whitespace still collapses and navigation is still dropped
    assert lines[:2] == ["RFC 2616", "An introduction paragraph."]
    assert "Home | Search" not in record["text"] and lines[-1] == "After the block."


def test_code_inline_keeps_spaces_and_block_code_keeps_lines():
    text, _ = raw.html_to_text(RFC_PAGE)
    lines = text.split("\n")
    # inline <code>: its spaces and tab exactly; the paragraph's own whitespace runs become one space
    assert "Run make   all\tnow then stop." in lines
    # a block <code> (multi-line, alone in its parent): verbatim lines, the last newline cut
    assert _contains_run(lines, ["def f(x):", "    if x:", "        return  1"])
    # <br> inside <pre> is a line break
    assert _contains_run(lines, ["one", "two"])


def test_inline_code_with_a_newline_stays_inline():
    text, _ = raw.html_to_text("<p>Call <code>f(a,\n  b)</code> here.</p><p>next</p>")
    assert text.split("\n") == ["Call f(a,   b) here.", "next"]


def test_pre_leading_newline_and_crlf_like_a_browser():
    # one newline after <pre> is dropped by the HTML spec; a second one (a blank first line) is a blank end line
    text, _ = raw.html_to_text("<body><pre>\r\n  x = 1\r\n\r\n  y = 2\r\n</pre></body>")
    assert text == "  x = 1\n\n  y = 2"
    text, _ = raw.html_to_text("<body><pre>  first line indented</pre></body>")
    assert text == "  first line indented"


def test_pre_as_the_selected_root_and_hidden_parts_inside():
    html = '<body><pre id="c">a  b\n  <span hidden>secret</span>c</pre></body>'
    assert raw.html_to_text(html, "#c")[0] == "a  b\n  c"


def test_real_wikipedia_page_with_a_pre_block(shared_data):
    d = shared_data / "raw" / "html"
    html = (d / "wikipedia_mozilla.html").read_text(encoding="utf-8")
    assert "<pre" not in html and "<code" not in html  # the real pages hold none: one is put into the content
    before, _ = raw.html_to_text(html, "#mw-content-text")
    soup = bs4.BeautifulSoup(html, "html.parser")
    first_p = next(p for p in soup.select("#mw-content-text p") if p.get_text(strip=True))
    block = "<pre>\nint main(void) {\n\tprintf(\"hi\\n\");\n    return   0;\n}\n</pre>"
    first_p.insert_after(bs4.BeautifulSoup(block, "html.parser"))
    after, _ = raw.html_to_text(str(soup), "#mw-content-text")
    ref = _reference(soup.find("pre"))
    assert ref == ["int main(void) {", "\tprintf(\"hi\\n\");", "    return   0;", "}"]
    lines = after.split("\n")
    i = next(i for i in range(len(lines)) if lines[i:i + len(ref)] == ref)
    # the page without the block reads exactly as before, and the block sits after the first paragraph's line
    assert lines[:i] + lines[i + len(ref):] == before.split("\n")
    assert lines[i - 1].startswith(" ".join(first_p.get_text().split())[:60])  # (citation marks are dropped)
    # the rest of the page keeps one space between words
    assert "  " not in "\n".join(lines[:i] + lines[i + len(ref):])


# ------------------------------------------------------------------ htmlized RFCs, code views, inline styles

RFC_HEAD = "RFC 2616                        HTTP/1.1                       June 1999"
RFC_FOOT = "Fielding, et al.            Standards Track                    [Page {n}]"
RFC_TOPICS = ["Introduction", "Terminology", "Overall Operation", "Notational Conventions", "Basic Rules",
              "Protocol Parameters"]


def _rfc_body(n: int) -> list[str]:
    topic = RFC_TOPICS[n - 1]
    return [f"{n}.  {topic}", "", f"   The {topic.lower()} section explains the {topic.lower()} of HTTP,",
            f"   with x &lt; y &amp;&amp; z and a <a href=\"#s{n}\">link</a> about {topic.lower()}."]


def _htmlized_rfc(pages: int = 6) -> str:
    """rfc-editor.org's "htmlized" layout: page 1 a plain <pre>, each later page a <pre class="newpage"> after an
    <hr class="noprint"/><!--NewPage-->, header and footer in <span class="grey">, no form feed anywhere."""
    out = ['<!DOCTYPE html><html><head><title>RFC 2616 - Hypertext Transfer Protocol -- HTTP/1.1</title></head><body>',
           '<div class="noprint">[<a href="../html/">Docs</a>] [<a href="/rfc/rfc2616.txt">txt</a>]</div>']
    for n in range(1, pages + 1):
        body = "\n".join(_rfc_body(n))
        foot = f'<span class="grey">{RFC_FOOT.format(n=n)}</span>'
        if n == 1:
            out.append(f"<pre>\n{body}\n\n{foot}</pre>")
        else:
            out.append(f'<hr class=\'noprint\'/><!--NewPage--><pre class=\'newpage\'><a name="page-{n}" id="page-{n}" '
                       f'href="#page-{n}" class="invisible"> </a>\n<span class="grey">{RFC_HEAD}</span>\n\n'
                       f"{body}\n\n{foot}</pre>")
    return "".join(out) + "</body></html>"


def test_htmlized_rfc_pages_are_split_and_their_furniture_removed(tmp_path):
    from easytune.data import clean
    html = _htmlized_rfc()
    assert "\f" not in html
    text, title = raw.html_to_text(html)
    pages = text.split("\n\f\n")
    assert len(pages) == 6 and text.count("\f") == 5 and not text.startswith("\f") and not text.endswith("\f")
    # each page as BeautifulSoup gives its <pre> (the reference of the tests above)
    pres = bs4.BeautifulSoup(html, "html.parser").find_all("pre")
    assert [p.split("\n") for p in pages] == [_reference(pre) for pre in pres]
    out, steps = clean.clean_records([{"text": text, "title": title, "_source": "rfc2616.html"}],
                                     dict(remove_furniture=True, remove_control_chars=True, normalize_whitespace=True))
    got = [line for line in out[0]["text"].split("\n") if line.strip()]
    ref = [bs4.BeautifulSoup(line, "html.parser").get_text() for n in range(1, 7) for line in _rfc_body(n) if line]
    assert got == ref  # 5 headers and 6 footers gone, every body line kept
    assert steps[0]["lines_removed"] == 11 and out[0]["title"] == title


def test_boilerplate_classes_inside_pre_and_code_are_content():
    html = ('<body><p>Setup:</p><pre><span class="cm-header cm-header-1"># Install</span>\n'
            '<span class="share">x = 1</span>\n    <span class="nav">y</span> = <span class="toc">2</span>\n'
            '<button>Copy</button></pre><p>Inline <code><span class="menu">menu()</span></code> call.</p>'
            '<div class="share">Share this page</div></body>')
    text, _ = raw.html_to_text(html)
    pre = bs4.BeautifulSoup(html, "html.parser").find("pre")
    pre.button.decompose()  # a button is no content anywhere
    assert text.split("\n") == ["Setup:", *_reference(pre), "Inline menu() call."]
    assert _reference(pre) == ["# Install", "x = 1", "    y = 2"]


def test_white_space_pre_style_and_github_code_view():
    source = ["def f(x):", "    if x < 0:", "        return -x", "", "\treturn x"]
    rows = "".join(f'<tr><td id="L{i}" class="blob-num js-line-number" data-line-number="{i}"></td>'
                   f'<td id="LC{i}" class="blob-code blob-code-inner js-file-line">'
                   + line.replace("<", "&lt;").replace("if", '<span class="pl-k">if</span>') + "</td></tr>\n"
                   for i, line in enumerate(source, start=1))
    gh = f'<html><body><main><p>f.py</p><table class="highlight tab-size js-file-line-container">{rows}</table>' \
         f"<p>end</p></main></body></html>"
    assert raw.html_to_text(gh)[0].split("\n") == ["f.py", *source, "end"]
    styled = ('<body><div style="white-space: pre-wrap">def g():\n    return  2\n</div>'
              '<p>Call <span style="white-space:pre">g(  1 )</span>   now.</p>'
              '<div style="font-family: monospace; WHITE-SPACE : pre ;">  a\n    b</div>'
              '<div style="white-space: pre-line">x    y\n  z</div></body>')
    assert raw.html_to_text(styled)[0].split("\n") == ["def g():", "    return  2", "Call g(  1 ) now.",
                                                       "  a", "    b", "x y z"]


def test_selected_code_keeps_its_lines_and_inline_code_has_no_edge_spaces():
    html = '<body><p>See <code id="x">\n  a = 1\n    b = 2\n</code></p></body>'
    assert raw.html_to_text(html, "#x")[0] == "  a = 1\n    b = 2"
    text, _ = raw.html_to_text("<body><p>Run<code>\nls -l\ncd /\n</code></p><p><code>  x </code> is x</p></body>")
    assert text.split("\n") == ["Run ls -l cd /", "x  is x"]
