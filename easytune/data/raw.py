"""Raw sources -> records: HTML pages (BeautifulSoup), CSV/TSV and Parquet (pandas; Parquet also streamed in
batches with pyarrow), SQL dumps (sqlparse), and other local files ``datasets.load_dataset`` reads.

``sources.read_file`` dispatches here by suffix; every record carries ``_source`` provenance
(``path``, ``path:row N`` or ``path:LINE``) as described in ``sources``. The shared low-level readers
come from ``files``; this module never imports ``sources``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping

from easytune.data.files import map_columns, no_records, open_binary, read_bytes, read_utf8

# ------------------------------------------------------------------------------------ HTML

_HTML_DROP = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template", "svg",
              "iframe", "button", "input", "select", "textarea", "menu", "head", "link", "meta")
# class / id fragments of navigation and boilerplate blocks (Wikipedia, typical CMS themes).
_HTML_BOILERPLATE = re.compile(r"(^|[-_ ])(nav|navbox|navbar|menu|sidebar|footer|header|breadcrumbs?|cookie|"
                               r"toc|mw-editsection|editsection|catlinks|printfooter|reflist|references?|"
                               r"hatnote|metadata|noprint|mw-jump-link|share|social|advert|banner)([-_ ]|$)",
                               re.IGNORECASE)
_HTML_BLOCKS = frozenset("address article aside blockquote br caption dd details div dl dt figcaption figure h1 "
                         "h2 h3 h4 h5 h6 hr li main ol p pre section summary table tbody td th thead tr ul".split())


_HTML_PRE = frozenset(("pre", "listing", "xmp", "plaintext"))  # preformatted: text taken verbatim
# inline ``style`` that preserves spaces and line breaks as ``<pre>`` does (CSS ``white-space``); ``pre-line``
# collapses spaces and is not one of them
_WHITE_SPACE_PRE = re.compile(r"(?:^|;)\s*white-space\s*:\s*(?:pre|pre-wrap|break-spaces)\s*(?:!important\s*)?(?:;|$)",
                              re.IGNORECASE)
# GitHub's code view: a table with one ``<td class="blob-code">`` per source line
_CODE_LINE_CLASS = "blob-code"


class _EveryTag(frozenset):
    """``preserve_whitespace_tags`` for BeautifulSoup holding every tag name: the parser keeps whitespace-only
    strings as they are everywhere (by default it makes them ``" "`` / ``"\\n"`` outside ``<pre>`` and
    ``<textarea>``), so ``white-space: pre`` elements and ``blob-code`` cells keep their indentation;
    :func:`html_to_text` collapses ordinary text itself."""

    def __contains__(self, name) -> bool:
        return True


def _classes(el) -> list[str]:
    return el.get("class") or []


def _is_block_code(el) -> bool:
    """A ``<code>`` shown as a block: its text spans lines and it has no text or element beside it in its parent
    (``<div class="highlight"><code>...</code></div>``); other ``<code>`` is inline."""
    if "\n" not in el.get_text().strip("\r\n"):
        return False
    return all(sib is el or (isinstance(sib, str) and not sib.strip()) for sib in el.parent.children)


def _pre_style(el) -> bool:
    """The element's inline ``style`` says ``white-space: pre`` / ``pre-wrap`` / ``break-spaces``."""
    return bool(_WHITE_SPACE_PRE.search(el.get("style", "")))


def _is_newpage_comment(node) -> bool:
    """``<!--NewPage-->``: the page break of rfc-editor.org's "htmlized" RFCs (case and spaces ignored)."""
    return "".join(str(node).split()).lower() == "newpage"


def _inline_line(pieces: list[tuple[str, bool]]) -> str:
    """One line from ``(text, verbatim)`` pieces: ordinary text's whitespace runs (across pieces too) become one
    space and are dropped at the line's ends, as ``" ".join(text.split())`` does; verbatim pieces (inline
    ``<code>``) are copied with their exact spaces and tabs (a newline in them becomes a space); the line's ends
    are stripped of whitespace, a verbatim piece's too (``<p>Run<code>\\nls\\n</code></p>`` -> ``"Run ls"``)."""
    parts: list[str] = []
    pending = False  # ordinary whitespace seen since the last visible text
    for text, verbatim in pieces:
        if verbatim:
            if pending and parts:
                parts.append(" ")
            pending = False
            parts.append(text.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
            continue
        words = text.split()
        if not words:
            pending = pending or bool(text)
            continue
        if (pending or text[0].isspace()) and parts:
            parts.append(" ")
        parts.append(" ".join(words))
        pending = text[-1].isspace()
    return "".join(parts).strip()


def _pre_lines(text: str) -> list[str]:
    """The lines of a preformatted block: ``\\r\\n`` / ``\\r`` -> ``\\n``, the newline right after the start tag
    dropped (HTML spec, "pre" element: "a single newline ... immediately following the pre element start tag" is
    ignored), whitespace-only lines at the block's start and end dropped; everything else verbatim (spaces,
    tabs, form feeds, blank lines inside)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\n"):
        text = text[1:]
    lines = text.split("\n")
    while lines and not lines[0].strip(" \t"):
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _code_line(text: str) -> list[str]:
    """The lines of a ``blob-code`` cell (one source line of GitHub's code view): verbatim, the newline at its end
    dropped, an empty cell a blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return (text[:-1] if text.endswith("\n") else text).split("\n")


def html_to_text(html: str, selector: str = "") -> tuple[str, str]:
    """Visible text of an HTML page, one line per block element; preformatted text kept as it is.

    Drops ``script``/``style``/``nav``/``header``/``footer``/``aside``/``form`` and other
    non-content tags, hidden elements (``hidden``, ``aria-hidden="true"``,
    ``display:none``), and blocks whose class or id names navigation or boilerplate
    (``navbox``, ``sidebar``, ``toc``, ``reflist``, ``reference`` citation marks, ...; not inside ``<pre>`` or
    ``<code>``, whose highlighter classes such as ``cm-header`` are content). Block elements (``p``, ``div``,
    ``li``, ``h1``..``h6``, ``tr``, ``br``, ...) start new lines; runs of whitespace inside a
    line collapse to one space; empty lines are dropped.

    Preformatted text keeps its line breaks and indentation: a ``<pre>`` (and the obsolete ``listing`` / ``xmp`` /
    ``plaintext``), a block ``<code>`` (one whose text spans lines and that stands alone in its parent, or that
    ``selector`` picks) or an element whose inline style is ``white-space: pre`` / ``pre-wrap`` / ``break-spaces``
    (a block element, or one whose text spans lines) gives its text verbatim, on lines of its own: spaces, tabs,
    blank lines and form feeds (``\\f``, the page breaks of RFC text; the ``remove_furniture`` cleaning step splits
    pages there, ``remove_control_chars`` drops them) are kept, ``<br>`` inside is a newline, the newline right
    after the start tag is dropped (the HTML spec's rule for ``<pre>``) and so are whitespace-only lines at the
    block's start and end. It is what BeautifulSoup's ``get_text()`` of the element gives, less those ends. An
    inline ``<code>`` (or inline ``white-space: pre`` element) keeps its exact spaces inside the line (a newline in
    it becomes a space). An element of class ``blob-code`` (GitHub's code view: a table row per source line) is one
    verbatim line, a blank one when empty.

    Pages of rfc-editor.org's "htmlized" RFCs (each page its own ``<pre class="newpage">``, pages separated by
    ``<!--NewPage-->``) are separated by a form feed line (``"\\f"``), as in the plain-text RFC: at each
    ``<!--NewPage-->`` comment and before a ``pre.newpage`` that does not follow one (never twice in a row, never
    first).

    Args:
        html: the page.
        selector: CSS selector (``soupsieve``) of the content; ``""`` takes the first of
            ``main``, ``article``, ``[role=main]``, ``body``, the whole document.

    Returns:
        ``(text, title)``: the text (lines joined by ``"\\n"``) and the ``<title>`` (``""`` when absent).

    Raises:
        ValueError: the selector matches nothing (message names the selector).
    """
    from bs4 import BeautifulSoup, Comment
    soup = BeautifulSoup(html, "html.parser", preserve_whitespace_tags=_EveryTag())
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    if selector:
        roots = soup.select(selector)
        if not roots:
            raise ValueError(f"data.html_selector {selector!r} matches no element")
    else:
        roots = [next((el for el in (soup.find("main"), soup.find("article"), soup.find(attrs={"role": "main"}),
                                     soup.body) if el is not None), soup)]
    lines: list[str] = []
    current: list[tuple[str, bool]] = []  # (text, verbatim) pieces of the line being built

    def newline():
        line = _inline_line(current)
        if line:
            lines.append(line)
        current.clear()

    def page_break():
        newline()
        if lines and lines[-1] != "\f":
            lines.append("\f")

    def hidden(el, in_code: bool = False) -> bool:
        """Dropped: a non-content tag, a hidden element, or (outside ``<pre>`` / ``<code>``) a navigation or
        boilerplate class / id / role."""
        if el.name in _HTML_DROP or el.has_attr("hidden") or el.get("aria-hidden") == "true":
            return True
        if "display:none" in el.get("style", "").replace(" ", "").lower():
            return True
        if in_code or el.name in _HTML_PRE or el.name == "code":
            return False
        names = " ".join(_classes(el)) + " " + (el.get("id") or "")
        return el.get("role") in ("navigation", "banner", "contentinfo") or bool(_HTML_BOILERPLATE.search(names))

    def verbatim_text(el, out: list[str]) -> None:
        """The text of a preformatted element's visible descendants, as it is (``<br>``: a newline)."""
        for child in el.children:
            if isinstance(child, Comment):
                if _is_newpage_comment(child):
                    out.append("\n\f\n")
            elif isinstance(child, str):
                out.append(str(child))
            elif child.name == "br":
                out.append("\n")
            elif child.name == "img" and "math" in " ".join(_classes(child)):
                out.append(child.get("alt", ""))
            elif child.name is not None and not hidden(child, True):
                verbatim_text(child, out)

    def block_verbatim(el, inline_code: bool) -> bool:
        """``el`` is preformatted text shown as a block (see the docstring)."""
        if el.name in _HTML_PRE or (el.name == "code" and not inline_code and _is_block_code(el)):
            return True
        if _CODE_LINE_CLASS in _classes(el):
            return True
        return _pre_style(el) and (el.name in _HTML_BLOCKS or "\n" in el.get_text().strip("\r\n"))

    def emit_verbatim(el) -> None:
        newline()
        if el.name == "pre" and "newpage" in _classes(el):
            page_break()
        out: list[str] = []
        verbatim_text(el, out)
        text = "".join(out)
        lines.extend(_code_line(text) if _CODE_LINE_CLASS in _classes(el) else _pre_lines(text))

    def walk(el, inline_code: bool = False):
        for child in el.children:
            if isinstance(child, Comment):
                if _is_newpage_comment(child):
                    page_break()
            elif isinstance(child, str):
                current.append((str(child), inline_code))
            elif child.name == "img" and "math" in " ".join(_classes(child)):
                current.append((child.get("alt", ""), False))  # a formula's TeX (Wikipedia's math fallback image)
            elif child.name is not None and not hidden(child, inline_code):
                if block_verbatim(child, inline_code):
                    emit_verbatim(child)
                    continue
                block = child.name in _HTML_BLOCKS
                if block:
                    newline()
                walk(child, inline_code or child.name == "code" or _pre_style(child))
                if block:
                    newline()

    for root in roots:
        if isinstance(root, str) or not hidden(root):
            name = getattr(root, "name", None)
            if name is not None and (block_verbatim(root, False)
                                     or (name == "code" and "\n" in root.get_text().strip("\r\n"))):
                emit_verbatim(root)
            else:
                walk(root)
        newline()
    while lines and lines[-1] == "\f":
        lines.pop()
    return "\n".join(lines), title


def read_html(path: str | os.PathLike, selector: str = "") -> list[dict]:
    """Reads an HTML page as one record ``{"text", "title", "_source": path}`` (:func:`html_to_text`).

    Raises:
        ValueError: non-UTF-8 bytes (line named), an unreadable file, a selector that
            matches nothing, or a page without visible text (``no records in path``).
    """
    path = os.fspath(path)
    try:
        text, title = html_to_text(read_utf8(path), selector)
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from None
    if not text.strip():
        no_records(path, "the page has no visible text" + (f" under {selector!r}" if selector else ""))
    return [{"text": text, "title": title, "_source": path}]


# ------------------------------------------------------------------------------------ CSV / Parquet


def read_csv(path: str | os.PathLike, columns: Mapping[str, str] | None = None, encoding: str = "utf-8",
             delimiter: str = ",") -> list[dict]:
    """Reads a CSV/TSV file with pandas; every cell is a string (empty cells ``""``).

    Args:
        path: the file; its first row is the header.
        columns: field -> column (see :func:`map_columns`); empty keeps all columns.
        encoding: text encoding; ``"utf-8"`` is read as ``"utf-8-sig"`` so a byte order
            mark does not end up in the first column's name.
        delimiter: ``","`` or ``"\t"`` (or any single character).

    Returns:
        One record per data row, ``_source = "path:row N"`` (1-based, header excluded).

    Raises:
        ValueError: a column missing from the header (available columns listed),
            undecodable bytes, a malformed row (pandas' message, with its line), an
            unreadable file, or no data row.
    """
    import pandas as pd
    path = os.fspath(path)
    read_bytes(path)  # permission errors as one line
    enc = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        df = pd.read_csv(path, sep=delimiter, encoding=enc, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid {encoding} ({e.reason} at byte {e.start}); set data.csv_encoding "
                         f"(e.g. 'latin-1', 'cp1252')") from None
    except pd.errors.EmptyDataError:
        no_records(path, "the file is empty")
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: malformed CSV: {e}") from None
    if df.empty:
        no_records(path, "the file has a header but no data row")
    header = [str(c) for c in df.columns]
    records = [{**row, "_source": f"{path}:row {i}"} for i, row in enumerate(df.to_dict("records"), start=1)]
    if columns:
        for col in columns.values():
            if col not in header:
                raise ValueError(f"{path}: no column {col!r} (available: {', '.join(header)})")
    return map_columns(records, columns or {})


def _rows_to_records(path: str, rows: list[dict], header: list[str], columns) -> list[dict]:
    if not rows:
        no_records(path, "no rows")
    for col in (columns or {}).values():
        if col not in header:
            raise ValueError(f"{path}: no column {col!r} (available: {', '.join(header)})")
    records = [{**row, "_source": f"{path}:row {i}"} for i, row in enumerate(rows)]
    return map_columns(records, columns or {})


def read_parquet(path: str | os.PathLike, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Reads a Parquet file with pandas (pyarrow); ``_source = "path:row N"`` (0-based).

    Raises:
        ValueError: a missing column (available ones listed), an unreadable or invalid file, no rows.
    """
    import pandas as pd
    path = os.fspath(path)
    read_bytes(path)
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises ArrowInvalid etc. without the path
        raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    rows = [{k: (None if _isnan(v) else v) for k, v in row.items()} for row in df.to_dict("records")]
    return _rows_to_records(path, rows, [str(c) for c in df.columns], columns)


def iter_parquet(path: str | os.PathLike, columns: Mapping[str, str] | None = None,
                 batch_size: int = 1024) -> Iterator[dict]:
    """Streams a Parquet file: the records of :func:`read_parquet` (same values, NaN -> None, same
    ``_source = "path:row N"``, 0-based), read with ``pyarrow.parquet.ParquetFile.iter_batches`` and each batch
    converted by pandas as ``pd.read_parquet`` converts the whole table. Memory holds one row group (pyarrow
    decodes a row group at a time) and ``batch_size`` rows as Python objects.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a missing column (available ones listed, before any record), an unreadable or invalid file,
            no rows.
    """
    import pyarrow.parquet as pq
    path = os.fspath(path)
    open_binary(path).close()  # a missing / unreadable file named as by the other readers
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre_buffer (the default) reads every row group at once
        batches = pf.iter_batches(batch_size=batch_size)
    except Exception as e:  # pyarrow raises ArrowInvalid etc. without the path
        raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
    if pf.metadata.num_rows == 0:
        no_records(path, "no rows")
    index, header = 0, None
    while True:
        try:
            df = next(batches).to_pandas()
        except StopIteration:
            return
        except Exception as e:
            raise ValueError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from None
        if header is None:
            header = [str(c) for c in df.columns]
            for col in (columns or {}).values():
                if col not in header:
                    raise ValueError(f"{path}: no column {col!r} (available: {', '.join(header)})")
        for row in df.to_dict("records"):
            record = {**{k: (None if _isnan(v) else v) for k, v in row.items()}, "_source": f"{path}:row {index}"}
            index += 1
            yield map_columns([record], columns)[0] if columns else record


def _isnan(v) -> bool:
    return isinstance(v, float) and v != v


def read_with_datasets(path: str | os.PathLike, builder: str, columns: Mapping[str, str] | None = None) -> list[dict]:
    """Reads a local file with ``datasets.load_dataset(builder, data_files=path, split="train")``.

    Used for what the other readers do not cover: ``.arrow`` and compressed JSON / CSV.
    ``_source = "path:row N"`` (0-based). Nothing is downloaded.

    Raises:
        ValueError: the file cannot be read by ``datasets``, a missing column, no rows.
    """
    import datasets
    path = os.fspath(path)
    read_bytes(path)
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as e:
        raise ValueError(f"{path}: datasets.load_dataset({builder!r}) failed ({type(e).__name__}: {e})") from None
    return _rows_to_records(path, ds.to_list(), list(ds.column_names), columns)


# ------------------------------------------------------------------------------------ SQL dumps

_IDENT = r'(?:\[[^\]]+\]|`[^`]+`|"[^"]+"|[A-Za-z_][\w$]*)'
_INSERT_RE = re.compile(rf"^\s*INSERT\s+(?:OR\s+\w+\s+|IGNORE\s+)?INTO\s+((?:{_IDENT}\.)?{_IDENT})\s*"
                        rf"(\(([^)]*)\))?\s*VALUES\s*", re.IGNORECASE | re.DOTALL)
_CREATE_RE = re.compile(rf"^\s*CREATE\s+(?:TEMP\w*\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?((?:{_IDENT}\.)?{_IDENT})"
                        rf"\s*\((.*)\)", re.IGNORECASE | re.DOTALL)
_VALUE_RE_STANDARD = re.compile(r"""\s*(?:
      (?P<str>[Nn]?'(?:[^']|'')*')
    | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<word>[A-Za-z_]\w*)
    )\s*""", re.VERBOSE | re.DOTALL)
_VALUE_RE = re.compile(r"""\s*(?:
      (?P<str>[Nn]?'(?:[^'\\]|''|\\.)*')
    | (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<word>[A-Za-z_]\w*)
    )\s*""", re.VERBOSE | re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"', "Z": "\x1a", "b": "\b"}
_LEADING_COMMENTS = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
_CONSTRAINTS = ("constraint", "primary", "foreign", "unique", "check", "key", "index", "fulltext")


def _unquote_ident(name: str) -> str:
    """``[a].[b]`` / ```b``` / ``"b"`` -> ``b`` (the table name without schema or quotes)."""
    last = re.findall(_IDENT, name)[-1]
    return last[1:-1] if last[0] in '["`' else last


def _sql_string(tok: str, backslash_escapes: bool) -> str:
    body = tok[tok.index("'") + 1:-1]
    if not backslash_escapes:
        return body.replace("''", "'")
    return re.sub(r"''|\\(.)", lambda m: "'" if m.group(0) == "''" else _ESCAPES.get(m.group(1), m.group(1)), body,
                  flags=re.DOTALL)


def is_mysql_dump(text: str) -> bool:
    """True for a MySQL / MariaDB dump (backquoted names, ``/*!`` comments or ``ENGINE=``), whose strings
    use backslash escapes; standard SQL (SQLite, PostgreSQL) treats a backslash as a plain character."""
    return "`" in text[:200_000] or "/*!" in text[:200_000] or re.search(r"\)\s*ENGINE\s*=", text) is not None


def parse_values(text: str, where: str, backslash_escapes: bool = False) -> list[tuple[int, list]]:
    """Parses the tuples after ``VALUES``: ``(1, 'a''b', NULL), (2, 'c', 3.5)``.

    Strings: single quotes with ``''`` for a quote and an optional ``N`` prefix; with
    ``backslash_escapes`` (MySQL dumps) also ``\\n``, ``\\'``, ``\\\\`` ....
    Numbers become int/float, ``NULL`` None, ``TRUE``/``FALSE`` bool, other words strings.

    Args:
        text: the statement from just after ``VALUES``.
        where: ``file:line`` for error messages.

    Returns:
        ``[(offset of the tuple's "(" in text, [values])]``.

    Raises:
        ValueError: a malformed tuple (``where`` and the character offset named).
    """
    rows, pos, n = [], 0, len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == ";":
            return rows
        if text[pos] != "(":
            raise ValueError(f"{where}: malformed INSERT values at character {pos}: expected '(', "
                             f"got {text[pos:pos + 20]!r}")
        start, pos, values = pos, pos + 1, []
        while True:
            m = (_VALUE_RE if backslash_escapes else _VALUE_RE_STANDARD).match(text, pos)
            if not m:
                raise ValueError(f"{where}: malformed INSERT value at character {pos}: {text[pos:pos + 30]!r}")
            if m.group("str") is not None:
                values.append(_sql_string(m.group("str"), backslash_escapes))
            elif m.group("num") is not None:
                num = m.group("num")
                values.append(float(num) if any(c in num for c in ".eE") else int(num))
            else:
                word = m.group("word").upper()
                values.append(None if word == "NULL" else True if word == "TRUE" else False if word == "FALSE"
                              else m.group("word"))
            pos = m.end()
            if pos < n and text[pos] == ",":
                pos += 1
            elif pos < n and text[pos] == ")":
                pos += 1
                break
            else:
                raise ValueError(f"{where}: malformed INSERT tuple at character {pos}: expected ',' or ')'")
        rows.append((start, values))


def _split_top_level(body: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in body:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


@functools.lru_cache(maxsize=4)
def _split_statements(text: str) -> tuple[str, ...]:
    """``sqlparse.split(text)``, memoized: it lexes every token (seconds for a 600 kB dump), and a
    dump is often read again for another table."""
    import sqlparse
    return tuple(sqlparse.split(text))


def read_sql(path: str | os.PathLike, table: str = "", columns: Mapping[str, str] | None = None) -> list[dict]:
    """Reads the rows of ``INSERT ... VALUES`` statements of one table from an SQL dump.

    Statements are split with ``sqlparse.split``; multi-row ``INSERT``s give one record
    per tuple. Column names come from the ``INSERT``'s column list, else from the
    table's ``CREATE TABLE`` (constraints skipped). Backslash escapes in strings are
    decoded only in MySQL dumps (:func:`is_mysql_dump`), as each database reads its own
    dump. Table names compare without quotes, brackets, schema or case.

    Args:
        path: the dump (UTF-8).
        table: the table to read; ``""`` takes the only table that has ``INSERT`` rows.
        columns: field -> column (see :func:`map_columns`).

    Returns:
        One record per row, ``_source = "path:LINE"`` (the line where the tuple starts).

    Raises:
        ValueError: no ``INSERT`` for the table (the tables that have some listed),
            ``table`` empty while several tables have rows, a row whose value count
            differs from the columns, columns unknown, a malformed tuple (line named),
            a missing column (available ones listed).
    """
    path = os.fspath(path)
    text = read_utf8(path)
    creates: dict[str, list[str]] = {}
    inserts: dict[str, list[tuple[int, str, list[str] | None, int]]] = {}  # table -> (offset, stmt, cols, values at)
    pos = 0
    for stmt in _split_statements(text):
        if not stmt:
            continue
        offset = text.find(stmt, pos)
        offset = pos if offset < 0 else offset
        pos = offset + len(stmt)
        lead = _LEADING_COMMENTS.match(stmt).end()  # comments sqlparse keeps at a statement's start
        body = stmt[lead:]
        if not body:
            continue
        m = _INSERT_RE.match(body)
        if m:
            name = _unquote_ident(m.group(1)).lower()
            cols = [_unquote_ident(c.strip()) for c in m.group(3).split(",")] if m.group(3) else None
            inserts.setdefault(name, []).append((offset + lead, body, cols, m.end()))
            continue
        m = _CREATE_RE.match(body)
        if m:
            cols = []
            for part in _split_top_level(m.group(2)):
                first = part.split(None, 1)[0]
                if first.lower() not in _CONSTRAINTS:
                    cols.append(_unquote_ident(first))
            creates[_unquote_ident(m.group(1)).lower()] = cols
    if not inserts:
        raise ValueError(f"{path}: no INSERT ... VALUES statement in the file")
    if not table:
        if len(inserts) > 1:
            raise ValueError(f"{path}: several tables have INSERT rows ({', '.join(sorted(inserts))}); "
                             f"choose one with data.sql_table")
        table = next(iter(inserts))
    key = _unquote_ident(table).lower() if re.fullmatch(_IDENT + r"(\." + _IDENT + ")?", table) else table.lower()
    if key not in inserts:
        raise ValueError(f"{path}: no INSERT rows for table {table!r} (data.sql_table); tables with INSERT rows: "
                         f"{', '.join(sorted(inserts))}")
    records, header, mysql = [], None, is_mysql_dump(text)
    for offset, body, cols, values_at in inserts[key]:
        line = text.count("\n", 0, offset) + 1
        cols = cols or creates.get(key)
        if cols is None:
            raise ValueError(f"{path}:{line}: INSERT INTO {table} has no column list and the file has no CREATE TABLE "
                             f"{table}; cannot name the columns")
        header = header or cols
        for start, values in parse_values(body[values_at:], f"{path}:{line}", mysql):
            row_line = line + body.count("\n", 0, values_at + start)
            if len(values) != len(cols):
                raise ValueError(f"{path}:{row_line}: row has {len(values)} values but table {table} has "
                                 f"{len(cols)} columns ({', '.join(cols)})")
            records.append({**dict(zip(cols, values)), "_source": f"{path}:{row_line}"})
    for col in (columns or {}).values():
        if col not in header:
            raise ValueError(f"{path}: table {table!r} has no column {col!r} (available: {', '.join(header)})")
    return map_columns(records, columns or {})
