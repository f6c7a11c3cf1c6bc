"""Examples -> fixed-shape training sequences: split, shift, pack, pad.

Axis letters: ``N`` sequences (rows), ``T`` = ``data.sequence_len`` positions.

Sequences are a dict of numpy arrays, each ``[N, T]``:

===============  =======  ====================================================
key              dtype    meaning
===============  =======  ====================================================
``input_ids``    int32    token fed at position t
``target_ids``   int32    the next token, predicted at position t
``loss_mask``    float32  1.0 where ``target_ids[t]`` is supervised
``segment_ids``  int32    1, 2, ... per packed document; 0 = padding
``positions``    int32    position within its document (restarts at 0)
===============  =======  ====================================================

An example of ``L`` tokens becomes ``L - 1`` (input, target) pairs:
``input = ids[:-1]``, ``target = ids[1:]``, ``loss_mask = mask[1:]``. So a target
never crosses a document boundary by construction, and a row holds an example
of up to ``T + 1`` tokens. Longer examples are truncated to their first
``T + 1`` tokens (counted by :func:`num_truncated`; never split across rows).
Padding is marked by ``segment_ids == 0`` and ``loss_mask == 0``, never by a token
id: its ``input_ids``/``target_ids`` are ``pad_id`` (0 by default), which may be a
real token.

:func:`prepare_dataset` runs read -> clean -> format -> split -> pack, optionally cached with
``datasets`` (``data.dataset_prepared_path``); The trainer then draws deterministic,
resumable windows of them (:mod:`easytune.train.batches`), each host gathering only its own rows.

References:
    Krell et al., "Efficient Sequence Packing without Cross-contamination", 2021
    (segment-masked packing); axolotl ``val_set_size`` and ``datasets``
    ``train_test_split`` (a fractional test size is rounded up).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pathlib
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from easytune.data import clean, formats, sources

log = logging.getLogger(__name__)

SEQUENCE_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


def supervised_bytes(seqs: Mapping[str, np.ndarray], tokenizer) -> int | None:
    """UTF-8 bytes of the supervised target tokens of ``seqs`` (the denominator of bits per byte; see
    :func:`easytune.tokenizer.token_byte_lengths`); None when the tokenizer has no fast backend or no target."""
    from easytune.tokenizer import token_byte_lengths
    if getattr(tokenizer, "backend_tokenizer", None) is None or not len(seqs["target_ids"]):
        return None
    lengths = token_byte_lengths(tokenizer)
    targets = np.clip(np.asarray(seqs["target_ids"]), 0, len(lengths) - 1)
    n = int((lengths[targets] * (np.asarray(seqs["loss_mask"]) > 0)).sum())
    return n or None


def split_train_val(examples: Sequence, val_set_size: float | int, seed: int,
                    contiguous: bool = False) -> tuple[list, list]:
    """Shuffles deterministically and splits off a validation set (or, with ``contiguous``, holds out the last
    examples in order, as nanoGPT holds out the tail of a text corpus: rows cut from one stream next to training
    rows would make the validation loss optimistic).

    Args:
        examples: any sequence (examples, records or chunks).
        val_set_size: 0 for no validation set; a fraction in (0, 1) (the count is
            ``ceil(fraction * n)``, as ``datasets.train_test_split``); or a count >= 1
            (an int, or an integer-valued float since ``ConfigDict`` stores
            ``data.val_set_size`` as float).
        seed: seed of the permutation (``numpy.random.default_rng``).

    Returns:
        ``(train, val)``: lists, each in permuted order (in order with ``contiguous``); together a permutation of
        ``examples``.

    Raises:
        ValueError: a negative or non-integer size >= 1, or a split leaving no
            training example (the message names ``data.val_set_size``).
    """
    n = len(examples)
    v = float(val_set_size)
    if v < 0 or math.isnan(v):
        raise ValueError(f"data.val_set_size must be >= 0, got {val_set_size!r}")
    if v == 0:
        n_val = 0
    elif v < 1:
        n_val = math.ceil(v * n)
    elif v == int(v):
        n_val = int(v)
    else:
        raise ValueError(f"data.val_set_size = {val_set_size!r}: use a fraction in (0, 1) or a whole count")
    if n_val >= n and n_val > 0:
        raise ValueError(f"data.val_set_size = {val_set_size!r} takes {n_val} of {n} examples, leaving none to "
                         f"train on; lower data.val_set_size (or 0 for no validation set)")
    if contiguous:
        return list(examples[:n - n_val]), list(examples[n - n_val:])
    order = np.random.default_rng(seed).permutation(n)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val


def chunk_text(ids: Sequence[int], sequence_len: int) -> list[dict]:
    """Cuts a token stream into examples of ``sequence_len + 1`` tokens overlapping by one.

    Chunk ``i`` is ``ids[i*T : i*T + T + 1]``: its last token is the next chunk's
    first, so after shifting every token but ``ids[0]`` is a target exactly once.
    The last chunk may be shorter (it is padded later); a final 1-token remainder
    holds no target and is dropped.

    Args:
        ids: the stream from ``formats.format_text``, length S.
        sequence_len: T, positions per row.

    Returns:
        ``ceil((S - 1) / T)`` examples; ``loss_mask`` is 1 except on each chunk's
        token 0 (already a target in the previous chunk).
    """
    if sequence_len < 1:
        raise ValueError(f"sequence_len must be >= 1, got {sequence_len}")
    ids = list(ids)
    chunks = []
    for start in range(0, max(len(ids) - 1, 0), sequence_len):
        piece = ids[start:start + sequence_len + 1]
        chunks.append({"input_ids": piece, "loss_mask": [0] + [1] * (len(piece) - 1)})
    return chunks


def num_truncated(examples: Sequence[dict], sequence_len: int) -> int:
    """Counts examples longer than ``sequence_len + 1`` tokens (cut by :func:`build_sequences`)."""
    return sum(len(ex["input_ids"]) > sequence_len + 1 for ex in examples)


def build_sequences(examples: Sequence[dict], sequence_len: int, packing: bool,
                    pad_id: int = 0, warn_truncated: bool = True) -> dict[str, np.ndarray]:
    """Shifts, truncates, packs and pads examples into ``[N, T]`` arrays.

    Without packing each example is one row. With packing, examples are placed
    greedily in order (next-fit): an example's ``L - 1`` pairs go into the last
    row if they fit, else they start a new row; earlier rows are never revisited,
    so the order is kept. Within a row documents get segment ids 1, 2, ... and
    positions restarting at 0.

    Args:
        examples: ``{"input_ids": list[int], "loss_mask": list[int]}``; examples
            with fewer than 2 tokens (no target) are skipped.
        sequence_len: T.
        packing: pack several examples per row.
        pad_id: token id written in padded positions (masked by segment 0 and
            loss_mask 0 whatever its value).
        warn_truncated: log a warning when examples are truncated (``prepare_dataset``
            passes False and warns once for both splits).

    Returns:
        Dict with ``input_ids``, ``target_ids``, ``segment_ids``, ``positions`` (int32
        ``[N, T]``) and ``loss_mask`` (float32 ``[N, T]``); N = number of rows (0 when
        no example has a target).

    Raises:
        ValueError: ``sequence_len < 1``, or an example whose ``loss_mask`` length
            differs from its ``input_ids``.
    """
    if sequence_len < 1:
        raise ValueError(f"sequence_len must be >= 1, got {sequence_len}")
    T = sequence_len
    rows: list[list[tuple[list[int], list[int]]]] = []  # per row: (ids, mask) documents
    used = T  # positions used in the last row; T forces a new row first
    for i, ex in enumerate(examples):
        ids, mask = list(ex["input_ids"]), list(ex["loss_mask"])
        if len(ids) != len(mask):
            raise ValueError(f"example {i}: input_ids has {len(ids)} tokens but loss_mask {len(mask)}")
        if len(ids) < 2:
            continue
        ids, mask = ids[:T + 1], mask[:T + 1]
        n = len(ids) - 1
        if packing and used + n <= T:
            rows[-1].append((ids, mask))
            used += n
        else:
            rows.append([(ids, mask)])
            used = n
    truncated = num_truncated(examples, T) if warn_truncated else 0
    if truncated:
        log.warning("%d of %d examples are longer than sequence_len + 1 = %d tokens and were truncated",
                    truncated, len(examples), T + 1)
    N = len(rows)
    out = {
            "input_ids": np.full((N, T), pad_id, np.int32),
            "target_ids": np.full((N, T), pad_id, np.int32),
            "loss_mask": np.zeros((N, T), np.float32),
            "segment_ids": np.zeros((N, T), np.int32),
            "positions": np.zeros((N, T), np.int32),
    }
    for r, docs in enumerate(rows):
        t = 0
        for seg, (ids, mask) in enumerate(docs, start=1):
            n = len(ids) - 1
            out["input_ids"][r, t:t + n] = ids[:-1]
            out["target_ids"][r, t:t + n] = ids[1:]
            out["loss_mask"][r, t:t + n] = mask[1:]
            out["segment_ids"][r, t:t + n] = seg
            out["positions"][r, t:t + n] = np.arange(n)
            t += n
    return out


def count_supervised_tokens(seqs: Mapping[str, np.ndarray]) -> int:
    """Number of supervised targets, ``sum(loss_mask)`` (int)."""
    return int(np.asarray(seqs["loss_mask"]).sum())


EXCESS_LENGTH_STRATEGIES = ("truncate", "drop", "raise")
CACHE_VERSION = 3  # bump when the prepared arrays change meaning


def _examples_with_sources(examples: list[dict], records: Sequence[dict]) -> list[dict]:
    return [dict(ex, _source=r.get("_source", "?")) for ex, r in zip(examples, records)]


def apply_excess_length(examples: list[dict], sequence_len: int, strategy: str) -> tuple[list[dict], int]:
    """``data.excess_length_strategy`` for examples longer than ``sequence_len + 1`` tokens (axolotl's name).

    ``truncate`` keeps them (:func:`build_sequences` cuts them to ``T + 1`` tokens), ``drop``
    removes them, ``raise`` stops at the first one.

    Args:
        examples: with ``input_ids`` (and ``_source`` for the error message).
        sequence_len: T.
        strategy: one of ``EXCESS_LENGTH_STRATEGIES``.

    Returns:
        ``(examples, dropped)``.

    Raises:
        ValueError: an unknown strategy, or with ``raise`` the first long example
            (its ``_source``, length in tokens and ``data.sequence_len`` named).
    """
    if strategy not in EXCESS_LENGTH_STRATEGIES:
        raise ValueError(f"data.excess_length_strategy must be one of {EXCESS_LENGTH_STRATEGIES}, got {strategy!r}")
    if strategy == "truncate":
        return examples, 0
    kept = []
    for ex in examples:
        if len(ex["input_ids"]) > sequence_len + 1:
            if strategy == "raise":
                raise ValueError(f"{ex.get('_source', '?')}: example has {len(ex['input_ids'])} tokens, more than "
                                 f"data.sequence_len + 1 = {sequence_len + 1} (data.excess_length_strategy = 'raise'; "
                                 f"use 'truncate' or 'drop', or a larger data.sequence_len)")
            continue
        kept.append(ex)
    return kept, len(examples) - len(kept)


def drop_unsupervised(examples: Sequence[dict], sequence_len: int) -> tuple[list[dict], list[str]]:
    """Drops examples with no supervised target left after truncation to ``sequence_len + 1`` tokens.

    Such an example would add rows that carry no loss (and, alone in a batch, a 0/0 loss).

    Returns:
        ``(kept, sources of the dropped)``.
    """
    kept, dropped = [], []
    for ex in examples:
        (kept if any(ex["loss_mask"][1:sequence_len + 1]) else dropped).append(ex)
    return kept, [ex.get("_source", "?") for ex in dropped]


def length_histogram(lengths: Sequence[int], bins: int = 8) -> list[tuple[int, int, int]]:
    """``[(low, high, count)]``: examples with ``low <= tokens <= high``, up to ``bins`` bins of equal integer width."""
    if not len(lengths):
        return []
    lo, hi = int(min(lengths)), int(max(lengths))
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = np.bincount((np.asarray(lengths) - lo) // width, minlength=(hi - lo) // width + 1)
    return [(lo + i * width, lo + (i + 1) * width - 1, int(c)) for i, c in enumerate(counts)]


def _get(cfg, key: str):
    """Reads ``cfg.key`` from a ConfigDict / object, or ``cfg[key]`` from a mapping."""
    if isinstance(cfg, Mapping):
        return cfg[key]
    return getattr(cfg, key)


def _has(cfg, key: str) -> bool:
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def _opt(cfg, key: str, default):
    """``cfg.key`` when the config has it (configs written before the key existed), else ``default``."""
    return _get(cfg, key) if _has(cfg, key) else default


def _file_list(train_files) -> list[str]:
    """``data.train_files``: a list of paths/globs, or one comma-separated string."""
    if isinstance(train_files, str):
        return [f.strip() for f in train_files.split(",") if f.strip()]
    return [str(f) for f in train_files]


def _prompt_lengths(examples: Sequence[dict]) -> list[int]:
    """Tokens before the first supervised one, per example with any supervision (bos included)."""
    return [ex["loss_mask"].index(1) for ex in examples if 1 in ex["loss_mask"]]


def _no_supervision_error(train: Sequence[dict], T: int, fmt: str) -> ValueError:
    """The error for a training split left with 0 supervised tokens, saying why."""
    prompts = _prompt_lengths(train)
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


def _read_and_clean(data_cfg) -> tuple[list[str], list[dict], list[dict], int]:
    files = [str(p) for p in sources.expand_paths(_file_list(_get(data_cfg, "train_files")))]
    records = sources.read_records(files, sources.read_options(data_cfg))
    n_read = len(records)
    records, steps = clean.clean_records(records, _opt(data_cfg, "clean", None))
    if not records:
        why = "; ".join(f"{st['step']}: {st['dropped']}" for st in steps if st["dropped"])
        raise ValueError(f"no records left after cleaning: all {n_read} records of {', '.join(files)} were dropped "
                         f"({why}); loosen data.clean.*")
    return files, records, steps, n_read


def _format(data_cfg, records, tokenizer, fmt, T, stats):
    text_field = _opt(data_cfg, "text_field", "text") or "text"
    template = _opt(data_cfg, "text_template", "")
    if template:
        records = formats.render_text_template(records, template, text_field)
    if fmt == "text":
        # A missing field is an error (a typo in data.text_field); an empty document is skipped.
        texts = [formats.record_field(r, text_field, required=text_field not in r) for r in records]
        if bool(_get(data_cfg, "packing")):  # each document cut on its own: rows never attend across documents
            return [chunk for t in texts if t for chunk in chunk_text(formats.format_text([t], tokenizer), T)]
        return chunk_text(formats.format_text(texts, tokenizer), T)
    chat_kwargs = {}
    if fmt == "chat":
        chat_kwargs = dict(roles_to_train=config_list(_opt(data_cfg, "roles_to_train", "assistant")),
                           role_map=sources.parse_columns(_opt(data_cfg, "role_map", "")),
                           chat_template=formats.load_chat_template(_opt(data_cfg, "chat_template", "")))
    examples = formats.format_records(records, fmt, tokenizer, train_on_inputs=bool(_get(data_cfg, "train_on_inputs")),
                                      text_field=text_field, stats=stats, **chat_kwargs)
    return _examples_with_sources(examples, records)


def config_list(value) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def prepare_dataset(data_cfg, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Reads, cleans, formats, splits and packs the training data described by ``config.data``.

    Pipeline: ``sources.read_records`` -> ``clean.clean_records`` (``data.clean``) ->
    ``formats`` (one example per record; ``text``: one token stream cut by
    :func:`chunk_text`) -> :func:`apply_excess_length` -> :func:`split_train_val` ->
    :func:`drop_unsupervised` -> :func:`build_sequences`. With ``data.dataset_prepared_path``
    set, the result is cached there (:func:`cache_key`) and reused while the inputs, the
    tokenizer and ``config.data`` are unchanged.

    Args:
        data_cfg: ``config.data`` (ConfigDict, object or mapping) with ``train_files``
            (list of paths/globs/dirs, or a comma-separated string), ``format``,
            ``val_set_size``, ``sequence_len``, ``packing``, ``train_on_inputs``, ``seed``;
            optional keys (``text_field``, ``text_template``, ``clean``, ``columns``,
            ``excess_length_strategy``, ``roles_to_train``, ...) default as in
            ``easytune.config.defaults()``. A whole config (with a ``data`` member) is accepted too.
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
        FileNotFoundError, ValueError: from the readers, cleaners and formatters (file,
        line and field named), an unknown format, a bad ``data.val_set_size``, nothing left
        after cleaning, an example too long under ``excess_length_strategy = 'raise'``, or a
        training split with 0 supervised tokens (e.g. ``data.sequence_len`` shorter than
        the prompts: the message gives the prompt lengths in tokens).
    """
    if not _has(data_cfg, "train_files") and _has(data_cfg, "data"):
        data_cfg = _get(data_cfg, "data")
    cache_dir = _opt(data_cfg, "dataset_prepared_path", "")
    if cache_dir:
        key = cache_key(data_cfg, tokenizer)
        cached = load_prepared(pathlib.Path(cache_dir) / key)
        if cached is not None:
            log.info("data: reusing %s", pathlib.Path(cache_dir) / key)
            return cached
    fmt = _get(data_cfg, "format")
    T = int(_get(data_cfg, "sequence_len"))
    packing = bool(_get(data_cfg, "packing"))
    files, records, steps, n_read = _read_and_clean(data_cfg)
    stats: dict = {"seam_fallbacks": 0, "chat_fallbacks": 0}
    examples = _format(data_cfg, records, tokenizer, fmt, T, stats)
    dropped_long = 0
    if fmt != "text":
        examples, dropped_long = apply_excess_length(examples, T, _opt(data_cfg, "excess_length_strategy", "truncate"))
        if not examples:
            raise ValueError(f"all {len(records)} examples are longer than data.sequence_len + 1 = {T + 1} tokens and "
                             f"data.excess_length_strategy = 'drop' dropped them; raise data.sequence_len")
    lengths = [len(ex["input_ids"]) for ex in examples]
    train, val = split_train_val(examples, _get(data_cfg, "val_set_size"), int(_get(data_cfg, "seed")),
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
    Any change to these gives a new key, so a stale cache is never read."""
    cfg = {k: v for k, v in _plain(data_cfg).items() if k != "dataset_prepared_path"}
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cfg], sort_keys=True, default=str).encode("utf-8"))
    extra = []
    clean_cfg = cfg.get("clean") or {}
    extra += config_list(clean_cfg.get("phrase_files", "")) if isinstance(clean_cfg, dict) else []
    if cfg.get("chat_template") and pathlib.Path(str(cfg["chat_template"])).is_file():
        extra.append(str(cfg["chat_template"]))
    for path in [*sources.expand_paths(_file_list(cfg["train_files"])), *map(pathlib.Path, extra)]:
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


# ------------------------------------------------------------------------------------ batches
