"""easytune.models.rope for the new families against transformers' own rotary modules (fp32, atol 1e-6).

- "longrope" (Phi-3 ``Phi3RotaryEmbedding``): short factors while a call's longest position + 1 stays within
  ``original_max_position_embeddings`` (16 here), long ones beyond it, cos/sin times the attention factor;
  also with ``partial_rotary_factor`` 0.5 (Phi-4-mini style) and under ``jax.jit``.
- partial rotary ``apply_rope`` against Phi-3's ``apply_rotary_pos_emb``.
- Gemma 3 (``Gemma3RotaryEmbedding``): sliding layers' default RoPE of ``rope_local_theta`` vs the full layers'
  linear scaling (factor 8).

ModelConfig objects are built directly (not through ``hf_config``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.models.model_config import ModelConfig  # noqa: E402
from easytune.models.rope import apply_rope, rope_attention_scaling, rope_cos_sin, rope_inv_freq  # noqa: E402

ATOL = 1e-6
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # head_dim 16
ORIGINAL, MAXPOS = 16, 64


def _factors(n: int, start: float, stop: float) -> list[float]:
    return [float(v) for v in np.linspace(start, stop, n)]


def _phi3(partial: float = 1.0, attention_factor: float | None = None):
    """(HF Phi3RotaryEmbedding, easytune ModelConfig) of a tiny longrope Phi-3."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
    rd = int(16 * partial)
    short, long = _factors(rd // 2, 1.0, 1.7), _factors(rd // 2, 1.5, 9.0)
    scaling = {"rope_type": "longrope", "short_factor": short, "long_factor": long}
    if attention_factor is not None:
        scaling["attention_factor"] = attention_factor
    hf = transformers.Phi3Config(**SIZES, max_position_embeddings=MAXPOS, original_max_position_embeddings=ORIGINAL,
                                 partial_rotary_factor=partial, rope_scaling=scaling, pad_token_id=0,
                                 eos_token_id=2)
    config = ModelConfig(**SIZES, max_position_embeddings=MAXPOS, model_type="phi3", rope_type="longrope",
                         rope_short_factor=tuple(short), rope_long_factor=tuple(long),
                         rope_original_max_position_embeddings=ORIGINAL, partial_rotary_factor=partial,
                         rope_attention_factor=attention_factor)
    return Phi3RotaryEmbedding(hf), config


def _hf_tables(module, positions: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = module(x, torch.as_tensor(positions, dtype=torch.long), **kwargs)
    return cos.numpy(), sin.numpy()


def _check(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=ATOL)


# positions per call: the longest + 1 within (short) and beyond (long) ORIGINAL, with the boundary both sides
SHORT_CALLS = [np.arange(ORIGINAL)[None], np.array([[3, 9, 15], [0, 1, 2]])]
LONG_CALLS = [np.arange(ORIGINAL + 1)[None], np.arange(40, 100).reshape(2, 30), np.array([[0, 1, 2], [5, 6, 16]])]


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_longrope_tables_match_phi3(partial):
    """Short factors up to the original length, long ones beyond (the whole call switches), attention factor."""
    hf, config = _phi3(partial)
    assert config.rotary_dim == int(16 * partial)
    scaling = rope_attention_scaling(config)
    assert scaling == pytest.approx(hf.attention_scaling) and scaling == pytest.approx(np.sqrt(1.5))
    np.testing.assert_allclose(rope_inv_freq(config), hf.original_inv_freq.numpy(), rtol=1e-6, atol=0)
    for positions in SHORT_CALLS + LONG_CALLS + SHORT_CALLS:  # HF's module keeps no state between calls
        got = rope_cos_sin(jnp.asarray(positions), config.head_dim, config.rope_theta, jnp.float32, config=config)
        _check(got, _hf_tables(hf, positions))
    # the two regimes differ (so the comparison above saw both)
    p = jnp.asarray(LONG_CALLS[0])
    short_cos = rope_cos_sin(p[:, :ORIGINAL], 16, 1e4, jnp.float32, config=config)[0]
    long_cos = rope_cos_sin(p, 16, 1e4, jnp.float32, config=config)[0][:, :ORIGINAL]
    assert not np.allclose(short_cos, long_cos, atol=1e-3)


def test_longrope_traced_and_explicit_attention_factor():
    """Under jit the long/short choice follows the traced positions; an explicit attention_factor is used as is."""
    hf, config = _phi3(0.5, attention_factor=1.25)
    assert rope_attention_scaling(config) == 1.25 == hf.attention_scaling
    tables = jax.jit(lambda p: rope_cos_sin(p, config.head_dim, config.rope_theta, jnp.float32, config=config))
    for positions in (np.array([[0, 5, 15]]), np.array([[0, 5, 16]]), np.array([[60, 61, 62]])):
        _check(tables(jnp.asarray(positions)), _hf_tables(hf, positions))


def test_longrope_attention_factor_is_one_without_extension():
    """max_position_embeddings <= original: HF's attention factor is 1."""
    config = ModelConfig(**SIZES, max_position_embeddings=ORIGINAL, rope_type="longrope",
                         rope_short_factor=(1.0,) * 8, rope_long_factor=(2.0,) * 8,
                         rope_original_max_position_embeddings=ORIGINAL)
    assert rope_attention_scaling(config) == 1.0


def test_partial_rotary_apply_rope_matches_phi3():
    """Only the first rotary_dim dims rotate, the rest pass through (HF phi3 apply_rotary_pos_emb)."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb
    hf, config = _phi3(0.5)
    positions = np.arange(40, 60).reshape(2, 10)
    cos, sin = rope_cos_sin(jnp.asarray(positions), 16, 1e4, jnp.float32, config=config)  # [B, T, 8]
    assert cos.shape == (2, 10, 8)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 10, 4, 16), dtype=np.float32)  # [B, T, H, E]
    k = rng.standard_normal((2, 10, 2, 16), dtype=np.float32)  # [B, T, K, E]
    hf_cos, hf_sin = _hf_tables(hf, positions)
    want_q, want_k = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(hf_cos),
                                          torch.from_numpy(hf_sin), unsqueeze_dim=2)
    got_q, got_k = apply_rope(jnp.asarray(q), cos, sin), apply_rope(jnp.asarray(k), cos, sin)
    _check((got_q, got_k), (want_q.numpy(), want_k.numpy()))
    np.testing.assert_array_equal(np.asarray(got_q)[..., 8:], q[..., 8:])


def test_full_width_apply_rope_is_the_plain_rotation():
    """rotary_dim == E: exactly ``x cos + rotate_half(x) sin`` (no split, bit for bit)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 8), dtype=np.float32))
    cos, sin = rope_cos_sin(jnp.arange(10).reshape(2, 5), 8, 1e4, jnp.float32)
    rotated = jnp.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    want = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    np.testing.assert_array_equal(np.asarray(apply_rope(x, cos, sin)), np.asarray(want))


def _gemma3():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    hf = transformers.Gemma3TextConfig(**SIZES, head_dim=16, max_position_embeddings=MAXPOS, rope_parameters=rope,
                                       layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    config = ModelConfig(**SIZES, head_dim=16, max_position_embeddings=MAXPOS, model_type="gemma3_text",
                         rope_type="linear", rope_factor=8.0, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                         layer_types=("sliding_attention", "full_attention"), sliding_window=8)
    return Gemma3RotaryEmbedding(hf), config


def test_gemma3_local_and_global_tables_match():
    """local=True: default RoPE of rope_local_theta; local=False: the global linear (factor 8) tables."""
    hf, config = _gemma3()
    np.testing.assert_allclose(rope_inv_freq(config, local=True), hf.sliding_attention_inv_freq.numpy(),
                               rtol=1e-6, atol=0)
    np.testing.assert_allclose(rope_inv_freq(config), hf.full_attention_inv_freq.numpy(), rtol=1e-6, atol=0)
    positions = np.arange(0, 120, 3).reshape(2, 20)
    p = jnp.asarray(positions)
    local = rope_cos_sin(p, 16, config.rope_theta, jnp.float32, config=config, local=True)
    full = rope_cos_sin(p, 16, config.rope_theta, jnp.float32, config=config)
    _check(local, _hf_tables(hf, positions, layer_type="sliding_attention"))
    _check(full, _hf_tables(hf, positions, layer_type="full_attention"))
    assert not np.allclose(local[0], full[0], atol=1e-3)


def test_local_without_local_theta_is_the_global_rope():
    """local=True changes nothing when rope_local_theta is None (Gemma 2, Mistral...)."""
    config = ModelConfig(**SIZES, rope_type="linear", rope_factor=4.0)
    p = jnp.arange(24).reshape(2, 12)
    np.testing.assert_array_equal(rope_inv_freq(config, local=True), rope_inv_freq(config))
    for a, b in zip(rope_cos_sin(p, 16, 1e4, jnp.float32, config=config, local=True),
                    rope_cos_sin(p, 16, 1e4, jnp.float32, config=config)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
