"""Rotary position embeddings (RoPE) in HF's ``rotate_half`` layout, with the linear, dynamic NTK and
Llama 3.1 frequency scalings.

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``), and ``N`` the heads of the rotated
tensor (H for queries, K for keys).

References:
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    transformers ``models/llama/modeling_llama.py`` (v5) ``LlamaRotaryEmbedding``, ``apply_rotary_pos_emb``;
    ``modeling_rope_utils.py`` (linear, dynamic NTK and llama3 RoPE scaling).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.model_config import ModelConfig

Array = jax.Array


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
