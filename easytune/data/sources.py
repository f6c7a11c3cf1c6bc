"""Readers: JSON / JSONL / plain-text files -> records with provenance.

A *record* is a ``dict`` parsed from a data file, plus one key added here:
``_source``, a string that says where the record came from, so that every later
error (a missing field, an empty output) can point at the file and line:

============  ==================  ==========================================
file kind     ``_source``         meaning of the number
============  ==================  ==========================================
``.jsonl``    ``"path:LINE"``     1-based line number (as editors show it)
``.json``     ``"path:INDEX"``    0-based index into the top-level list
text          ``"path"``          the whole file is one record ``{"text": ...}``
============  ==================  ==========================================

A ``.json`` file whose content is JSON Lines (what ``datasets.Dataset.to_json``
writes by default) is read as JSONL. Files are decoded as UTF-8, a leading byte
order mark is ignored; bytes that are not UTF-8 raise ``ValueError`` naming the
file and line. A file that yields no record (empty, only blank lines, ``[]``, or
a text file holding only whitespace) raises ``ValueError("no records in FILE ...")``.
Plain ``json`` is all these formats need; ``datasets`` is not used here.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
_GLOB_CHARS = frozenset("*?[")


def expand_paths(patterns: str | os.PathLike | Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """Expands a list of paths and glob patterns into existing files.

    Each pattern containing ``*``, ``?`` or ``[`` is expanded with
    ``glob.glob(pattern, recursive=True)`` and its matches sorted; other entries
    are taken as paths. The order of ``patterns`` is kept and duplicates dropped.

    Args:
        patterns: one path / glob, or a sequence of them.

    Returns:
        The matched files, in order.

    Raises:
        FileNotFoundError: a path does not exist, or a glob matches no file (the
            message names the pattern).
        IsADirectoryError: a path is a directory (use a glob such as ``dir/*.jsonl``).
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
                raise IsADirectoryError(
                        f"data path {pattern!r} is a directory; give files or a glob such as "
                        f"'{pattern.rstrip('/')}/*.jsonl'")
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


def _read_utf8(path: str) -> str:
    """Reads a file as UTF-8 (a leading byte order mark is dropped).

    Raises:
        ValueError: the file is not valid UTF-8; the message names the file, the
            1-based line and the offending byte, and suggests re-encoding.
    """
    data = pathlib.Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # e.object is the decoded buffer (after a BOM); a BOM holds no newline, so lines match the file's.
        raw = e.object
        lineno = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(
            f"{path}:{lineno}: file is not valid UTF-8: byte 0x{raw[e.start]:02x} at line {lineno}, "
            f"byte {column} of the line ({e.reason}); re-encode the file to UTF-8, e.g. "
            f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > fixed{pathlib.Path(path).suffix}` "
            f"if it was saved as Windows-1252 / Latin-1") from None


def _no_records(path: str, why: str):
    raise ValueError(f"no records in {path}: {why}")


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
        text = _read_utf8(path)
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
        _no_records(path, "the file is empty" if not text else "the file holds only blank lines")
    return records


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
    text = _read_utf8(path)
    if not text.strip():
        _no_records(path, "the file is empty" if not text else "the file holds only whitespace")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines under a .json name.
            return read_jsonl(path, text)
        raise ValueError(f"{path}:{e.lineno}: invalid JSON at line {e.lineno}, column {e.colno}: "
                         f"{e.msg}") from None
    if isinstance(data, dict):
        # One object on one line is valid JSON Lines too.
        return read_jsonl(path, text) if "\n" not in text.strip() else _not_a_list(path, data)
    if not isinstance(data, list):
        _not_a_list(path, data)
    if not data:
        _no_records(path, "the top-level JSON list is empty")
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


def read_text(path: str | os.PathLike) -> list[dict]:
    """Reads a plain-text file as one record ``{"text": content, "_source": path}``.

    Args:
        path: the file (UTF-8).

    Returns:
        A one-element list.

    Raises:
        ValueError: bytes that are not UTF-8 (``path:LINE`` named), or a file that is
            empty or only whitespace (``no records in path``).
    """
    path = os.fspath(path)
    text = _read_utf8(path)
    if not text.strip():
        _no_records(path, "the text file is empty" if not text else "the text file holds only whitespace")
    return [{"text": text, "_source": path}]


def read_file(path: str | os.PathLike) -> list[dict]:
    """Reads one file, choosing the reader by suffix (.jsonl/.ndjson, .json, else text).

    Args:
        path: the file.

    Returns:
        Its records with ``_source`` provenance.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: see :func:`read_json`, :func:`read_jsonl` and :func:`read_text`
            (invalid JSON, non-UTF-8 bytes, no records).
    """
    suffix = pathlib.Path(path).suffix.lower()
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"data file not found: {os.fspath(path)!r}")
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(path)
    if suffix in JSON_SUFFIXES:
        return read_json(path)
    return read_text(path)


def read_records(patterns: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """Reads every record of every file matched by ``patterns``, in order.

    Args:
        patterns: paths and globs (``data.train_files``).

    Returns:
        The records, each a dict with the file's fields plus ``_source``.

    Raises:
        FileNotFoundError: a missing file or a glob without matches (named).
        ValueError: invalid JSON, a non-object record, non-UTF-8 bytes (file and
            line/index named), or a file without records (``no records in FILE``).
    """
    if not isinstance(patterns, (str, os.PathLike)):
        patterns = list(patterns)
    records: list[dict] = []
    for path in expand_paths(patterns):
        records.extend(read_file(path))
    return records
