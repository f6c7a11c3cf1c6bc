"""Which attention implementation runs (``model.attention``): :func:`resolve` picks one per call, :func:`attend`
runs it. The implementations: :func:`~easytune.models.attention.attention_core` ("xla", one ``[T, S]`` softmax),
:func:`~easytune.models.attention.blockwise_attention` ("blockwise", memory linear in length), and the
accelerator kernels of :mod:`easytune.models.attention_kernels` ("splash" on TPU, "cudnn" on GPU).

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easytune import sharding
from easytune.models import attention_kernels as kernels
from easytune.models.attention import MaskSpec, attention_core, blockwise_attention, layer_windows
from easytune.models.model_config import ModelConfig

Array = jax.Array


def resolve(config: ModelConfig, t: int, s: int, dtype, *, decode: bool = False) -> str:
    """The implementation ``model.attention`` names for a call with T queries over S keys.

    ``"auto"`` takes the fused kernel of the backend when it applies (TPU: ``"splash"``; GPU with a 16-bit
    compute dtype: ``"cudnn"``), else ``"blockwise"`` when the queries span more than one block
    (``T > model.attention_block``; memory linear in length) and ``"xla"`` otherwise (one block: the
    unblocked :func:`attention_core` is the same computation without the loop). Decoding with a KV cache
    (``decode``) never takes the fused kernels, whose masks assume ``q_idx == k_idx``. An explicit
    ``"splash"`` / ``"cudnn"`` falls back to ``"auto"``'s choice for the calls whose shapes the kernel does not
    take (decoding, the ``[1, 1]`` batch of parameter init, lengths off its block multiple, and for cuDNN a
    config with ``attn_logit_softcapping``; see ``attention_kernels.splash_supported`` / ``cudnn_supported``).

    Raises:
        ValueError: ``"splash"`` without a TPU, ``"cudnn"`` without a GPU or with a 32-bit compute dtype.
    """
    impl = config.attention
    backend = jax.default_backend()
    if impl == "splash" and backend != "tpu":
        raise ValueError(f"model.attention='splash' needs a TPU (backend {backend}); use 'auto' or 'blockwise'")
    if impl == "cudnn" and not (backend == "gpu" and kernels.cudnn_supported(dtype)):
        raise ValueError(f"model.attention='cudnn' needs a GPU and a float16/bfloat16 compute dtype (backend "
                         f"{backend}, dtype {jnp.dtype(dtype).name}); use 'auto' or 'blockwise'")
    fused = {"splash": not decode and backend == "tpu" and kernels.splash_supported(t, s, config.head_dim),
             # jax.nn.dot_product_attention has no logit soft-capping (Gemma 2)
             "cudnn": not decode and backend == "gpu" and config.attn_logit_softcapping is None
             and kernels.cudnn_supported(dtype, t, s, config.head_dim)}
    if impl == "auto":
        impl = next((name for name, ok in fused.items() if ok), "auto")
    if impl in fused and not fused[impl]:
        impl = "auto"  # a shape the kernel does not take (decode, the init batch, a length off its blocks)
    if impl == "auto":
        return "blockwise" if t > config.attention_block else "xla"
    return impl


def attend(q: Array, key: Array, val: Array, spec: MaskSpec, dtype, config: ModelConfig, *,
           decode: bool = False) -> Array:
    """Masked softmax attention by the implementation ``config.attention`` names (:func:`resolve`).

    Args:
        q: ``[B, T, K, G, E]`` queries already scaled (``1/sqrt(E)``, or ``query_pre_attn_scalar ** -0.5``).
        key, val: ``[B, S, K, E]``.
        spec: which keys each query sees (:class:`MaskSpec`).
        dtype: compute dtype (see :func:`attention_core`).
        config: the model config (``attention``, ``attention_block``, the layers' windows, head_dim,
            ``attn_logit_softcapping``).
        decode: a KV-cache call (queries at cache slots, ``q_idx != k_idx``).

    Returns:
        ``[B, T, K, G, E]`` in ``dtype``; every implementation computes the same function (tested against
        ``transformers`` and against each other).

    Raises:
        ValueError: see :func:`resolve`.
    """
    impl = resolve(config, q.shape[1], key.shape[1], dtype, decode=decode)
    cap = config.attn_logit_softcapping
    if impl == "xla":
        return attention_core(q, key, val, spec.dense(), dtype, cap)
    if impl == "blockwise":
        fn = lambda q, k_, v, sp: blockwise_attention(q, k_, v, sp, dtype, config.attention_block, cap)
    elif impl == "splash":
        fn = lambda q, k_, v, sp: kernels.splash_attention(q, k_, v, sp, dtype, layer_windows(config), softcap=cap)
    else:
        fn = lambda q, k_, v, sp: kernels.cudnn_attention(q, k_, v, sp, dtype, layer_windows(config))
    return _per_shard(fn, q, key, val, spec)


def _per_shard(fn, q: Array, key: Array, val: Array, spec: MaskSpec) -> Array:
    """``fn(q, key, val, spec)`` run per device with ``jax.shard_map`` on the mesh of
    :func:`easytune.sharding.current_mesh` (rows over ``batch``, kv heads over ``kv_heads``: attention is
    independent per row and head), or directly without a mesh.

    The blocked loops decide per block pair whether any row sees a key; per shard that is a local decision
    (over the whole batch it would be an all-reduce per block pair), and a Pallas kernel is not split by
    XLA's partitioner at all (MaxText calls splash attention under ``shard_map`` the same way).
    """
    mesh = sharding.current_mesh()
    if mesh is None:
        return fn(q, key, val, spec)
    b, t, k, g, e = q.shape
    s = key.shape[1]
    rows, _ = sharding.logical_to_spec(("batch", None), (b, t), mesh)
    q_spec, _ = sharding.logical_to_spec(("batch", None, "kv_heads", None, None), q.shape, mesh)
    kv_spec, _ = sharding.logical_to_spec(("batch", None, "kv_heads", None), key.shape, mesh)
    k_rows, _ = sharding.logical_to_spec(("batch", None), (b, s), mesh)
    spec_specs = MaskSpec(P(None), P(None), rows, k_rows, P())
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec_specs), out_specs=q_spec,
                         check_vma=False)(q, key, val, spec)
