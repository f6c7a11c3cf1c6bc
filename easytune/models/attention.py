"""Masked softmax attention with a hand-written backward pass (:func:`attention_core`), and the causal,
same-segment and sliding-window masks of the decoder layers (:func:`layer_masks`).

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).

References:
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023.
    Dao et al., "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022
    (Algorithm 2: the gradient formulas).
    transformers ``models/llama/modeling_llama.py`` (v5) ``eager_attention_forward``; ``masking_utils.py``
    ``causal_mask_function`` and ``sliding_window_overlay`` (Mistral / Qwen2 sliding-window attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.model_config import ModelConfig

Array = jax.Array


_MASKED = float(np.finfo(np.float32).min)


def _attention_forward(q, key, val, mask, dtype):
    """The forward of :func:`attention_core` in head-major layout; returns its residuals too."""
    qh = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, E]
    kh = jnp.transpose(key, (0, 2, 1, 3))  # [B, K, S, E]
    vh = jnp.transpose(val, (0, 2, 1, 3))  # [B, K, S, E]
    scores = jnp.einsum("bkgte,bkse->bkgts", qh, kh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores, _MASKED)
    weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))  # unnormalized probabilities
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    out = jnp.einsum("bkgts,bkse->bkgte", weights.astype(dtype), vh, preferred_element_type=jnp.float32) / total
    return out, (qh, kh, vh, weights / total, out, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_core(q: Array, key: Array, val: Array, mask: Array, dtype) -> Array:
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

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``.
    """
    return _attention_fwd(q, key, val, mask, dtype)[0]


def _attention_fwd(q, key, val, mask, dtype):
    out, res = _attention_forward(q, key, val, mask, dtype)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype), res


def _attention_bwd(dtype, res, d_out):
    qh, kh, vh, probs, out, mask = res  # probs: [B, K, G, T, S]
    b, k, g, t, e = qh.shape
    do = jnp.transpose(d_out, (0, 2, 3, 1, 4)).astype(jnp.float32)  # [B, K, G, T, E]
    rows = (b, k, g * t)  # the query heads of one kv head and their positions, contracted together for dk, dv
    dv_t = jnp.einsum("bkxe,bkxs->bkes", do.reshape(*rows, e).astype(dtype),
                      probs.reshape(*rows, -1).astype(dtype), preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgte,bkse->bkgts", do.astype(dtype), vh, preferred_element_type=jnp.float32)
    d_scores = jnp.where(mask, probs * (dp - jnp.sum(do * out, axis=-1, keepdims=True)), 0.0)
    dq = jnp.einsum("bkgts,bkse->bkgte", d_scores.astype(dtype), kh, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("bkxe,bkxs->bkes", qh.reshape(*rows, e), d_scores.reshape(*rows, -1).astype(dtype),
                      preferred_element_type=jnp.float32)
    return (jnp.transpose(dq, (0, 3, 1, 2, 4)).astype(qh.dtype), jnp.transpose(dk_t, (0, 3, 1, 2)).astype(kh.dtype),
            jnp.transpose(dv_t, (0, 3, 1, 2)).astype(vh.dtype), None)


attention_core.defvjp(_attention_fwd, _attention_bwd)


def layer_masks(config: ModelConfig, q_idx: Array, k_idx: Array, same: Array) -> dict:
    """Attention masks keyed by window: ``{None: causal & same, W: causal & same & (q - k < W)}``.

    Args:
        config: model config (which windows the layers use).
        q_idx: int32 [T] sequence (or cache-slot) index of each query.
        k_idx: int32 [S] index of each key.
        same: bool [B, T, S] query and key share a segment id.

    Returns:
        ``{window: bool [B, 1, 1, T, S]}`` for every window used by a layer.

    References:
        transformers ``masking_utils``: ``causal_mask_function`` and ``sliding_window_overlay``
        (``kv_idx > q_idx - sliding_window``).
    """
    dist = q_idx[:, None] - k_idx[None, :]  # [T, S]
    base = (dist >= 0)[None] & same  # [B, T, S]
    masks = {}
    for i in range(config.num_hidden_layers):
        w = config.layer_window(i)
        if w not in masks:
            masks[w] = (base if w is None else base & (dist < w)[None])[:, None, None]
    return masks
