"""``prepare_dataset``: the training data of a config, read -> clean -> format -> split -> pack, and the cache
of its result (``data.dataset_prepared_path``, a ``datasets`` save keyed by :func:`cache_key`).

The readers are in ``sources`` / ``raw``, the cleaning steps in ``clean``, the record formats in ``formats``,
and the sequence arrays (and what packing means) in ``sequences``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import statistics
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from easytune import config as config_lib
from easytune.data import clean, formats, sources
from easytune.data.sequences import (
    SEQUENCE_KEYS,
    apply_excess_length,
    build_sequences,
    chunk_text,
    count_supervised_tokens,
    drop_unsupervised,
    length_histogram,
    num_truncated,
    prompt_lengths,
    split_train_val,
    supervised_bytes,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the prepared arrays change meaning


def _examples_with_sources(examples: list[dict], records: Sequence[dict]) -> list[dict]:
    return [dict(ex, _source=r.get("_source", "?")) for ex, r in zip(examples, records)]


def _no_supervision_error(train: Sequence[dict], T: int, fmt: str) -> ValueError:
    """The error for a training split left with 0 supervised tokens, saying why."""
    prompts = prompt_lengths(train)
    if prompts and min(prompts) > T:
        # Every supervised token lies past position T: truncation cut each example to (part of) its prompt.
        return ValueError(
            f"the training split has 0 supervised tokens: data.sequence_len = {T} is shorter than every "
            f"prompt (longest {max(prompts)} tokens, median {statistics.median(prompts):g} tokens, bos "
            f"included), so all {len(train)} {fmt} examples were truncated to their prompt and keep no "
            f"response token to train on; set data.sequence_len larger than the prompts (at least "
            f"{max(prompts)}, plus room for the responses)")
    return ValueError(
        f"the training split has 0 supervised tokens ({len(train)} {fmt} examples, data.sequence_len = {T}); "
        f"check that the data files hold non-empty documents / responses")


def data_config(cfg) -> ml_collections.ConfigDict:
    """``config.data`` with every key: ``cfg`` is ``config.data`` (a ConfigDict or a mapping, possibly partial:
    absent keys take their ``config.defaults()`` values) or a whole config (with a ``data`` member).

    Raises:
        easytune.config.ConfigError: an unknown key or a value of the wrong type.
    """
    if "train_files" not in cfg and "data" in cfg:
        cfg = cfg["data"]
    return config_lib.with_defaults(cfg, "data")


def _read_and_clean(data_cfg) -> tuple[list[str], list[dict], list[dict], int]:
    files = [str(p) for p in sources.expand_paths(data_cfg.train_files)]
    records = sources.read_records(files, sources.ReadOptions.from_config(data_cfg))
    n_read = len(records)
    records, steps = clean.clean_records(records, clean.CleanConfig.from_config(data_cfg.clean))
    if not records:
        why = "; ".join(f"{st['step']}: {st['dropped']}" for st in steps if st["dropped"])
        raise ValueError(f"no records left after cleaning: all {n_read} records of {', '.join(files)} were dropped "
                         f"({why}); loosen data.clean.*")
    return files, records, steps, n_read


def _format(data_cfg, records, tokenizer, fmt, T, stats):
    text_field = data_cfg.text_field or "text"
    template = data_cfg.text_template
    if template:
        records = formats.render_text_template(records, template, text_field)
    if fmt == "text":
        # A missing field is an error (a typo in data.text_field); an empty document is skipped.
        texts = [formats.record_field(r, text_field, required=text_field not in r) for r in records]
        if bool(data_cfg.packing):  # each document cut on its own: rows never attend across documents
            return [chunk for t in texts if t for chunk in chunk_text(formats.format_text([t], tokenizer), T)]
        return chunk_text(formats.format_text(texts, tokenizer), T)
    chat_kwargs = {}
    if fmt == "chat":
        chat_kwargs = dict(roles_to_train=list(data_cfg.roles_to_train),
                           role_map=sources.parse_columns(data_cfg.role_map),
                           chat_template=formats.load_chat_template(data_cfg.chat_template))
    examples = formats.format_records(records, fmt, tokenizer, train_on_inputs=bool(data_cfg.train_on_inputs),
                                      text_field=text_field, stats=stats, **chat_kwargs)
    return _examples_with_sources(examples, records)


def prepare_dataset(data_cfg, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Reads, cleans, formats, splits and packs the training data described by ``config.data``.

    Pipeline: ``sources.read_records`` -> ``clean.clean_records`` (``data.clean``) ->
    ``formats`` (one example per record; ``text``: one token stream cut by
    :func:`chunk_text`) -> :func:`apply_excess_length` -> :func:`split_train_val` ->
    :func:`drop_unsupervised` -> :func:`build_sequences`. With ``data.dataset_prepared_path``
    set, the result is cached there (:func:`cache_key`) and reused while the inputs, the
    tokenizer and ``config.data`` are unchanged.

    Args:
        data_cfg: ``config.data`` (a ConfigDict or a mapping; keys it lacks take their
            ``easytune.config.defaults()`` values, :func:`data_config`), e.g. ``train_files`` (a list of
            paths/globs/dirs; the old comma-separated string is read too), ``format``, ``val_set_size``,
            ``sequence_len``, ``packing``, ``clean``, ``columns``. A whole config (with a ``data`` member)
            is accepted too.
        tokenizer: a ``transformers`` tokenizer.

    Returns:
        ``(train_seqs, val_seqs, report)``: the sequences as in the module docstring
        (``val_seqs`` has N = 0 rows without a validation set), and a report dict:
        ``format``, ``files``, ``records`` (after cleaning), ``records_read``, ``clean_steps``,
        ``examples``, ``tokens`` (in all examples), ``seam_fallbacks``, ``chat_fallbacks``,
        ``dropped_too_long``, ``length_histogram`` (tokens per example), ``sequence_len``,
        ``packing``, ``cache`` (path or ""), and per split ``{train,val}_examples``,
        ``_sequences``, ``_truncated``, ``_supervised_tokens``, ``_dropped_unsupervised``.

    Raises:
        easytune.config.ConfigError: an unknown ``data`` key.
        FileNotFoundError, ValueError: from the readers, cleaners and formatters (file,
        line and field named), an unknown format, a bad ``data.val_set_size``, nothing left
        after cleaning, an example too long under ``excess_length_strategy = 'raise'``, or a
        training split with 0 supervised tokens (e.g. ``data.sequence_len`` shorter than
        the prompts: the message gives the prompt lengths in tokens).
    """
    data_cfg = data_config(data_cfg)
    cache_dir = data_cfg.dataset_prepared_path
    if cache_dir:
        key = cache_key(data_cfg, tokenizer)
        cached = load_prepared(pathlib.Path(cache_dir) / key)
        if cached is not None:
            log.info("data: reusing %s", pathlib.Path(cache_dir) / key)
            return cached
    fmt = data_cfg.format
    T = int(data_cfg.sequence_len)
    packing = bool(data_cfg.packing)
    files, records, steps, n_read = _read_and_clean(data_cfg)
    stats: dict = {"seam_fallbacks": 0, "chat_fallbacks": 0}
    examples = _format(data_cfg, records, tokenizer, fmt, T, stats)
    dropped_long = 0
    if fmt != "text":
        examples, dropped_long = apply_excess_length(examples, T, data_cfg.excess_length_strategy)
        if not examples:
            raise ValueError(f"all {len(records)} examples are longer than data.sequence_len + 1 = {T + 1} tokens and "
                             f"data.excess_length_strategy = 'drop' dropped them; raise data.sequence_len")
    lengths = [len(ex["input_ids"]) for ex in examples]
    train, val = split_train_val(examples, data_cfg.val_set_size, int(data_cfg.seed),
                                 contiguous=fmt == "text")
    report = {"format": fmt, "files": files, "records_read": n_read, "clean_steps": steps, "records": len(records),
              "examples": len(examples), "tokens": sum(lengths), "sequence_len": T, "packing": packing,
              "seam_fallbacks": stats["seam_fallbacks"], "chat_fallbacks": stats["chat_fallbacks"],
              "dropped_too_long": dropped_long, "length_histogram": length_histogram(lengths), "cache": ""}
    out, unsupervised = [], []
    for name, split in (("train", train), ("val", val)):
        kept, dropped = drop_unsupervised(split, T)
        if name == "train" and not kept:
            raise _no_supervision_error(train, T, fmt)
        unsupervised += dropped
        seqs = build_sequences(kept, T, packing, warn_truncated=False)
        report[f"{name}_examples"] = len(kept)
        report[f"{name}_sequences"] = int(seqs["input_ids"].shape[0])
        report[f"{name}_truncated"] = num_truncated(kept, T)
        report[f"{name}_supervised_tokens"] = count_supervised_tokens(seqs)
        report[f"{name}_dropped_unsupervised"] = len(dropped)
        out.append(seqs)
    report["val_bytes"] = supervised_bytes(out[1], tokenizer)
    truncated = report["train_truncated"] + report["val_truncated"]
    if truncated or unsupervised:
        msg = (f"{truncated + len(unsupervised)} of {len(examples)} examples are longer than data.sequence_len + 1 = "
               f"{T + 1} tokens and were truncated")
        if unsupervised:
            msg += (f"; {len(unsupervised)} of them kept no supervised token and were dropped (e.g. "
                    f"{', '.join(unsupervised[:3])})")
        if 2 * (truncated + len(unsupervised)) > len(examples):
            msg += (f": more than half of the data loses its end (longest example {max(lengths)} tokens, median "
                    f"{statistics.median(lengths):g}); consider a larger data.sequence_len (now {T})")
        log.warning("%s", msg)
    log.info("data: %s", {k: v for k, v in report.items() if k not in ("files", "clean_steps", "length_histogram")})
    if cache_dir:
        report["cache"] = str(save_prepared(pathlib.Path(cache_dir) / key, out[0], out[1], report))
    return out[0], out[1], report


# ------------------------------------------------------------------------------------ cache


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256()
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(str(getattr(tokenizer, "chat_template", "")).encode("utf-8"))
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()


def _plain(value):
    if hasattr(value, "to_dict"):
        return {k: _plain(v) for k, v in value.to_dict().items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def cache_key(data_cfg, tokenizer) -> str:
    """A hex key for the prepared data: SHA-256 over ``config.data`` (without the cache path), each
    input file's path and content (phrase lists and chat template files included), the tokenizer
    (its serialized vocabulary, merges, chat template and special ids) and ``CACHE_VERSION``.
    Any change to these gives a new key, so a stale cache is never read.

    Args:
        data_cfg: ``config.data`` with every key (:func:`data_config`).
        tokenizer: a ``transformers`` tokenizer.
    """
    cfg = {k: v for k, v in _plain(data_cfg).items() if k != "dataset_prepared_path"}
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cfg], sort_keys=True, default=str).encode("utf-8"))
    extra = list(data_cfg.clean.phrase_files)
    if data_cfg.chat_template and pathlib.Path(str(data_cfg.chat_template)).is_file():
        extra.append(str(data_cfg.chat_template))
    for path in [*sources.expand_paths(data_cfg.train_files), *map(pathlib.Path, extra)]:
        h.update(str(path).encode("utf-8"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def save_prepared(path: pathlib.Path, train: dict, val: dict, report: dict) -> pathlib.Path:
    """Writes both splits as ``datasets`` datasets (``save_to_disk``) and ``report.json`` under ``path``."""
    import datasets
    tmp = path.with_name(path.name + ".tmp")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for name, seqs in (("train", train), ("val", val)):
            if len(seqs["input_ids"]):  # an empty split is stored as its absence (datasets cannot reload one)
                datasets.Dataset.from_dict({k: v for k, v in seqs.items()}).save_to_disk(str(tmp / name))
    finally:
        if bars:
            datasets.enable_progress_bars()
    report = dict(report, cache=str(path))
    (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
    if path.exists():
        import shutil
        shutil.rmtree(path)
    tmp.rename(path)  # complete or absent: a killed prepare never leaves a half cache
    return path


def load_prepared(path: pathlib.Path):
    """``(train, val, report)`` from :func:`save_prepared`, or None when ``path`` holds none."""
    if not (path / "report.json").is_file():
        return None
    import datasets
    T = json.loads((path / "report.json").read_text())["sequence_len"]
    out = []
    for name in ("train", "val"):
        dtype = {k: np.float32 if k == "loss_mask" else np.int32 for k in SEQUENCE_KEYS}
        if not (path / name).is_dir():
            out.append({k: np.zeros((0, T), dtype[k]) for k in SEQUENCE_KEYS})
            continue
        ds = datasets.load_from_disk(str(path / name)).with_format("numpy")
        out.append({k: np.asarray(ds[k]).reshape(len(ds), T).astype(dtype[k]) for k in SEQUENCE_KEYS})
    report = json.loads((path / "report.json").read_text())
    report["length_histogram"] = [tuple(b) for b in report["length_histogram"]]
    return out[0], out[1], report
