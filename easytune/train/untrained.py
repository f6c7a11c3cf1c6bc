"""Pre-flight check: tokens the data uses whose ``embed_tokens`` or ``lm_head`` row was never trained.

Some released checkpoints ship all-zero rows for tokens the base model never saw (Llama 3 base:
``<|eot_id|>``, ``<|start_header_id|>``, ``<|end_header_id|>``). Fine-tuning on data that uses them starts from
a zero input embedding (the position begins with an empty residual stream) and a zero output row (the token's
logit is 0 whatever the hidden state; with a frozen head a supervised EOS can never be predicted from context,
so the model does not learn to stop). :func:`check` runs after :func:`easytune.train.setup.build`, before the
optimizer state exists:

1. Rule (per matrix, each on its own): a row is *untrained* when ``max |w| <= eps`` (``eps = 1e-16``). Rows are
   tokens: ``embed_tokens.embedding [V, D]`` row ``v`` and the ``lm_head.kernel [D, V]`` column ``v`` (HF's
   ``lm_head.weight`` row); a tied model has only the embedding. The maxima are one jitted reduction per matrix
   on the devices holding it (sharded or not, an NF4 head dequantized on device), only the ``[V]`` result is
   brought to the host.
2. Only when some row is untrained the data is counted (:func:`token_usage`): per token, how often it is an
   input, a target and a supervised target in the train and the validation split, streamed over the prepared
   folder's memory-mapped token array in chunks (nothing is gathered into ``[N, T]`` rows). A token matters
   when either split uses it; untrained rows of tokens the data never uses (padded vocabularies, unused
   specials) are left alone and not reported one by one.
3. A warning names those tokens (id and text, the first :data:`MAX_NAMED`, and the count) with their per-split
   counts; an EOS among them is called out.
4. With ``model.fix_untrained_tokens = True`` each such row is set to the mean of that matrix's trained rows
   (all rows with ``max |w| > eps``), the mean computed in float32 and cast back to the matrix dtype, on device
   with the array's own sharding (:func:`fix_rows`); the embedding and the head are fixed separately, each only
   where its own row is untrained, and every change is logged.

Where the matrix lives decides what can be fixed. Full fine-tuning, or LoRA with the module in
``lora.modules_to_save``: the matrix is trainable, the fixed rows are in every checkpoint, in the merged export
and in the PEFT adapter (which stores ``modules_to_save`` in full). LoRA/QLoRA with the module frozen: a
changed base row would be in no checkpoint (a reload rebuilds the base from ``model.path``), so neither the
merged export nor the adapter would carry it; :func:`check` then refuses with a
:class:`~easytune.config.ConfigError` that says to add the module to ``lora.modules_to_save`` (which also keeps
a QLoRA ``lm_head`` in float). Without the fix the check only warns.

Source and differences: unsloth ``tokenizer_utils.fix_untrained_tokens`` (copied into axolotl as
``axolotl.core.tokenizer_utils.fix_untrained_tokens``, its ``fix_untrained_tokens: true`` option) flags a
token when ``torch.amax(W, axis=1) <= eps`` (eps 1e-16) holds for the embedding *and* for the head (or the head
row repeats among the flagged ones), never flags the pad token, counts the ``input_ids`` of the train set and
resets the tokens seen there to the float32 mean of the other rows, scaled by ``count / max_count``; it raises
when ``embed_tokens`` / ``lm_head`` are not trainable. easytune differs where that rule would miss a problem or
change what the issue asks for: ``max |w|`` instead of the signed max (a row of negative weights is not
untrained), each matrix on its own (a zero head row alone is enough to break a supervised EOS), special tokens
are not exempt (a zero EOS row is exactly the case above), and the rows are set to the plain mean (as
transformers' mean-resizing of new token rows), not a frequency-scaled one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from easytune import config as config_lib
from easytune import quant
from easytune import sharding as sharding_lib
from easytune.data import packed

EPS = 1e-16  # unsloth / axolotl fix_untrained_tokens' eps
MAX_NAMED = 20  # tokens named in the warning
CHUNK_TOKENS = 1 << 22  # tokens (or row positions) counted per numpy chunk: ~50 MB of temporaries

EMBED_PATH = ("params", "model", "embed_tokens", "embedding")  # [V, D]
LM_HEAD_PATH = ("params", "lm_head", "kernel")  # [D, V] (HF lm_head.weight transposed)
MODULES = {"embed_tokens": (EMBED_PATH, 0), "lm_head": (LM_HEAD_PATH, 1)}  # name -> (path, token axis)
KINDS = ("input", "target", "supervised")


def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _replace(tree: dict, path, value) -> dict:
    """A copy of the nested dict ``tree`` with the leaf at ``path`` replaced (other leaves shared)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out


def _locate(trainable, frozen, name: str):
    """``(tree_name, leaf)`` of module ``name`` (``embed_tokens`` / ``lm_head``): 'trainable' or 'frozen', or
    ``(None, None)`` when the model has no such matrix (a tied model has no ``lm_head``)."""
    path, _ = MODULES[name]
    for tree_name, tree in (("trainable", trainable), ("frozen", frozen)):
        leaf = _get(tree, path)
        if leaf is not None:
            return tree_name, leaf
    return None, None


def row_absmax(w, axis: int, mesh=None) -> np.ndarray:
    """``max |w|`` of every token row: float32 ``[V]`` on the host.

    Args:
        w: ``embed_tokens`` ``[V, D]`` (``axis=0``) or ``lm_head`` kernel ``[D, V]`` (``axis=1``): a (sharded)
            ``jax.Array``, a numpy array, or an NF4 :class:`~easytune.quant.QTensor` of the head (dequantized
            to bfloat16 on device inside the same jit; NF4 maps 0 to exactly 0).
        axis: the token axis of ``w``.
        mesh: with a mesh, the ``[V]`` result is replicated on it (every process can read it); the matrix is
            reduced where it lies, never gathered to the host.
    """
    def f(w):
        if quant.is_qtensor(w):
            return jnp.max(jnp.abs(quant.dequantize_hf(w, jnp.bfloat16)), axis=1).astype(jnp.float32)  # [V, D]
        return jnp.max(jnp.abs(w), axis=1 - axis).astype(jnp.float32)
    out = sharding_lib.replicated(mesh) if mesh is not None else None
    return np.asarray(jax.device_get(jax.jit(f, out_shardings=out)(w)))


def fix_rows(w, axis: int, untrained: np.ndarray, rows: np.ndarray):
    """``w`` with token rows ``rows`` set to the mean of its trained rows (``untrained`` False).

    The mean is ``sum(w[trained], float32) / n_trained`` and is cast to ``w.dtype`` (as unsloth's
    ``fix_untrained_tokens``); jitted, the result keeps ``w``'s sharding.

    Args:
        w: ``[V, D]`` (``axis=0``) or ``[D, V]`` (``axis=1``) float ``jax.Array``.
        untrained: bool ``[V]``, rows excluded from the mean.
        rows: int ``[K]`` token ids to overwrite.

    Raises:
        ValueError: every row is untrained (no mean to take).
    """
    n_trained = int((~untrained).sum())
    if n_trained == 0:
        raise ValueError("every row of the matrix is (near) zero: there are no trained rows to take the mean of")

    def f(w, trained, rows):
        keep = trained[:, None] if axis == 0 else trained[None, :]
        mean = jnp.sum(jnp.where(keep, w.astype(jnp.float32), 0.0), axis=axis) / n_trained  # [D]
        mean = mean.astype(w.dtype)
        return w.at[rows].set(mean[None, :]) if axis == 0 else w.at[:, rows].set(mean[:, None])
    sh = getattr(w, "sharding", None)
    return jax.jit(f, out_shardings=sh)(w, np.asarray(~untrained), np.asarray(rows, np.int32))  # numpy: replicated


def token_usage(seqs, vocab_size: int, chunk: int = CHUNK_TOKENS) -> dict[str, np.ndarray]:
    """How often each token id occurs in one split: ``{'input', 'target', 'supervised'}``, int64 ``[V]`` each.

    ``input``: positions where it is fed (``input_ids`` of non-padding positions), ``target``: positions where
    it is predicted (``target_ids``, non-padding), ``supervised``: targets with ``loss_mask`` 1. Padding
    (``segment_ids == 0``) is not counted. Ids ``>= vocab_size`` are not counted.

    Args:
        seqs: a :class:`~easytune.data.packed.PackedSequences` (counted from its memory-mapped ``tokens.npy`` /
            ``loss_mask.npy``, ``chunk`` tokens at a time, each stored example weighted by how often the split's
            order uses it: exactly the rows' counts without building them), anything else with the
            ``gather``/``len`` interface or a dict of ``[N, T]`` arrays (:func:`~easytune.data.packed.as_sequences`;
            gathered ``chunk // T`` rows at a time), or None (all zeros).
        vocab_size: V.
        chunk: tokens per step.
    """
    counts = {k: np.zeros(vocab_size, np.int64) for k in KINDS}

    def add(kind, ids, weights=None):
        c = np.bincount(np.asarray(ids, np.int64).ravel(), weights=weights, minlength=vocab_size)
        counts[kind] += np.rint(c[:vocab_size]).astype(np.int64)

    seqs = packed.as_sequences(seqs)
    if seqs is None or len(seqs) == 0:
        return counts
    if isinstance(seqs, packed.PackedSequences):
        offsets = np.asarray(seqs.offsets, np.int64)
        uses = np.bincount(np.asarray(seqs.order, np.int64), minlength=len(offsets) - 1).astype(np.float64)
        used = np.nonzero(uses)[0]
        lo, hi = int(offsets[used.min()]), int(offsets[used.max() + 1])  # the span the split's examples cover
        for s in range(lo, hi, chunk):
            p = np.arange(s, min(s + chunk, hi), dtype=np.int64)
            ex = np.searchsorted(offsets, p, side="right") - 1  # stored example of each token
            w = uses[ex]
            first, last = p == offsets[ex], p == offsets[ex + 1] - 1  # not a target / not an input
            ids = np.asarray(seqs.tokens[s:s + len(p)])
            mask = np.asarray(seqs.mask[s:s + len(p)]) > 0
            add("input", ids, w * ~last)
            add("target", ids, w * ~first)
            add("supervised", ids, w * (~first & mask))
        return counts
    T = max(int(getattr(seqs, "sequence_len", 0) or 0), 1)
    step = max(chunk // T, 1)
    for s in range(0, len(seqs), step):
        b = seqs.gather(np.arange(s, min(s + step, len(seqs))))
        real = b["segment_ids"] > 0
        add("input", b["input_ids"][real])
        add("target", b["target_ids"][real])
        add("supervised", b["target_ids"][real & (b["loss_mask"] > 0)])
    return counts


def _token_text(tokenizer, i: int) -> str:
    try:
        tok = tokenizer.convert_ids_to_tokens(int(i))
    except Exception:  # a tokenizer without the method
        tok = None
    if tok is None:
        tok = tokenizer.decode([int(i)])
    return repr(tok)


def _eos_ids(setup) -> set[int]:
    ids = set()
    for v in (getattr(setup.tokenizer, "eos_token_id", None), getattr(setup.model_cfg, "eos_token_id", None)):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if x is not None:
                ids.add(int(x))
    return ids


@dataclasses.dataclass
class Finding:
    """What :func:`check` found (``as_dict`` is the JSON form in the dry-run report)."""
    eps: float
    untrained_rows: dict  # module -> number of untrained rows in the whole matrix (used by the data or not)
    tokens: list  # one dict per used untrained token: id, text, modules, per-split counts
    fixed: dict  # module -> ids whose row was set to the mean

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check(setup, train_seqs, val_seqs, fix: bool, log: Callable = print) -> tuple[Any, Finding | None]:
    """The pre-flight check of the module docstring: finds, reports and (with ``fix``) fixes untrained rows.

    Args:
        setup: a :class:`easytune.train.setup.Setup` as ``build`` returns it (per-layer or scanned layers --
            the embedding and head are never stacked --, any mesh, LoRA/QLoRA or full).
        train_seqs, val_seqs: the prepared splits (:func:`token_usage`); ``val_seqs`` may be None.
        fix: ``model.fix_untrained_tokens``.
        log: where the warning and the changes go.

    Returns:
        ``(setup, finding)``: ``setup`` unchanged, or a copy whose ``trainable`` tree carries the fixed rows
        (same shardings); ``finding`` is None when no used token has an untrained row.

    Raises:
        ConfigError: ``fix`` with an untrained row of a frozen module (LoRA/QLoRA without the module in
            ``lora.modules_to_save``); names the module and the key to set.
        ValueError: ``fix`` on a matrix whose rows are all zero.
    """
    V = int(setup.model_cfg.vocab_size)
    flags: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for name, (_, axis) in MODULES.items():
        tree_name, leaf = _locate(setup.trainable, setup.frozen, name)
        if leaf is None:
            continue
        flags[name] = row_absmax(leaf, axis, setup.mesh) <= EPS
        where[name] = tree_name
    if not any(f.any() for f in flags.values()):
        log(f"untrained tokens: none ({' and '.join(flags)} rows all have max |w| > {EPS:g})")
        return setup, None
    usage = {"train": token_usage(train_seqs, V), "val": token_usage(val_seqs, V)}
    used = np.zeros(V, bool)
    for split in usage.values():
        used |= split["input"] > 0
        used |= split["target"] > 0
    bad = {name: np.nonzero(f[:V] & used)[0] for name, f in flags.items()}
    ids = sorted(set().union(*(v.tolist() for v in bad.values())))
    if not ids:
        log(f"untrained tokens: {', '.join(f'{int(f.sum())} {n} rows' for n, f in flags.items())} are (near) zero "
            f"(max |w| <= {EPS:g}); the data uses none of those tokens")
        return setup, None
    bad_sets = {n: set(v.tolist()) for n, v in bad.items()}
    tokens = []
    for i in ids:
        tokens.append({"id": i, "text": _token_text(setup.tokenizer, i),
                       "modules": [n for n in flags if i in bad_sets[n]],
                       **{split: {k: int(u[k][i]) for k in KINDS} for split, u in usage.items()}})
    finding = Finding(EPS, {n: int(f.sum()) for n, f in flags.items()}, tokens, {})
    _warn(setup, finding, where, fix, log)
    if not fix:
        return setup, finding
    frozen_bad = [n for n in bad if len(bad[n]) and where[n] == "frozen"]
    if frozen_bad:
        names = ", ".join(repr(n) for n in frozen_bad)
        raise config_lib.ConfigError(
            f"model.fix_untrained_tokens: the untrained rows are in {names}, which this {setup.config.method} run "
            f"keeps frozen: a changed frozen row would be in no checkpoint, merged export or PEFT adapter. Add "
            f"{names} to lora.modules_to_save (trained in full, saved with the adapter, kept in float under "
            f"QLoRA), or train with method='full', or set model.fix_untrained_tokens=False to train as is")
    trainable = setup.trainable
    for name, rows in bad.items():
        if not len(rows):
            continue
        path, axis = MODULES[name]
        w = _get(trainable, path)
        trainable = _replace(trainable, path, fix_rows(w, axis, flags[name], rows))
        finding.fixed[name] = [int(r) for r in rows]
        log(f"model.fix_untrained_tokens: set {len(rows)} {name} row(s) {_name_list(setup.tokenizer, rows)} to the "
            f"float32 mean of its {int((~flags[name]).sum())} trained rows (cast to {jnp.dtype(w.dtype).name})")
    return dataclasses.replace(setup, trainable=trainable), finding


def _name_list(tokenizer, ids) -> str:
    ids = [int(i) for i in ids]
    named = ", ".join(f"{i} {_token_text(tokenizer, i)}" for i in ids[:MAX_NAMED])
    return f"[{named}{f', ... ({len(ids) - MAX_NAMED} more)' if len(ids) > MAX_NAMED else ''}]"


def _warn(setup, finding: Finding, where: dict, fix: bool, log: Callable) -> None:
    """The warning lines: the tokens, how the data uses them, the EOS case, and what to do."""
    toks = finding.tokens
    log(f"warning: {len(toks)} token(s) the data uses have an untrained row (max |w| <= {finding.eps:g}) in "
        f"embed_tokens or lm_head:")
    for t in toks[:MAX_NAMED]:
        per = "; ".join(f"{s}: {t[s]['input']} as input, {t[s]['target']} as target ({t[s]['supervised']} "
                        f"supervised)" for s in ("train", "val"))
        log(f"  id {t['id']} {t['text']} ({' and '.join(t['modules'])} row zero) -- {per}")
    if len(toks) > MAX_NAMED:
        log(f"  ... and {len(toks) - MAX_NAMED} more (the dry-run report lists them all)")
    tied = bool(setup.model_cfg.tie_word_embeddings)  # a tied head's row is the embedding row
    head = "embed_tokens" if tied else "lm_head"
    eos = [t for t in toks if t["id"] in _eos_ids(setup) and head in t["modules"] and t["train"]["supervised"]]
    for t in eos:
        log(f"  id {t['id']} is the EOS token and a supervised target {t['train']['supervised']} times in the "
            f"train split: with a zero {'(tied) output' if tied else 'lm_head'} row its logit is 0 whatever the "
            f"input, so the model cannot learn from context when to stop"
            + (" (frozen here)" if where.get(head) == "frozen" else ""))
    if not fix:
        frozen = [n for n in where if where[n] == "frozen" and any(n in t["modules"] for t in toks)]
        log("  set model.fix_untrained_tokens=True to set these rows to the mean of the trained rows (as unsloth "
            "and axolotl do)" + (f"; this run keeps {', '.join(frozen)} frozen, so also add "
                                 f"{', '.join(repr(n) for n in frozen)} to lora.modules_to_save" if frozen else ""))
