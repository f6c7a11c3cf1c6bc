"""``prepare_dataset``: the training data of a config, streamed read -> clean -> format -> tokenize -> split -> pack
into a prepared folder on disk (:mod:`easytune.data.packed`), in bounded memory; and the cache of that folder
(``data.dataset_prepared_path``, keyed by :func:`cache_key`).

Pass 1 streams records in batches of ``data.batch_records`` (``sources.iter_records`` -> ``clean.Cleaner``, whose
dedup state is hashes only) to :func:`easytune.data.stream.tokenize_batch` in ``data.num_proc`` processes and appends
the examples to the folder's flat token files. Pass 2 works on per-example counts only: the mixture's sample of each
source (``data.datasets``), the train/validation split (:func:`sequences.split_indices`, the permutation of
today's in-memory pipeline) and the next-fit packing (:func:`packed.pack_rows`). Memory is a few bytes per example,
never the text or the tokens.

The readers are in ``sources`` / ``raw``, the cleaning steps in ``clean``, the record formats in ``formats``,
and the sequence arrays (and what packing means) in ``sequences``.
"""

from __future__ import annotations

import array
import glob
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Mapping

import ml_collections
import numpy as np

from easytune import config as config_lib
from easytune import mixture
from easytune.data import clean, packed, sources, stream
from easytune.data.sequences import length_histogram, split_indices
from easytune.tokenizer import token_byte_lengths

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # bump when the prepared folder changes meaning (4: the packed, memory-mapped folder)
BAD_SHOWN = 5  # bad records named in the report
PROBE_EXAMPLES = 1000  # a sequence_len shorter than every prompt of the first this many examples stops the prepare
BATCH_BYTES = 8 << 20  # characters of text per streamed batch at most (a batch also ends at data.batch_records)
# format "text": a larger text file is read and tokenized in pieces of this size (bytes); a piece is tokenized on
# its own, so this is also the size below which a file's tokens are exactly the whole file's
TEXT_PIECE_BYTES = 8 << 20
# config.data keys that change how the work is done, never its result: not part of the cache key
NOT_IN_KEY = ("dataset_prepared_path", "num_proc", "batch_records")


def data_config(cfg) -> ml_collections.ConfigDict:
    """``config.data`` with every key: ``cfg`` is ``config.data`` (a ConfigDict or a mapping, possibly partial:
    absent keys take their ``config.defaults()`` values) or a whole config (with a ``data`` member).

    Raises:
        easytune.config.ConfigError: an unknown key or a value of the wrong type.
    """
    if "train_files" not in cfg and "data" in cfg:
        cfg = cfg["data"]
    return config_lib.with_defaults(cfg, "data")


def _no_supervision_error(prompts: np.ndarray, n: int, T: int, fmt: str, first: int = 0) -> ValueError:
    """The error for a training split left with 0 supervised tokens, saying why (``prompts``: tokens before the
    first supervised one per example, -1 for none; ``first``: only the first batch of that many records was seen)."""
    prompts = prompts[prompts >= 0]
    which = f"the first {first} {fmt} examples" if first else f"all {n} {fmt} examples"
    if len(prompts) and prompts.min() > T:
        # Every supervised token lies past position T: truncation cut each example to (part of) its prompt.
        return ValueError(
            f"the training split has 0 supervised tokens: data.sequence_len = {T} is shorter than every "
            f"prompt (longest {int(prompts.max())} tokens, median {float(np.median(prompts)):g} tokens, "
            f"bos included), so {which} were truncated to their prompt and keep no response token to train on; "
            f"set data.sequence_len larger than the prompts (at least {int(prompts.max())}, plus room for the "
            f"responses)")
    return ValueError(
        f"the training split has 0 supervised tokens ({n} {fmt} examples, data.sequence_len = {T}); "
        f"check that the data files hold non-empty documents / responses")


def _spec(src: Mapping, data_cfg) -> stream.FormatSpec:
    chat_template = None
    if src["format"] == "chat":
        from easytune.data import formats
        chat_template = formats.load_chat_template(src["chat_template"])
    return stream.FormatSpec(
        format=src["format"], sequence_len=int(data_cfg.sequence_len),
        excess_length_strategy=data_cfg.excess_length_strategy, bad_records=data_cfg.bad_records,
        text_field=src["text_field"] or "text", text_template=src["text_template"],
        train_on_inputs=bool(src["train_on_inputs"]), roles_to_train=tuple(src["roles_to_train"]),
        role_map=tuple(sources.parse_columns(src["role_map"]).items()), chat_template=chat_template)


def _read_options(src: Mapping, pieces: bool) -> sources.ReadOptions:
    """The reader options of a source; ``pieces``: a large text file may be read in pieces (only without cleaning,
    whose steps judge a whole document)."""
    return sources.ReadOptions(columns=sources.parse_columns(src["columns"]), html_selector=src["html_selector"],
                               csv_encoding=src["csv_encoding"] or "utf-8", csv_delimiter=src["csv_delimiter"],
                               sql_table=src["sql_table"],
                               text_piece_bytes=TEXT_PIECE_BYTES if pieces and src["format"] == "text" else 0)


class _Pass1:
    """The streamed pass: records -> cleaned batches -> examples appended to the folder, plus the counts."""

    def __init__(self, data_cfg, tokenizer, srcs: list[dict], directory: pathlib.Path):
        self.cfg, self.srcs = data_cfg, srcs
        self.T = int(data_cfg.sequence_len)
        self.writer = packed.StoreWriter(directory, self.T)
        self.cleaner = clean.Cleaner(clean.CleanConfig.from_config(data_cfg.clean))
        self.specs = [_spec(s, data_cfg) for s in srcs]
        self.tokenizer = tokenizer
        self.n_read = self.n_records = self.n_bad = self.n_bad_read = self.dropped_long = 0
        self.bad: list[str] = []
        self.stats = {"seam_fallbacks": 0, "chat_fallbacks": 0}
        self.lengths, self.prompts = array.array("i"), array.array("i")  # 8 bytes per example in all
        self.unsupervised: list[str] = []
        self.ranges = [[0, 0] for _ in srcs]  # per source: examples [start, end)
        self.carry = [np.zeros(0, np.int32) for _ in srcs]  # text without packing: the stream not yet chunked

    def _on_bad_read(self, where: str, message: str) -> None:
        """A record the reader could not parse (bad_records = "skip")."""
        self.n_bad_read += 1
        self._on_bad(where, message)

    def _on_bad(self, where: str, message: str) -> None:
        self.n_bad += 1
        if len(self.bad) < BAD_SHOWN:
            self.bad.append(message if message.startswith(where) else f"{where}: {message}")

    def _jobs(self) -> Iterator[tuple[int, list[dict]]]:
        """Batches of ``data.batch_records`` records, or fewer holding ``BATCH_BYTES`` of text."""
        size = int(self.cfg.batch_records)
        on_bad = self._on_bad_read if self.cfg.bad_records == "skip" else None
        for i, src in enumerate(self.srcs):
            batch: list[dict] = []
            chars = 0
            options = _read_options(src, pieces=not self.cleaner.steps)
            for record in sources.iter_records(src["train_files"], options, on_bad=on_bad):
                batch.append(record)
                chars += sum(len(v) for v in record.values() if isinstance(v, str))
                if len(batch) == size or chars >= BATCH_BYTES:
                    yield from self._clean(i, batch)
                    batch, chars = [], 0
            yield from self._clean(i, batch, last=True)

    def _clean(self, i: int, batch: list[dict], last: bool = False):
        """Cleans a batch of source ``i``; ``last``: the source's end, where a grouped ``remove_furniture`` step
        gives back the records it holds (a page group never spans sources)."""
        self.n_read += len(batch)
        kept = self.cleaner.clean(batch) if batch else []
        if last:
            kept += self.cleaner.flush()
        self.n_records += len(kept)
        if kept:
            yield i, kept

    def run(self) -> None:
        num_proc = int(self.cfg.num_proc) or stream.default_num_proc()
        current, probing = 0, True
        try:
            for res in stream.map_batches(stream.tokenize_batch, self._jobs(), num_proc,
                                          (self.tokenizer, self.specs)):
                src = res["source"]
                while current < src:  # the previous sources are complete
                    self._finish_source(current)
                    current += 1
                self._add(src, res)
                if probing and len(self.srcs) == 1 and "stored" in res:
                    probing = self._check_hopeless(res)
            while current < len(self.srcs):
                self._finish_source(current)
                current += 1
        except BaseException:
            self.writer.abort()
            raise
        self.writer.close()

    def _add(self, i: int, res: dict) -> None:
        for where, message in res["bad"]:
            self._on_bad(where, message)
        for k in self.stats:
            self.stats[k] += res[k]
        if self.specs[i].format == "text":
            ids, offsets = res["ids"], np.concatenate([[0], np.cumsum(res["doc_lengths"])])
            if self.cfg.packing:  # each document cut on its own: rows never attend across documents
                for a, b, start, end in zip(offsets[:-1], offsets[1:], res["doc_starts"], res["doc_ends"]):
                    if start and len(self.carry[i]):  # the end of the previous document was cleaned away
                        self._add_chunks(*stream.chunk_stream(self.carry[i], self.T, final=True)[:2])
                        self.carry[i] = self.carry[i][:0]
                    chunks, lengths, self.carry[i] = stream.chunk_stream(np.concatenate([self.carry[i], ids[a:b]]),
                                                                         self.T, final=bool(end))
                    self._add_chunks(chunks, lengths)
            else:
                chunks, lengths, self.carry[i] = stream.chunk_stream(np.concatenate([self.carry[i], ids]), self.T,
                                                                     final=False)
                self._add_chunks(chunks, lengths)
            return
        self.dropped_long += res["dropped_too_long"]
        self.unsupervised += res["unsupervised"][:max(0, 3 - len(self.unsupervised))]
        self.writer.add(res["ids"], res["mask"], res["stored"])
        self.lengths.extend(res["lengths"].tolist())
        self.prompts.extend(res["prompts"].tolist())

    def _add_chunks(self, chunks: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        mask = np.ones(len(chunks), np.uint8)
        mask[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 0  # each chunk's token 0 is the previous' target
        self.writer.add(chunks, mask, lengths)
        self.lengths.extend(lengths.tolist())
        self.prompts.extend([1] * len(lengths))

    def _finish_source(self, i: int) -> None:
        if self.specs[i].format == "text":  # the rest of the stream (or of a document whose end was cleaned away)
            self._add_chunks(*stream.chunk_stream(self.carry[i], self.T, final=True)[:2])
            self.carry[i] = np.zeros(0, np.int32)
        self.ranges[i][1] = self.writer.num_examples  # results come in source order: the next source starts here
        if i + 1 < len(self.ranges):
            self.ranges[i + 1][0] = self.writer.num_examples

    def _check_hopeless(self, res: dict) -> bool:
        """A ``data.sequence_len`` shorter than every prompt of the first ``PROBE_EXAMPLES`` examples (whatever the
        batch size: the decision depends on the data alone) is an error now, not after all the work. Returns
        whether to keep checking (the probe is not complete yet)."""
        if res["stored"].any():  # an example with a supervised token: not hopeless
            return False
        if len(self.lengths) < PROBE_EXAMPLES:  # (a stream that ends sooner gets the same error at the end)
            return True
        prompts = np.frombuffer(self.prompts, np.int32)[:PROBE_EXAMPLES]
        if (prompts >= 0).any() and prompts[prompts >= 0].min() > self.T:
            raise _no_supervision_error(prompts, PROBE_EXAMPLES, self.T, self.specs[0].format, first=PROBE_EXAMPLES)
        return False


def _select(srcs: list[dict], ranges: list[list[int]], seed: int, lengths: np.ndarray) -> tuple[np.ndarray,
                                                                                                list[dict]]:
    """The examples a mixture takes from each source (``weight`` / ``num_samples``), in source order, and a share
    row per source. A deterministic sample (``default_rng(seed + 1000 + source index)``) keeps the sampled
    examples in order; a count above the source's size repeats it whole, then samples the rest."""
    parts, shares = [], []
    for i, (src, (a, b)) in enumerate(zip(srcs, ranges)):
        n = b - a
        count = n
        if src.get("num_samples") is not None:
            count = int(src["num_samples"])
        elif src.get("weight") is not None:
            count = int(round(float(src["weight"]) * n))
        idx = np.arange(a, b, dtype=np.int64)
        whole, rest = divmod(count, n) if n else (0, 0)
        pick = np.sort(np.random.default_rng(seed + 1000 + i).permutation(n)[:rest]) if rest else idx[:0] - a
        parts.append(np.concatenate([np.tile(idx, whole), idx[pick]]))
        shares.append({"name": src.get("name", ""), "format": src["format"], "files": len(src["train_files"]),
                       "examples_available": n, "examples": len(parts[-1]),
                       "tokens": int(lengths[parts[-1]].sum())})
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), shares


def _build(data_cfg, tokenizer, directory: pathlib.Path) -> dict:
    """Runs both passes into ``directory`` and writes its ``report.json``; returns the report."""
    T, packing = int(data_cfg.sequence_len), bool(data_cfg.packing)
    srcs = mixture.dataset_sources(data_cfg)
    files = [str(p) for s in srcs for p in sources.expand_paths(s["train_files"])]
    p1 = _Pass1(data_cfg, tokenizer, srcs, directory)
    p1.run()
    fmt = "+".join(dict.fromkeys(s["format"] for s in srcs))
    seen = p1.n_read + p1.n_bad_read
    if p1.n_bad and p1.n_bad > float(data_cfg.max_bad_fraction) * seen:
        raise ValueError(f"{p1.n_bad} of {seen} records are bad, more than data.max_bad_fraction = "
                         f"{data_cfg.max_bad_fraction:g} of them (data.bad_records = 'skip'); the first: "
                         + "; ".join(p1.bad))
    if not p1.n_records:
        why = "; ".join(f"{st['step']}: {st['dropped']}" for st in p1.cleaner.steps if st["dropped"])
        raise ValueError(f"no records left after cleaning: all {p1.n_read} records of {', '.join(files)} were dropped "
                         f"({why}); loosen data.clean.*")
    lengths, prompts = np.frombuffer(p1.lengths, np.int32), np.frombuffer(p1.prompts, np.int32)
    if all(s["format"] != "text" for s in srcs) and not len(lengths) and p1.dropped_long:
        raise ValueError(f"all {p1.n_records} examples are longer than data.sequence_len + 1 = {T + 1} tokens and "
                         f"data.excess_length_strategy = 'drop' dropped them; raise data.sequence_len")
    sel, shares = _select(srcs, p1.ranges, int(data_cfg.seed), lengths)
    supervised = np.load(directory / "supervised.npy")
    offsets = np.load(directory / "offsets.npy", mmap_mode="r")
    stored = np.diff(offsets).astype(np.int32)
    contiguous = all(s["format"] == "text" for s in srcs)
    # split the distinct examples, so a repeated one (weight > 1) is never in both splits; repeats train only
    if np.all(np.diff(sel) > 0):  # no example repeated (sel is then sorted): the common case, without a sort
        distinct, times = sel, np.ones(len(sel), np.int32)
    else:
        distinct, times = np.unique(sel, return_counts=True)
    train_pos, val_pos = split_indices(len(distinct), data_cfg.val_set_size, int(data_cfg.seed),
                                       contiguous=contiguous)
    train_once = distinct[train_pos]
    repeats = [train_once[times[train_pos] > r] for r in range(1, int(times.max(initial=1)))]
    splits = (("train", np.concatenate([train_once, *repeats])), ("val", distinct[val_pos]))
    report = {"format": fmt, "files": files, "records_read": p1.n_read, "clean_steps": p1.cleaner.steps,
              "near_dedup_languages": p1.cleaner.languages,
              "records": p1.n_records, "examples": int(len(sel)), "tokens": int(lengths[sel].sum()),
              "sequence_len": T, "packing": packing, "seam_fallbacks": p1.stats["seam_fallbacks"],
              "chat_fallbacks": p1.stats["chat_fallbacks"], "dropped_too_long": p1.dropped_long,
              "length_histogram": length_histogram(lengths[sel]), "cache": "",
              "bad_records": p1.n_bad, "bad_examples": p1.bad,
              # copies of validation examples (a source's weight > 1) left out: an example is in one split only
              "val_copies_left_out": int(times[val_pos].sum() - len(val_pos))}
    truncated = dropped = 0
    for name, idx in splits:
        kept = idx[supervised[idx] > 0]
        if name == "train" and not len(kept):
            raise _no_supervision_error(prompts[idx], len(idx), T, fmt)
        rows = packed.pack_rows(stored[kept], T, packing)
        packed.write_split(directory, name, kept, rows)
        report[f"{name}_examples"] = int(len(kept))
        report[f"{name}_sequences"] = int(len(rows) - 1)
        report[f"{name}_truncated"] = int((lengths[kept] > T + 1).sum())
        report[f"{name}_supervised_tokens"] = int(supervised[kept].sum())
        report[f"{name}_dropped_unsupervised"] = int(len(idx) - len(kept))
        truncated += report[f"{name}_truncated"]
        dropped += report[f"{name}_dropped_unsupervised"]
        if name == "val":
            report["val_bytes"] = _supervised_bytes(directory, kept, tokenizer)
    if len(srcs) > 1:
        for share in shares:
            share["share"] = share["examples"] / max(len(sel), 1)
            share["token_share"] = share["tokens"] / max(report["tokens"], 1)
        report["sources"] = shares
    if truncated or dropped:
        msg = (f"{truncated + dropped} of {len(sel)} examples are longer than data.sequence_len + 1 = "
               f"{T + 1} tokens and were truncated")
        if dropped:
            msg += (f"; {dropped} of them kept no supervised token and were dropped (e.g. "
                    f"{', '.join(p1.unsupervised[:3])})")
        if 2 * (truncated + dropped) > len(sel):
            msg += (f": more than half of the data loses its end (longest example {int(lengths.max())} tokens, "
                    f"median {float(np.median(lengths)):g}); consider a larger data.sequence_len (now {T})")
        log.warning("%s", msg)
    log.info("data: %s", {k: v for k, v in report.items()
                          if k not in ("files", "clean_steps", "near_dedup_languages", "length_histogram", "sources",
                                       "bad_examples")})
    (directory / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _supervised_bytes(directory: pathlib.Path, examples: np.ndarray, tokenizer) -> int | None:
    """UTF-8 bytes of the supervised targets of ``examples`` (:func:`easytune.tokenizer.token_byte_lengths`; the
    denominator of bits per byte), or None without a fast tokenizer or a target."""
    if getattr(tokenizer, "backend_tokenizer", None) is None or not len(examples):
        return None
    table = token_byte_lengths(tokenizer)
    tokens = np.load(directory / "tokens.npy", mmap_mode="r")
    mask = np.load(directory / "loss_mask.npy", mmap_mode="r")
    offsets = np.load(directory / "offsets.npy", mmap_mode="r")
    n = 0
    for e in examples.tolist():
        a, b = int(offsets[e]) + 1, int(offsets[e + 1])
        n += int((table[np.clip(tokens[a:b], 0, len(table) - 1)] * (mask[a:b] > 0)).sum())
    return n or None


TEMP_PREFIX = "easytune-prepared-"


class _TemporaryFolder:
    """Owns a temporary prepared folder (``easytune-prepared-PID-*`` in the system's temp dir); it is removed when
    the last sequences view using it goes away. Folders of processes that no longer run (killed) are removed
    when the next one is made."""

    def __init__(self):
        root = pathlib.Path(tempfile.gettempdir())
        remove_stale(root, TEMP_PREFIX)
        self.path = pathlib.Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=root))
        weakref.finalize(self, shutil.rmtree, str(self.path), True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(folder: pathlib.Path, prefix: str) -> list[pathlib.Path]:
    """Removes the folders ``{prefix}{PID}-*`` in ``folder`` whose process (on this host) no longer runs: what a
    killed prepare left. Returns them."""
    removed = []
    for path in folder.glob(glob.escape(prefix) + "*"):
        pid = path.name[len(prefix):].split("-")[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prepare_dataset(data_cfg, tokenizer):
    """Reads, cleans, formats, splits and packs the training data described by ``config.data``, streaming.

    Pipeline (module docstring): ``sources.iter_records`` -> ``clean.Cleaner`` (``data.clean``) ->
    ``stream.tokenize_batch`` (one example per record; ``text``: one token stream per source, or per document
    with packing, cut into ``T + 1``-token chunks) in ``data.num_proc`` processes -> the excess-length strategy ->
    a mixture's sample per source -> :func:`split_indices` -> examples without a supervised target dropped ->
    next-fit packing. Sequences, masks and split are identical to the in-memory
    :func:`easytune.data.sequences.build_sequences` of the same examples, for any ``num_proc`` and
    ``batch_records``. With ``data.dataset_prepared_path`` set, the folder is kept there under :func:`cache_key`
    and reused while the inputs, the tokenizer and ``config.data`` are unchanged; otherwise it lives in a
    temporary folder removed when the returned sequences are garbage-collected.

    Args:
        data_cfg: ``config.data`` (a ConfigDict or a mapping; keys it lacks take their
            ``easytune.config.defaults()`` values, :func:`data_config`). A whole config (with a ``data`` member)
            is accepted too.
        tokenizer: a ``transformers`` tokenizer (forked workers inherit it; where processes are spawned it is pickled).

    Returns:
        ``(train_seqs, val_seqs, report)``: :class:`easytune.data.packed.PackedSequences` (``len`` = rows N;
        ``gather(rows)`` -> ``[B, T]`` arrays of ``sequences.SEQUENCE_KEYS``; ``val_seqs`` has N = 0 rows
        without a validation set), and a report dict: ``format``, ``files``, ``records`` (after cleaning),
        ``records_read``, ``clean_steps``, ``near_dedup_languages`` (``clean.Cleaner.languages``: the near-dedup
        per script-based language label), ``examples``, ``tokens`` (in all examples), ``seam_fallbacks``,
        ``chat_fallbacks``, ``dropped_too_long``, ``length_histogram`` (tokens per example), ``sequence_len``,
        ``packing``, ``cache`` (path or ""), ``reused`` (True when the cache held it), ``bad_records`` (count)
        and ``bad_examples`` (the first few, file:line and why), ``val_copies_left_out`` (repeats of validation
        examples, which neither split takes), ``val_bytes``, ``sources`` (a mixture: per source ``name``,
        ``format``, ``files``, ``examples_available``, ``examples``, ``tokens``, ``share`` and ``token_share``,
        fractions of the total), and per split ``{train,val}_examples``, ``_sequences``, ``_truncated``,
        ``_supervised_tokens``, ``_dropped_unsupervised``.

    Raises:
        easytune.config.ConfigError: an unknown ``data`` key or a bad ``data.datasets`` entry.
        FileNotFoundError, ValueError: from the readers, cleaners and formatters (file, line and field named),
            an unknown format, a bad ``data.val_set_size``, nothing left after cleaning, an example too long
            under ``excess_length_strategy = 'raise'``, more than ``data.max_bad_fraction`` bad records under
            ``bad_records = 'skip'``, or a training split with 0 supervised tokens (e.g. ``data.sequence_len``
            shorter than the prompts: raised after the first batch, the message gives the prompt lengths).
    """
    data_cfg = data_config(data_cfg)
    cache_dir = data_cfg.dataset_prepared_path
    owner = None
    if cache_dir:
        target = pathlib.Path(cache_dir) / cache_key(data_cfg, tokenizer)
        cached = packed.open_prepared(target)
        if cached is not None:
            log.info("data: reusing %s", target)
            cached[2]["reused"] = True
            return cached
    else:
        owner = _TemporaryFolder()
        target = owner.path / "data"
    prefix = f"{target.name}.tmp-{socket.gethostname()}-"  # a shared cache folder may serve several hosts
    remove_stale(target.parent, prefix)
    work = target.with_name(f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _build(data_cfg, tokenizer, work)
        if cache_dir:
            report_path = work / "report.json"
            report_path.write_text(json.dumps(dict(json.loads(report_path.read_text()), cache=str(target)),
                                              indent=1))
        try:
            work.rename(target)  # complete or absent: a killed prepare never leaves a half folder
        except OSError:
            if not (target / "report.json").is_file():  # not another process's complete folder: a real error
                raise
            shutil.rmtree(work, ignore_errors=True)  # another process prepared the same data first
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return packed.open_prepared(target, keep_alive=owner)


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
    """A hex key for the prepared data: SHA-256 over ``config.data`` (without the cache path, ``num_proc`` and
    ``batch_records``, which never change the result), each input file's path and content (every mixture
    source's, phrase lists and chat template files included), the tokenizer (its serialized vocabulary, merges,
    chat template and special ids) and ``CACHE_VERSION``. Any change to these gives a new key, so a stale
    cache is never read.

    Args:
        data_cfg: ``config.data`` with every key (:func:`data_config`).
        tokenizer: a ``transformers`` tokenizer.
    """
    cfg = {k: v for k, v in _plain(data_cfg).items() if k not in NOT_IN_KEY}
    h = hashlib.sha256(json.dumps([CACHE_VERSION, cfg], sort_keys=True, default=str).encode("utf-8"))
    extra = list(data_cfg.clean.phrase_files)
    data_files = []
    for src in mixture.dataset_sources(data_cfg):
        data_files += sources.expand_paths(src["train_files"])
        if src["chat_template"] and pathlib.Path(str(src["chat_template"])).is_file():
            extra.append(str(src["chat_template"]))
    for path in [*data_files, *map(pathlib.Path, extra)]:
        h.update(str(path).encode("utf-8"))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]
