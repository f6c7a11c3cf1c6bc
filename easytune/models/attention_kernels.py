"""The fused attention kernels JAX ships, behind :class:`~easytune.models.attention.MaskSpec`: the Pallas TPU
splash-attention kernel (:func:`splash_attention`) and ``jax.nn.dot_product_attention`` with cuDNN on GPU
(:func:`cudnn_attention`), with the shape / dtype checks a dispatcher needs to fall back
(:func:`splash_supported`, :func:`cudnn_supported`).

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``); ``N = K * G`` query heads.

Both kernels take the causal and sliding-window parts of the mask from positions ``0..T-1`` (their masks are
static), so they assume ``q_idx = k_idx = arange(T)`` (self-attention over a whole sequence: training and
evaluation, not decoding from a KV cache). The window is a traced scalar in :class:`MaskSpec`, while the
kernels need it static: callers pass ``windows``, the static tuple of distinct windows a config uses (``None``
= full causal), and ``jax.lax.switch`` picks the kernel built for the one equal to ``spec.window``.

Window convention: :class:`MaskSpec` lets query ``t`` see key ``s`` when ``0 <= t - s < W`` (the token itself
and the ``W - 1`` before it, transformers ``sliding_window_overlay``). That is splash's
``LocalMask(window_size=(W - 1, 0))`` (``t - left <= s <= t + right``), ``jax.nn.dot_product_attention``'s
``local_window_size=(W - 1, 0)`` (XLA: ``t <= s + left`` and ``t >= s - right``) and cuDNN's
``sliding_window_length = left + 1 = W`` (``(t - W, t]``, which ``jax.nn`` derives from ``left`` itself).

References:
    JAX ``jax/experimental/pallas/ops/tpu/splash_attention`` (``make_splash_mha``, ``make_splash_mqa``,
    ``CausalMask``, ``LocalMask``, ``MultiHeadMask``, ``SegmentIds``) and its kernel test.
    JAX ``jax.nn.dot_product_attention`` (``implementation="cudnn" | "xla"``) and
    ``jax._src.cudnn.fused_attention_stablehlo`` (its dtype / head-dim checks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.attention import NO_WINDOW, MaskSpec

Array = jax.Array

_LANES = 128  # TPU vector lane width: splash's blocks and our padded head dim are multiples of it
_CUDNN_DTYPES = (np.dtype(jnp.float16), np.dtype(jnp.bfloat16))


def _window_branch(spec_window: Array, windows: tuple) -> Array:
    """int32 index into ``windows`` of the one equal to ``spec_window`` (None = :data:`NO_WINDOW`); 0 if none."""
    values = jnp.asarray([NO_WINDOW if w is None else w for w in windows], jnp.int32)
    return jnp.argmax(values == spec_window).astype(jnp.int32)


def _switch_windows(spec: MaskSpec, windows: tuple, make_branch, *operands):
    """``make_branch(w)(*operands)`` for the ``w`` of ``windows`` equal to ``spec.window`` (lax.switch)."""
    windows = tuple(windows)
    if not windows:
        raise ValueError("windows must name at least one window (None = full causal)")
    for w in windows:
        if w is not None and (int(w) != w or w < 1):
            raise ValueError(f"windows must hold None or positive ints, got {windows}")
    if len(windows) == 1:
        return make_branch(windows[0])(*operands)
    return jax.lax.switch(_window_branch(spec.window, windows), [make_branch(w) for w in windows], *operands)


def _splash_block(n: int, block: int) -> int | None:
    """The largest multiple of 128 that is at most ``block`` and divides ``n``; None if there is none."""
    for b in range(min(block, n) // _LANES * _LANES, 0, -_LANES):
        if n % b == 0:
            return b
    return None


def splash_supported(t: int, s: int, head_dim: int, *, block: int = 512, interpret: bool = False) -> bool:
    """Whether :func:`splash_attention` runs for these shapes here.

    Constraints (``splash_attention_kernel`` / ``splash_attention_mask_info``): the kernel's block sizes are
    multiples of 128 (the lane width; required with segment ids) that divide the lengths, so ``T`` and ``S``
    must be multiples of 128 (blocks are the largest such divisor at most ``block``); ``T == S`` (the causal
    and window masks are laid out from position 0 for both axes: self-attention, not decoding). Any head dim:
    :func:`splash_attention` zero-pads it to a multiple of 128 (JAX tests the kernel at 128 and 256 only).
    Off TPU it runs only in Pallas interpret mode (slow; for tests).

    Args:
        t, s: query and key lengths in tokens.
        head_dim: ``E``.
        block: the largest block in tokens (``model.attention_block``).
        interpret: whether the caller runs Pallas interpret mode (then any backend will do).
    """
    if not interpret and jax.default_backend() != "tpu":
        return False
    return t == s and head_dim > 0 and _splash_block(t, block) is not None and _splash_block(s, block) is not None


def splash_attention(q: Array, key: Array, val: Array, spec: MaskSpec, dtype, windows: tuple, *,
                     interpret: bool = False, block: int = 512, softcap: float | None = None) -> Array:
    """Masked softmax attention by the Pallas TPU splash-attention kernel (forward and its own backward).

    .. math::
        o = \\mathrm{softmax}(q k^T \\text{ where } 0 \\le t - s < W \\wedge seg_q[t] = seg_k[s]) v

    One kernel per window of ``windows`` (``CausalMask``, or ``LocalMask((W - 1, 0))`` for window ``W``, for
    every query head), ``jax.vmap``-ped over the batch with ``SegmentIds`` from ``spec.q_segments`` /
    ``spec.k_segments``; ``make_splash_mha`` with ``K`` kv heads (GQA: query head ``n`` reads kv head
    ``n // G``), ``make_splash_mqa`` when ``K == 1``. Block sizes: the largest multiple of 128 at most
    ``block`` dividing the length, forward and both backward kernels (dq, dkv). Scores, softmax and
    accumulation are float32 inside the kernel (matmuls in ``dtype``); the probabilities are never stored
    (the backward recomputes them per block from the saved log-sum-exp). A head dim that is not a multiple of
    128 is zero-padded to one (``q k^T`` unchanged; the padded output columns are dropped).

    The masks assume ``q_idx = k_idx = arange(T)`` (training, evaluation); ``spec.q_idx`` / ``spec.k_idx`` are
    not read. Rows with no visible key do not occur then (a token always sees itself). The kernel is a
    ``pallas_call``, which XLA does not partition: on a multi-device mesh call it inside ``shard_map`` over
    the batch (and head) axes, as MaxText does.

    Args:
        q: ``[B, T, K, G, E]`` queries, already scaled by ``1/sqrt(E)``.
        key, val: ``[B, S, K, E]``.
        spec: the mask; ``window`` must equal one of ``windows`` (an unknown one runs ``windows[0]``).
        dtype: compute dtype: q, k, v are cast to it, and the result is in it.
        windows: static tuple of the distinct windows in use (None = full causal).
        interpret: run the Pallas kernels in interpret mode (any backend; slow).
        block: the largest block in tokens.
        softcap: attention logit soft-cap (Gemma 2), the kernel's ``attn_logits_soft_cap``, or None.

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``.

    Raises:
        ValueError: shapes :func:`splash_supported` rejects (with ``interpret=True``).

    References:
        JAX ``jax.experimental.pallas.ops.tpu.splash_attention``; MaxText's ``tpu_flash_attention`` (vmap over
        the batch, segment ids).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, k, g, e = q.shape
    s = key.shape[1]
    if not splash_supported(t, s, e, block=block, interpret=True):
        raise ValueError(f"splash attention needs T == S, multiples of 128; got T={t}, S={s} (block {block})")
    bq, bkv = _splash_block(t, block), _splash_block(s, block)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    pad = -e % _LANES
    qh = jnp.transpose(q.reshape(b, t, k * g, e), (0, 2, 1, 3)).astype(dtype)  # [B, N, T, E]
    kh = jnp.transpose(key, (0, 2, 1, 3)).astype(dtype)  # [B, K, S, E]
    vh = jnp.transpose(val, (0, 2, 1, 3)).astype(dtype)
    if pad:
        qh, kh, vh = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) for x in (qh, kh, vh))
    if k == 1:  # MQA: the kernel takes the single kv head unbatched
        kh, vh = kh[:, 0], vh[:, 0]
    segments = splash.SegmentIds(q=spec.q_segments.astype(jnp.int32), kv=spec.k_segments.astype(jnp.int32))

    def make_branch(w):
        one = masks.CausalMask((t, s)) if w is None else masks.LocalMask((t, s), (w - 1, 0), offset=0)
        make = splash.make_splash_mqa if k == 1 else splash.make_splash_mha
        kernel = make(masks.MultiHeadMask([one] * (k * g)), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                      interpret=interpret, attn_logits_soft_cap=softcap)
        return lambda qh, kh, vh, segments: jax.vmap(kernel)(qh, kh, vh, segments)

    out = _switch_windows(spec, windows, make_branch, qh, kh, vh, segments)  # [B, N, T, E + pad]
    out = jnp.transpose(out[..., :e], (0, 2, 1, 3)).reshape(b, t, k, g, e)
    return out.astype(dtype)


def cudnn_supported(dtype, t: int | None = None, s: int | None = None, head_dim: int | None = None, *,
                    backend: str | None = None) -> bool:
    """Whether :func:`cudnn_attention` with ``implementation="cudnn"`` runs for these settings.

    Constraints (``jax._src.cudnn.fused_attention_stablehlo``): a GPU backend; q, k, v in float16 or bfloat16
    (the wrapper casts them to ``dtype``); head dim a multiple of 8, at most 128 (256 from Hopper, compute
    capability 9.0, when the device reports it); with a mask (our segments) in training, even lengths;
    ``T == S`` (causal and window masks from position 0). The cuDNN library version is checked by JAX at
    trace time (it raises there, not here).

    Args:
        dtype: the compute dtype.
        t, s: query and key lengths in tokens (None: not checked).
        head_dim: ``E`` (None: not checked).
        backend: the JAX backend to check for (default ``jax.default_backend()``).
    """
    if np.dtype(dtype) not in _CUDNN_DTYPES or (backend or jax.default_backend()) not in ("gpu", "cuda"):
        return False
    if t is not None and s is not None and (t != s or t % 2 or s % 2):
        return False
    if head_dim is not None:
        h_max = 128
        try:
            if float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0:
                h_max = 256
        except (ValueError, RuntimeError):
            pass
        if head_dim % 8 or head_dim > h_max:
            return False
    return True


def cudnn_attention(q: Array, key: Array, val: Array, spec: MaskSpec, dtype, windows: tuple, *,
                    implementation: str = "cudnn") -> Array:
    """Masked softmax attention by ``jax.nn.dot_product_attention`` (cuDNN's fused flash attention on GPU).

    .. math::
        o = \\mathrm{softmax}(q k^T \\text{ where } 0 \\le t - s < W \\wedge seg_q[t] = seg_k[s]) v

    Layout ``[B, T, N, E]`` with ``K`` kv heads (GQA by kv head count: query head ``n`` reads ``n // G``),
    ``scale=1.0`` (q is prescaled), ``is_causal=True``, ``local_window_size=(W - 1, 0)`` for window ``W``
    (static, one call per window of ``windows`` under ``jax.lax.switch``), and the packed segments as the
    ``mask`` argument: bool ``[B, 1, T, S]`` ``q_segments[t] == k_segments[s]``. That mask is quadratic
    in length, but cuDNN's fused kernel still never forms the float32 ``[B, N, T, S]`` probabilities (it
    takes the mask as a ``dtype`` bias, once for all heads, and recomputes probabilities per block in the
    backward pass). The mask assumes ``q_idx = k_idx = arange(T)``; ``spec.q_idx`` / ``spec.k_idx`` are not
    read.

    Args:
        q: ``[B, T, K, G, E]`` queries, already scaled by ``1/sqrt(E)``.
        key, val: ``[B, S, K, E]``.
        spec: the mask; ``window`` must equal one of ``windows`` (an unknown one runs ``windows[0]``).
        dtype: compute dtype: q, k, v are cast to it (cuDNN: float16 / bfloat16), and the result is in it.
        windows: static tuple of the distinct windows in use (None = full causal).
        implementation: ``"cudnn"``, or ``"xla"`` (the same call on XLA's reference path: for tests on CPU).

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``.

    Raises:
        NotImplementedError / ValueError / RuntimeError: from JAX when cuDNN does not support the shapes or
        dtype, or is absent (check :func:`cudnn_supported` first).

    References:
        JAX ``jax.nn.dot_product_attention``.
    """
    b, t, k, g, e = q.shape
    qn = q.reshape(b, t, k * g, e).astype(dtype)
    kn, vn = key.astype(dtype), val.astype(dtype)
    same = (spec.q_segments[:, :, None] == spec.k_segments[:, None, :])[:, None]  # [B, 1, T, S]

    def make_branch(w):
        def call(qn, kn, vn, same):
            return jax.nn.dot_product_attention(qn, kn, vn, mask=same, scale=1.0, is_causal=True,
                                                local_window_size=None if w is None else (w - 1, 0),
                                                implementation=implementation)
        return call

    out = _switch_windows(spec, windows, make_branch, qn, kn, vn, same)  # [B, T, N, E]
    return out.reshape(b, t, k, g, e).astype(dtype)
