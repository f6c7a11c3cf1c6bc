"""QLoRA's 4-bit NormalFloat (NF4) with double quantization, for the frozen base kernels.

Storage of one kernel ``W`` (stored in the Hugging Face layout ``[out, in]`` = our ``kernel.T``, flattened
row-major, exactly as ``bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4",
compress_statistics=True)`` stores a ``Linear4bit`` weight)::

    blocks of 64 values      c_b = absmax(block b)                    (fp32, one per 64 values)
    codes                    q_i = argmin_j |W_i / c_b - NF4[j]|      (4 bits; two per uint8, first in the
                                                                       high nibble)
    double quantization      c_b - mean(c) in blocks of 256 with the signed 8-bit dynamic code:
                             s_k = absmax(block k of c - mean(c)),    (fp32, one per 256 constants)
                             r_b = argmin_j |(c_b - mean(c)) / s_k - DYN[j]|  (uint8)
    dequantization           W_i = NF4[q_i] * (DYN[r_b] * s_k + mean(c))

Bits per parameter: 4 + 8/64 + 32/(64*256) = 4.127 (plus one fp32 mean per tensor).

A mixture-of-experts layer's stacked expert weights (``mlp/experts/gate_proj [X, D, F]`` etc., :data:`EXPERT_KERNELS`)
are stored as X such kernels side by side: expert ``e`` is quantized on its own, exactly as the per-expert
``Linear4bit`` ``model.layers.i.mlp.experts.e.gate_proj`` of a transformers v4 checkpoint would be, and every array
of the :class:`QTensor` gets a leading [X] axis (``shape`` is ``(X, in, out)``), so :func:`dequantize` returns the
whole ``[X, in, out]`` stack in one call and the experts can be split over a mesh axis like the float ones. The
routers (``mlp/gate``) are never quantized: they are tiny, and bitsandbytes leaves them in float (transformers v5's
router is no ``nn.Linear``; v4 setups list it in ``llm_int8_skip_modules``).

Inside the jitted step each ``Linear`` of :mod:`easytune.models.layers` that finds a :class:`QTensor` as its
kernel calls :func:`qmatmul`: the kernel is dequantized to the compute dtype in that layer and recomputed in
the backward pass, never the whole float model at once (:func:`dequantize_tree` does the whole tree, for
export and inference). Measured limit: XLA:CPU's scheduler still allocates the dequantized kernels of all
layers side by side (``memory_analysis()`` shows the same temp bytes either way on CPU); ``model.scan_layers``
(``nn.scan`` over the decoder layers) bounds it to one layer on every backend. The codes are 1-D arrays with their
own logical axes (``nf4_codes``, ``nf4_blocks``) that :mod:`easytune.sharding` splits over ``fsdp`` (and
``tensor``) the way the float kernels are split, so per-device weight memory shrinks by the same factor.

:func:`easytune.models.hf_weights.load_hf_quantized` reads a Hugging Face checkpoint one tensor at a time and
quantizes each kernel as it arrives: host memory holds the quantized model plus one float tensor, never the whole
float model.

References:
    Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3 (4-bit NormalFloat,
    double quantization) and appendix E (the NF4 values).
    bitsandbytes 0.50 ``functional.quantize_4bit`` / ``dequantize_4bit`` (``compress_statistics=True``:
    ``offset = absmax.mean()``, ``quantize_blockwise(absmax - offset, blocksize=256)``),
    ``create_dynamic_map(signed=True)`` and the default backend's ``bucketize`` on code midpoints.
    Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning" (the dynamic code).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

BLOCKSIZE = 64          # values per NF4 absmax block (bitsandbytes' default for QLoRA)
BLOCKSIZE2 = 256        # absmax constants per double-quantization block

# QLoRA appendix E / bitsandbytes ``get_4bit_type("nf4")``: quantiles of N(0, 1), normalised to [-1, 1],
# with an exact zero (7 negative, 8 positive values).
NF4_CODE = np.array([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0], dtype=np.float32)


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The signed 8-bit dynamic code of bitsandbytes ``create_dynamic_map(signed=True)``: 256 sorted fp32 values.

    For exponent ``i`` in 0..6 the fraction takes ``2**i`` values, the midpoints of ``linspace(0.1, 1,
    2**i + 1)``, scaled by ``10**(i - 6)``, with both signs; then 0 and 1. Computed in float64 and rounded
    once to float32 (bitsandbytes rounds its float32 ``linspace``; the two agree within 1 ulp).

    Returns:
        float32 ``[256]``, sorted ascending, from -0.9928... to 1.0.
    """
    non_sign = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        bounds = np.linspace(0.1, 1.0, 2 ** (i + non_sign - max_exponent_bits) + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += list(scale * means) + list(-scale * means)
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.asarray(data, np.float64)).astype(np.float32)


DYNAMIC_CODE = dynamic_code()


# the stacked expert weights of a mixture-of-experts layer: params ``.../mlp/experts/{name}`` [X, in, out]
EXPERT_KERNELS = ("gate_proj", "up_proj", "down_proj")


@flax.struct.dataclass
class QTensor:
    """An NF4-quantized kernel, or a stack of X expert kernels quantized one by one (a pytree: the arrays are
    children, the layout is static).

    Attributes:
        codes: uint8 ``[ceil(n/64)*64 / 2]``, two 4-bit NF4 indices per byte (first value in the high nibble),
            over the Hugging Face layout ``[out, in]`` flattened row-major (``n = in * out``).
        absmax: per-64-block scale: uint8 ``[ceil(n/64)]`` dynamic-code indices with double quantization,
            else float32 ``[ceil(n/64)]``.
        absmax_scale: float32 ``[ceil(ceil(n/64)/256)]``, one scale per 256 absmax constants (``[0]`` without
            double quantization).
        offset: float32 scalar, the mean of the absmax constants subtracted before double quantization.
        shape: the kernel's shape ``(in, out)`` (the model's layout), or ``(X, in, out)`` for stacked experts,
            whose four arrays then carry a leading [X] axis (``codes [X, ceil(n/64)*32]``, ``offset [X]``, ...;
            each expert quantized on its own).
        double_quant: whether ``absmax`` is itself quantized.
    """
    codes: jax.Array
    absmax: jax.Array
    absmax_scale: jax.Array
    offset: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    double_quant: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def size(self) -> int:
        """Number of parameters the kernel has (``in * out``; ``X * in * out`` for stacked experts)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage (codes, absmax, scales and offset)."""
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in (self.codes, self.absmax, self.absmax_scale, self.offset))

    @property
    def bits_per_param(self) -> float:
        """Storage bits per kernel parameter (4.127 with double quantization, 4.5 without)."""
        return 8.0 * self.nbytes / self.size


def _nearest(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest value of the sorted ``code`` for each ``x`` (ties go to the lower value, as
    ``torch.bucketize`` on the midpoints in bitsandbytes)."""
    bounds = (code[:-1] + code[1:]) / np.float32(2)
    return np.searchsorted(bounds, x, side="left").astype(np.uint8)


def _blockwise(flat: np.ndarray, blocksize: int, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Absmax quantization of a 1-D float32 array in blocks: ``(indices [n], absmax [ceil(n/blocksize)])``."""
    n = flat.size
    nb = -(-n // blocksize)
    blocks = np.zeros(nb * blocksize, np.float32)
    blocks[:n] = flat
    blocks = blocks.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    scaled = np.clip(blocks * (np.float32(1.0) / np.maximum(absmax, np.float32(1e-38)))[:, None], -1, 1)
    return _nearest(scaled.reshape(-1)[:n], code), absmax


def quantize(weight: np.ndarray, *, double_quant: bool = True, hf_layout: bool = True) -> QTensor:
    """NF4-quantizes one kernel on the host (numpy), as bitsandbytes ``quantize_4bit`` does; or a stack of
    expert kernels, each on its own.

    Args:
        weight: float array, ``[out, in]`` (Hugging Face / torch layout) when ``hf_layout``, else the model's
            ``[in, out]`` kernel (transposed first, so both give the same storage). A 3-D array is a stack of X
            expert kernels, ``[X, out, in]`` or ``[X, in, out]`` alike (see :func:`stack_experts`).
        double_quant: quantize the absmax constants again (8-bit dynamic code, blocks of 256).
        hf_layout: see ``weight``.

    Returns:
        a :class:`QTensor` of numpy arrays (``shape`` = the model's ``(in, out)``, or ``(X, in, out)``).

    Raises:
        ValueError: ``weight`` is not 2-D or 3-D, or not finite.
    """
    w = np.asarray(weight)
    if w.ndim == 3:
        return stack_experts([quantize(x, double_quant=double_quant, hf_layout=hf_layout) for x in w])
    if w.ndim != 2:
        raise ValueError(f"quantize: expected a 2-D kernel (or a 3-D stack of expert kernels), got shape {w.shape}")
    if not hf_layout:
        w = w.T
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"quantize: kernel of shape {w.shape} holds NaN or inf")
    out_f, in_f = w.shape
    q, absmax = _blockwise(w.reshape(-1), BLOCKSIZE, NF4_CODE)
    q = np.concatenate([q, np.zeros(absmax.size * BLOCKSIZE - q.size, np.uint8)])
    codes = (q[0::2] << 4) | q[1::2]
    if double_quant:
        offset = np.float32(absmax.mean(dtype=np.float32))
        absmax_q, scale = _blockwise(absmax - offset, BLOCKSIZE2, DYNAMIC_CODE)
        return QTensor(codes, absmax_q, scale.astype(np.float32), np.asarray(offset, np.float32),
                       (in_f, out_f), True)
    return QTensor(codes, absmax.astype(np.float32), np.zeros((0,), np.float32), np.zeros((), np.float32),
                   (in_f, out_f), False)


def stack_experts(qs) -> QTensor:
    """One :class:`QTensor` of ``shape (X, in, out)`` from X expert kernels quantized alike (same ``shape`` and
    ``double_quant``): each array stacked on a new leading axis (numpy).

    Raises:
        ValueError: no kernels, or kernels of different shapes or quantization settings.
    """
    qs = list(qs)
    if not qs or any(q.shape != qs[0].shape or q.double_quant != qs[0].double_quant or len(q.shape) != 2
                     for q in qs):
        raise ValueError(f"stack_experts: needs one or more 2-D kernels quantized alike, got "
                         f"{sorted({(q.shape, q.double_quant) for q in qs}, key=str)}")
    out = empty_experts(qs[0], len(qs))
    for e, q in enumerate(qs):
        set_expert(out, e, q)
    return out


def empty_experts(like: QTensor, num_experts: int) -> QTensor:
    """A stacked-experts :class:`QTensor` (``shape (X, in, out)``) of zero-filled numpy arrays, each with a
    leading [X] axis, for X kernels quantized as ``like`` (a 2-D one); fill it with :func:`set_expert`."""
    arrays = {f: np.zeros((num_experts, *np.shape(getattr(like, f))), np.asarray(getattr(like, f)).dtype)
              for f in ("codes", "absmax", "absmax_scale", "offset")}
    return QTensor(**arrays, shape=(num_experts, *like.shape), double_quant=like.double_quant)


def set_expert(stacked: QTensor, e: int, q: QTensor) -> None:
    """Writes the 2-D kernel ``q`` as expert ``e`` of ``stacked`` (numpy arrays, in place; as from
    :func:`empty_experts`).

    Raises:
        ValueError: ``q`` is not quantized like the stack's kernels.
    """
    num_experts = stacked.shape[0]
    if (num_experts, *q.shape) != tuple(stacked.shape) or q.double_quant != stacked.double_quant:
        raise ValueError(f"set_expert: kernel {q.shape} (double_quant={q.double_quant}) does not fit the stack "
                         f"{stacked.shape} (double_quant={stacked.double_quant})")
    if not 0 <= e < num_experts:
        raise ValueError(f"set_expert: expert {e} out of range for {num_experts} experts")
    for f in ("codes", "absmax", "absmax_scale", "offset"):
        getattr(stacked, f)[e] = getattr(q, f)


def dequantize_hf(q: QTensor, dtype: Any = jnp.float32) -> jax.Array:
    """The kernel a :class:`QTensor` stands for in its stored Hugging Face layout ``[out, in]`` (= the model's
    kernel transposed; jittable; math in float32, result in ``dtype``); ``[X, out, in]`` for stacked experts
    (expert e as transformers v4 stores ``experts.e.*.weight``).

    ``W = NF4[code] * absmax_block``, with ``absmax = DYN[absmax_q] * absmax_scale + offset`` under double
    quantization (bitsandbytes ``dequantize_4bit``). Each code byte's two nibbles are looked up (a 16-entry
    gather) and scaled per 64-block as ``[blocks, 32]`` arrays, then interleaved (high nibble first): the
    same float32 products, element for element, as looking up all ``n`` codes first.
    """
    *lead, in_f, out_f = q.shape
    n = in_f * out_f
    nb = q.absmax.shape[-1]
    codes = jnp.asarray(q.codes).reshape(*lead, nb, BLOCKSIZE // 2)
    if q.double_quant:
        scale = jnp.repeat(q.absmax_scale, BLOCKSIZE2, axis=-1,
                           total_repeat_length=q.absmax_scale.shape[-1] * BLOCKSIZE2)
        offset = jnp.asarray(q.offset)[..., None] if lead else q.offset
        absmax = jnp.asarray(DYNAMIC_CODE)[q.absmax.astype(jnp.int32)] * scale[..., :nb] + offset
    else:
        absmax = jnp.asarray(q.absmax, jnp.float32)
    table, absmax = jnp.asarray(NF4_CODE), absmax[..., None]
    high = table[(codes >> 4).astype(jnp.int32)] * absmax
    low = table[(codes & 0xF).astype(jnp.int32)] * absmax
    values = jnp.stack([high, low], axis=-1).reshape(*lead, -1)
    return values[..., :n].reshape(*lead, out_f, in_f).astype(dtype)


def dequantize(q: QTensor, dtype: Any = jnp.float32) -> jax.Array:
    """The ``[in, out]`` kernel a :class:`QTensor` stands for (the model's layout: :func:`dequantize_hf`
    transposed; jittable; math in float32, result in ``dtype``); ``[X, in, out]`` for stacked experts."""
    return jnp.swapaxes(dequantize_hf(q, dtype), -1, -2)


def qmatmul(x: jax.Array, q: QTensor, dtype: Any) -> jax.Array:
    """``x @ dequantize(q)`` for ``x [..., in]`` -> float32 ``[..., out]``, the kernel dequantized to ``dtype``
    inside the layer and *recomputed* in the backward pass (``jax.checkpoint`` saving nothing), so a step holds
    one layer's float kernel at a time instead of the whole float model (the QLoRA paper's point: the
    backward pass dequantizes again, as bitsandbytes' ``MatMul4Bit.backward`` does).

    The dots take the kernel in its stored ``[out, in]`` layout (:func:`dequantize_hf`): the forward pass
    contracts both operands' last axis and the backward pass ``dy [..., out] @ W [out, in]`` is a plain
    matmul, so no transposed copy of the kernel is needed (dequantizing a 1024 x 2736 kernel alone under jit on
    the 2-core CPU machine: 27 ms into ``[in, out]``, 2.7-4 ms into ``[out, in]``). Measured there too: the
    second dequantization costs 2.7-4 ms against about 1.1 s for that kernel's forward and backward matmuls
    at 4,096 tokens (0.3%), so it is not traded for holding every layer's float kernel until the backward pass.
    """
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def f(x, q):
        # the barrier ties the dequantization to this layer's input, so XLA cannot hoist every layer's
        # dequantization to the start of the step (which would hold the whole float model at once)
        x, q = jax.lax.optimization_barrier((x, q))
        return jnp.einsum("...i,oi->...o", x, dequantize_hf(q, dtype), preferred_element_type=jnp.float32)
    return f(x, q)


def qapply(fn, x: jax.Array, q, dtype: Any):
    """``fn(x, kernels)`` with the :class:`QTensor` leaves of ``q`` dequantized inside (:func:`dequantize`, the
    model's layout) and *recomputed* in the backward pass, as :func:`qmatmul` does for a ``Linear``
    (``jax.checkpoint`` saving nothing, an optimization barrier tying the dequantization to ``x``): for a layer
    that uses its kernels some other way than ``x @ W``, e.g. a mixture-of-experts layer with stacked expert
    kernels ``[X, in, out]``, so that a step holds one layer's float experts at a time.

    Args:
        fn: ``(x, kernels) -> array``, traced once; ``kernels`` is ``q`` with every QTensor dequantized to
            ``dtype`` (other leaves as given).
        x: the layer's input (any pytree ``fn`` takes; the dequantization is tied to it).
        q: a QTensor, or a pytree of them (e.g. the tuple of an MoE layer's gate/up/down experts).
        dtype: dtype of the dequantized kernels.
    """
    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
    def f(x, q):
        x, q = jax.lax.optimization_barrier((x, q))
        return fn(x, jax.tree_util.tree_map(lambda z: dequantize(z, dtype) if is_qtensor(z) else z, q,
                                            is_leaf=is_qtensor))
    return f(x, q)


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def dequantize_tree(tree, dtype: Any = jnp.float32):
    """Every :class:`QTensor` leaf of ``tree`` replaced by its dequantized kernel in ``dtype``; other leaves
    are returned unchanged (a no-op for trees without quantized kernels, e.g. LoRA or full runs)."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_qtensor(x) else x, tree,
                                  is_leaf=is_qtensor)


def count_params(tree) -> int:
    """Parameters in ``tree``, a :class:`QTensor` counting as its kernel's ``in * out``."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_qtensor)
    return sum(x.size if is_qtensor(x) else int(np.size(x)) for x in leaves)


def nbytes(tree) -> int:
    """Bytes held by the arrays of ``tree`` (quantized kernels at their packed size)."""
    return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------- which kernels

def _module_name(path: tuple[str, ...]) -> str:
    from easytune.lora import hf_module_name
    return hf_module_name(path)


def is_expert_kernel(path: tuple[str, ...]) -> bool:
    """Whether flax ``path`` is a mixture-of-experts layer's stacked expert weight
    (``.../mlp/experts/{gate_proj,up_proj,down_proj}``, ``[X, in, out]``)."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_KERNELS


def is_router(path: tuple[str, ...]) -> bool:
    """Whether flax ``path`` belongs to a mixture-of-experts router (``.../mlp/gate/weight [X, D]``; HF
    ``mlp.gate``, Mixtral ``block_sparse_moe.gate``)."""
    return len(path) >= 3 and path[-3:-1] == ("mlp", "gate")


def should_quantize(path: tuple[str, ...], skip_modules) -> bool:
    """Whether the param at flax ``path`` is a kernel to store in NF4: every linear ``kernel`` and every stacked
    expert weight (:func:`is_expert_kernel`, module ``...mlp.experts``) except the modules named in
    ``skip_modules`` (HF module names or suffixes, PEFT's rule; transformers' ``llm_int8_skip_modules``, by
    default ``lm_head``). Embeddings, norms, biases and mixture-of-experts routers (:func:`is_router`) are never
    quantized."""
    if not (path[-1] == "kernel" and not is_router(path)) and not is_expert_kernel(path):
        return False
    name = _module_name(path[:-1])
    return not any(name == s or name.endswith("." + s) for s in skip_modules)


def quantize_params(params, skip_modules=("lm_head",), double_quant: bool = True):
    """A params tree with every kernel chosen by :func:`should_quantize` replaced by a :class:`QTensor` (stacked
    experts ``[X, in, out]`` by one of ``shape (X, in, out)``, each expert quantized on its own)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: quantize(np.asarray(v, np.float32), double_quant=double_quant, hf_layout=False)
           if should_quantize(k, skip_modules) else v for k, v in flat.items()}
    return traverse_util.unflatten_dict(out)


def logical_axes(tree, axes_tree):
    """``axes_tree`` (logical axis names, as ``llama.param_logical_axes``) with the entry of every quantized
    kernel of ``tree`` replaced by a :class:`QTensor` of axis names for its arrays: ``codes`` ->
    ``('nf4_codes',)``, ``absmax`` -> ``('nf4_blocks',)``, the small ``absmax_scale`` and ``offset``
    replicated. :data:`easytune.sharding.RULES` maps the first two onto ``fsdp`` (and ``tensor``). Stacked
    experts keep their float weight's leading axis name on every array (``("expert", "nf4_codes")``,
    ``offset`` ``("expert",)``, ...), so they split over experts like the float ones."""
    flat = traverse_util.flatten_dict(tree)
    if not any(is_qtensor(v) for v in flat.values()):
        return axes_tree
    aflat = traverse_util.flatten_dict(axes_tree, is_leaf=lambda k, v: isinstance(v, tuple))
    for k, v in flat.items():
        if is_qtensor(v):
            lead = tuple(aflat[k][:len(v.shape) - 2])  # ("expert",) for stacked experts, () for a kernel
            aflat[k] = v.replace(codes=(*lead, "nf4_codes"), absmax=(*lead, "nf4_blocks"),
                                 absmax_scale=(*lead, None), offset=lead)
    return traverse_util.unflatten_dict(aflat)


def summary(tree) -> dict:
    """``{'kernels', 'params', 'bytes', 'bits_per_param'}`` over the quantized kernels of ``tree``."""
    qs = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qtensor) if is_qtensor(x)]
    params = sum(q.size for q in qs)
    total = sum(q.nbytes for q in qs)
    return {"kernels": len(qs), "params": params, "bytes": total,
            "bits_per_param": 8.0 * total / params if params else 0.0}

