"""Readers: JSON / JSONL / plain-text files -> records with provenance, as a list or streamed.

A *record* is a ``dict`` parsed from a data file, plus one key added here:
``_source``, a string that says where the record came from, so that every later
error (a missing field, an empty output) can point at the file and line:

============  ==================  ==========================================
file kind     ``_source``         meaning of the number
============  ==================  ==========================================
``.jsonl``    ``"path:LINE"``     1-based line number (as editors show it)
``.jsonl.gz`` ``"path:LINE"``     line of the decompressed file (also ``.json.gz``)
``.json``     ``"path:INDEX"``    0-based index into the top-level list
text          ``"path"``          the whole file is one record ``{"text": ...}``
``.txt.gz``   ``"path"``          the same, decompressed (also ``.md.gz``)
``.html``     ``"path"``          one record ``{"text", "title"}`` per page
``.csv/.tsv`` ``"path:row N"``    1-based data row (the header is row 0)
``.sql``      ``"path:LINE"``     line where the ``INSERT`` row's tuple starts
``.parquet``  ``"path:row N"``    0-based row (also ``datasets`` files)
============  ==================  ==========================================

HTML, CSV/TSV, SQL dumps, Parquet and other ``datasets`` files (``.arrow``,
``.csv.gz``, ``.jsonl.zst``, ... and a ``.json.gz`` / ``.jsonl.gz`` holding one JSON list) are read by ``raw.py``
with BeautifulSoup, pandas, sqlparse and ``datasets.load_dataset``; :class:`ReadOptions` (from ``config.data``) chooses
the HTML content selector, CSV encoding / delimiter, SQL table and the columns.
A directory given as a path reads every file in it with a known suffix.

:func:`iter_records` streams the records of :func:`read_records` (same records, order and ``_source``):
JSON Lines (``.jsonl``, ``.ndjson``, ``.jsonl.gz``, ``.json.gz``) line by line and Parquet in batches, so memory
does not grow with the file; the other kinds a file at a time. Its ``on_bad`` callback receives the bad lines of
a streamed JSON Lines file (invalid JSON, not an object, not UTF-8) instead of an exception.

A ``.json`` file whose content is JSON Lines (what ``datasets.Dataset.to_json``
writes by default) is read as JSONL. Files are decoded as UTF-8, a leading byte
order mark is ignored; bytes that are not UTF-8 raise ``ValueError`` naming the
file and line. A file that yields no record (empty, only blank lines, ``[]``, or
a text file holding only whitespace) raises ``ValueError("no records in FILE ...")``.
A file that cannot be read (permissions) raises ``ValueError("FILE: cannot read ...")``.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
import pathlib
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from easytune import config as config_lib
from easytune.data import files, raw

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
CSV_SUFFIXES = (".csv", ".tsv", ".tab")
SQL_SUFFIXES = (".sql",)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".md", ".text")
GZIP_JSONL_SUFFIXES = (".jsonl.gz", ".json.gz")  # JSON Lines inside, streamed (a JSON list: DATASETS_SUFFIXES)
GZIP_TEXT_SUFFIXES = (".txt.gz", ".md.gz")
# ``datasets.load_dataset`` builders for the files it reads that the readers above do not.
DATASETS_SUFFIXES = {".arrow": "arrow", ".json.gz": "json", ".jsonl.gz": "json", ".csv.gz": "csv",
                     ".jsonl.zst": "json", ".json.xz": "json", ".jsonl.xz": "json"}
KNOWN_SUFFIXES = (JSONL_SUFFIXES + JSON_SUFFIXES + HTML_SUFFIXES + CSV_SUFFIXES + SQL_SUFFIXES
                  + PARQUET_SUFFIXES + TEXT_SUFFIXES + GZIP_TEXT_SUFFIXES + tuple(DATASETS_SUFFIXES))
OnBad = Callable[[str, str], None]  # on_bad(where "path:LINE", message): a skipped bad line


_DATA = config_lib.defaults().data  # the defaults of the reader options (config.defaults() is their one home)


# kinds read a file at a time by _read_whole_file (anything else is plain text)
WHOLE_FILE_SUFFIXES = JSON_SUFFIXES + HTML_SUFFIXES + CSV_SUFFIXES + SQL_SUFFIXES + tuple(DATASETS_SUFFIXES)


@dataclass(frozen=True)
class ReadOptions:
    """How to read the non-JSON sources (``config.data`` keys, built by :meth:`from_config`); a field left out
    takes its ``config.defaults()`` value.

    Attributes:
        columns: record field -> source column (CSV/TSV, SQL, Parquet, ``datasets`` files and
            JSON records); empty keeps every column under its own name.
        html_selector: CSS selector of the content of an HTML page (``""``: ``main``, ``article``,
            ``[role=main]`` or ``body``, the first present).
        csv_encoding: encoding of CSV/TSV files (``"utf-8"`` also drops a byte order mark).
        csv_delimiter: field delimiter (``""``: ``,`` for .csv, tab for .tsv/.tab).
        sql_table: the table whose ``INSERT`` rows become records (``""``: the only table with rows).
        text_piece_bytes: a plain-text file larger than this is read in pieces (:func:`iter_text`); 0 = whole.
    """
    columns: Mapping[str, str] = field(default_factory=lambda: parse_columns(_DATA.columns))
    html_selector: str = _DATA.html_selector
    csv_encoding: str = _DATA.csv_encoding
    csv_delimiter: str = _DATA.csv_delimiter
    sql_table: str = _DATA.sql_table
    text_piece_bytes: int = 0

    @classmethod
    def from_config(cls, data_cfg) -> "ReadOptions":
        """From ``config.data`` (a complete ConfigDict: ``columns``, ``html_selector``, ``csv_encoding``,
        ``csv_delimiter``, ``sql_table``); an empty ``csv_encoding`` means UTF-8.

        Raises:
            ValueError: a malformed ``data.columns`` (:func:`parse_columns`).
        """
        return cls(columns=parse_columns(data_cfg.columns), html_selector=data_cfg.html_selector,
                   csv_encoding=data_cfg.csv_encoding or "utf-8", csv_delimiter=data_cfg.csv_delimiter,
                   sql_table=data_cfg.sql_table)


def parse_columns(spec: str | Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    """``"instruction=Question,output=Best Answer"`` -> ``{"instruction": "Question", "output": "Best Answer"}``.

    An entry without ``=`` keeps the column's own name (``"Name"`` -> ``{"Name": "Name"}``).

    Raises:
        ValueError: an entry with an empty field or column name.
    """
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        fld, _, col = item.partition("=")
        fld, col = fld.strip(), (col.strip() if _ else fld.strip())
        if not fld or not col:
            raise ValueError(f"data.columns entry {item!r}: use FIELD=COLUMN or COLUMN")
        out[fld] = col
    return out


def _suffix(path) -> str:
    """The reader-relevant suffix: ``.jsonl.gz`` for compressed files, else the last one (lower case)."""
    name = pathlib.Path(path).name.lower()
    for compound in (*DATASETS_SUFFIXES, *GZIP_TEXT_SUFFIXES):
        if name.endswith(compound):
            return compound
    return pathlib.Path(name).suffix


_GLOB_CHARS = frozenset("*?[")


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """Expands a list of paths and glob patterns into existing files.

    Each pattern containing ``*``, ``?`` or ``[`` is expanded with
    ``glob.glob(pattern, recursive=True)`` and its matches sorted; other entries
    are taken as paths; a directory stands for its files with a known suffix
    (``KNOWN_SUFFIXES``, recursively, sorted). The order of ``patterns`` is kept and
    duplicates dropped.

    Args:
        patterns: one path / glob, or a sequence of them.

    Returns:
        The matched files, in order.

    Raises:
        FileNotFoundError: a path does not exist, or a glob matches no file (the
            message names the pattern).
        IsADirectoryError: a directory holding no file with a known suffix.
        ValueError: ``patterns`` is empty.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    patterns = [os.fspath(p) for p in patterns]
    if not patterns:
        raise ValueError("no data files given (data.train_files is empty)")
    out: list[pathlib.Path] = []
    seen: set[pathlib.Path] = set()
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(m for m in glob.glob(pattern, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"glob {pattern!r} matched no file (cwd: {os.getcwd()})")
            paths = [pathlib.Path(m) for m in matches]
        else:
            path = pathlib.Path(pattern)
            if not path.exists():
                raise FileNotFoundError(f"data file not found: {pattern!r} (cwd: {os.getcwd()})")
            if path.is_dir():
                paths = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in KNOWN_SUFFIXES)
                if not paths:
                    raise IsADirectoryError(
                            f"data path {pattern!r} is a directory without data files ({', '.join(KNOWN_SUFFIXES)});"
                            f" give files or a glob such as '{pattern.rstrip('/')}/*.jsonl'")
            else:
                paths = [path]
        for path in paths:
            if path not in seen:
                seen.add(path)
                out.append(path)
    return out


def _check_object(obj, where: str, label: str = "record") -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: {label} is {_json_type(obj)}, expected a JSON object "
                         f"(e.g. {{\"instruction\": ..., \"output\": ...}})")
    return obj


def _json_type(obj) -> str:
    """'a JSON array', 'a JSON string', ... for error messages."""
    name = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", dict: "object",
            type(None): "null"}.get(type(obj), type(obj).__name__)
    return f"a JSON {name}"


def read_jsonl(path: str | os.PathLike, text: str | None = None) -> list[dict]:
    """Reads a JSON Lines file: one JSON object per line, blank lines skipped.

    Args:
        path: the file.
        text: its content, when already read (otherwise read from ``path``).

    Returns:
        The records, each with ``_source = "path:LINE"`` (1-based line).

    Raises:
        ValueError: invalid JSON on a line (message ``path:LINE: invalid JSON ...``),
            a line holding something other than an object, bytes that are not UTF-8
            (``path:LINE`` named), or no record at all (``no records in path``).
    """
    path = os.fspath(path)
    if text is None:
        text = files.read_utf8(path)
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from None
        record = dict(_check_object(obj, where))
        record["_source"] = where
        records.append(record)
    if not records:
        files.no_records(path, "the file is empty" if not text else "the file holds only blank lines")
    return records


def iter_jsonl(path: str | os.PathLike, on_bad: OnBad | None = None, compressed: bool = False) -> Iterator[dict]:
    """Streams a JSON Lines file: the records of :func:`read_jsonl`, read line by line (memory holds one line).

    Args:
        path: the file.
        on_bad: when given, a bad line (invalid JSON, not an object, not UTF-8) is passed to it as
            ``(f"{path}:{LINE}", message)`` (the message the ``ValueError`` would carry) and skipped.
        compressed: the file is gzip (``.jsonl.gz``).

    Yields:
        The records, each with ``_source = "path:LINE"`` (1-based line of the (decompressed) file).

    Raises:
        ValueError: as :func:`read_jsonl`, raised when the bad line is reached (earlier records were yielded);
            with ``on_bad`` only the file-level ones (unreadable, not gzip, no record at all).
    """
    path = os.fspath(path)
    count = bad = 0
    seen = False

    def report(where: str, message: str):
        nonlocal bad
        bad += 1
        on_bad(where, message)

    for lineno, line in files.iter_lines(path, compressed, report if on_bad else None):
        seen = True
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            message = f"{where}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}"
            if on_bad is None:
                raise ValueError(message) from None
            report(where, message)
            continue
        if not isinstance(obj, dict):
            try:
                _check_object(obj, where)
            except ValueError as e:
                if on_bad is None:
                    raise
                report(where, str(e))
                continue
        count += 1
        yield {**obj, "_source": where}
    if not count:
        files.no_records(path, f"no valid line ({bad} bad lines skipped)" if bad
                         else "the file holds only blank lines" if seen else "the file is empty")


def read_json(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON file holding a list of objects (JSON Lines content also accepted).

    Args:
        path: the file.

    Returns:
        The records, each with ``_source = "path:INDEX"`` (0-based list index), or
        ``"path:LINE"`` when the file turned out to be JSON Lines.

    Raises:
        ValueError: invalid JSON (the message gives line and column), a top level
            that is not a list, an element that is not an object (named by index),
            bytes that are not UTF-8 (``path:LINE`` named), or no record at all
            (empty file or ``[]``; ``no records in path``).
    """
    path = os.fspath(path)
    text = files.read_utf8(path)
    if not text.strip():
        files.no_records(path, "the file is empty" if not text else "the file holds only whitespace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines under a .json name.
            return read_jsonl(path, text)
        raise ValueError(f"{path}:{e.lineno}: invalid JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg}") from None
    if isinstance(data, dict):
        if "conversations" in data or "messages" in data:  # one conversation saved on its own
            return [dict(data, _source=f"{path}:0")]
        # One object on one line is valid JSON Lines too.
        return read_jsonl(path, text) if "\n" not in text.strip() else _not_a_list(path, data)
    if not isinstance(data, list):
        _not_a_list(path, data)
    if not data:
        files.no_records(path, "the top-level JSON list is empty")
    records = []
    for index, obj in enumerate(data):
        where = f"{path}:{index}"
        record = dict(_check_object(obj, where, f"record {index} (0-based index in the list)"))
        record["_source"] = where
        records.append(record)
    return records


def _not_a_list(path: str, data):
    raise ValueError(f"{path}: top-level JSON is {_json_type(data)}, expected a list of records "
                     f"(or JSON Lines, one object per line)")


def read_text(path: str | os.PathLike, compressed: bool = False) -> list[dict]:
    """Reads a plain-text file as one record ``{"text": content, "_source": path}``.

    Args:
        path: the file (UTF-8).
        compressed: the file is gzip (``.txt.gz``); ``content`` is the decompressed text.

    Returns:
        A one-element list.

    Raises:
        ValueError: bytes that are not UTF-8 (``path:LINE`` named), a file that is
            empty or only whitespace (``no records in path``), an unreadable or (``compressed``) not gzip file.
    """
    path = os.fspath(path)
    text = files.decode_utf8(files.read_gzip(path), path) if compressed else files.read_utf8(path)
    if not text.strip():
        files.no_records(path, "the text file is empty" if not text else "the text file holds only whitespace")
    return [{"text": text, "_source": path}]


def iter_file(path: str | os.PathLike, options: ReadOptions | None = None,
              on_bad: OnBad | None = None) -> Iterator[dict]:
    """Streams one file's records (those of :func:`read_file`, in order), choosing the reader by suffix.

    JSON Lines (``.jsonl``/``.ndjson``, ``.jsonl.gz``/``.json.gz``) are read line by line (:func:`iter_jsonl`;
    a compressed file whose content starts with ``[`` is one JSON list, read by ``datasets``), Parquet in
    batches (``raw.iter_parquet``); the other kinds a file at a time. ``options.columns`` then maps source
    columns to record fields.

    Args:
        path: the file.
        options: reader options (defaults: :class:`ReadOptions`).
        on_bad: receives the bad lines of a streamed JSON Lines file (see :func:`iter_jsonl`); ``None`` raises.

    Raises:
        FileNotFoundError: the file does not exist (when the generator starts).
        ValueError: as :func:`read_file`; a bad JSON Lines line when it is reached.
    """
    options = options or ReadOptions()  # the config.defaults() reader options
    suffix = _suffix(path)
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {os.fspath(path)!r}")
    gzip_jsonl = suffix in GZIP_JSONL_SUFFIXES and files.first_char(path, compressed=True) != "["
    if suffix in JSONL_SUFFIXES or gzip_jsonl:
        columns = options.columns
        for record in iter_jsonl(path, on_bad, compressed=gzip_jsonl):
            yield files.map_columns([record], columns)[0] if columns else record
    elif suffix in PARQUET_SUFFIXES:
        yield from raw.iter_parquet(path, options.columns)
    elif suffix in GZIP_TEXT_SUFFIXES:
        yield from iter_text(path, options.text_piece_bytes, compressed=True)
    elif suffix in WHOLE_FILE_SUFFIXES:
        yield from _read_whole_file(path, suffix, options)
    else:
        yield from iter_text(path, options.text_piece_bytes)


def iter_text(path: str | os.PathLike, piece_bytes: int = 0, compressed: bool = False) -> Iterator[dict]:
    """A plain-text file as one document: the record of :func:`read_text`, or, for a file of more than
    ``piece_bytes`` bytes, the document in pieces of about ``piece_bytes`` bytes cut after a line end (memory
    bounded by the piece, not the file).

    Piece records are ``{"text": piece, "_source": "path:LINE", "_piece": k, "_last_piece": bool}`` (``LINE``:
    the 1-based line the piece starts at; ``k`` from 0); ``formats.format_documents`` frames the whole document
    once (bos before piece 0, eos after the last piece), so the token stream is the document's, except that
    each piece is tokenized on its own (a token may differ where two pieces meet).

    Args:
        path: the file (UTF-8).
        piece_bytes: the size of a piece; 0 = the whole file as one record.
        compressed: gunzip it (``.txt.gz``); ``piece_bytes`` counts decompressed bytes.

    Raises:
        ValueError: as :func:`read_text` (non-UTF-8 bytes named by ``path:LINE``, an empty file, an unreadable
            or not-gzip file).
    """
    if not piece_bytes:
        yield from read_text(path, compressed=compressed)
        return
    path = os.fspath(path)
    pieces = _byte_pieces(path, int(piece_bytes), compressed)
    first, second = next(pieces, b""), next(pieces, None)
    if second is None:  # small enough: the record of read_text
        text = files.decode_utf8(first, path)
        if not text.strip():
            files.no_records(path, "the text file is empty" if not text else "the text file holds only whitespace")
        yield {"text": text, "_source": path}
        return
    line, k, current = 1, 0, first
    for nxt in itertools.chain([second], pieces):
        yield {"text": files.decode_utf8(current, path, line), "_source": f"{path}:{line}", "_piece": k,
               "_last_piece": False}
        line, k, current = line + current.count(b"\n"), k + 1, nxt
    yield {"text": files.decode_utf8(current, path, line), "_source": f"{path}:{line}", "_piece": k,
           "_last_piece": True}


def _byte_pieces(path: str, piece_bytes: int, compressed: bool) -> Iterator[bytes]:
    """The file's bytes in pieces of at least ``piece_bytes`` (the last may be shorter), each ending after a
    ``\\n`` (a line longer than a piece stays whole)."""
    with files.open_binary(path) as fh:
        stream = gzip.GzipFile(fileobj=fh, mode="rb") if compressed else fh
        buf = b""
        while True:
            try:
                block = stream.read(piece_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise ValueError(f"{path}: cannot read the {'gzip ' if compressed else ''}file "
                                 f"({type(e).__name__}: {e})") from None
            if not block:
                break
            buf += block
            cut = buf.rfind(b"\n") + 1
            if cut and len(buf) >= piece_bytes:
                yield buf[:cut]
                buf = buf[cut:]
        if buf:
            yield buf


def _read_whole_file(path, suffix: str, options: ReadOptions) -> list[dict]:
    """The file-at-a-time readers of :func:`iter_file` (its kinds that are not streamed)."""
    if suffix in JSON_SUFFIXES:
        return files.map_columns(read_json(path), options.columns)
    if suffix in HTML_SUFFIXES:
        return raw.read_html(path, options.html_selector)
    if suffix in CSV_SUFFIXES:
        delimiter = options.csv_delimiter or ("," if suffix == ".csv" else "\t")
        return raw.read_csv(path, options.columns, encoding=options.csv_encoding, delimiter=delimiter)
    if suffix in SQL_SUFFIXES:
        return raw.read_sql(path, options.sql_table, options.columns)
    if suffix in DATASETS_SUFFIXES:
        return raw.read_with_datasets(path, DATASETS_SUFFIXES[suffix], options.columns)
    return read_text(path)


def read_file(path: str | os.PathLike, options: ReadOptions | None = None) -> list[dict]:
    """Reads one file, choosing the reader by suffix: ``list(iter_file(path, options))``.

    ``.jsonl``/``.ndjson``, ``.json``, ``.html``/``.htm``, ``.csv``/``.tsv``, ``.sql``,
    ``.parquet``, ``.jsonl.gz``/``.json.gz`` (JSON Lines), ``.txt.gz``/``.md.gz`` (text), ``datasets`` files
    (``.arrow``, ``.csv.gz``, ...); anything else is plain text. ``options.columns`` then maps source
    columns to record fields.

    Args:
        path: the file.
        options: reader options (defaults: :class:`ReadOptions`).

    Returns:
        Its records with ``_source`` provenance.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: see the readers (invalid JSON, non-UTF-8 bytes, no records, an
            unreadable file, a missing column (the available ones listed), an SQL file
            without ``INSERT`` rows for the table).
    """
    return list(iter_file(path, options))


def iter_records(patterns: str | os.PathLike | Iterable[str | os.PathLike], options: ReadOptions | None = None,
                 on_bad: OnBad | None = None) -> Iterator[dict]:
    """Streams every record of every file matched by ``patterns``: the records of :func:`read_records`, in the
    same order with the same ``_source``, without holding a JSON Lines or Parquet file in memory
    (:func:`iter_file`).

    Args:
        patterns: paths, directories and globs (``data.train_files``); expanded now, by :func:`expand_paths`.
        options: reader options (:meth:`ReadOptions.from_config` of ``config.data``).
        on_bad: ``on_bad(where, message)`` receives each bad line of a streamed JSON Lines file (invalid JSON,
            not an object, not UTF-8; ``where = "path:LINE"``, ``message`` the ``ValueError``'s text), which is
            then skipped; ``None`` raises instead. File-level errors raise either way.

    Returns:
        An iterator of the records (dicts with the file's fields plus ``_source``).

    Raises:
        FileNotFoundError: a missing file or a glob without matches (named), on the call.
        ValueError: ``patterns`` empty (on the call); while iterating, the errors of :func:`read_records`, each
            when its file or line is reached (earlier records were yielded already).
    """
    if not isinstance(patterns, (str, os.PathLike)):
        patterns = list(patterns)
    paths = expand_paths(patterns)
    return (record for path in paths for record in iter_file(path, options, on_bad))


def read_records(patterns: str | os.PathLike | Iterable[str | os.PathLike],
                 options: ReadOptions | None = None) -> list[dict]:
    """Reads every record of every file matched by ``patterns``, in order: ``list(iter_records(...))``.

    Args:
        patterns: paths, directories and globs (``data.train_files``).
        options: reader options (:meth:`ReadOptions.from_config` of ``config.data``).

    Returns:
        The records, each a dict with the file's fields plus ``_source``.

    Raises:
        FileNotFoundError: a missing file or a glob without matches (named).
        ValueError: invalid JSON, a non-object record, non-UTF-8 bytes (file and
            line/index named), a file without records (``no records in FILE``), a
            missing column, an unreadable file.
    """
    return list(iter_records(patterns, options))
