"""Rotary position embeddings (RoPE) in HF's ``rotate_half`` layout, with the linear, dynamic NTK, Llama 3.1 and
LongRoPE (Phi-3) frequency scalings, partial rotary (only the first ``rotary_dim`` dims of each head) and Gemma 3's
separate default RoPE of the sliding-window layers.

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``), and ``N`` the heads of the rotated
tensor (H for queries, K for keys).

References:
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    transformers ``models/llama/modeling_llama.py`` (v5) ``LlamaRotaryEmbedding``, ``apply_rotary_pos_emb``;
    ``modeling_rope_utils.py`` (linear, dynamic NTK, llama3 and longrope RoPE scaling, ``dynamic_rope_update``);
    ``models/phi3/modeling_phi3.py`` ``Phi3RotaryEmbedding``, ``apply_rotary_pos_emb`` (partial rotary);
    ``models/gemma3/modeling_gemma3.py`` ``Gemma3RotaryEmbedding`` (per-layer-type ``rope_parameters``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.model_config import ModelConfig

Array = jax.Array


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``theta ** (-2i / dim)`` for ``i < dim / 2``, float32 [dim/2] (HF ``compute_default_rope_parameters``)."""
    return (1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _longrope_inv_freq(config: ModelConfig, long: bool) -> np.ndarray:
    """LongRoPE frequencies ``1 / (ext_i * theta ** (2i / R))``, float32 [R/2], ``ext`` the long or short factors."""
    r = config.rotary_dim
    ext = np.asarray(config.rope_long_factor if long else config.rope_short_factor, dtype=np.float32)
    shape = np.arange(0, r, 2, dtype=np.float32) / np.float32(r)
    return (1.0 / (ext * np.float32(config.rope_theta) ** shape)).astype(np.float32)


def _longrope_original_max(config: ModelConfig) -> int:
    """L0, the pretraining context of "longrope" (HF defaults it to ``max_position_embeddings``)."""
    return config.rope_original_max_position_embeddings or config.max_position_embeddings


def rope_attention_scaling(config: ModelConfig, local: bool = False) -> float:
    """The factor transformers multiplies cos and sin by (HF ``attention_scaling``); 1.0 except for "longrope".

    For "longrope": ``config.rope_attention_factor``, or when None ``sqrt(1 + ln(s) / ln(L0))`` with
    ``s = max_position_embeddings / L0`` (1.0 when ``s <= 1``), L0 = ``rope_original_max_position_embeddings``.

    Args:
        config: model config.
        local: the sliding-window layers of a model with ``rope_local_theta`` (default RoPE, always 1.0).

    Returns:
        A Python float.

    References:
        transformers ``modeling_rope_utils._compute_longrope_parameters``.
    """
    if config.rope_type != "longrope" or (local and config.rope_local_theta is not None):
        return 1.0
    if config.rope_attention_factor is not None:
        return float(config.rope_attention_factor)
    original = _longrope_original_max(config)
    factor = config.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_inv_freq(config: ModelConfig, local: bool = False) -> np.ndarray:
    """The static RoPE inverse frequencies ``omega`` (float32 [R/2], R = ``config.rotary_dim``) of ``config.rope_type``.

    .. math::
        \\omega_i = \\theta^{-2i/R};\\quad \\text{linear: } \\omega_i / f;\\quad
        \\text{llama3: } \\omega_i / f \\text{ if } \\lambda_i > L / l,\\ \\omega_i \\text{ if }
        \\lambda_i < L / h,\\ \\text{else } (1 - s)\\omega_i / f + s\\,\\omega_i,\\
        s = \\frac{L / \\lambda_i - l}{h - l};\\quad \\text{longrope: } \\omega_i / \\mathrm{short}_i

    with wavelength ``lambda_i = 2 pi / omega_i``, ``f`` the factor, ``L`` the original context length,
    ``l``/``h`` the low/high frequency factors. "dynamic" returns the unscaled frequencies and "longrope" the
    short-factor ones (HF's values at init; both change with the positions, see ``rope_cos_sin``). With
    ``local=True`` and ``config.rope_local_theta`` set: default RoPE of base ``rope_local_theta`` (Gemma 3's
    sliding-window layers). Computed in float32 as transformers does.

    Args:
        config: model config (head_dim, partial_rotary_factor, rope_theta, rope_* fields).
        local: frequencies of the sliding-window layers (only differs when ``config.rope_local_theta`` is set).

    Returns:
        float32 numpy array [R/2].

    References:
        transformers ``modeling_rope_utils``: ``_compute_linear_scaling_rope_parameters``,
        ``_compute_llama3_parameters`` (Llama 3.1, Meta's ``apply_scaling``), ``_compute_longrope_parameters``;
        ``Gemma3RotaryEmbedding`` (``rope_parameters["sliding_attention"]``).
    """
    e = config.rotary_dim
    if local and config.rope_local_theta is not None:
        return _default_inv_freq(config.rope_local_theta, e)
    if config.rope_type == "longrope":
        return _longrope_inv_freq(config, long=False)
    inv_freq = _default_inv_freq(config.rope_theta, e)
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
                 config: ModelConfig | None = None, local: bool = False) -> tuple[Array, Array]:
    """Cosine and sine tables of rotary embeddings in HF's ``rotate_half`` layout.

    .. math::
        \\omega_i = \\theta^{-2i/R},\\quad \\mathrm{cos}[b,t] = a \\cos(p_{bt}[\\omega, \\omega])

    Without ``config``: default RoPE of base ``theta`` over ``R = head_dim``, ``a = 1``. With ``config``:
    ``R = config.rotary_dim`` (``head_dim`` and ``theta`` are ignored) and the frequencies follow
    ``config.rope_type`` (``rope_inv_freq``); ``n = max(positions) + 1`` over the whole call decides the
    position-dependent variants (traced, no host sync):

    - "dynamic" (NTK), ``M = max_position_embeddings``: when ``n > M`` the base becomes
      ``theta * (f n / M - (f - 1)) ** (R / (R - 2))``, else it stays theta. This is transformers'
      ``dynamic_rope_update`` on a fresh model and during ``generate`` (positions only grow), where each
      call's keys are rotated with that call's frequencies and cached as such.
    - "longrope" (Phi-3): the long factors when ``n > rope_original_max_position_embeddings``, else the short
      ones (HF ``longrope_frequency_update``, which picks per call likewise); ``a = rope_attention_scaling``.

    With ``local=True`` and ``config.rope_local_theta`` set (Gemma 3's sliding-window layers): default,
    unscaled RoPE of base ``rope_local_theta``, ``a = 1``; otherwise ``local`` changes nothing.

    Args:
        positions: int [B, T] token positions.
        head_dim: E (even), the table width when ``config`` is None.
        theta: RoPE base (used when ``config`` is None).
        dtype: output dtype (HF casts the tables to the activation dtype).
        config: optional model config selecting the RoPE variant.
        local: tables of a sliding-window layer (HF ``layer_type="sliding_attention"``).

    Returns:
        ``(cos, sin)``, each [B, T, R] in ``dtype`` (R = E without ``config``, else ``config.rotary_dim``).

    References:
        transformers ``LlamaRotaryEmbedding.forward``, ``Phi3RotaryEmbedding.forward``,
        ``Gemma3RotaryEmbedding.forward``, ``compute_default_rope_parameters``,
        ``_compute_dynamic_ntk_parameters``, ``_compute_longrope_parameters`` and ``dynamic_rope_update``.
    """
    scaling = 1.0
    if config is None:
        inv_freq = jnp.asarray(
            1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)), jnp.float32)
    elif local and config.rope_local_theta is not None:
        inv_freq = jnp.asarray(rope_inv_freq(config, local=True))  # [R/2]
    elif config.rope_type == "dynamic":
        e, m, f = config.rotary_dim, config.max_position_embeddings, config.rope_factor
        n = (jnp.max(positions) + 1).astype(jnp.float32)
        base = jnp.float32(config.rope_theta) * (f * jnp.maximum(n, m) / m - (f - 1)) ** (e / (e - 2))
        grown = 1.0 / (base ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
        inv_freq = jnp.where(n > m, grown, jnp.asarray(rope_inv_freq(config)))  # [R/2]
    elif config.rope_type == "longrope":
        n = jnp.max(positions) + 1
        inv_freq = jnp.where(n > _longrope_original_max(config), jnp.asarray(_longrope_inv_freq(config, long=True)),
                             jnp.asarray(_longrope_inv_freq(config, long=False)))  # [R/2]
        scaling = rope_attention_scaling(config)
    else:
        inv_freq = jnp.asarray(rope_inv_freq(config))  # [R/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [B,T,R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, R]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if scaling != 1.0:
        cos, sin = cos * jnp.float32(scaling), sin * jnp.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x [B, T, N, E]`` by ``cos, sin [B, T, R]``: ``x cos + rotate_half(x) sin`` on the first R dims.

    With ``R < E`` (partial rotary, Phi-3 ``partial_rotary_factor``) only ``x[..., :R]`` is rotated and
    ``x[..., R:]`` passes through unchanged; ``R == E`` is the whole head. Output [B, T, N, E] in x's dtype
    (given cos/sin of that dtype).

    References:
        transformers ``models/phi3/modeling_phi3.py`` ``apply_rotary_pos_emb``, ``rotate_half``.
    """
    r = cos.shape[-1]
    if r != x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :r], cos, sin), x[..., r:]], axis=-1)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
