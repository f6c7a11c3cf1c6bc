"""Llama-family decoder (Llama 2 / 3 / 3.1, Mistral, Qwen2 / 2.5) in Flax linen.

The module tree and parameter names mirror Hugging Face ``LlamaForCausalLM`` one-to-one, so loading a
checkpoint is a rename and a transpose (see ``easytune/models/hf.py``). Kernels are stored ``[in, out]``
(HF ``weight.T``).

Axis letters used in every einsum and shape comment:

    B  batch
    T  length (query positions)      S  length (key positions; same tokens as T)
    D  embed (hidden_size)
    H  query heads                   K  key/value heads      G  query heads per kv head (H // K)
    E  head dim (head_dim)
    F  mlp (intermediate_size)
    V  vocab

Logical axis names on parameters (for ``easytune/sharding.py``): ``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``norm``; with ``ModelConfig.scan_layers`` the stacked decoder layers add a leading
``layers`` axis (see ``easytune/models/scan.py``).

References:
    Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", 2023.
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021 (RoPE).
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023.
    Shazeer, "GLU Variants Improve Transformer", 2020 (SwiGLU).
    transformers ``models/llama/modeling_llama.py`` (v5): the numerics matched here;
    ``modeling_rope_utils.py`` (linear, dynamic NTK and llama3 RoPE scaling); ``masking_utils.py``
    ``sliding_window_overlay`` (Mistral / Qwen2 sliding-window attention); ``models/qwen2`` (q/k/v bias,
    no o_proj bias).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easytune import config as config_lib

Array = jax.Array
PyTree = Any
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")

# ``model.remat`` name (``config.REMAT_POLICY_NAMES``) -> what ``jax.checkpoint`` may keep from a decoder layer's forward pass for the backward
# pass (everything else is recomputed). None: no rematerialisation (every intermediate is kept).
REMAT_POLICIES = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,       # keep only the layer's input
        "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep every matmul output, recompute the rest
        "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,  # jax's alias of dots_saveable
        # keep the projections' outputs, recompute the attention score matmuls (they have a batch dim)
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model (the fields of HF ``LlamaConfig`` that change the math).

    ``head_dim=None`` resolves to ``hidden_size // num_attention_heads`` in ``__post_init__``, so
    ``config.head_dim`` is always an int after construction (``config.head_dim_`` is the same value).

    Attributes:
        vocab_size: V, number of token ids.
        hidden_size: D, residual stream width.
        intermediate_size: F, SwiGLU hidden width.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: H, query heads.
        num_key_value_heads: K, key/value heads (K divides H; K == H is multi-head attention).
        head_dim: E, per-head width (None: D // H).
        rms_norm_eps: epsilon inside RMSNorm's square root.
        rope_theta: RoPE base frequency.
        max_position_embeddings: longest context the checkpoint was trained for (informational).
        tie_word_embeddings: logits use ``embed_tokens`` transposed; no ``lm_head`` parameter.
        attention_bias: q/k/v/o projections carry a bias (as HF Llama ``attention_bias``).
        mlp_bias: gate/up/down projections carry a bias.
        bos_token_id, eos_token_id, pad_token_id: special token ids (or None).
        model_type: HF model_type the config came from ("llama", "mistral" or "qwen2").
        rope_type: RoPE variant as HF ``rope_parameters["rope_type"]``: "default", "linear" (positions
            divided by ``rope_factor``), "dynamic" (NTK-aware base growth once a call's longest position
            exceeds ``max_position_embeddings``) or "llama3" (Llama 3.1 frequency-band scaling).
        rope_factor: the RoPE scaling ``factor`` (unused by "default").
        rope_low_freq_factor, rope_high_freq_factor: "llama3" band edges (HF ``low_freq_factor``,
            ``high_freq_factor``).
        rope_original_max_position_embeddings: "llama3" pretraining context length in tokens (None:
            ``max_position_embeddings``).
        sliding_window: W in tokens, or None. Layers of type "sliding_attention" let query index t see
            key index s only when ``t - s < W`` (HF ``sliding_window_overlay``: the window holds the
            token itself and the W - 1 before it).
        layer_types: per layer "full_attention" or "sliding_attention" (HF v5 ``layer_types``); None means
            every layer slides when ``sliding_window`` is set (Mistral), else none does.
        o_proj_bias: whether o_proj carries a bias; None follows ``attention_bias`` (Llama). Qwen2 has
            biases on q/k/v only: ``attention_bias=True, o_proj_bias=False``.
        initializer_range: standard deviation of the normal init of kernels and embeddings.
        dtype: parameter storage dtype name ("float32", "bfloat16", "float16").
        compute_dtype: activation dtype name; RMSNorm and softmax run in float32, logits are float32.
        remat: rematerialisation policy of each decoder layer, a name of :data:`REMAT_POLICIES`: "none"
            (keep every activation), "full" (keep only the layer input, recompute the layer in the backward
            pass), "dots_saveable" / "checkpoint_dots" (keep matmul outputs), "dots_with_no_batch_dims_saveable"
            (keep the projections' outputs). Booleans are accepted (True = "full", False = "none").
        scan_layers: run the decoder stack as one ``nn.scan`` over a single stacked layer (compiles one
            layer instead of L). Parameters are then stacked: ``model/layers/...`` with a leading [L] axis
            (logical axis "layers"); ``easytune.models.scan.stack_layers`` converts the per-layer layout.
            Decoding with a KV cache needs the per-layer layout.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    o_proj_bias: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "remat", config_lib.remat_policy_name(self.remat))
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be > 0 for rope_type {self.rope_type!r}, "
                             f"got {self.rope_factor}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                             f"{self.rope_high_freq_factor} <= {self.rope_low_freq_factor}")
        if self.sliding_window is not None and (int(self.sliding_window) != self.sliding_window
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got "
                             f"{self.sliding_window!r}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers (num_hidden_layers)")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def head_dim_(self) -> int:
        """E, the resolved per-head width (same as ``head_dim`` after ``__post_init__``)."""
        return self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window (tokens) of decoder layer ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None


def _init(config: ModelConfig, axes: tuple[str, ...]):
    """Normal(0, initializer_range) initializer carrying logical axis names (HF ``_init_weights``)."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


class Linear(nn.Module):
    """Dense layer ``y = x @ kernel (+ bias)`` with an optional LoRA branch.

    .. math::
        y = x W + b + s \\cdot (\\mathrm{dropout}(x) A) B

    The LoRA term is added only when the ``lora`` collection holds ``lora_A`` at this module's path
    (``lora_A: [in, r]``, ``lora_B: [r, out]``); dropout uses the ``'dropout'`` rng and runs only when
    ``deterministic`` is False.

    Attributes:
        features: output width.
        axes: logical axis names of the kernel ``(in_axis, out_axis)``; the bias gets ``(out_axis,)``.
        use_bias: whether to create a zero-initialized bias.
        config: the model config (initializer range, param dtype, compute dtype).
        lora_scale: ``s`` above (alpha / r, or alpha / sqrt(r) for rsLoRA).
        lora_dropout: dropout rate on the LoRA input.
        float32_out: return float32 instead of the compute dtype (used for logits).

    References:
        Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021, eq. (3).
        peft ``tuners/lora/layer.py`` ``Linear.forward`` (dropout applies to the LoRA input only).
    """

    features: int
    axes: tuple[str, str]
    use_bias: bool
    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    float32_out: bool = False

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """Applies the layer to ``x [..., in]`` (flattened to ``[tokens, in]`` for the dots); returns
        ``[..., features]``."""
        dtype = jnp.dtype(self.config.compute_dtype)
        out_dtype = jnp.float32 if self.float32_out else dtype
        lead = x.shape[:-1]
        # 2-D dots over [tokens, in]: with the leading axes kept, XLA:CPU's layout assignment transposes the
        # [tokens, out] activation gradient (a strided copy as long as the matmul itself) to contract the
        # token axes for the LoRA / weight gradients; flattened, every dot takes its operands as they are.
        x = x.reshape(-1, x.shape[-1]).astype(dtype)
        stored = self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        if hasattr(stored, "codes"):  # QLoRA: an NF4 QTensor, dequantized here (and again in the backward pass)
            from easytune import quant
            y = quant.qmatmul(x, stored, dtype)
        else:
            kernel = self.param("kernel", _init(self.config, self.axes), (x.shape[-1], self.features),
                                jnp.dtype(self.config.dtype))
            y = jnp.einsum("...i,io->...o", x, kernel.astype(dtype), preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), jnp.dtype(self.config.dtype))
            y = y + bias.astype(dtype).astype(jnp.float32)
        if self.has_variable("lora", "lora_A"):
            lora_a = self.get_variable("lora", "lora_A").astype(dtype)  # [in, r]
            lora_b = self.get_variable("lora", "lora_B").astype(dtype)  # [r, out]
            h = x
            if not deterministic and self.lora_dropout > 0.0:
                h = nn.Dropout(rate=self.lora_dropout)(h, deterministic=False)
            low = jnp.einsum("...i,ir->...r", h, lora_a)
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", low, lora_b,
                                                 preferred_element_type=jnp.float32)
        return y.astype(out_dtype).reshape(*lead, self.features)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as HF ``LlamaRMSNorm``.

    .. math::
        y = w \\odot \\mathrm{cast}\\big(x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon}\\big)

    Attributes:
        config: model config (eps, dtypes).

    References:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", 2019.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes ``x [B, T, D]`` over D; returns ``[B, T, D]`` in the compute dtype."""
        dtype = jnp.dtype(self.config.compute_dtype)
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), jnp.dtype(self.config.dtype))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(var + self.config.rms_norm_eps)
        return weight.astype(dtype) * x32.astype(dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """The static RoPE inverse frequencies ``omega`` (float32 [E/2]) of ``config.rope_type``.

    .. math::
        \\omega_i = \\theta^{-2i/E};\\quad \\text{linear: } \\omega_i / f;\\quad
        \\text{llama3: } \\omega_i / f \\text{ if } \\lambda_i > L / l,\\ \\omega_i \\text{ if }
        \\lambda_i < L / h,\\ \\text{else } (1 - s)\\omega_i / f + s\\,\\omega_i,\\
        s = \\frac{L / \\lambda_i - l}{h - l}

    with wavelength ``lambda_i = 2 pi / omega_i``, ``f`` the factor, ``L`` the original context length,
    ``l``/``h`` the low/high frequency factors. "dynamic" returns the unscaled frequencies (its growth
    depends on the positions; see ``rope_cos_sin``). Computed in float32 as transformers does.

    Args:
        config: model config (head_dim, rope_theta, rope_* fields).

    Returns:
        float32 numpy array [E/2].

    References:
        transformers ``modeling_rope_utils``: ``_compute_linear_scaling_rope_parameters``,
        ``_compute_llama3_parameters`` (Llama 3.1, Meta's ``apply_scaling``).
    """
    e = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta)
                       ** (np.arange(0, e, 2, dtype=np.float32) / np.float32(e)))).astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor = np.float32(config.rope_factor)
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old = config.rope_original_max_position_embeddings or config.max_position_embeddings
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: Array, head_dim: int, theta: float, dtype,
                 config: ModelConfig | None = None) -> tuple[Array, Array]:
    """Cosine and sine tables of rotary embeddings in HF's ``rotate_half`` layout.

    .. math::
        \\omega_i = \\theta^{-2i/E},\\quad \\mathrm{cos}[b,t] = \\cos(p_{bt}[\\omega, \\omega])

    With ``config`` the frequencies follow ``config.rope_type`` (``rope_inv_freq``). For "dynamic" (NTK),
    with ``n = max(positions) + 1`` over the whole call and ``M = max_position_embeddings``: when
    ``n > M`` the base becomes ``theta * (f n / M - (f - 1)) ** (E / (E - 2))``, else it stays theta. This
    is transformers' ``dynamic_rope_update`` on a fresh model and during ``generate`` (positions only
    grow), where each call's keys are rotated with that call's frequencies and cached as such.

    Args:
        positions: int [B, T] token positions.
        head_dim: E (even).
        theta: RoPE base (used when ``config`` is None).
        dtype: output dtype (HF casts the tables to the activation dtype).
        config: optional model config selecting the RoPE variant.

    Returns:
        ``(cos, sin)``, each [B, T, E] in ``dtype``.

    References:
        transformers ``LlamaRotaryEmbedding.forward``, ``compute_default_rope_parameters``,
        ``_compute_dynamic_ntk_parameters`` and ``dynamic_rope_update``.
    """
    if config is None:
        inv_freq = jnp.asarray(
            1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)), jnp.float32)
    elif config.rope_type == "dynamic":
        e, m, f = config.head_dim, config.max_position_embeddings, config.rope_factor
        n = (jnp.max(positions) + 1).astype(jnp.float32)
        base = jnp.float32(config.rope_theta) * (f * jnp.maximum(n, m) / m - (f - 1)) ** (e / (e - 2))
        grown = 1.0 / (base ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
        inv_freq = jnp.where(n > m, grown, jnp.asarray(rope_inv_freq(config)))  # [E/2]
    else:
        inv_freq = jnp.asarray(rope_inv_freq(config))  # [E/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B,T,E/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, E]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, T, N, E]`` by ``cos, sin [B, T, E]``: ``x cos + rotate_half(x) sin``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


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


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE.

    .. math::
        \\mathrm{softmax}_{fp32}\\big(q k^T / \\sqrt{E} + \\mathrm{mask}\\big) v

    Query head ``h`` reads kv head ``h // G`` (HF ``repeat_kv``).

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, deterministic: bool,
                 cache: dict | None = None, cache_index: Array | None = None):
        """Attends ``x [B, T, D]`` under ``mask`` bool [B, 1, 1, T, S]; returns [B, T, D].

        With ``cache`` (``{'k', 'v'}``, each [B, S, K, E] in the compute dtype, keys after RoPE) the new
        keys and values are written at slots ``[cache_index, cache_index + T)``, the queries attend to
        all S slots (``mask`` decides which count), and ``(out, new_cache)`` is returned.
        """
        c = self.config
        h, k, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        g = h // k
        dtype = jnp.dtype(c.compute_dtype)
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  use_bias=c.attention_bias)
        b, t, _ = x.shape
        q = Linear(h * e, ("embed", "heads"), name="q_proj", **kw)(x, deterministic)
        key = Linear(k * e, ("embed", "kv_heads"), name="k_proj", **kw)(x, deterministic)
        val = Linear(k * e, ("embed", "kv_heads"), name="v_proj", **kw)(x, deterministic)
        q = apply_rope(q.reshape(b, t, h, e), cos, sin)  # [B, T, H, E]
        key = apply_rope(key.reshape(b, t, k, e), cos, sin)  # [B, S, K, E]
        val = val.reshape(b, t, k, e)  # [B, S, K, E]
        if cache is not None:  # decode: the keys/values are the whole cache, this chunk written in
            key = jax.lax.dynamic_update_slice(
                cache["k"], key.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            val = jax.lax.dynamic_update_slice(
                cache["v"], val.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            cache = {"k": key, "v": val}
        # the 1/sqrt(E) scale goes on q ([B,T,H,E], S/E times fewer elements than the scores; exact when E is
        # a power of 4), as transformers' sdpa path folds it into the kernel
        q = q.reshape(b, t, k, g, e) * jnp.asarray(e**-0.5, dtype)  # [B, T, K, G, E]
        out = attention_core(q, key, val, mask, dtype).reshape(b, t, h * e)
        o_bias = c.attention_bias if c.o_proj_bias is None else c.o_proj_bias
        out = Linear(c.hidden_size, ("heads", "embed"), name="o_proj",
                     **{**kw, "use_bias": o_bias})(out, deterministic)
        return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``.

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        """Maps ``x [B, T, D]`` through ``[B, T, F]`` back to [B, T, D]."""
        c = self.config
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  use_bias=c.mlp_bias)
        gate = Linear(c.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x, deterministic)
        up = Linear(c.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x, deterministic)
        return Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(
            nn.silu(gate) * up, deterministic)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder block: ``x += attn(norm(x)); x += mlp(norm(x))``.

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, deterministic: bool,
                 cache: dict | None = None, cache_index: Array | None = None):
        """Applies one block to ``x [B, T, D]``; returns [B, T, D] in the compute dtype.

        With ``cache`` (this layer's ``{'k', 'v'}``, see ``LlamaAttention``) returns ``(x, new_cache)``.
        """
        kw = dict(config=self.config, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
        h = RMSNorm(self.config, name="input_layernorm")(x)
        attn = LlamaAttention(name="self_attn", **kw)(h, cos, sin, mask, deterministic, cache,
                                                      cache_index)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        h = RMSNorm(self.config, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(name="mlp", **kw)(h, deterministic)
        return x if cache is None else (x, cache)


def _layer_masks(config: ModelConfig, q_idx: Array, k_idx: Array, same: Array) -> dict:
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


def _constrain(x: Array) -> Array:
    """Hidden states [B, T, D] kept sharded over the batch (see ``easytune.sharding.activation_mesh``)."""
    from easytune import sharding
    return sharding.constrain(x, ("batch", "length", "act_embed"))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (HF ``LlamaModel``).

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.compute_dtype),
            param_dtype=jnp.dtype(c.dtype), embedding_init=_init(c, ("vocab", "embed")))
        layer_cls = LlamaDecoderLayer
        policy = REMAT_POLICIES[c.remat]
        if policy is not None:  # argnum 5 = deterministic (argnum 0 is the module); inside a scan the
            # loop boundary already keeps XLA from merging the recomputation into the forward pass
            layer_cls = nn.remat(LlamaDecoderLayer, static_argnums=(5,), policy=policy,
                                 prevent_cse=not c.scan_layers)
        if c.scan_layers:  # one module; nn.scan in __call__ gives its variables a leading [L] axis
            self.layers = layer_cls(c, self.lora_scale, self.lora_dropout)
        else:
            self.layers = [layer_cls(c, self.lora_scale, self.lora_dropout, name=f"layers_{i}")
                           for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c)

    def __call__(self, input_ids: Array, positions: Array, segment_ids: Array,
                 deterministic: bool, cache: dict | None = None, cache_index: Array | None = None):
        """Returns final hidden states [B, T, D] (compute dtype) for ``input_ids`` int [B, T].

        With ``cache`` (see ``init_cache``) returns ``(hidden, new_cache)``; see ``LlamaForCausalLM``.
        """
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        x = self.embed_tokens(input_ids).astype(dtype)  # [B, T, D]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, dtype, config=c)
        if cache is not None:
            return self._decode(x, cos, sin, segment_ids, deterministic, cache, cache_index)
        t = input_ids.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
        masks = _layer_masks(c, idx, idx, same)
        x = _constrain(x)
        if c.scan_layers:
            return self.norm(self._scan(x, cos, sin, masks, deterministic))
        for i, layer in enumerate(self.layers):
            x = _constrain(layer(x, cos, sin, masks[c.layer_window(i)], deterministic))
        return self.norm(x)

    def _scan(self, x, cos, sin, masks, deterministic):
        """The decoder stack as ``nn.scan`` over the stacked layer ``self.layers``.

        Every variable collection (``params``, ``lora``) is scanned over its leading [L] axis (logical axis
        "layers"); ``params`` and ``dropout`` rngs are split per layer. Layers with different windows (Qwen2
        ``layer_types``) share the loop: both masks are broadcast and a scanned per-layer flag selects one.
        """
        c = self.config
        windows = [c.layer_window(i) for i in range(c.num_hidden_layers)]
        keys = list(dict.fromkeys(windows))  # the distinct windows, first-use order
        stacked = tuple(masks[w] for w in keys)  # bool [B, 1, 1, T, S] each (a tuple: None is no dict key)
        which = jnp.asarray([keys.index(w) for w in windows], jnp.int32)  # [L] index into ``stacked``

        def body(layer, x, k, cos, sin, stacked):
            mask = stacked[0]
            for j in range(1, len(stacked)):
                mask = jnp.where(k == j, stacked[j], mask)
            return _constrain(layer(x, cos, sin, mask, deterministic)), None

        scan = nn.scan(body, variable_axes={True: 0}, split_rngs={True: True},
                       in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scan(self.layers, x, which, cos, sin, stacked)
        return x

    def _decode(self, x, cos, sin, segment_ids, deterministic, cache, cache_index):
        """The decoder stack over a KV cache: query slot ``cache_index + t`` sees slots ``s`` with
        ``s <= cache_index + t`` and the same segment id (the training mask, in cache-slot order), and in
        sliding-window layers only ``cache_index + t - s < W``. A row's tokens fill consecutive slots
        (left padding first), so slot distance is token distance, as HF's cache positions."""
        if self.config.scan_layers:
            raise ValueError("a scan_layers model does not decode with a KV cache: convert the params with "
                             "easytune.models.scan.unstack_layers and use scan_layers=False")
        t, s = x.shape[1], cache["segment_ids"].shape[1]
        key_segments = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))  # [B, S]
        slots = cache_index + jnp.arange(t, dtype=jnp.int32)  # [T]
        same = segment_ids[:, :, None] == key_segments[:, None, :]  # [B, T, S]
        masks = _layer_masks(self.config, slots, jnp.arange(s, dtype=jnp.int32), same)
        new_layers = []
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache["layers"])):
            x, layer_cache = layer(x, cos, sin, masks[self.config.layer_window(i)], deterministic,
                                   layer_cache, cache_index)
            new_layers.append(layer_cache)
        return self.norm(x), {"segment_ids": key_segments, "layers": new_layers}

    def attend(self, x: Array) -> Array:
        """Tied-embedding logits ``x [B, T, D] @ embedding.T`` -> float32 [B, T, V]."""
        emb = self.embed_tokens.embedding.astype(x.dtype)  # [V, D]
        return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)


class LlamaForCausalLM(nn.Module):
    """Llama causal language model returning float32 next-token logits.

    The attention mask is causal AND same-segment: token t attends to s <= t only when
    ``segment_ids[b, t] == segment_ids[b, s]``. Padding (segment 0) attends causally among padding, so
    its rows are finite (and meaningless).

    Attributes:
        config: model config.
        lora_scale: LoRA scale (alpha / r, or alpha / sqrt(r)); used only where a ``lora`` variable exists.
        lora_dropout: dropout rate on LoRA inputs (rng ``'dropout'``, only when not deterministic).

    Example:
        ``model.apply({'params': params}, ids)`` or
        ``model.apply({'params': params, 'lora': lora}, ids, deterministic=False, rngs={'dropout': key})``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, deterministic: bool = True,
                 cache: dict | None = None, cache_index: Array | None = None, return_hidden: bool = False):
        """Computes logits (or, with ``return_hidden``, the final hidden states the logits are made of).

        Args:
            input_ids: int32 [B, T] token ids.
            positions: int32 [B, T] RoPE positions (default ``arange(T)`` per row; restart per packed doc).
            segment_ids: int32 [B, T] document ids (default all ones; 0 marks padding).
            deterministic: disable LoRA dropout.
            cache: optional KV cache from ``init_cache`` (decoding). The T tokens occupy cache slots
                ``[cache_index, cache_index + T)``; each attends to earlier-or-equal slots holding the
                same segment id (so left padding with segment 0 is invisible to the prompt). Give
                ``positions`` explicitly: the default ``arange(T)`` is only right for the first chunk.
            cache_index: int32 scalar, first cache slot of this chunk (with ``cache`` only).
            return_hidden: return the final (normed) hidden states [B, T, D] in the compute dtype instead of
                the logits; ``lm_head`` (or the tied embedding) is not applied. Used by the chunked loss
                (``easytune.train.step.chunked_token_loss_sum``).

        Returns:
            float32 [B, T, V] logits (or [B, T, D] hidden states); with ``cache``, ``(logits, new_cache)``.
        """
        c = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        model = LlamaModel(c, self.lora_scale, self.lora_dropout, name="model")
        if cache is not None:
            if cache_index is None:
                raise ValueError("cache_index is required with cache")
            x, cache = model(input_ids, positions, segment_ids, deterministic, cache,
                             jnp.asarray(cache_index, jnp.int32))
        else:
            x = model(input_ids, positions, segment_ids, deterministic)
        if return_hidden:
            return x if cache is None else (x, cache)
        if c.tie_word_embeddings:
            logits = model.attend(x)
        else:
            logits = Linear(c.vocab_size, ("embed", "vocab"), use_bias=False, config=c,
                            lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                            float32_out=True, name="lm_head")(x, deterministic)
        return logits if cache is None else (logits, cache)


def init_cache(config: ModelConfig, batch: int, length: int) -> PyTree:
    """An empty KV cache for ``LlamaForCausalLM(..., cache=..., cache_index=...)``.

    Args:
        config: model config (layers, kv heads, head dim, compute dtype).
        batch: B.
        length: S, number of cache slots (prompt + generated tokens).

    Returns:
        ``{'segment_ids': int32 [B, S] zeros, 'layers': [{'k', 'v'}: [B, S, K, E] zeros] * layers}``;
        keys are stored after RoPE, K kv heads only (GQA).
    """
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    dtype = jnp.dtype(config.compute_dtype)
    return {"segment_ids": jnp.zeros((batch, length), jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(config.num_hidden_layers)]}


def _boxed_init(config: ModelConfig, rng: Array) -> PyTree:
    """``model.init`` on a [1, 1] dummy batch; returns the boxed ``params`` collection."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return LlamaForCausalLM(config).init(rng, ids)["params"]


def init_params(config: ModelConfig, rng: Array) -> PyTree:
    """Randomly initialized parameters as HF ``LlamaPreTrainedModel._init_weights``.

    Kernels and embeddings ~ Normal(0, initializer_range), biases 0, norm weights 1.

    Args:
        config: model config.
        rng: PRNG key.

    Returns:
        Plain nested dict (unboxed) mirroring HF names, arrays in ``config.dtype``.
    """
    return jax.jit(lambda r: nn.meta.unbox(_boxed_init(config, r)))(rng)


def param_logical_axes(config: ModelConfig) -> PyTree:
    """Logical axis names of every parameter, without allocating any.

    Args:
        config: model config.

    Returns:
        Nested dict with the structure of ``init_params(config, rng)`` whose leaves are tuples of logical
        axis names, e.g. ``('embed', 'heads')``. Tuples are pytree nodes in JAX: map over it with
        ``is_leaf=lambda x: isinstance(x, tuple)``.
    """
    boxed = jax.eval_shape(lambda r: _boxed_init(config, r), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: tuple(x.names) if is_box(x) else (None,) * len(x.shape),
                        boxed, is_leaf=is_box)
