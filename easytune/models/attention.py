"""Masked softmax attention: the masks of the decoder layers as a :class:`MaskSpec` (causal, same segment,
sliding window), the unblocked :func:`attention_core` and the blockwise (FlashAttention) :func:`blockwise_attention`,
both with hand-written backward passes.

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).

References:
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023.
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022
    (Algorithms 1 and 2: the blocked forward and the gradient formulas).
    Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023 (loop order).
    Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
    transformers ``models/llama/modeling_llama.py`` (v5) ``eager_attention_forward``; ``masking_utils.py``
    ``causal_mask_function`` and ``sliding_window_overlay`` (Mistral / Qwen2 sliding-window attention).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.model_config import ModelConfig

Array = jax.Array


_MASKED = float(np.finfo(np.float32).min)
NO_WINDOW = 2**30  # ``MaskSpec.window`` of a full-causal layer (longer than any sequence)


class MaskSpec(NamedTuple):
    """Which keys each query may see, without a ``[T, S]`` array: causal by index, same segment, window.

    Query ``t`` of row ``b`` sees key ``s`` when ``k_idx[s] <= q_idx[t]``, ``q_segments[b, t] ==
    k_segments[b, s]`` and ``q_idx[t] - k_idx[s] < window`` (transformers ``masking_utils``
    ``causal_mask_function``, ``packed_sequence_mask_function`` and ``sliding_window_overlay``). A pytree of
    arrays, so it passes through ``jax.jit``, ``nn.remat`` and ``nn.scan`` unchanged.

    Attributes:
        q_idx: int32 [T] sequence (or cache-slot) index of each query.
        k_idx: int32 [S] index of each key.
        q_segments: int32 [B, T] document id of each query (0 = padding).
        k_segments: int32 [B, S] document id of each key.
        window: int32 scalar, the sliding window W in tokens (:data:`NO_WINDOW` for full causal attention).
    """

    q_idx: Array
    k_idx: Array
    q_segments: Array
    k_segments: Array
    window: Array

    def dense(self) -> Array:
        """The mask as bool [B, 1, 1, T, S] (what :func:`attention_core` takes); quadratic in length."""
        dist = self.q_idx[:, None] - self.k_idx[None, :]  # [T, S]
        same = self.q_segments[:, :, None] == self.k_segments[:, None, :]  # [B, T, S]
        return ((dist >= 0) & (dist < self.window))[None, None, None] & same[:, None, None]


def mask_spec(q_idx: Array, k_idx: Array, q_segments: Array, k_segments: Array, window: int | None) -> MaskSpec:
    """A :class:`MaskSpec` with ``window`` None (full causal) or a number of tokens."""
    w = NO_WINDOW if window is None else window
    return MaskSpec(jnp.asarray(q_idx, jnp.int32), jnp.asarray(k_idx, jnp.int32), jnp.asarray(q_segments, jnp.int32),
                    jnp.asarray(k_segments, jnp.int32), jnp.asarray(w, jnp.int32))


def softcap_scores(scores: Array, softcap: float | None) -> Array:
    """Gemma 2's attention logit soft-capping ``c * tanh(s / c)`` (identity when ``softcap`` is None).

    Reference: transformers ``models/gemma2/modeling_gemma2.py`` ``eager_attention_forward`` (``softcap``).
    """
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _softcap_grad(raw: Array, softcap: float | None) -> Array | float:
    """``d softcap_scores / d raw = 1 - tanh(raw / c)^2`` (1 without a cap)."""
    return 1.0 if softcap is None else 1.0 - jnp.square(jnp.tanh(raw / softcap))


def _attention_forward(q, key, val, mask, dtype, softcap=None):
    """The forward of :func:`attention_core` in head-major layout; returns its residuals too."""
    qh = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, E]
    kh = jnp.transpose(key, (0, 2, 1, 3))  # [B, K, S, E]
    vh = jnp.transpose(val, (0, 2, 1, 3))  # [B, K, S, E]
    scores = jnp.einsum("bkgte,bkse->bkgts", qh, kh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, softcap_scores(scores, softcap), _MASKED)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # unnormalized probabilities
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    out = jnp.einsum("bkgts,bkse->bkgte", weights.astype(dtype), vh, preferred_element_type=jnp.float32) / total
    return out, (qh, kh, vh, weights / total, out, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention_core(q: Array, key: Array, val: Array, mask: Array, dtype, softcap: float | None = None) -> Array:
    """Masked softmax attention ``softmax(q k^T + mask) v`` with a hand-written backward pass.

    .. math::
        P = \\mathrm{softmax}_{fp32}(q k^T \\text{ where mask, else } -\\infty),\\quad o = P v;\\qquad
        dv = P^T do,\\ dP = do\\, v^T,\\ dS = P \\odot (dP - \\mathrm{rowsum}(do \\odot o)),\\ dq = dS\\, k,\\
        dk = dS^T q

    The output is divided by the row sums after the ``P v`` matmul (``[T, E]`` instead of ``[T, S]``
    divisions; the normalized probabilities are formed once more only as the residual for the backward
    pass), and the backward pass contracts the token axes as ``do^T P`` and ``q^T dS`` so that XLA:CPU never
    transposes a ``[T, S]`` array (autodiff of the same einsums did: about a quarter of the attention
    time). The gradient formulas are FlashAttention's (Dao et al. 2022, Algorithm 2, unblocked); the
    forward is transformers' eager attention with scores accumulated and softmaxed in float32 (masked scores
    at float32 min, so a fully masked row averages ``v`` uniformly as there). Being a ``jax.custom_vjp``, it
    supports reverse-mode differentiation (``grad``, ``vjp``, remat, scan) but not forward mode (``jvp``).

    Args:
        q: ``[B, T, K, G, E]`` queries, already scaled by ``1/sqrt(E)`` (query head ``k * G + g`` reads kv
            head ``k``).
        key, val: ``[B, S, K, E]``.
        mask: bool ``[B, 1, 1, T, S]``, True where query t may attend to slot s (no gradient).
        dtype: the compute dtype of the probabilities in the ``P v`` matmul and of the result (the other
            operands keep their dtypes, promoted as ``jnp.einsum`` does when a KV cache has another dtype);
            scores, softmax and accumulation are float32.
        softcap: Gemma 2's attention logit soft-cap ``c`` (scores become ``c * tanh(s / c)`` before the mask,
            :func:`softcap_scores`), or None.

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``.
    """
    return _attention_fwd(q, key, val, mask, dtype, softcap)[0]


def _attention_fwd(q, key, val, mask, dtype, softcap=None):
    out, res = _attention_forward(q, key, val, mask, dtype, softcap)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype), res


def _attention_bwd(dtype, softcap, res, d_out):
    qh, kh, vh, probs, out, mask = res  # probs: [B, K, G, T, S]
    b, k, g, t, e = qh.shape
    do = jnp.transpose(d_out, (0, 2, 3, 1, 4)).astype(jnp.float32)  # [B, K, G, T, E]
    rows = (b, k, g * t)  # the query heads of one kv head and their positions, contracted together for dk, dv
    dv_t = jnp.einsum("bkxe,bkxs->bkes", do.reshape(*rows, e).astype(dtype),
                      probs.reshape(*rows, -1).astype(dtype), preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgte,bkse->bkgts", do.astype(dtype), vh, preferred_element_type=jnp.float32)
    d_scores = jnp.where(mask, probs * (dp - jnp.sum(do * out, axis=-1, keepdims=True)), 0.0)
    if softcap is not None:  # through c * tanh(s / c): the raw scores are recomputed (one more [T, S] matmul)
        d_scores = d_scores * _softcap_grad(
            jnp.einsum("bkgte,bkse->bkgts", qh, kh, preferred_element_type=jnp.float32), softcap)
    dq = jnp.einsum("bkgts,bkse->bkgte", d_scores.astype(dtype), kh, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("bkxe,bkxs->bkes", qh.reshape(*rows, e), d_scores.reshape(*rows, -1).astype(dtype),
                      preferred_element_type=jnp.float32)
    return (jnp.transpose(dq, (0, 3, 1, 2, 4)).astype(qh.dtype), jnp.transpose(dk_t, (0, 3, 1, 2)).astype(kh.dtype),
            jnp.transpose(dv_t, (0, 3, 1, 2)).astype(vh.dtype), None)


attention_core.defvjp(_attention_fwd, _attention_bwd)


def _blocks(n: int, block: int) -> tuple[int, int]:
    """``(block length, padded length)`` of an axis of ``n`` tokens cut into blocks of at most ``block``."""
    b = min(block, n)
    return b, -(-n // b) * b


def _pad_to(x: Array, axis: int, length: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return x if length == x.shape[axis] else jnp.pad(x, pad, constant_values=value)


def _block_mask(spec: MaskSpec, qi: Array, kj: Array, bq: int, bk: int) -> Array:
    """bool [B, 1, 1, bq, bk]: the mask of query block ``qi`` (start token) against key block ``kj``."""
    q_idx = jax.lax.dynamic_slice_in_dim(spec.q_idx, qi, bq)
    k_idx = jax.lax.dynamic_slice_in_dim(spec.k_idx, kj, bk)
    q_seg = jax.lax.dynamic_slice_in_dim(spec.q_segments, qi, bq, axis=1)
    k_seg = jax.lax.dynamic_slice_in_dim(spec.k_segments, kj, bk, axis=1)
    dist = q_idx[:, None] - k_idx[None, :]
    return (((dist >= 0) & (dist < spec.window))[None] & (q_seg[:, :, None] == k_seg[:, None, :]))[:, None, None]


def _padded(q, key, val, spec: MaskSpec, block: int):
    """Head-major, block-padded operands: ``qh [B, K, G, Tp, E]``, ``kh, vh [B, K, Sp, E]`` and the spec with
    padded keys in segment -1 (seen by no query) and padded queries in segment -2 (their rows are dropped)."""
    t, s = q.shape[1], key.shape[1]
    (bq, tp), (bk, sp) = _blocks(t, block), _blocks(s, block)
    qh = _pad_to(jnp.transpose(q, (0, 2, 3, 1, 4)), 3, tp)
    kh = _pad_to(jnp.transpose(key, (0, 2, 1, 3)), 2, sp)
    vh = _pad_to(jnp.transpose(val, (0, 2, 1, 3)), 2, sp)
    spec = MaskSpec(_pad_to(spec.q_idx, 0, tp), _pad_to(spec.k_idx, 0, sp), _pad_to(spec.q_segments, 1, tp, -2),
                    _pad_to(spec.k_segments, 1, sp, -1), spec.window)
    return qh, kh, vh, spec, bq, bk


def _blockwise_forward(q, key, val, spec: MaskSpec, dtype, block: int, softcap=None):
    """Online-softmax forward: ``(out fp32 [B, K, G, Tp, E], lse fp32 [B, K, G, Tp])`` and the padded operands."""
    qh, kh, vh, spec, bq, bk = _padded(q, key, val, spec, block)
    b, k, g, tp, e = qh.shape
    nk = kh.shape[2] // bk

    def q_block(i, acc):
        out, lse = acc
        qi = i * bq
        q_i = jax.lax.dynamic_slice_in_dim(qh, qi, bq, axis=3)  # [B, K, G, bq, E]

        def k_block(j, carry):
            m, tot, o = carry
            kj = j * bk
            mask = _block_mask(spec, qi, kj, bq, bk)

            def visit(carry):
                m, tot, o = carry
                k_j = jax.lax.dynamic_slice_in_dim(kh, kj, bk, axis=2)
                v_j = jax.lax.dynamic_slice_in_dim(vh, kj, bk, axis=2)
                sc = jnp.einsum("bkgte,bkse->bkgts", q_i, k_j, preferred_element_type=jnp.float32)
                sc = jnp.where(mask, softcap_scores(sc, softcap), _MASKED)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                corr = jnp.exp(m - m_new)  # 0 once a row's first visible score arrives, 1 before
                # masked scores give exp(min - max) = 0; a row with nothing visible yet subtracts 0, not min
                p = jnp.exp(sc - jnp.where(m_new == _MASKED, 0.0, m_new)[..., None])
                tot = tot * corr + jnp.sum(p, axis=-1)
                o = o * corr[..., None] + jnp.einsum("bkgts,bkse->bkgte", p.astype(dtype), v_j,
                                                     preferred_element_type=jnp.float32)
                return m_new, tot, o

            return jax.lax.cond(jnp.any(mask), visit, lambda c: c, carry)

        init = (jnp.full((b, k, g, bq), _MASKED, jnp.float32), jnp.zeros((b, k, g, bq), jnp.float32),
                jnp.zeros((b, k, g, bq, e), jnp.float32))
        m, tot, o = jax.lax.fori_loop(0, nk, k_block, init)
        seen = tot > 0  # a row that sees no key (only padding queries) gets 0
        o = o / jnp.where(seen, tot, 1.0)[..., None]
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, tot, 1.0)), 0.0)
        return (jax.lax.dynamic_update_slice_in_dim(out, o, qi, axis=3),
                jax.lax.dynamic_update_slice_in_dim(lse, lse_i, qi, axis=3))

    init = (jnp.zeros((b, k, g, tp, e), jnp.float32), jnp.zeros((b, k, g, tp), jnp.float32))
    out, lse = jax.lax.fori_loop(0, tp // bq, q_block, init)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def blockwise_attention(q: Array, key: Array, val: Array, spec: MaskSpec, dtype, block: int = 512,
                        softcap: float | None = None) -> Array:
    """Masked softmax attention in blocks (FlashAttention): memory linear in the sequence length.

    Computes what :func:`attention_core` computes with ``spec.dense()`` as the mask, but never forms a
    ``[T, S]`` array: queries and keys are cut into blocks of ``block`` tokens, the forward pass keeps a
    running row maximum and row sum per query (online softmax, Milakov & Gimelshein 2018) and saves only the
    output and the row log-sum-exp, and the backward pass recomputes each block's probabilities from them
    (Dao et al. 2022, Algorithms 1 and 2; Dao 2023, FlashAttention-2, for the loop order). Block pairs in
    which no query sees a key (above the causal diagonal, outside the sliding window, between packed
    documents of every row) are skipped (``lax.cond``), so causal attention does about half the matmul
    work of :func:`attention_core`. Scores, softmax and accumulation are float32; the ``P v``, ``dP``, ``dq``,
    ``dk`` and ``dv`` matmuls take their operands in ``dtype`` as :func:`attention_core` does. The results
    equal :func:`attention_core`'s up to float summation order, except that a query row that sees no key at
    all gets 0 (attention_core: the uniform average of ``v``; such rows do not occur in easytune's masks:
    every token sees itself).

    Memory per call: the operands, the float32 output and ``lse`` ``[B, K, G, T]``, and one block pair's
    ``[B, K, G, block, block]`` scores (the backward pass adds float32 ``dq`` ``[B, T, K, G, E]``).

    Args:
        q: ``[B, T, K, G, E]`` queries already scaled by ``1/sqrt(E)`` (query head ``k * G + g`` reads kv head
            ``k``).
        key, val: ``[B, S, K, E]``.
        spec: which keys each query sees (:class:`MaskSpec`; no gradient).
        dtype: compute dtype of the matmul operands and of the result.
        block: query and key block length in tokens (``model.attention_block``); lengths that are not a
            multiple are padded (padded keys are seen by no query).
        softcap: attention logit soft-cap (:func:`softcap_scores`), or None.

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``.
    """
    return _blockwise_fwd(q, key, val, spec, dtype, block, softcap)[0]


def _blockwise_fwd(q, key, val, spec, dtype, block, softcap=None):
    out, lse = _blockwise_forward(q, key, val, spec, dtype, block, softcap)
    t = q.shape[1]
    res = (q, key, val, spec, out, lse)
    return jnp.transpose(out[:, :, :, :t], (0, 3, 1, 2, 4)).astype(dtype), res


def _blockwise_bwd(dtype, block, softcap, res, d_out):
    q, key, val, spec0, out, lse = res
    t, s = q.shape[1], key.shape[1]
    qh, kh, vh, spec, bq, bk = _padded(q, key, val, spec0, block)
    b, k, g, tp, e = qh.shape
    do = _pad_to(jnp.transpose(d_out, (0, 2, 3, 1, 4)).astype(jnp.float32), 3, tp)  # [B, K, G, Tp, E]
    delta = jnp.sum(do * out, axis=-1)  # [B, K, G, Tp]: rowsum(do * o)
    do = do.astype(dtype)
    rows = lambda x: x.reshape(b, k, g * bq, -1)  # the G query heads of a kv head, contracted for dk, dv

    def k_block(j, acc):
        dq, dk, dv = acc
        kj = j * bk
        k_j = jax.lax.dynamic_slice_in_dim(kh, kj, bk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(vh, kj, bk, axis=2)

        def q_block(i, carry):
            dq, dk_j, dv_j = carry
            qi = i * bq
            mask = _block_mask(spec, qi, kj, bq, bk)

            def visit(carry):
                dq, dk_j, dv_j = carry
                q_i = jax.lax.dynamic_slice_in_dim(qh, qi, bq, axis=3)
                do_i = jax.lax.dynamic_slice_in_dim(do, qi, bq, axis=3)
                lse_i = jax.lax.dynamic_slice_in_dim(lse, qi, bq, axis=3)
                delta_i = jax.lax.dynamic_slice_in_dim(delta, qi, bq, axis=3)
                sc = jnp.einsum("bkgte,bkse->bkgts", q_i, k_j, preferred_element_type=jnp.float32)
                p = jnp.exp(jnp.where(mask, softcap_scores(sc, softcap), _MASKED) - lse_i[..., None])  # [B,K,G,bq,bk]
                dv_j = dv_j + jnp.einsum("bkxe,bkxs->bkes", rows(do_i), rows(p.astype(dtype)),
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgte,bkse->bkgts", do_i, v_j, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * _softcap_grad(sc, softcap)).astype(dtype)
                dq_i = jax.lax.dynamic_slice_in_dim(dq, qi, bq, axis=3) + jnp.einsum(
                    "bkgts,bkse->bkgte", ds, k_j, preferred_element_type=jnp.float32)
                dk_j = dk_j + jnp.einsum("bkxe,bkxs->bkes", rows(q_i), rows(ds), preferred_element_type=jnp.float32)
                return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, qi, axis=3), dk_j, dv_j

            return jax.lax.cond(jnp.any(mask), visit, lambda c: c, carry)

        zeros = jnp.zeros((b, k, e, bk), jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, tp // bq, q_block, (dq, zeros, zeros))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dk_j, kj, axis=3),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_j, kj, axis=3))

    sp = kh.shape[2]
    init = (jnp.zeros((b, k, g, tp, e), jnp.float32), jnp.zeros((b, k, e, sp), jnp.float32),
            jnp.zeros((b, k, e, sp), jnp.float32))
    dq, dk_t, dv_t = jax.lax.fori_loop(0, sp // bk, k_block, init)
    d_spec = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), spec0)
    return (jnp.transpose(dq[:, :, :, :t], (0, 3, 1, 2, 4)).astype(q.dtype),
            jnp.transpose(dk_t[..., :s], (0, 3, 1, 2)).astype(key.dtype),
            jnp.transpose(dv_t[..., :s], (0, 3, 1, 2)).astype(val.dtype), d_spec)


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def layer_windows(config: ModelConfig) -> tuple:
    """The distinct sliding windows of a config's layers in first-use order (None = full causal)."""
    return tuple(dict.fromkeys(config.layer_window(i) for i in range(config.num_hidden_layers)))
