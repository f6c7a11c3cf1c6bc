"""Low-level file reading shared by the record readers (``sources``, ``raw``): bytes, UTF-8 text with the
error messages that name file and line, the "no records" error, and renaming columns to record fields.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

_BOM = b"\xef\xbb\xbf"


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (permissions, a directory); the message names it.
    """
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        _cannot_read(path, e)


def _cannot_read(path, e: OSError):
    """Re-raises a FileNotFoundError; any other OSError becomes ``ValueError("PATH: cannot read the file (...)")``."""
    if isinstance(e, FileNotFoundError):
        raise e
    raise ValueError(f"{os.fspath(path)}: cannot read the file ({e.strerror or e})") from None


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """Opens the file for reading bytes (buffered); close it (``with``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read (permissions, a directory); the message names it.
    """
    try:
        return pathlib.Path(path).open("rb")
    except OSError as e:
        _cannot_read(path, e)


def read_gzip(path: str | os.PathLike) -> bytes:
    """The decompressed bytes of a gzip file (the whole content, in memory).

    Raises:
        FileNotFoundError, ValueError: as :func:`open_binary`; ``ValueError("PATH: cannot read the gzip file
            (...)")`` for a file that is not gzip or is truncated.
    """
    with open_binary(path) as fh:
        try:
            return gzip.GzipFile(fileobj=fh, mode="rb").read()
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{os.fspath(path)}: cannot read the gzip file ({type(e).__name__}: {e})") from None


def read_utf8(path: str | os.PathLike) -> str:
    """Reads a file as UTF-8 (a leading byte order mark is dropped).

    Raises:
        ValueError: the file is not valid UTF-8; the message names the file, the
            1-based line and the offending byte, and suggests re-encoding. An unreadable
            file (see :func:`read_bytes`).
    """
    return decode_utf8(read_bytes(path), path)


def decode_utf8(data: bytes, path: str | os.PathLike, first_line: int = 1) -> str:
    """``data`` (the content of ``path``, or a part of it starting at line ``first_line``) decoded as UTF-8, a
    leading byte order mark dropped when ``first_line == 1``.

    Raises:
        ValueError: not valid UTF-8, with the message of :func:`read_utf8` (file, line, byte).
    """
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        # e.object is the decoded buffer (after a BOM); a BOM holds no newline, so lines match the file's.
        raw = e.object
        lineno = raw[:e.start].count(b"\n") + first_line
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise _not_utf8(path, lineno, column, raw[e.start], e.reason) from None


def _not_utf8(path, lineno: int, column: int, byte: int, reason: str) -> ValueError:
    return ValueError(
            f"{path}:{lineno}: file is not valid UTF-8: byte 0x{byte:02x} at line {lineno}, "
            f"byte {column} of the line ({reason}); re-encode the file to UTF-8, e.g. "
            f"`iconv -f WINDOWS-1252 -t UTF-8 {path} > fixed{pathlib.Path(path).suffix}` "
            f"if it was saved as Windows-1252 / Latin-1")


def first_char(path: str | os.PathLike, compressed: bool = False) -> str:
    """The first character of the file that is not whitespace (a byte order mark skipped), ``""`` when none;
    reads only as far as that character (``compressed``: of the gunzipped content).

    Raises:
        FileNotFoundError, ValueError: as :func:`open_binary` / :func:`read_gzip`.
    """
    with open_binary(path) as fh:
        stream = gzip.GzipFile(fileobj=fh, mode="rb") if compressed else fh
        start = True
        while True:
            try:
                chunk = stream.read(65536)
            except (OSError, EOFError, zlib.error) as e:
                raise ValueError(f"{os.fspath(path)}: cannot read the {'gzip ' if compressed else ''}file "
                                 f"({type(e).__name__}: {e})") from None
            if start and chunk.startswith(_BOM):
                chunk = chunk[len(_BOM):]
            start = False
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode("latin-1")


def _byte_lines(path: str, compressed: bool) -> Iterator[bytes]:
    """The file's lines as bytes (each with its ``\\n``), read through a buffer; gunzipped when ``compressed``."""
    with open_binary(path) as fh:
        lines = iter(gzip.GzipFile(fileobj=fh, mode="rb") if compressed else fh)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as e:
                if not compressed:
                    _cannot_read(path, e)
                raise ValueError(f"{path}: cannot read the gzip file ({type(e).__name__}: {e})") from None
            yield line


def iter_lines(path: str | os.PathLike, compressed: bool = False,
               on_bad: Callable[[str, str], None] | None = None) -> Iterator[tuple[int, str]]:
    """Reads a UTF-8 text file line by line (memory bounded by the longest line), as ``str.splitlines`` of
    :func:`read_utf8`'s text would: yields ``(line number, line)``, 1-based, line ends dropped, a leading
    byte order mark dropped, blank lines included.

    Args:
        path: the file.
        compressed: gunzip it while reading (``.jsonl.gz``).
        on_bad: when given, a line that is not UTF-8 is passed to it as ``(f"{path}:{LINE}", message)`` and
            skipped; otherwise it raises.

    Raises:
        FileNotFoundError, ValueError: as :func:`open_binary` / :func:`read_gzip`; a line that is not UTF-8
            (the message of :func:`read_utf8`, naming the file's line; earlier lines were yielded already).
    """
    path = os.fspath(path)
    lineno = 0
    for physical, raw in enumerate(_byte_lines(path, compressed), start=1):
        if physical == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # the whole line (with its \n) decoded, so e.reason is read_utf8's
            error = _not_utf8(path, physical, e.start + 1, raw[e.start], e.reason)
            if on_bad is None:
                raise error from None
            lineno += 1
            on_bad(f"{path}:{physical}", str(error))
            continue
        for line in text.splitlines():  # a \r, \x85, \u2028 ... inside counts as splitlines counts it
            lineno += 1
            yield lineno, line


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
