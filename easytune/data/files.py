"""Low-level file reading shared by the record readers (``sources``, ``raw``): bytes, UTF-8 text with the
error messages that name file and line, the "no records" error, and renaming columns to record fields.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (permissions, a directory); the message names it.
    """
    try:
        return pathlib.Path(path).read_bytes()
    except (PermissionError, IsADirectoryError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{os.fspath(path)}: cannot read the file ({e.strerror or e})") from None


def read_utf8(path: str | os.PathLike) -> str:
    """Reads a file as UTF-8 (a leading byte order mark is dropped).

    Raises:
        ValueError: the file is not valid UTF-8; the message names the file, the
            1-based line and the offending byte, and suggests re-encoding. An unreadable
            file (see :func:`read_bytes`).
    """
    data = read_bytes(path)
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


def no_records(path: str | os.PathLike, why: str):
    """Raises ``ValueError("no records in PATH: WHY")``, the error of a file that yields no record."""
    raise ValueError(f"no records in {os.fspath(path)}: {why}")


def map_columns(records: list[dict], columns: Mapping[str, str]) -> list[dict]:
    """Renames source columns to record fields: ``{field: record[column]}`` (+ ``_source``).

    Args:
        records: records with ``_source``.
        columns: field -> column; empty returns ``records`` unchanged.

    Raises:
        ValueError: a column missing from a record (``FILE:LINE: no column 'X' (available: ...)``).
    """
    if not columns:
        return records
    out = []
    for r in records:
        missing = [c for c in columns.values() if c not in r]
        if missing:
            keys = [k for k in r if k != "_source"]
            raise ValueError(f"{r['_source']}: no column {missing[0]!r} (available: {', '.join(map(str, keys))})")
        out.append({**{f: r[c] for f, c in columns.items()}, "_source": r["_source"]})
    return out
