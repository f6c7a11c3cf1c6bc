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
``remove_control_chars``     drops Unicode category Cc/Cf characters except ``\\n`` and ``\\t``; ``\\r\\n`` -> ``\\n``
``normalize_whitespace``     exotic spaces -> ``" "``, trailing spaces cut, 3+ newlines -> 2, ends stripped
                             (indentation is kept: code stays code)
``phrases``                  boilerplate / refusal / slop phrases, case-insensitive substrings:
                             ``phrase_action = "drop"`` drops the record, ``"cut_sentence"`` removes each
                             sentence holding one (a record left empty is dropped)
``min_length/max_length``    characters over all text slots; outside the bounds -> dropped
``dedup_exact``              same normalized text (NFKC, casefold, whitespace and punctuation removed)
                             -> later copies dropped (16-byte BLAKE2b digest of the normalized text)
``dedup_near``               MinHash over word 5-gram shingles (character 5-grams for text without
                             spaces, e.g. Chinese) + LSH (``datasketch``); a record whose estimated
                             Jaccard similarity to a kept one reaches ``near_dup_threshold`` is dropped
===========================  =========================================================

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
import hashlib
import json
import os
import pathlib
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from easytune import config as config_lib

PHRASE_DIR = pathlib.Path(__file__).with_name("phrases")
PHRASE_ACTIONS = ("drop", "cut_sentence")
# a sentence: up to and including its end punctuation (Latin or CJK) or a newline
_SENTENCE = re.compile(r"[^.!?。！？\n]*(?:[.!?。！？]+[\"'”’)]*[ \t]*|\n|$)")
_EXOTIC_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")


@dataclass(frozen=True)
class CleanConfig:
    """The ``data.clean`` keys (see the module docstring), read once by :meth:`from_config`; lengths are in
    characters. No field has a default: ``config.defaults()`` is the one home of those."""
    fix_mojibake: bool
    unicode_normalization: str
    remove_control_chars: bool
    normalize_whitespace: bool
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


def _slots(record: dict, fields: Sequence[str]) -> Iterator[tuple[object, object]]:
    """``(container, key)`` for each text string of ``record`` (see the module docstring)."""
    for key, value in record.items():
        if key.startswith("_") or (fields and key not in fields):
            continue
        if isinstance(value, str):
            yield record, key
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    for k, v in item.items():
                        if isinstance(v, str) and k in ("content", "value", "text"):
                            yield item, k


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


def shingles(text: str, n: int = 5) -> set[str]:
    """Word ``n``-grams of the normalized text, or character ``n``-grams when it has no spaces (CJK)."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    words = text.split(" ")
    if len(words) > 1:
        return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
    return {text[i:i + n] for i in range(max(len(text) - n + 1, 1))}


class _NearIndex:
    """MinHash LSH over :func:`shingles`: ``datasketch``'s MinHash and its choice of bands for the threshold
    (``MinHashLSH.hashranges``), but membership only: per band, the set of the kept texts' band values (as 16-byte
    BLAKE2b digests when longer). A text is a duplicate when one of its bands is in its set, as
    ``MinHashLSH.query`` is non-empty then; storing no keys takes 0.7-1.3 KB per kept text at 128 permutations
    (9 bands) where ``MinHashLSH`` takes ~3.3 KB."""

    def __init__(self, threshold: float, num_perm: int, seed: int):
        from datasketch import MinHash, MinHashLSH
        if not 0 < threshold <= 1:
            raise ValueError(f"data.clean.near_dup_threshold must be in (0, 1], got {threshold}")
        self._ranges = MinHashLSH(threshold=threshold, num_perm=num_perm).hashranges
        self._bands: list[set[bytes]] = [set() for _ in self._ranges]
        self._template = MinHash(num_perm=num_perm, seed=seed)  # its permutations, drawn once, are reused
        self._minhash = MinHash

    def is_duplicate(self, text: str) -> bool:
        """True when ``text`` near-duplicates a kept text; False after adding it to the kept ones."""
        t = self._template
        m = self._minhash(num_perm=t.num_perm, seed=t.seed, permutations=t.permutations, scheme=t.scheme)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        keys = [m.hashvalues[start:end].tobytes() for start, end in self._ranges]
        keys = [k if len(k) <= 16 else hashlib.blake2b(k, digest_size=16).digest() for k in keys]
        if any(k in band for k, band in zip(keys, self._bands)):
            return True
        for k, band in zip(keys, self._bands):
            band.add(k)
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
    one digest per LSH band of each record it kept (0.7-1.3 KB at 128 permutations).

    Usage::

        cleaner = Cleaner(config.data.clean)
        for batch in batches:
            kept = cleaner.clean(batch)      # this batch's kept records, in order
        report = cleaner.steps               # the per-step counts over all batches

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
            self._pipeline.append(("dedup_near", None, lambda r: not self._near.is_duplicate(record_text(r, fields))))
        self._report = [{"step": name, "changed": 0, "dropped": 0, "examples": []} for name, _, _ in self._pipeline]

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
        records = list(batch)
        for (_, fn, keep), report in zip(self._pipeline, self._report):
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
        "examples": [_source, ...]}`` (the first 3 sources of dropped records in the stream); a fresh copy."""
        return [dict(s, examples=list(s["examples"])) for s in self._report]


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
    return kept, cleaner.steps


def describe_steps(steps: Sequence[dict]) -> str:
    """One line per step: ``name: N changed, M dropped (e.g. file:line)``."""
    lines = []
    for s in steps:
        ex = f" (e.g. {', '.join(map(os.path.basename, s['examples']))})" if s["examples"] else ""
        lines.append(f"  {s['step']}: {s['changed']} changed, {s['dropped']} dropped{ex}")
    return "\n".join(lines)
