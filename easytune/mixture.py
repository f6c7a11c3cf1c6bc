"""The sources of a data mixture: ``data.datasets`` entries resolved against the ``data.*`` keys.

``data.datasets`` (a mixture of sources, as axolotl's ``datasets:``) is a list of dicts, one per source; each
entry sets some ``data.*`` keys of :data:`SOURCE_KEYS` (the rest take the ``data.*`` values) and the mixture keys
of :data:`MIXTURE_KEYS`. :func:`dataset_sources` resolves the entries (or the single source of an empty
``data.datasets``) to plain dicts; :func:`easytune.config_check.validate` checks their files and
:mod:`easytune.data.prepare` reads them. How a config holds the list (plain dicts, list keys as lists) is
:func:`easytune.config.datasets_value`'s.
"""

from __future__ import annotations

import difflib
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from easytune.config import FORMATS, ConfigError, datasets_value, split_list, with_defaults

# A ``data.datasets`` entry (one source of a mixture): these ``data.*`` keys, each defaulting to its ``data.*``
# value, and the mixture keys. :func:`dataset_sources` resolves the entries.
SOURCE_KEYS = ("train_files", "format", "columns", "role_map", "text_field", "text_template", "chat_template",
               "roles_to_train", "train_on_inputs", "html_selector", "csv_encoding", "csv_delimiter", "sql_table")
MIXTURE_KEYS = ("weight", "num_samples", "name")
# axolotl's names of entry keys -> ours (axolotl's completion datasets name the text column ``field``)
SOURCE_KEY_ALIASES = {"path": "train_files", "type": "format", "field": "text_field"}
# axolotl's dataset ``type`` (and other common names) -> ``data.format``
FORMAT_ALIASES = {**{f: f for f in FORMATS}, "sharegpt": "chat", "chat_template": "chat", "messages": "chat",
                  "conversation": "chat", "conversations": "chat", "openai": "chat", "pretrain": "text",
                  "pretraining": "text", "raw": "text"}


def dataset_sources(data_cfg) -> list[dict[str, Any]]:
    """The sources of the training data, resolved: one per ``data.datasets`` entry (a mixture, as axolotl's
    ``datasets:``), or the single source the ``data.*`` keys describe when ``data.datasets`` is empty.

    Each source is a plain dict with every key of :data:`SOURCE_KEYS` (the entry's value, else the ``data.*``
    value: ``train_files`` and ``roles_to_train`` lists of strings, ``columns`` / ``role_map`` ``"name=value,..."``
    strings (an entry may give a dict), ``format`` one of :data:`FORMATS`) and of :data:`MIXTURE_KEYS`:
    ``weight`` (float, the share of the source's examples taken: 0.5 = a deterministic half, 2.0 = each twice;
    1.0 for an entry that gives neither), ``num_samples`` (int, exactly this many examples; an entry sets at most
    one of the two) and ``name`` (the entry's, else its first file's stem or a glob's folder). The single source
    has weight and num_samples None and name "". Entry keys may use axolotl's names (:data:`SOURCE_KEY_ALIASES`:
    ``path``, ``type``, ``field``) and formats (:data:`FORMATS` or :data:`FORMAT_ALIASES`: ``sharegpt`` /
    ``chat_template`` -> "chat", ``pretrain`` -> "text"; a suffix after a dot, ``chat_template.default``, is
    ignored). Files are not looked at (:func:`easytune.config_check.validate` checks that they exist).

    Args:
        data_cfg: ``config.data`` (a ConfigDict; a mapping may be partial, absent keys taking their defaults).

    Raises:
        ConfigError: naming ``data.datasets[i]``: an entry that is not a dict, an unknown key (the valid ones
            listed), no train_files, an unknown format, both weight and num_samples, a value of the wrong type
            or range, a name used twice; or ``data.train_files`` set beside ``data.datasets``.
    """
    d = data_cfg if isinstance(data_cfg, ml_collections.ConfigDict) else with_defaults(data_cfg, "data")
    base = {key: d[key] for key in SOURCE_KEYS}
    base["train_files"], base["roles_to_train"] = split_list(d.train_files), split_list(d.roles_to_train)
    entries = datasets_value(d.datasets)
    if not entries:
        return [{**base, "weight": None, "num_samples": None, "name": ""}]
    if not isinstance(entries, list):
        raise ConfigError(f"config key 'data.datasets': must be a list of dicts, got {entries!r:.80}")
    if base["train_files"]:
        raise ConfigError(f"config key 'data.train_files': set it (one source) or data.datasets (a mixture, each "
                          f"entry with its own train_files), not both; got {base['train_files']}")
    out = [_source(f"data.datasets[{i}]", entry, base) for i, entry in enumerate(entries)]
    first = {}
    for i, src in enumerate(out):
        if src["name"] in first:
            raise ConfigError(f"config key 'data.datasets[{i}].name': {src['name']!r} already names "
                              f"data.datasets[{first[src['name']]}]; give each source its own name")
        first[src["name"]] = i
    return out


def _source(where: str, entry: Any, base: dict[str, Any]) -> dict[str, Any]:
    """One :func:`dataset_sources` source from the ``data.datasets`` entry at ``where``."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"config key '{where}': must be a dict of source keys, got {entry!r:.80}")
    valid = SOURCE_KEYS + MIXTURE_KEYS
    given, spelled = {}, {}
    for key, value in entry.items():
        ours = SOURCE_KEY_ALIASES.get(key, key)
        if ours not in valid:
            close = difflib.get_close_matches(str(key), list(valid) + list(SOURCE_KEY_ALIASES), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            aliases = ", ".join(f"{a} = {b}" for a, b in SOURCE_KEY_ALIASES.items())
            raise ConfigError(f"config key '{where}': unknown key {key!r}; {hint}valid keys: {', '.join(valid)} "
                              f"(axolotl's {aliases})")
        if ours in given:
            raise ConfigError(f"config key '{where}': {spelled[ours]!r} and {key!r} both give {ours}; give one")
        given[ours], spelled[ours] = value, key
    src = dict(base)  # base["train_files"] is [] beside data.datasets
    for key in SOURCE_KEYS:
        if key in given:
            src[key] = _source_value(f"{where}.{key}", key, given[key])
    if not src["train_files"]:
        raise ConfigError(f"config key '{where}': no train_files (or path) given; each source names its files")
    src["format"] = _format_name(f"{where}.format", src["format"])
    weight, num_samples = given.get("weight"), given.get("num_samples")
    if weight is not None and num_samples is not None:
        raise ConfigError(f"config key '{where}': give weight ({weight!r}) or num_samples ({num_samples!r}), "
                          f"not both")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise ConfigError(f"config key '{where}.num_samples': must be an int >= 1, got {num_samples!r}")
    if weight is not None and (not isinstance(weight, (int, float)) or isinstance(weight, bool)
                               or not 0 < weight < float("inf")):
        raise ConfigError(f"config key '{where}.weight': must be a number > 0, got {weight!r}")
    name = given.get("name") or _default_name(src["train_files"][0])
    if not isinstance(name, str):
        raise ConfigError(f"config key '{where}.name': must be a string, got {name!r}")
    src.update(weight=float(weight) if weight is not None else (None if num_samples is not None else 1.0),
               num_samples=num_samples, name=name)
    return src


def _default_name(path: str) -> str:
    """A source's default name: its first file's stem (``a.jsonl.gz`` -> ``a``), or for a glob (``chats/*.jsonl``)
    the folder's name."""
    p = pathlib.PurePath(path)
    stem = pathlib.PurePath(p.stem).stem if p.suffix.lower() in (".gz", ".bz2", ".xz", ".zst") else p.stem
    return (p.parent.name or stem) if re.search(r"[*?\[]", stem) else stem


def _source_value(where: str, key: str, value: Any) -> Any:
    """A ``data.datasets`` entry's value of the ``data.*`` key ``key``, in that key's form (refused: naming
    ``where``)."""
    if key in ("train_files", "roles_to_train"):
        value = split_list(value) if isinstance(value, str) else value
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise ConfigError(f"config key '{where}': must be a list of non-empty strings (or 'a,b'), got {value!r}")
        return list(value)
    if key == "train_on_inputs":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}': must be True or False, got {value!r}")
        return value
    if key in ("columns", "role_map") and isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if not isinstance(value, str):
        raise ConfigError(f"config key '{where}': must be a string, got {value!r}")
    return value


def _format_name(where: str, value: Any) -> str:
    """``data.format`` of a source's ``format`` / axolotl ``type`` (:data:`FORMAT_ALIASES`)."""
    text = value.strip().lower() if isinstance(value, str) else ""
    fmt = FORMAT_ALIASES.get(text) or FORMAT_ALIASES.get(text.split(".")[0])
    if not fmt:
        raise ConfigError(f"config key '{where}': unknown format {value!r}; use one of {', '.join(FORMATS)} "
                          f"(or axolotl's {', '.join(k for k in FORMAT_ALIASES if k not in FORMATS)})")
    return fmt
