"""The prepared data on disk: tokenized examples in flat, memory-mapped ``.npy`` arrays plus the packed-row index
over them; :class:`PackedSequences` gathers the fixed-shape ``[N, T]`` rows of :mod:`easytune.data.sequences` from
them on demand, so training holds one batch of rows in memory, never the dataset.

A prepared folder (written by :class:`StoreWriter`, read by :func:`open_prepared`):

====================  =========  ====================  ==============================================================
file                  dtype      shape                 meaning
====================  =========  ====================  ==============================================================
``tokens.npy``        int32      ``[S]``               every stored example's token ids, one after another (an
                                                       example is stored cut to its first ``T + 1`` tokens)
``loss_mask.npy``     uint8      ``[S]``               1 where the token is supervised (as a target)
``offsets.npy``       int64      ``[E + 1]``           example ``e`` is ``tokens[offsets[e]:offsets[e + 1]]``
``supervised.npy``    int32      ``[E]``               supervised targets of example ``e`` (``loss_mask[1:T + 1]``)
``{split}_order.npy`` int64      ``[K]``               the split's examples in row order (an index may repeat:
                                                       a mixture source with ``weight > 1``)
``{split}_rows.npy``  int64      ``[N + 1]``           row ``r`` holds ``order[rows[r]:rows[r + 1]]``, packed
                                                       in that order (segment ids 1, 2, ...)
``report.json``       JSON                             the data report; written last: its presence marks a
                                                       complete folder
====================  =========  ====================  ==============================================================

``S`` tokens, ``E`` examples, ``K`` examples in a split, ``N`` rows, ``T`` = ``data.sequence_len``. Storage is 5
bytes per token (a ``[N, T]`` layout of the five sequence arrays would take 20 bytes per position). A row is
rebuilt exactly as :func:`easytune.data.sequences.build_sequences` builds it: example ``e`` of ``L`` stored tokens
contributes ``L - 1`` (input, target) pairs.
"""

from __future__ import annotations

import array
import io
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from easytune.data.sequences import SEQUENCE_KEYS, place_document

DTYPES = {"input_ids": np.int32, "target_ids": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
          "positions": np.int32}
SPLITS = ("train", "val")


def _npy_header(dtype, length: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": (int(length),)})
    return buf.getvalue()


class _Column:
    """A 1-D ``.npy`` file written by appending; its header is rewritten with the final length on close."""

    def __init__(self, path: pathlib.Path, dtype):
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.header_len = len(_npy_header(dtype, 0))
        self.file.write(_npy_header(dtype, 0))

    def append(self, values) -> None:
        values = np.ascontiguousarray(values, self.dtype)
        self.file.write(values.tobytes())
        self.length += len(values)

    def close(self) -> None:
        header = _npy_header(self.dtype, self.length)
        if len(header) != self.header_len:  # numpy pads the header so the shape can grow in place
            raise RuntimeError(f"{self.path}: .npy header changed size ({self.header_len} -> {len(header)})")
        self.file.seek(0)
        self.file.write(header)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class StoreWriter:
    """Appends tokenized examples to the flat arrays of a prepared folder (module docstring), in bounded memory:
    the tokens go to disk as they come; only per-example counts (12 bytes each) stay in memory until :meth:`close`.

    Args:
        directory: the (new, empty or absent) folder to write.
        sequence_len: T; examples are stored cut to their first ``T + 1`` tokens.
    """

    def __init__(self, directory: str | os.PathLike, sequence_len: int):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.T = int(sequence_len)
        self.tokens = _Column(self.dir / "tokens.npy", np.int32)
        self.mask = _Column(self.dir / "loss_mask.npy", np.uint8)
        self.offsets = _Column(self.dir / "offsets.npy", np.int64)
        self.offsets.append([0])
        self.supervised = _Column(self.dir / "supervised.npy", np.int32)
        self.num_examples = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """Appends a batch of examples given flat: ``ids`` / ``mask`` ``[sum(lengths)]``, ``lengths`` ``[B]``
        tokens per example (already cut to ``T + 1``; 0 for an example kept only as a place in the order)."""
        lengths = np.asarray(lengths, np.int64)
        if not len(lengths):
            return
        mask = np.asarray(mask, np.uint8)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # supervised targets per example: mask[1:] of each example (the first token is never a target)
        cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        sup = cum[ends] - cum[np.minimum(starts + 1, ends)]
        self.tokens.append(ids)
        self.mask.append(mask)
        self.offsets.append(self.tokens.length - len(ids) + ends)
        self.supervised.append(sup)
        self.num_examples += len(lengths)

    def close(self) -> None:
        """Finishes the files (final ``.npy`` headers, flushed to disk)."""
        for col in (self.tokens, self.mask, self.offsets, self.supervised):
            col.close()

    def abort(self) -> None:
        """Closes the files as they are (the caller removes the unfinished folder)."""
        for col in (self.tokens, self.mask, self.offsets, self.supervised):
            col.file.close()


def pack_rows(lengths: Sequence[int] | np.ndarray, sequence_len: int, packing: bool) -> np.ndarray:
    """Row boundaries of next-fit packing, the rule of :func:`easytune.data.sequences.build_sequences`.

    Args:
        lengths: int ``[K]``, stored tokens per example in row order (each >= 2, at most ``T + 1``).
        sequence_len: T.
        packing: several examples per row; without it each example is one row.

    Returns:
        int64 ``[N + 1]``: row ``r`` holds examples ``rows[r]:rows[r + 1]``.
    """
    lengths = np.asarray(lengths)
    if not packing:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    T = int(sequence_len)
    starts, used = array.array("q"), T
    for c in range(0, len(lengths), 1 << 16):  # in chunks: a Python int per example only for one chunk at a time
        for i, n in enumerate((lengths[c:c + (1 << 16)] - 1).tolist(), start=c):
            if used + n <= T:
                used += n
            else:
                starts.append(i)
                used = n
    starts.append(len(lengths))
    return np.frombuffer(starts, np.int64).copy()


def write_split(directory: str | os.PathLike, split: str, order: np.ndarray, rows: np.ndarray) -> None:
    """Writes ``{split}_order.npy`` and ``{split}_rows.npy`` (module docstring)."""
    directory = pathlib.Path(directory)
    np.save(directory / f"{split}_order.npy", np.asarray(order, np.int64))
    np.save(directory / f"{split}_rows.npy", np.asarray(rows, np.int64))


class _Rows:
    """The mapping face both row sources share: keys, iteration and ``items`` over :meth:`gather`."""

    def keys(self):
        return SEQUENCE_KEYS

    def __iter__(self):
        return iter(SEQUENCE_KEYS)

    def items(self):
        """``(key, [N, T] array)`` pairs: the whole split in memory (for inspection and small data)."""
        arrays = self.gather(np.arange(len(self)))
        return [(k, arrays[k]) for k in SEQUENCE_KEYS]


class PackedSequences(_Rows):
    """One split of a prepared folder as ``[N, T]`` rows gathered on demand (memory-mapped; module docstring).

    ``len(seqs)`` is N; :meth:`gather` builds the rows of a batch; ``seqs["input_ids"]`` builds a whole column
    (``[N, T]``, for inspection and tests: it holds the split in memory).
    """

    def __init__(self, directory: str | os.PathLike, split: str, sequence_len: int, keep_alive=None):
        self.dir = pathlib.Path(directory)
        self.split = split
        self.sequence_len = int(sequence_len)
        self._keep_alive = keep_alive  # e.g. the owner of a temporary folder, removed when the last view goes
        self.tokens = np.load(self.dir / "tokens.npy", mmap_mode="r")
        self.mask = np.load(self.dir / "loss_mask.npy", mmap_mode="r")
        self.offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        self.order = np.load(self.dir / f"{split}_order.npy")
        self.rows = np.load(self.dir / f"{split}_rows.npy")

    def __len__(self) -> int:
        return len(self.rows) - 1

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in DTYPES:
            raise KeyError(key)
        return self.gather(np.arange(len(self)))[key]

    def _row_examples(self):
        """Per example of the order: its row and stored length (int64 ``[K]`` each)."""
        row_of = np.repeat(np.arange(len(self)), np.diff(self.rows))
        lengths = self.offsets[self.order + 1] - self.offsets[self.order]
        return row_of, lengths

    def supervised_per_row(self) -> np.ndarray:
        """float64 ``[N]``: supervised targets per row (``loss_mask.sum(axis=1)``)."""
        sup = np.load(self.dir / "supervised.npy", mmap_mode="r")
        row_of, _ = self._row_examples()
        return np.bincount(row_of, weights=sup[self.order], minlength=len(self)).astype(np.float64)

    def tokens_per_row(self) -> np.ndarray:
        """float64 ``[N]``: non-padding positions per row (``(segment_ids > 0).sum(axis=1)``)."""
        row_of, lengths = self._row_examples()
        return np.bincount(row_of, weights=lengths - 1, minlength=len(self)).astype(np.float64)

    def gather(self, rows) -> dict[str, np.ndarray]:
        """The rows ``rows`` (int ``[B]``; -1 = an empty row: segment 0, loss_mask 0) as ``[B, T]`` arrays with the
        keys and dtypes of :data:`easytune.data.sequences.SEQUENCE_KEYS`; padding is 0.

        Raises:
            IndexError: a row index >= N.
        """
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and rows.max(initial=-1) >= len(self):
            raise IndexError(f"row {int(rows.max())} of the {self.split} split, which has {len(self)} rows")
        T = self.sequence_len
        out = {k: np.zeros((len(rows), T), dt) for k, dt in DTYPES.items()}
        for i, r in enumerate(rows.tolist()):
            if r < 0:
                continue
            t = 0
            for seg, e in enumerate(self.order[self.rows[r]:self.rows[r + 1]].tolist(), start=1):
                a, b = int(self.offsets[e]), int(self.offsets[e + 1])
                t += place_document(out, i, t, seg, self.tokens[a:b], self.mask[a:b])
        return out


class ArraySequences(_Rows):
    """In-memory ``[N, T]`` arrays (a dict as :func:`easytune.data.sequences.build_sequences` returns) behind the
    interface of :class:`PackedSequences`."""

    def __init__(self, seqs):
        self.arrays = {k: np.asarray(seqs[k]) for k in SEQUENCE_KEYS}
        self.sequence_len = int(self.arrays["input_ids"].shape[1]) if self.arrays["input_ids"].ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def supervised_per_row(self) -> np.ndarray:
        return self.arrays["loss_mask"].sum(axis=1, dtype=np.float64)

    def tokens_per_row(self) -> np.ndarray:
        return (self.arrays["segment_ids"] > 0).sum(axis=1).astype(np.float64)

    def gather(self, rows) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64).reshape(-1)
        empty = rows < 0
        out = {k: v[np.where(empty, 0, rows)] for k, v in self.arrays.items()} if len(self) else \
            {k: np.zeros((len(rows),) + v.shape[1:], v.dtype) for k, v in self.arrays.items()}
        if empty.any():
            out = {k: np.where(empty.reshape((-1,) + (1,) * (v.ndim - 1)), np.zeros((), v.dtype), v)
                   for k, v in out.items()}
        return out


def as_sequences(seqs):
    """``seqs`` with the :class:`PackedSequences` interface: a :class:`PackedSequences` / :class:`ArraySequences`
    as is, a dict of ``[N, T]`` arrays wrapped in :class:`ArraySequences`; None stays None."""
    if seqs is None or isinstance(seqs, (PackedSequences, ArraySequences)):
        return seqs
    return ArraySequences(seqs)


def open_prepared(directory: str | os.PathLike, keep_alive=None):
    """``(train, val, report)`` of a complete prepared folder (:class:`PackedSequences` each), or None when
    ``directory`` holds none (no ``report.json``)."""
    directory = pathlib.Path(directory)
    if not (directory / "report.json").is_file():
        return None
    report = json.loads((directory / "report.json").read_text())
    report["length_histogram"] = [tuple(b) for b in report.get("length_histogram", [])]
    T = int(report["sequence_len"])
    train, val = (PackedSequences(directory, s, T, keep_alive) for s in SPLITS)
    return train, val, report
