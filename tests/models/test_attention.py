"""easytune.models.attention: the hand-written backward pass of ``attention_core`` against JAX autodiff of the
textbook masked softmax (``jax.nn.softmax``), float32 and bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.attention import attention_core


def _textbook_attention(q, key, val, mask):
    """softmax(q k^T masked at float32 min) v with jax.nn.softmax, differentiated by JAX (the reference)."""
    g = q.shape[3]
    key, val = jnp.repeat(key, g, axis=2), jnp.repeat(val, g, axis=2)  # HF repeat_kv: head h reads h // G
    b, t, k, _, e = q.shape
    qh = q.reshape(b, t, k * g, e)
    scores = jnp.einsum("bthe,bshe->bhts", qh, key)
    scores = jnp.where(mask[:, 0], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, axis=-1), val)
    return out.reshape(q.shape)


def test_attention_core_gradients_equal_autodiff_of_textbook_softmax():
    """attention_core's custom VJP vs JAX autodiff of the textbook formula: GQA (2 kv heads x 2), causal
    packed segments and an all-padding row (its output is the uniform average of v, its gradients are
    those of that average), and a decode shape (T=4 queries, S=12 slots) under a sliding window. float32
    within 1e-5; bfloat16 compute within 3e-2 of float32, finite."""
    b, t, k, g, e = 2, 12, 2, 2, 8
    rng = np.random.default_rng(0)
    q, key, val, cot = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                        for s in [(b, t, k, g, e), (b, t, k, e), (b, t, k, e), (b, t, k, g, e)])
    seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [0] * t])
    pos = np.arange(t)
    mask = jnp.asarray((pos[:, None] >= pos[None, :]) & (seg[:, :, None] == seg[:, None, :])
                       & (seg[:, :, None] > 0))[:, None, None]  # [B, 1, 1, T, S]
    assert not mask[1].any()

    def vjp(fn, *args):
        out, pull = jax.vjp(fn, *args)
        return (out,) + pull(cot.astype(out.dtype))

    want = jax.jit(lambda *a: vjp(lambda q, k_, v: _textbook_attention(q, k_, v, mask), *a))(q, key, val)
    got = jax.jit(lambda *a: vjp(lambda q, k_, v: attention_core(q, k_, v, mask, jnp.float32), *a))(q, key, val)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        assert x.shape == y.shape and x.dtype == jnp.float32, name
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_allclose(got[0][1], np.broadcast_to(val[1].mean(0)[:, None], (t, k, g, e)), atol=1e-6)
    # decode shape (4 new queries at slots 6..9 of a 12-slot cache) under a sliding window of 3
    window = jnp.asarray((pos[6:10, None] >= pos[None, :]) & (pos[6:10, None] - pos[None, :] < 3))
    mask_w = jnp.broadcast_to(window, (b, 1, 1, 4, t))
    q4 = q[:, 6:10]
    want_w = jax.vjp(lambda q, k_, v: _textbook_attention(q, k_, v, mask_w), q4, key, val)
    got_w = jax.vjp(lambda q, k_, v: attention_core(q, k_, v, mask_w, jnp.float32), q4, key, val)
    np.testing.assert_allclose(got_w[0], want_w[0], atol=1e-5, rtol=0)
    for x, y in zip(got_w[1](cot[:, :4]), want_w[1](cot[:, :4])):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, key, val)]
    low = jax.jit(lambda *a: vjp(lambda q, k_, v: attention_core(q, k_, v, mask, jnp.bfloat16), *a))(*bf16)
    for name, x, y in zip(["out", "dq", "dk", "dv"], low, want):
        assert x.dtype == jnp.bfloat16 and np.isfinite(np.asarray(x, np.float32)).all(), name
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=3e-2 * max(1.0, float(np.abs(y).max())),
                                   rtol=0, err_msg=name)
