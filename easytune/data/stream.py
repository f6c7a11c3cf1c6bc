"""Batches of cleaned records -> tokenized example arrays, in worker processes (``data.num_proc``), in order.

:func:`map_batches` runs :func:`tokenize_batch` over a stream of record batches, in this process or in a pool of
worker processes (forked on Linux), keeping at most ``2 * num_proc`` batches in flight (bounded memory) and yielding
results in input order, so the prepared ids are the same for any ``num_proc``. Each result holds flat numpy arrays
(cheap to send between processes), not per-example lists.

A :class:`FormatSpec` says how one source's records become examples (``easytune.data.formats``);
``bad_records = "skip"`` turns a record-level error (a message starting with the record's ``_source``) into a
``(source, message)`` entry of the result instead of an exception.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from easytune.data import formats

_STATE: dict = {}  # per process: the tokenizer and the FormatSpecs (set by init_worker)


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """How one source's records are formatted (the ``config.data`` keys of that source).

    Attributes:
        format: ``alpaca`` | ``chat`` | ``completion`` | ``pretokenized`` | ``text``.
        sequence_len: T (tokens per row); examples are returned cut to ``T + 1`` tokens.
        excess_length_strategy: ``truncate`` | ``drop`` | ``raise`` (:func:`sequences.apply_excess_length`).
        bad_records: ``error`` | ``skip``.
    """
    format: str
    sequence_len: int
    excess_length_strategy: str = "truncate"
    bad_records: str = "error"
    text_field: str = "text"
    text_template: str = ""
    train_on_inputs: bool = False
    roles_to_train: tuple = ("assistant",)
    role_map: tuple = ()  # (name, role) pairs
    chat_template: str | None = None


def default_num_proc() -> int:
    """All the cores this process may use (``os.sched_getaffinity``, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_worker(tokenizer, specs) -> None:
    """Sets this process's tokenizer and format specs (the pool initializer; also used in-process)."""
    _STATE["tokenizer"], _STATE["specs"] = tokenizer, list(specs)


def _format(records: list[dict], spec: FormatSpec, stats: dict) -> list:
    """Examples (or, for ``text``, token streams per non-empty document) of ``records``."""
    tokenizer = _STATE["tokenizer"]
    if spec.text_template:
        records = formats.render_text_template(records, spec.text_template, spec.text_field)
    if spec.format == "text":
        f = spec.text_field
        texts = [formats.record_field(r, f, required=f not in r) for r in records]
        frames = [(r.get("_piece", 0) == 0, r.get("_last_piece", True)) for r in records]
        return formats.format_documents(texts, tokenizer, frames)
    chat = {}
    if spec.format == "chat":
        chat = dict(roles_to_train=list(spec.roles_to_train), role_map=dict(spec.role_map),
                    chat_template=spec.chat_template)
    return formats.format_records(records, spec.format, tokenizer, train_on_inputs=spec.train_on_inputs,
                                  text_field=spec.text_field, stats=stats, **chat)


def _format_skipping(records: list[dict], spec: FormatSpec, stats: dict) -> tuple[list, list, list]:
    """``(kept records, their examples, bad)``: with ``bad_records = "skip"`` a failing batch is formatted record by
    record and each record whose error names it is left out (``bad``: ``(source, message)``)."""
    try:
        return records, _format(records, spec, stats), []
    except ValueError:
        if spec.bad_records != "skip":
            raise
    kept, out, bad = [], [], []
    for r in records:
        try:
            ex = _format([r], spec, stats)
        except ValueError as e:
            where = str(r.get("_source", "?"))
            if not str(e).startswith(where):  # not about this record (a config error): stop
                raise
            bad.append((where, str(e)))
            continue
        kept.append(r)
        out.extend(ex)
    return kept, out, bad


def tokenize_batch(job: tuple[int, list[dict]]) -> dict:
    """Formats and tokenizes one batch of records of source ``job[0]`` (runs in a worker).

    Returns:
        A dict of numpy arrays and counters. ``text``: ``ids`` int32 (the documents' streams one after another),
        ``doc_lengths`` int64 ``[D]``, ``doc_starts`` / ``doc_ends`` bool ``[D]`` (False for a piece that does
        not start / end its document).
        Other formats: ``ids`` int32 and ``mask`` uint8 (examples cut to
        ``T + 1`` tokens; an example without a supervised target within them is stored with 0 tokens),
        ``stored`` int64 ``[B]`` tokens stored per example, ``lengths`` int64 ``[B]`` full tokens per example,
        ``prompts`` int64 ``[B]`` tokens before the first supervised one (-1 when none),
        ``unsupervised`` (sources of examples without a supervised target), ``dropped_too_long``. Both:
        ``source``, ``records`` (formatted), ``bad`` (``(source, message)`` pairs), ``seam_fallbacks``,
        ``chat_fallbacks``.

    Raises:
        ValueError: a bad record with ``bad_records = "error"`` (its file:line and field named), or an example
            too long under ``excess_length_strategy = "raise"``.
    """
    source, records = job
    spec: FormatSpec = _STATE["specs"][source]
    stats = {"seam_fallbacks": 0, "chat_fallbacks": 0}
    kept, examples, bad = _format_skipping(records, spec, stats)
    out = dict(stats, source=source, records=len(kept), bad=bad)
    if spec.format == "text":
        docs = [(d, r.get("_piece", 0) == 0, r.get("_last_piece", True)) for r, d in zip(kept, examples) if d]
        out["ids"] = np.concatenate([np.asarray(d, np.int32) for d, _, _ in docs] or [np.zeros(0, np.int32)])
        out["doc_lengths"] = np.array([len(d) for d, _, _ in docs], np.int64)
        out["doc_starts"] = np.array([first for _, first, _ in docs], bool)  # False: a later piece of a document
        out["doc_ends"] = np.array([last for _, _, last in docs], bool)  # False: the document goes on next piece
        return out
    T1 = spec.sequence_len + 1
    ids, mask, stored, lengths, prompts, unsupervised, dropped = [], [], [], [], [], [], 0
    for record, ex in zip(kept, examples):
        L = len(ex["input_ids"])
        if L > T1 and spec.excess_length_strategy != "truncate":
            if spec.excess_length_strategy == "raise":
                raise ValueError(f"{record.get('_source', '?')}: example has {L} tokens, more than "
                                 f"data.sequence_len + 1 = {T1} (data.excess_length_strategy = 'raise'; "
                                 f"use 'truncate' or 'drop', or a larger data.sequence_len)")
            dropped += 1
            continue
        m = ex["loss_mask"]
        if len(m) != L:
            raise ValueError(f"{record.get('_source', '?')}: input_ids has {L} tokens but loss_mask {len(m)}")
        lengths.append(L)
        prompts.append(m.index(1) if 1 in m else -1)
        if any(m[1:T1]):
            ids.extend(ex["input_ids"][:T1])
            mask.extend(m[:T1])
            stored.append(min(L, T1))
        else:
            stored.append(0)
            unsupervised.append(str(record.get("_source", "?")))
    out.update(ids=np.array(ids, np.int32), mask=np.array(mask, np.uint8), stored=np.array(stored, np.int64),
               lengths=np.array(lengths, np.int64), prompts=np.array(prompts, np.int64),
               unsupervised=unsupervised, dropped_too_long=dropped)
    return out


def map_batches(fn: Callable, jobs: Iterable, num_proc: int, initargs: tuple) -> Iterator:
    """``fn(job)`` for each job, in order, computed in ``num_proc`` worker processes (or in this one when
    ``num_proc <= 1`` or there is only one job), with at most ``2 * num_proc`` jobs in flight.

    Args:
        fn: a module-level function (picklable).
        jobs: an iterable, consumed lazily.
        num_proc: worker processes.
        initargs: arguments of :func:`init_worker` for each process.
    """
    it = iter(jobs)
    head = [job for job in (next(it, None), next(it, None)) if job is not None]
    if num_proc <= 1 or len(head) < 2:
        init_worker(*initargs)
        for job in head:
            yield fn(job)
        for job in it:
            yield fn(job)
        return
    with _pool(num_proc, initargs) as pool:
        pending: collections.deque = collections.deque()
        for job in _chain(head, it):
            pending.append(pool.apply_async(fn, (job,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _pool(num_proc: int, initargs: tuple):
    """A pool of ``num_proc`` workers: forked where the platform forks (as ``datasets.map`` and PyTorch's
    ``DataLoader`` do: no re-import, and a script without an ``if __name__ == "__main__"`` guard works), else
    spawned. The workers never touch JAX, so JAX's warning about forking a multithreaded process is silenced
    here; ``TOKENIZERS_PARALLELISM=false`` is set while forking so the workers neither warn nor oversubscribe."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            pool = ctx.Pool(num_proc, initializer=init_worker, initargs=initargs)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


def chunk_stream(ids: np.ndarray, sequence_len: int, final: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cuts a token stream into ``T + 1``-token chunks overlapping by one, as :func:`sequences.chunk_text`.

    Args:
        ids: int32 ``[S]``.
        sequence_len: T.
        final: the stream ends here: also return the last, shorter chunk (when it holds a target).

    Returns:
        ``(chunk_ids, chunk_lengths, rest)``: the chunks' tokens one after another, tokens per chunk, and the
        tokens not yet chunked (the start of the next chunk; empty when ``final``).
    """
    T = int(sequence_len)
    S = len(ids)
    k = (S - 1) // T if S >= T + 1 else 0  # full chunks: start i*T with i*T + T + 1 <= S
    full = ids[(np.arange(k)[:, None] * T + np.arange(T + 1)).reshape(-1)] if k else ids[:0]
    lengths = [T + 1] * k
    rest = ids[k * T:]
    if final:
        if len(rest) >= 2:
            full = np.concatenate([full, rest])
            lengths.append(len(rest))
        rest = ids[:0]
    return full, np.asarray(lengths, np.int64), rest
