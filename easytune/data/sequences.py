"""Examples -> fixed-shape training sequences: split, shift, pack, pad; plus the length bookkeeping
(truncation counts, excess-length strategies, histograms) and the supervised-token counts of sequences.

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

:func:`build_sequences` is the in-memory form of these rows: :func:`easytune.data.prepare.prepare_dataset` streams
the examples to disk and :class:`easytune.data.packed.PackedSequences` gathers the same rows (the same split, the
same next-fit packing) on demand; the trainer then draws deterministic, resumable windows of them
(:mod:`easytune.train.batches`).

References:
    Krell et al., "Efficient Sequence Packing without Cross-contamination", 2021
    (segment-masked packing); axolotl ``val_set_size`` and ``datasets``
    ``train_test_split`` (a fractional test size is rounded up).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from easytune.config import EXCESS_LENGTH_STRATEGIES
from easytune.tokenizer import token_byte_lengths

log = logging.getLogger(__name__)

SEQUENCE_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


def supervised_bytes(seqs: Mapping[str, np.ndarray], tokenizer) -> int | None:
    """UTF-8 bytes of the supervised target tokens of ``seqs`` (the denominator of bits per byte; see
    :func:`easytune.tokenizer.token_byte_lengths`); None when the tokenizer has no fast backend or no target."""
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
    train_idx, val_idx = split_indices(len(examples), val_set_size, seed, contiguous)
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx]


def split_indices(n: int, val_set_size: float | int, seed: int, contiguous: bool = False) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """The split of :func:`split_train_val` as indices: ``(train, val)``, int64 arrays over ``range(n)``.

    Without ``contiguous`` both follow ``numpy.random.default_rng(seed).permutation(n)`` (val takes its first
    entries); with it, train is ``0 .. n - n_val - 1`` and val the tail.

    Raises:
        ValueError: as :func:`split_train_val`.
    """
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
        return np.arange(n - n_val, dtype=np.int64), np.arange(n - n_val, n, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n).astype(np.int64, copy=False)
    return order[n_val:], order[:n_val]


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
        warn_truncated: log a warning when examples are truncated (``prepare.prepare_dataset``
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
            t += place_document(out, r, t, seg, ids, mask)
    return out


def place_document(out: Mapping[str, np.ndarray], row: int, start: int, segment: int, ids, mask) -> int:
    """Writes one document of ``L`` tokens (``ids``, ``mask``: length ``L``, already cut to ``T + 1``) into row
    ``row`` of the ``[N, T]`` arrays ``out`` at position ``start``, as its ``L - 1`` shifted (input, target) pairs
    with segment id ``segment`` and positions from 0. Returns ``L - 1``, the positions used."""
    n = len(ids) - 1
    out["input_ids"][row, start:start + n] = ids[:-1]
    out["target_ids"][row, start:start + n] = ids[1:]
    out["loss_mask"][row, start:start + n] = mask[1:]
    out["segment_ids"][row, start:start + n] = segment
    out["positions"][row, start:start + n] = np.arange(n)
    return n


def count_supervised_tokens(seqs: Mapping[str, np.ndarray]) -> int:
    """Number of supervised targets, ``sum(loss_mask)`` (int)."""
    return int(np.asarray(seqs["loss_mask"]).sum())


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


def prompt_lengths(examples: Sequence[dict]) -> list[int]:
    """Tokens before the first supervised one, per example with any supervision (bos included)."""
    return [ex["loss_mask"].index(1) for ex in examples if 1 in ex["loss_mask"]]
