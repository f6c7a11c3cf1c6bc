"""Cleaning records before formatting: unicode, mojibake, whitespace, phrases, length, duplicates.

Every step works on the record's *text slots*: its top-level string fields and the strings
inside lists of objects (``messages[i].content``, ``conversations[i].value``), skipping keys
that start with ``_`` (``_source``). ``data.clean.fields`` restricts the steps to some
top-level fields (e.g. ``["output"]`` to look for refusals only in responses). Steps, in order,
each reporting how many records it changed and dropped (``data.clean.*`` keys):

===========================  =========================================================
step                         what it does
===========================  =========================================================
``fix_mojibake``             ``ftfy.fix_encoding``: UTF-8 read as Latin-1/cp1252 (``"cafÃ©"`` -> ``"café"``)
``unicode_normalization``    ``unicodedata.normalize(form)`` (``"NFC"``, ``"NFKC"``, ...)
``remove_furniture``         page furniture: a line (compared by :func:`furniture_key`) among the first / last
                             ``furniture_edge_lines`` non-blank lines of more than ``furniture_min_fraction`` of
                             the pages of a document (3 pages at least), or of its odd or even pages, is removed
                             (:func:`find_furniture`); a record a text of which is left blank is dropped
``remove_control_chars``     drops Unicode category Cc/Cf characters except ``\\n`` and ``\\t``; ``\\r\\n`` -> ``\\n``
``normalize_whitespace``     exotic spaces -> ``" "``, trailing spaces cut, 3+ newlines -> 2, ends stripped
                             (indentation is kept: code stays code)
``phrases``                  boilerplate / refusal / slop phrases, case-insensitive substrings:
                             ``phrase_action = "drop"`` drops the record, ``"cut_sentence"`` removes each
                             sentence holding one (a record left empty is dropped)
``min_length/max_length``    characters over all text slots; outside the bounds -> dropped
``dedup_exact``              same normalized text (NFKC, casefold, whitespace and punctuation removed)
                             -> later copies dropped (16-byte BLAKE2b digest of the normalized text)
``dedup_near``               MinHash over word 5-gram shingles, or character n-grams for a record whose
                             units (:func:`script_counts`) are >= 30% characters of scripts written without
                             spaces (:func:`shingles`) + LSH (``datasketch``); a record that shares an LSH band
                             with a kept one and whose estimated Jaccard similarity to it reaches
                             ``near_dup_threshold`` is dropped; counted per script-based language label
                             (:func:`language_label`, :attr:`Cleaner.languages`)
===========================  =========================================================

Page furniture (``remove_furniture``): a *page* is a piece of a text slot between form feeds (``\\f``, the page
break of RFC text and of ``pdftotext`` output; ``html_to_text`` writes one between the pages of an "htmlized" RFC;
blank pages do not count). A *document* is one text slot of one record (``furniture_group = ""``), or, with
``furniture_group``, the texts of one field name (``"text"``, ``"messages[].content"``) in consecutive records of
one group: ``"source_file"`` (records read from the same file: one page per row of a JSONL / CSV file),
``"source_dir"`` (files of one folder: the HTML pages of one site) or ``"field:NAME"`` (records with the same
value of field NAME, which is not itself cleaned). Grouped, a one-line text (an HTML page's ``title``, an ``id``)
is no page: it neither counts nor is cleaned, so it does not dilute the pages of the field that holds them. Records
of a group are held back until the group ends (a record of another group, or :meth:`Cleaner.flush`); a group's
furniture is decided on its first ``FURNITURE_SAMPLE_PAGES`` pages and removed from all of them.

Lines are compared by :func:`furniture_key` (whitespace collapsed, casefolded, digit runs -> ``0``, so
``"[Page 3]"`` matches ``"[Page 12]"``; body lines that differ only in their numbers match too; in a line without
another letter, a roman numeral is a number: ``"- iv -"``); lines without a letter or digit are never furniture.
A line with no letter (``"17"``, ``"- iv -"``, ``"391"``) is furniture only when its numbers strictly increase
over the pages it is on, as page numbers do. Only a page's *edges* are looked at, where running headers and
footers are: its first / last ``furniture_edge_lines`` non-blank lines, fewer on a short page (at most
``(n - 1) // 2`` of its ``n`` non-blank lines, at least one: a page of 3 lines has its first and last as edges).
A line at the edges of more than ``furniture_min_fraction`` of the pages is removed *whatever it is*: a body line
that ends most pages (``return 0;`` closing a listing per page, ``Example:``) goes too; a line deeper in the page
never does (``furniture_edge_lines = 0`` looks at every line). A line at the edges of more than
``furniture_min_fraction`` of the odd pages, or of the even pages, and on 3 of them at least, is furniture too: the
alternating running heads of a book (the book's title on the left pages, the chapter's on the right). Removed
lines go with their newline; blank lines and form feeds stay (``normalize_whitespace`` and
``remove_control_chars`` tidy them). A record a text of which the step leaves blank is dropped (counted in the
step's ``dropped``, named in its ``examples``). The step reports ``lines_removed``.

Near-dedup shingles are chosen per record from its letters' Unicode scripts (:func:`char_ngram`), not from
whether it holds a space: Chinese with a few Latin words and spaces still gets character n-grams. The share is of
*units*: a character of a script written without spaces is one, a word of another script is one
(``"使用pip install numpy安装NumPy库"``: 5 Han units, 4 Latin ones), as a Han character carries about what a
short word does; the language label is the script with the most units. The n-gram:
3 for Han / kana, 5 for Thai, Lao, Khmer, Myanmar, Tibetan. Data-Juicer's MinHash deduplicator shingles
Chinese by character with a window of 5 (``tokenization="character"``, ``window_size=5``); on LLaMA-Factory's
``identity.json`` (75 short Chinese records, 59 characters on average) a one-character edit keeps the Jaccard
similarity >= 0.8 for all of them with 3-grams but for 84% with 5-grams, while distinct records stay apart
(99th percentile 0.51 with 3-grams, 0.42 with 5-grams); a Han character carries about what a syllable or short
word does, and a Thai letter what a Latin letter does, hence 5 there.

The default phrase list (``phrases = "default"``) is ours, in English and Chinese
(``easytune/data/phrases/default_*.txt``); ``phrase_files`` adds user lists: ``.txt`` (one
phrase per line, ``#`` comments), ``.json`` (a list of strings, or of ``[phrase, weight]``
pairs as antislop's lists) or ``.yaml`` (a list, or a mapping of lists as gptslop's files).

References:
    Broder, "On the resemblance and containment of documents" (1997) for MinHash;
    Lee et al., "Deduplicating Training Data Makes Language Models Better" (2022) for
    near-duplicate removal before training; ``ftfy`` (Speer, 2019) for mojibake repair.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from easytune import config as config_lib

PHRASE_DIR = pathlib.Path(__file__).with_name("phrases")
PHRASE_ACTIONS = ("drop", "cut_sentence")
# a sentence: up to and including its end punctuation (Latin or CJK) or a newline
_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+[\"'”’)]*[ \t]*|\n|$)")
_EXOTIC_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
FURNITURE_MIN_PAGES = 3  # a document with fewer (non-blank) pages has no furniture
FURNITURE_SAMPLE_PAGES = 1000  # a furniture group's lines are counted on its first pages (memory: those records)
FURNITURE_GROUPS = ("", "source_file", "source_dir", "field:NAME")


@dataclass(frozen=True)
class CleanConfig:
    """The ``data.clean`` keys (see the module docstring), read once by :meth:`from_config`; lengths are in
    characters. No field has a default: ``config.defaults()`` is the one home of those."""
    fix_mojibake: bool
    unicode_normalization: str
    remove_control_chars: bool
    normalize_whitespace: bool
    remove_furniture: bool
    furniture_min_fraction: float
    furniture_edge_lines: int
    furniture_group: str
    phrases: str
    phrase_files: tuple[str, ...]
    phrase_action: str
    fields: tuple[str, ...]
    min_length: int
    max_length: int
    dedup_exact: bool
    dedup_near: bool
    near_dup_threshold: float
    minhash_num_perm: int

    @classmethod
    def from_config(cls, cfg=None) -> "CleanConfig":
        """From ``config.data.clean``: a ConfigDict or a mapping, possibly partial (absent keys take their
        ``config.defaults()`` values; old comma-separated ``phrase_files`` / ``fields`` strings are read too).

        Raises:
            easytune.config.ConfigError: an unknown key, or a value of the wrong type.
        """
        c = config_lib.with_defaults(cfg, "data.clean")
        values = {f.name: c[f.name] for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_phrases(spec: str = "default", files: str | Sequence[str] = "") -> list[str]:
    """The phrase list: the default one (``spec == "default"``) plus user files.

    Args:
        spec: ``"default"`` (our English + Chinese lists) or ``""`` (none).
        files: paths (a list, or one comma-separated string) of ``.txt``, ``.json`` or ``.yaml`` lists.

    Returns:
        Lower-cased phrases, de-duplicated, in file order.

    Raises:
        ValueError: an unknown ``spec``, an unreadable / malformed list (file named), or a
            file holding no phrase.
    """
    if spec not in ("", "default"):
        raise ValueError(f"data.clean.phrases must be 'default' or '', got {spec!r} (user lists go in "
                         f"data.clean.phrase_files)")
    paths = sorted(PHRASE_DIR.glob("default_*.txt")) if spec == "default" else []
    if isinstance(files, str):
        files = [f.strip() for f in files.split(",") if f.strip()]
    out: dict[str, None] = {}
    for path in [*paths, *map(pathlib.Path, files)]:
        found = _read_phrase_file(path)
        if not found:
            raise ValueError(f"{path}: phrase list holds no phrase")
        out.update(dict.fromkeys(p.lower() for p in found))
    return list(out)


def _read_phrase_file(path: pathlib.Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the phrase list ({e})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON in the phrase list: {e.msg}") from None
        return _flatten_phrases(data, path)
    if suffix in (".yaml", ".yml"):
        import yaml
        try:
            return _flatten_phrases(yaml.safe_load(text), path)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML in the phrase list: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _flatten_phrases(data, path) -> list[str]:
    if isinstance(data, str):
        return [data] if data.strip() else []
    if isinstance(data, Mapping):
        return [p for v in data.values() for p in _flatten_phrases(v, path)]
    if isinstance(data, list):
        out = []
        for item in data:
            if isinstance(item, list) and item and isinstance(item[0], str):  # [phrase, weight]
                out.append(item[0])
            else:
                out.extend(_flatten_phrases(item, path))
        return [p.strip() for p in out if p.strip()]
    if data is None:
        return []
    raise ValueError(f"{path}: phrase list must hold strings, got {type(data).__name__}")


def _named_slots(record: dict, fields: Sequence[str]) -> Iterator[tuple[object, object, str]]:
    """``(container, key, name)`` for each text string of ``record`` (see the module docstring); ``name`` is the
    field's (``"text"``), or ``"messages[].content"`` for a string inside a list of objects."""
    for key, value in record.items():
        if key.startswith("_") or (fields and key not in fields):
            continue
        if isinstance(value, str):
            yield record, key, key
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    for k, v in item.items():
                        if isinstance(v, str) and k in ("content", "value", "text"):
                            yield item, k, f"{key}[].{k}"


def _slots(record: dict, fields: Sequence[str]) -> Iterator[tuple[object, object]]:
    """``(container, key)`` for each text string of ``record`` (see the module docstring)."""
    return ((c, k) for c, k, _ in _named_slots(record, fields))


def record_text(record: dict, fields: Sequence[str] = ()) -> str:
    """All text slots of ``record`` joined by newlines (what length and dedup look at)."""
    return "\n".join(c[k] for c, k in _slots(record, fields))


def _copy(record: dict) -> dict:
    return {k: ([dict(i) if isinstance(i, dict) else i for i in v] if isinstance(v, list) else v)
            for k, v in record.items()}


def _map_text(records: list[dict], fn: Callable[[str], str], fields) -> tuple[list[dict], int]:
    """Applies ``fn`` to every text slot; returns the new records and how many changed."""
    out, changed = [], 0
    for r in records:
        r2, diff = _copy(r), False
        for container, key in list(_slots(r2, fields)):
            new = fn(container[key])
            if new != container[key]:
                container[key] = new
                diff = True
        changed += diff
        out.append(r2)
    return out, changed


def remove_control_chars(text: str) -> str:
    """Drops Cc/Cf characters except newline and tab; ``\\r\\n`` and lone ``\\r`` become ``\\n``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"))


def normalize_whitespace(text: str) -> str:
    """Exotic spaces -> space, trailing spaces per line cut, 3+ newlines -> 2, ends stripped."""
    text = _EXOTIC_SPACES.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def phrase_pattern(phrases: Sequence[str]) -> re.Pattern | None:
    """A case-insensitive regex matching any phrase (longest first); None for no phrase."""
    if not phrases:
        return None
    return re.compile("|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True)), re.IGNORECASE)


def cut_sentences(text: str, pattern: re.Pattern) -> str:
    """Removes every sentence of ``text`` that holds a match of ``pattern`` (ends stripped)."""
    kept = [s for s in _SENTENCE.findall(text) if s and not pattern.search(s)]
    return "".join(kept).strip()


def normalized_key(text: str) -> str:
    """The text exact-dedup compares: NFKC, casefolded, punctuation and whitespace removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    # the per-character test runs once per distinct character; str.translate does the deleting
    drop = [ch for ch in set(text) if ch.isspace() or unicodedata.category(ch).startswith("P")]
    return text.translate(dict.fromkeys(map(ord, drop))) if drop else text


# ------------------------------------------------------------------------------------ page furniture

_DIGITS = re.compile(r"\d+")
_NUMBER_OR_WORD = re.compile(r"[^\W\d_]+|\d+")  # a run of letters or a run of digits
_ROMAN = re.compile(r"m{0,4}(?:cm|cd|d?c{0,3})(?:xc|xl|l?x{0,3})(?:ix|iv|v?i{0,3})")  # casefolded, whole token
_ROMAN_VALUES = {"m": 1000, "d": 500, "c": 100, "l": 50, "x": 10, "v": 5, "i": 1}


def _roman_value(token: str) -> int:
    """The value of a (casefolded, valid) roman numeral: ``"xiv"`` -> 14."""
    values = [_ROMAN_VALUES[ch] for ch in token]
    return sum(-v if v < nxt else v for v, nxt in zip(values, values[1:] + [0]))


def _line_key(line: str) -> tuple[str, tuple[tuple[int, int], ...] | None]:
    """``(furniture_key(line), numbers)``: ``numbers`` is None for a line with a letter; for a *letterless* line (no
    letter but in whole-token roman numerals) the numbers it holds in order, ``(0, value)`` for a roman numeral and
    ``(1, value)`` for a digit run (so that front matter's ``i, ii, ...`` sorts before ``1, 2, ...``)."""
    text = " ".join(line.split()).casefold()
    if not any(ch.isalnum() for ch in text):
        return "", None
    words = [t for t in _NUMBER_OR_WORD.findall(text) if not t.isdigit()]
    if words and not all(_ROMAN.fullmatch(w) for w in words):
        return _DIGITS.sub("0", text), None
    numbers: list[tuple[int, int]] = []

    def number(m: re.Match) -> str:
        token = m.group(0)
        try:
            numbers.append((1, int(token)) if token[0].isdigit() else (0, _roman_value(token)))
        except ValueError:  # a digit int() does not read
            numbers.append((1, 0))
        return "0"
    return _NUMBER_OR_WORD.sub(number, text), tuple(numbers)


def furniture_key(line: str) -> str:
    """What page-furniture detection compares: the line with whitespace runs as one space, ends stripped,
    casefolded and each run of digits as ``0`` (``"RFC 2616   June 1999   [Page 12]"`` -> ``"rfc 0 june 0 [page 0]"``);
    in a line with no other letter a whole-token roman numeral is a number too (``"- xiv -"`` -> ``"- 0 -"``,
    ``"Page iv"`` stays ``"page iv"``); ``""`` for a line without a letter or digit (never furniture)."""
    return _line_key(line)[0]


def _edges(lines: Sequence[str], edge_lines: int) -> list[tuple[int, str]]:
    """``(index, "top" | "bottom")`` of a page's edge lines: its first and last ``k`` non-blank lines,
    ``k = edge_lines`` but at most ``(n - 1) // 2`` (and at least 1) for a page of ``n`` non-blank lines, so that a
    page of 3 or more lines keeps a middle line out; the top ones from the first down, then the bottom ones from the
    last up (outermost first). All non-blank lines (as top ones) for ``edge_lines == 0``."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    if not edge_lines:
        return [(i, "top") for i in filled]
    k = min(edge_lines, max(1, (len(filled) - 1) // 2))
    top = filled[:k]
    return [(i, "top") for i in top] + [(i, "bottom") for i in filled[:len(top) - 1:-1][:k]]


def _edge_indices(lines: Sequence[str], edge_lines: int) -> list[int]:
    """The indices of :func:`_edges`."""
    return [i for i, _ in _edges(lines, edge_lines)]


def _edge_keys(lines: Sequence[str], edge_lines: int) -> Iterator[tuple[int, str, tuple | None]]:
    """``(index, key, numbers)`` of a page's edge lines (:func:`_edges`, :func:`_line_key`; lines without a key
    left out). A letterless line's key carries its side (``"0\x00bottom"``) and only the outermost line of a key
    on each side is given: a page number, not the body value next to it."""
    seen: set[str] = set()
    for i, side in _edges(lines, edge_lines):
        key, numbers = _line_key(lines[i])
        if key and numbers is not None:
            key = f"{key}\x00{side}"
            if key in seen:
                continue
            seen.add(key)
        if key:
            yield i, key, numbers


def _increasing(values: Sequence[tuple]) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


def find_furniture(pages: Sequence[str], min_fraction: float = 0.5, edge_lines: int = 3) -> set[str]:
    """The furniture of a document: the :func:`furniture_key` values found among the edge lines (the first / last
    ``edge_lines`` non-blank lines, fewer on short pages: :func:`_edge_indices`) of more than ``min_fraction`` of its
    non-blank pages, or of more than ``min_fraction`` of its odd or of its even pages (position in ``pages``), being
    on ``FURNITURE_MIN_PAGES`` of them at least: the alternating running heads of a book. A key counts
    once per page. A letterless key (page numbers: ``"17"``, ``"- iv -"``, ``"3/40"``) is counted per side of the
    page (top / bottom), on the line of that key nearest the page's edge only (:func:`_edge_keys`), and is furniture
    only when its numbers strictly increase over the pages it is on (in page order, gaps allowed), which page
    numbers do and body values (a ``"391"`` under ``"Total:"``) do not.

    Args:
        pages: the document's pages (``text.split("\\f")``, or the texts of a group's records).
        min_fraction: in (0, 1); a key must be on more than ``min_fraction`` of the pages (or of one parity's).
        edge_lines: lines looked at from each end of a page; 0: every line.

    Returns:
        The furniture keys; empty for a document of fewer than ``FURNITURE_MIN_PAGES`` non-blank pages.
    """
    filled = [(i, p) for i, p in enumerate(pages) if p.strip()]
    if len(filled) < FURNITURE_MIN_PAGES:
        return set()
    counts: Counter[str] = Counter()
    by_parity: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
    parity_pages = [0, 0]
    numbers: dict[str, list[tuple]] = {}  # letterless key -> its numbers, page by page
    for index, page in filled:
        seen: dict[str, tuple | None] = {}
        for _, key, value in _edge_keys(page.split("\n"), edge_lines):
            seen.setdefault(key, value)
        counts.update(seen.keys())
        by_parity[index % 2].update(seen.keys())
        parity_pages[index % 2] += 1
        for key, value in seen.items():
            if value is not None:
                numbers.setdefault(key, []).append(value)
    out = set()
    for key, c in counts.items():
        frequent = c > min_fraction * len(filled) or any(
                by_parity[p][key] >= FURNITURE_MIN_PAGES and by_parity[p][key] > min_fraction * n
                for p, n in enumerate(parity_pages))
        if frequent and (key not in numbers or _increasing(numbers[key])):
            out.add(key)
    return out


def remove_furniture(text: str, furniture: set[str], edge_lines: int = 3) -> tuple[str, int]:
    """Removes the lines of ``text`` whose key is in ``furniture`` (:func:`find_furniture`) from the edge lines of each
    page (pages split at ``\\f``; :func:`_edge_keys`; 0: every line), each with its newline.

    Returns:
        ``(text, lines removed)``; form feeds and blank lines are kept.
    """
    if not furniture:
        return text, 0
    out, removed = [], 0
    for page in text.split("\f"):
        lines = page.split("\n")
        drop = {i for i, key, _ in _edge_keys(lines, edge_lines) if key in furniture}
        removed += len(drop)
        out.append("\n".join(line for i, line in enumerate(lines) if i not in drop) if drop else page)
    return "\f".join(out), removed


def _count_drop(report: dict, record: dict) -> None:
    report["dropped"] += 1
    if len(report["examples"]) < 3:
        report["examples"].append(record["_source"])


def _remove_record_furniture(record: dict, furniture_of: Callable[[str, str], set[str]],
                             slots: Callable[[dict], Iterator[tuple[object, object, str]]], edge_lines: int,
                             report: dict) -> dict | None:
    """``record`` with the furniture of each of its text slots (``slots(record)`` gives ``(container, key, name)``)
    removed (``furniture_of(name, text)``: the keys), counted in ``report``: the record itself when nothing is
    removed, a copy when lines are, None (counted as dropped) when a text it removed lines from is left blank."""
    changes: dict[int, str] = {}
    removed, emptied = 0, False
    for j, (container, key, name) in enumerate(slots(record)):
        furniture = furniture_of(name, container[key])
        if furniture:
            text, n = remove_furniture(container[key], furniture, edge_lines)
            if n:
                changes[j], removed, emptied = text, removed + n, emptied or not text.strip()
    if not removed:
        return record
    report["changed"] += 1
    report["lines_removed"] += removed
    if emptied:
        _count_drop(report, record)
        return None
    r2 = _copy(record)
    for j, (container, key, _) in enumerate(list(slots(r2))):
        if j in changes:
            container[key] = changes[j]
    return r2


_SOURCE_ROW = re.compile(r":(?:row )?\d+$")


def _group_key_fn(group: str) -> Callable[[dict], object]:
    """``record -> group key`` for ``data.clean.furniture_group`` (module docstring)."""
    if group == "source_file":
        return lambda r: _SOURCE_ROW.sub("", str(r.get("_source", "")))
    if group == "source_dir":
        return lambda r: os.path.dirname(_SOURCE_ROW.sub("", str(r.get("_source", ""))))
    if group.startswith("field:") and group[6:]:
        name = group[6:]

        def key(r):
            if name not in r:
                raise ValueError(f"{r.get('_source', '?')}: no field {name!r} to group pages by "
                                 f"(data.clean.furniture_group = {group!r}); fields: {', '.join(r)}")
            return json.dumps(r[name], sort_keys=True, default=str)
        return key
    raise ValueError(f"data.clean.furniture_group must be '', 'source_file', 'source_dir' or 'field:NAME', "
                     f"got {group!r}")


class _FurnitureGroups:
    """The grouped furniture step: holds a group's records until the group ends or its first
    ``FURNITURE_SAMPLE_PAGES`` pages are in, decides its furniture on them per field (the pages of each field name,
    :func:`_named_slots`, are a document of their own; a one-line text is no page), and cleans its records."""

    def __init__(self, cfg: CleanConfig, fields: list[str], report: dict):
        self.key_fn, self.cfg, self.fields, self.report = _group_key_fn(cfg.furniture_group), cfg, fields, report
        self.group_field = cfg.furniture_group[6:] if cfg.furniture_group.startswith("field:") else None
        self.key: object = None
        self.held: list[dict] = []
        self.pages = 0
        self.furniture: dict[str, set[str]] | None = None  # field name -> keys, decided for the current group

    def add(self, records: Sequence[dict]) -> list[dict]:
        out: list[dict] = []
        for r in records:
            key = self.key_fn(r)
            if key != self.key:
                out += self.flush()
                self.key = key
            if self.furniture is not None:
                r2 = self._apply(r)
                if r2 is not None:
                    out.append(r2)
                continue
            self.held.append(r)
            self.pages += sum(c[k].count("\f") + 1 for c, k, _ in self._texts(r))
            if self.pages >= FURNITURE_SAMPLE_PAGES:
                out += self._release()
        return out

    def flush(self) -> list[dict]:
        """Releases the held group (the end of the stream, or of a source)."""
        out = self._release()
        self.key, self.furniture = None, None
        return out

    def _release(self) -> list[dict]:
        if not self.held:
            return []
        pages: dict[str, list[str]] = {}
        for r in self.held:
            for c, k, name in self._texts(r):
                pages.setdefault(name, []).extend(c[k].split("\f"))
        self.furniture = {name: find_furniture(p, self.cfg.furniture_min_fraction, self.cfg.furniture_edge_lines)
                          for name, p in pages.items()}
        out = [r2 for r2 in map(self._apply, self.held) if r2 is not None]
        self.held, self.pages = [], 0
        return out

    def _texts(self, record: dict) -> Iterator[tuple[object, object, str]]:
        """The record's text slots that can be pages: not the group field (``field:NAME``), not a one-line text (a
        title, an id)."""
        return ((c, k, name) for c, k, name in _named_slots(record, self.fields)
                if not (c is record and k == self.group_field) and "\n" in c[k].strip())

    def _apply(self, record: dict) -> dict | None:
        furniture = self.furniture
        if not any(furniture.values()):
            return record
        return _remove_record_furniture(record, lambda name, _: furniture.get(name, set()), self._texts,
                                        self.cfg.furniture_edge_lines, self.report)


# ------------------------------------------------------------------------------------ scripts and shingles

# scripts written without spaces between words (Unicode script of the letter); Hangul is written with spaces
NO_SPACE_SCRIPTS = frozenset(("han", "kana", "thai", "lao", "khmer", "myanmar", "tibetan"))
NO_SPACE_SHARE = 0.3  # a record with at least this share of its units (script_counts) in NO_SPACE_SCRIPTS is
# shingled by characters
HAN_KANA_NGRAM = 3  # character n-gram of Chinese / Japanese text (a character is about a syllable)
CHAR_NGRAM = 5  # character n-gram of the other scripts written without spaces (Thai, Lao, Khmer, Myanmar, Tibetan)
_SCRIPT_WORDS = {"CJK": "han", "IDEOGRAPHIC": "han", "HIRAGANA": "kana", "KATAKANA": "kana",
                 "KATAKANA-HIRAGANA": "kana", "HANGUL": "hangul", "THAI": "thai", "LAO": "lao", "KHMER": "khmer",
                 "MYANMAR": "myanmar", "TIBETAN": "tibetan", "LATIN": "latin", "CYRILLIC": "cyrillic",
                 "GREEK": "greek", "ARABIC": "arabic", "HEBREW": "hebrew", "ARMENIAN": "armenian",
                 "GEORGIAN": "georgian", "ETHIOPIC": "ethiopic", "DEVANAGARI": "devanagari", "BENGALI": "bengali",
                 "GURMUKHI": "gurmukhi", "GUJARATI": "gujarati", "ORIYA": "oriya", "TAMIL": "tamil",
                 "TELUGU": "telugu", "KANNADA": "kannada", "MALAYALAM": "malayalam", "SINHALA": "sinhala",
                 "MONGOLIAN": "mongolian", "SYRIAC": "syriac", "THAANA": "thaana", "CHEROKEE": "cherokee"}
# labels named by a language: a script used (nearly) by one language
_SCRIPT_LANGUAGE = {"hangul": "ko", "thai": "th", "lao": "lo", "khmer": "km", "myanmar": "my", "tibetan": "bo"}
KANA_SHARE_JA = 0.05  # Han + kana text with at least this share of kana is labelled "ja", else "zh"


@functools.lru_cache(maxsize=1 << 16)
def char_script(ch: str) -> str:
    """The script of a letter from its Unicode name (``unicodedata.name``'s first word; ``FULLWIDTH`` /
    ``HALFWIDTH`` forms by their second): ``"han"``, ``"kana"``, ``"hangul"``, ``"thai"``, ``"latin"``,
    ``"cyrillic"``, ... (``_SCRIPT_WORDS``), ``"other"`` for letters of other scripts, ``""`` for a non-letter
    (Unicode category not ``L*``)."""
    if not unicodedata.category(ch).startswith("L"):
        return ""
    words = unicodedata.name(ch, "").split()
    if words[:1] in (["FULLWIDTH"], ["HALFWIDTH"]):
        words = words[1:]
    return _SCRIPT_WORDS.get(words[0], "other") if words else "other"


# the spaced scripts' codes in script_counts' reduced text (one private-use character per script)
_SCRIPT_CODE: dict[str, str] = {}


def _script_code(script: str) -> str:
    return _SCRIPT_CODE.setdefault(script, chr(0xE000 + len(_SCRIPT_CODE)))


_RUN = re.compile(r"([\ue000-\uf8ff])\1*")


def script_counts(text: str) -> Counter[str]:
    """Units of ``text`` per script (:func:`char_script`): each letter of a script written without spaces
    (``NO_SPACE_SCRIPTS``: a Han, kana, Thai ... character) is one unit, and each run of letters of another script
    (a word: ``"useState"``, ``"NumPy"``; combining marks inside do not break it) is one, so that
    ``"在 React 中使用 useState hook"`` counts 4 Han units and 3 Latin ones. Digits, punctuation and spaces are
    not counted."""
    counts: Counter[str] = Counter()
    table: dict[int, str | None] = {}
    spaced = False
    for ch, n in Counter(text).items():
        script = char_script(ch)
        if script in NO_SPACE_SCRIPTS:
            counts[script] += n
            table[ord(ch)] = " "
        elif script:
            table[ord(ch)] = _script_code(script)
            spaced = True
        elif unicodedata.category(ch).startswith("M"):
            table[ord(ch)] = None  # a combining mark: part of the word it is in
        else:
            table[ord(ch)] = " "
    if spaced:
        names = {code: script for script, code in _SCRIPT_CODE.items()}
        counts.update(names[code] for code in _RUN.findall(text.translate(table)))
    return counts


def language_label(counts: Mapping[str, int]) -> str:
    """A script-based language label of a text from its :func:`script_counts` (no language model: a guess from
    the letters' scripts). The script group with the most units (a character of a script written without spaces,
    a word of another) decides, Han and kana together: ``"ja"`` when kana is at least ``KANA_SHARE_JA`` of them,
    else ``"zh"``; Hangul ``"ko"``, Thai ``"th"``, Lao ``"lo"``,
    Khmer ``"km"``, Myanmar ``"my"``, Tibetan ``"bo"``; other scripts by name (``"latin"``, ``"cyrillic"``,
    ``"arabic"``, ..., ``"other"``); ``"none"`` for a text without letters."""
    groups: Counter[str] = Counter()
    for script, n in counts.items():
        groups["cjk" if script in ("han", "kana") else script] += n
    if not groups:
        return "none"
    top = max(sorted(groups), key=groups.__getitem__)
    if top == "cjk":
        return "ja" if counts.get("kana", 0) >= KANA_SHARE_JA * groups["cjk"] else "zh"
    return _SCRIPT_LANGUAGE.get(top, top)


def char_ngram(counts: Mapping[str, int]) -> int:
    """The character n-gram size for a text with these :func:`script_counts`, or 0 for word shingles: units
    (characters) from ``NO_SPACE_SCRIPTS`` at least ``NO_SPACE_SHARE`` of all units (those characters and the other
    scripts' words) -> ``HAN_KANA_NGRAM`` (3) when Han and kana are most of those, else ``CHAR_NGRAM`` (5)."""
    units = sum(counts.values())
    no_space = sum(n for s, n in counts.items() if s in NO_SPACE_SCRIPTS)
    if not units or no_space < NO_SPACE_SHARE * units:
        return 0
    return HAN_KANA_NGRAM if 2 * (counts.get("han", 0) + counts.get("kana", 0)) >= no_space else CHAR_NGRAM


def shingles(text: str, n: int = 5) -> set[str]:
    """The shingle set near-dedup compares, decided per text by its letters (:func:`char_ngram`).

    The text is NFKC-normalized and casefolded. A text mostly in scripts written without spaces (Chinese,
    Japanese, Thai, ...) gives its character n-grams (``HAN_KANA_NGRAM`` / ``CHAR_NGRAM``), whitespace removed;
    other text its word ``n``-grams (words split at whitespace), or the character ``n``-grams of a single word.

    Returns:
        The set of shingles (one shingle, the whole text, when it is shorter than the n-gram).
    """
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    size = char_ngram(script_counts(text))
    if size:
        text = text.replace(" ", "")
        return {text[i:i + size] for i in range(max(len(text) - size + 1, 1))}
    words = text.split(" ")
    if len(words) > 1:
        return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


class _NearIndex:
    """MinHash LSH over :func:`shingles`: ``datasketch``'s MinHash and its choice of bands for the threshold
    (``MinHashLSH.hashranges``), with each candidate confirmed. Per band, a dict from the kept texts' band values (as
    16-byte BLAKE2b digests when longer) to the kept text's number; per kept text, the low 16 bits of each MinHash
    value (b-bit minwise hashing, Li and König 2010). A text is a duplicate when a kept text shares one of its bands
    (what ``MinHashLSH.query`` returns) and their MinHash values agree at ``threshold`` of the permutations or more
    (``MinHash.jaccard(other) >= threshold``; the 16-bit values agree by chance at 1/65536 of the permutations that
    differ). Without the check a band shared by chance drops a text: short texts of one template whose shingle sets
    are only ~0.6-0.7 similar met a band of some earlier one (13 of 30 ``「X」の反対語は何ですか？``). Memory per kept
    text at 128 permutations: 256 bytes of values and 9 band entries, 1.0-1.3 KB in all (tracemalloc, 3k-50k
    texts; bands alone were 0.8-1.4 KB; ``MinHashLSH`` takes ~3.3 KB)."""

    def __init__(self, threshold: float, num_perm: int, seed: int):
        import array

        from datasketch import MinHash, MinHashLSH
        if not 0 < threshold <= 1:
            raise ValueError(f"data.clean.near_dup_threshold must be in (0, 1], got {threshold}")
        self._ranges = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges
        self._bands: list[dict[bytes, int | list[int]]] = [{} for _ in self._ranges]
        self._template = MinHash(num_perm=num_perm, seed=seed)  # its permutations, drawn once, are reused
        self._minhash = MinHash
        self._threshold = threshold
        self._signatures = array.array("H")  # kept text i: values [i * num_perm, (i + 1) * num_perm)
        self._kept = 0

    def is_duplicate(self, text: str) -> bool:
        """True when ``text`` near-duplicates a kept text; False after adding it to the kept ones."""
        import numpy as np
        t = self._template
        m = self._minhash(num_perm=t.num_perm, seed=t.seed, permutations=t.permutations, scheme=t.scheme)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        keys = [m.hashvalues[start:end].tobytes() for start, end in self._ranges]
        keys = [k if len(k) <= 16 else hashlib.blake2b(k, digest_size=16).digest() for k in keys]
        low = (m.hashvalues & 0xFFFF).astype(np.uint16)
        candidates: set[int] = set()
        for k, band in zip(keys, self._bands):
            found = band.get(k)
            if found is not None:
                candidates.update(found if isinstance(found, list) else (found,))
        n = t.num_perm
        need = self._threshold * n
        for i in sorted(candidates):  # (no name holds the view: the array grows below)
            if np.count_nonzero(np.frombuffer(self._signatures, np.uint16, n, 2 * i * n) == low) >= need:
                return True
        index = self._kept
        self._kept += 1
        self._signatures.frombytes(low.tobytes())
        for k, band in zip(keys, self._bands):
            found = band.get(k)
            if found is None:
                band[k] = index
            elif isinstance(found, list):
                found.append(index)
            else:
                band[k] = [found, index]
        return False


def near_duplicates(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128, seed: int = 1) -> list[int]:
    """Indices of texts that near-duplicate an earlier kept text (MinHash LSH, ``datasketch``).

    Args:
        texts: the documents, in order (earlier ones are kept).
        threshold: Jaccard similarity of the shingle sets at which LSH reports a pair
            (``datasketch.MinHashLSH(threshold)``); in (0, 1].
        num_perm: MinHash permutations (more: a better estimate, slower).
        seed: MinHash seed (fixed: the result is deterministic).

    Returns:
        Sorted indices to drop.

    Raises:
        ValueError: threshold outside (0, 1].
    """
    index = _NearIndex(threshold, num_perm, seed)
    return [i for i, text in enumerate(texts) if index.is_duplicate(text)]


class Cleaner:
    """The cleaning steps (module docstring) over a stream of record batches, with the dedup state kept
    between batches: feeding a list in batches of any size keeps, and reports, exactly what one call over the
    whole list does (a duplicate is dropped whether its first copy came in this batch or an earlier one).

    The state grows with the number of *kept* records only, never with their text: ``dedup_exact`` keeps one
    16-byte BLAKE2b digest per record it kept (about 150 bytes with the set's table), ``dedup_near``
    one digest per LSH band and 16 bits per permutation of each record it kept (1.0-1.3 KB at 128 permutations).

    Usage::

        cleaner = Cleaner(config.data.clean)
        for batch in batches:
            kept = cleaner.clean(batch)      # this batch's kept records, in order
        kept = cleaner.flush()               # records a grouped remove_furniture step still holds
        report = cleaner.steps               # the per-step counts over all batches
        languages = cleaner.languages        # dedup_near per script-based language label

    With ``furniture_group`` set, the records of a group come out of :meth:`clean` once the group ends (in a later
    call, or from :meth:`flush`): the stream of records out, over all calls, is still the same whatever the batches.

    Args:
        cfg: a :class:`CleanConfig`, or ``config.data.clean`` (a ConfigDict or mapping; None: every step off,
            as in ``config.defaults()``).

    Raises:
        ValueError: an unknown normalization form or phrase action, a bad threshold, an unreadable phrase
            list (all found here, before any record is read).
        easytune.config.ConfigError: an unknown key or a value of the wrong type in ``cfg``.
    """

    def __init__(self, cfg: CleanConfig | Mapping | None = None):
        cfg = cfg if isinstance(cfg, CleanConfig) else CleanConfig.from_config(cfg)
        self.config = cfg
        fields = self._fields = list(cfg.fields)
        # (name, fn applied to every text slot or None, keep(record) -> bool or None), in order
        self._pipeline: list[tuple[str, Callable[[str], str] | None, Callable[[dict], bool] | None]] = []
        if cfg.fix_mojibake:
            import ftfy
            self._pipeline.append(("fix_mojibake", ftfy.fix_encoding, None))
        if cfg.unicode_normalization:
            form = cfg.unicode_normalization.upper()
            if form not in ("NFC", "NFD", "NFKC", "NFKD"):
                raise ValueError(f"data.clean.unicode_normalization must be NFC, NFD, NFKC, NFKD or '', got {form!r}")
            self._pipeline.append((f"unicode_{form}", lambda t: unicodedata.normalize(form, t), None))
        self._groups: _FurnitureGroups | None = None
        if cfg.remove_furniture:
            if not 0 < cfg.furniture_min_fraction < 1:
                raise ValueError(f"data.clean.furniture_min_fraction must be in (0, 1), got "
                                 f"{cfg.furniture_min_fraction}")
            if cfg.furniture_edge_lines < 0:
                raise ValueError(f"data.clean.furniture_edge_lines must be >= 0 (0 = every line), got "
                                 f"{cfg.furniture_edge_lines}")
            if cfg.furniture_group:
                _group_key_fn(cfg.furniture_group)  # a bad value is an error now
            # grouped: the records go through self._groups (clean / flush); else self._furniture_records
            self._pipeline.append(("remove_furniture", None, None))
        if cfg.remove_control_chars:
            self._pipeline.append(("remove_control_chars", remove_control_chars, None))
        if cfg.normalize_whitespace:
            self._pipeline.append(("normalize_whitespace", normalize_whitespace, None))
        if cfg.phrases or cfg.phrase_files:
            if cfg.phrase_action not in PHRASE_ACTIONS:
                raise ValueError(f"data.clean.phrase_action must be one of {PHRASE_ACTIONS}, got {cfg.phrase_action!r}")
            pattern = phrase_pattern(load_phrases(cfg.phrases, cfg.phrase_files))
            if cfg.phrase_action == "drop":
                self._pipeline.append(("phrases(drop)", None,
                                       lambda r: not pattern.search(record_text(r, fields))))
            else:
                self._pipeline.append(("phrases(cut_sentence)",
                                       lambda t: cut_sentences(t, pattern) if pattern.search(t) else t,
                                       lambda r: all(c[k].strip() for c, k in _slots(r, fields))))
        if cfg.min_length or cfg.max_length:
            lo, hi = cfg.min_length, cfg.max_length or float("inf")
            self._pipeline.append(("length", None, lambda r: lo <= len(record_text(r, fields)) <= hi))
        if cfg.dedup_exact:
            self._seen: set[bytes] = set()
            self._pipeline.append(("dedup_exact", None, self._first_exact))
        if cfg.dedup_near:
            self._near = _NearIndex(cfg.near_dup_threshold, cfg.minhash_num_perm, seed=1)
            self._pipeline.append(("dedup_near", None, self._first_near))
        self._languages: dict[str, dict[str, int]] = {}
        self._report = [{"step": name, "changed": 0, "dropped": 0, "examples": []} for name, _, _ in self._pipeline]
        self._furniture_at = next((i for i, (name, _, _) in enumerate(self._pipeline) if name == "remove_furniture"),
                                  -1)
        if self._furniture_at >= 0:
            self._report[self._furniture_at]["lines_removed"] = 0
            if cfg.furniture_group:
                self._groups = _FurnitureGroups(cfg, fields, self._report[self._furniture_at])

    def _furniture_records(self, records: list[dict]) -> list[dict]:
        """The ungrouped furniture step: each text slot holding a form feed is a document of its own (its pages:
        the pieces between form feeds); a record a text of which is left blank is dropped."""
        c = self.config

        def furniture_of(name: str, text: str) -> set[str]:
            return find_furniture(text.split("\f"), c.furniture_min_fraction, c.furniture_edge_lines) \
                if "\f" in text else set()
        out = (_remove_record_furniture(r, furniture_of, lambda rec: _named_slots(rec, self._fields),
                                        c.furniture_edge_lines, self._report[self._furniture_at]) for r in records)
        return [r for r in out if r is not None]

    def _first_near(self, record: dict) -> bool:
        text = record_text(record, self._fields)
        counts = script_counts(text)
        row = self._languages.setdefault(language_label(counts), {"records": 0, "dropped": 0, "char_shingles": 0})
        row["records"] += 1
        row["char_shingles"] += bool(char_ngram(counts))
        if self._near.is_duplicate(text):
            row["dropped"] += 1
            return False
        return True

    def _first_exact(self, record: dict) -> bool:
        key = normalized_key(record_text(record, self._fields)).encode("utf-8")
        digest = hashlib.blake2b(key, digest_size=16).digest()
        if digest in self._seen:
            return False
        self._seen.add(digest)
        return True

    def clean(self, batch: Sequence[dict]) -> list[dict]:
        """Runs the enabled steps over the next ``batch`` of the stream (module docstring).

        Args:
            batch: records with ``_source`` (not modified; changed ones are copied); any iterable of them.

        Returns:
            The batch's kept records, in order (an unchanged record is the input object itself).
        """
        return self._run(list(batch), 0)

    def flush(self) -> list[dict]:
        """The records held back by a grouped ``remove_furniture`` step (``furniture_group``), cleaned by the rest of
        the steps: call it at the end of the stream (``[]`` without such a step or held record)."""
        if self._groups is None:
            return []
        return self._run(self._groups.flush(), self._furniture_at + 1)

    def _run(self, records: list[dict], start: int) -> list[dict]:
        """The steps from index ``start`` on over ``records``."""
        for i in range(start, len(self._pipeline)):
            (_, fn, keep), report = self._pipeline[i], self._report[i]
            if i == self._furniture_at:
                records = self._groups.add(records) if self._groups is not None else self._furniture_records(records)
            if fn is not None:
                records, changed = _map_text(records, fn, self._fields)
                report["changed"] += changed
            if keep is not None:
                kept = []
                for r in records:
                    if keep(r):
                        kept.append(r)
                    else:
                        report["dropped"] += 1
                        if len(report["examples"]) < 3:
                            report["examples"].append(r["_source"])
                records = kept
        return records

    @property
    def steps(self) -> list[dict]:
        """One dict per enabled step, over all batches so far: ``{"step": name, "changed": int, "dropped": int,
        "examples": [_source, ...]}`` (the first 3 sources of dropped records in the stream), and for
        ``remove_furniture`` ``"lines_removed": int``; a fresh copy."""
        return [dict(s, examples=list(s["examples"])) for s in self._report]

    @property
    def languages(self) -> dict[str, dict[str, int]]:
        """The ``dedup_near`` step per script-based language label (:func:`language_label`) of the records it saw:
        ``{label: {"records": int, "dropped": int, "char_shingles": int}}`` (records shingled by characters), labels
        sorted by records seen, most first; ``{}`` without ``dedup_near``. A fresh copy."""
        rows = sorted(self._languages.items(), key=lambda kv: (-kv[1]["records"], kv[0]))
        return {label: dict(row) for label, row in rows}


def clean_records(records: Sequence[dict], cfg: CleanConfig | Mapping | None = None) -> tuple[list[dict], list[dict]]:
    """Runs the enabled cleaning steps in order (module docstring) over one list: :class:`Cleaner` with a
    single batch.

    Args:
        records: records with ``_source`` (not modified; changed ones are copied).
        cfg: a :class:`CleanConfig`, or ``config.data.clean`` (a ConfigDict or mapping; None: every step off,
            as in ``config.defaults()``).

    Returns:
        ``(records, steps)``: the kept records, in order, and one dict per enabled step:
        ``{"step": name, "changed": int, "dropped": int, "examples": [_source, ...]}`` (up to 3
        sources of dropped records).

    Raises:
        ValueError: an unknown normalization form or phrase action, a bad threshold, an
            unreadable phrase list.
    """
    cleaner = Cleaner(cfg)
    kept = cleaner.clean(records)
    kept += cleaner.flush()
    return kept, cleaner.steps


def describe_steps(steps: Sequence[dict]) -> str:
    """One line per step: ``name: N changed, M dropped (e.g. file:line)``."""
    lines = []
    for s in steps:
        ex = f" (e.g. {', '.join(map(os.path.basename, s['examples']))})" if s["examples"] else ""
        removed = f", {s['lines_removed']} lines removed" if "lines_removed" in s else ""
        lines.append(f"  {s['step']}: {s['changed']} changed{removed}, {s['dropped']} dropped{ex}")
    return "\n".join(lines)


def describe_languages(languages: Mapping[str, Mapping[str, int]]) -> str:
    """:attr:`Cleaner.languages` as one line: ``  dedup_near per language (by script): zh 300 records, 50 dropped
    (300 by characters); latin ...`` (``""`` when empty)."""
    if not languages:
        return ""
    parts = [f"{label} {row['records']} records, {row['dropped']} dropped"
             + (f" ({row['char_shingles']} by characters)" if row["char_shingles"] else "")
             for label, row in languages.items()]
    return "  dedup_near per language (by script): " + "; ".join(parts)
