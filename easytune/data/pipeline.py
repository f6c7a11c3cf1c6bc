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

References:
    Krell et al., "Efficient Sequence Packing without Cross-contamination", 2021
    (segment-masked packing); axolotl ``val_set_size`` and ``datasets``
    ``train_test_split`` (a fractional test size is rounded up).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from easytune.data import formats, sources

log = logging.getLogger(__name__)

SEQUENCE_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


def split_train_val(examples: Sequence, val_set_size: float | int, seed: int) -> tuple[list, list]:
    """Shuffles deterministically and splits off a validation set.

    Args:
        examples: any sequence (examples, records or chunks).
        val_set_size: 0 for no validation set; a fraction in (0, 1) (the count is
            ``ceil(fraction * n)``, as ``datasets.train_test_split``); or a count >= 1
            (an int, or an integer-valued float since ``ConfigDict`` stores
            ``data.val_set_size`` as float).
        seed: seed of the permutation (``numpy.random.default_rng``).

    Returns:
        ``(train, val)``: lists, each in permuted order; together a permutation of
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


def _get(cfg, key: str):
    """Reads ``cfg.key`` from a ConfigDict / object, or ``cfg[key]`` from a mapping."""
    if isinstance(cfg, Mapping):
        return cfg[key]
    return getattr(cfg, key)


def _has(cfg, key: str) -> bool:
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


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


def prepare_dataset(data_cfg, tokenizer) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Reads, formats, splits and packs the training data described by ``config.data``.

    Pipeline: ``sources.read_records`` -> ``formats`` (alpaca / completion: one
    example per record; text: one token stream cut by :func:`chunk_text`) ->
    :func:`split_train_val` (examples, or chunks for text) -> :func:`build_sequences`.

    Args:
        data_cfg: ``config.data`` (ConfigDict, object or mapping) with ``train_files``
            (list of paths/globs, or a comma-separated string), ``format``,
            ``val_set_size``, ``sequence_len``, ``packing``, ``train_on_inputs``, ``seed``;
            optional ``text_field`` (default ``"text"``). A whole config (with a
            ``data`` member) is accepted too.
        tokenizer: a ``transformers`` tokenizer.

    Returns:
        ``(train_seqs, val_seqs, report)``: the sequences as in the module docstring
        (``val_seqs`` has N = 0 rows without a validation set), and a report dict:
        ``format``, ``files``, ``records``, ``examples``, ``tokens`` (in all examples),
        ``seam_fallbacks``, and per split ``{train,val}_examples``, ``_sequences``,
        ``_truncated``, ``_supervised_tokens``.

    Raises:
        FileNotFoundError, ValueError: from the readers and formatters (file, line
        and field named), an unknown format, a bad ``data.val_set_size``, or a
        training split with 0 supervised tokens (e.g. ``data.sequence_len`` shorter
        than the prompts: the message gives the prompt lengths in tokens).
    """
    if not _has(data_cfg, "train_files") and _has(data_cfg, "data"):
        data_cfg = _get(data_cfg, "data")
    fmt = _get(data_cfg, "format")
    T = int(_get(data_cfg, "sequence_len"))
    packing = bool(_get(data_cfg, "packing"))
    text_field = _get(data_cfg, "text_field") if _has(data_cfg, "text_field") else "text"
    files = [str(p) for p in sources.expand_paths(_file_list(_get(data_cfg, "train_files")))]
    records = sources.read_records(files)
    stats: dict = {"seam_fallbacks": 0}
    if fmt == "text":
        # A missing field is an error (a typo in data.text_field); an empty document is skipped.
        texts = [formats.record_field(r, text_field, required=text_field not in r) for r in records]
        stream = formats.format_text(texts, tokenizer)
        examples = chunk_text(stream, T)
        # Text rows are contiguous slices of one stream: packing them changes nothing.
        packing = False
    else:
        examples = formats.format_records(records, fmt, tokenizer, train_on_inputs=bool(_get(data_cfg, "train_on_inputs")),
                                          text_field=text_field, stats=stats)
    train, val = split_train_val(examples, _get(data_cfg, "val_set_size"), int(_get(data_cfg, "seed")))
    report = {"format": fmt, "files": files, "records": len(records), "examples": len(examples),
              "tokens": sum(len(ex["input_ids"]) for ex in examples), "sequence_len": T, "packing": packing,
              "seam_fallbacks": stats["seam_fallbacks"]}
    out = []
    for name, split in (("train", train), ("val", val)):
        seqs = build_sequences(split, T, packing, warn_truncated=False)
        report[f"{name}_examples"] = len(split)
        report[f"{name}_sequences"] = int(seqs["input_ids"].shape[0])
        report[f"{name}_truncated"] = num_truncated(split, T)
        report[f"{name}_supervised_tokens"] = count_supervised_tokens(seqs)
        if name == "train" and report["train_supervised_tokens"] == 0:
            raise _no_supervision_error(train, T, fmt)
        out.append(seqs)
    truncated = report["train_truncated"] + report["val_truncated"]
    if truncated:
        msg = (f"{truncated} of {len(examples)} examples are longer than data.sequence_len + 1 = {T + 1} tokens "
               f"and were truncated")
        if 2 * truncated > len(examples):
            lengths = sorted(len(ex["input_ids"]) for ex in examples)
            msg += (f": more than half of the data loses its end (longest example {lengths[-1]} tokens, median "
                    f"{statistics.median(lengths):g}); consider a larger data.sequence_len (now {T})")
        log.warning("%s", msg)
    log.info("data: %s", {k: v for k, v in report.items() if k != "files"})
    return out[0], out[1], report
