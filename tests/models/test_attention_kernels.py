"""easytune.models.attention_kernels against ``attention_core`` on ``MaskSpec.dense()`` (the reference): the
Pallas splash-attention kernel in interpret mode and ``jax.nn.dot_product_attention`` on its XLA path (the
cuDNN wrapper's code with another backend), forward and gradients, float32 within 1e-5: causal, packed
segments with padding, a sliding window chosen by a traced ``spec.window``, GQA and MQA.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune.models.attention import attention_core, mask_spec
from easytune.models.attention_kernels import (
    cudnn_attention,
    cudnn_supported,
    splash_attention,
    splash_supported,
)

WINDOWS = (None, 40)  # a config mixing full-causal and sliding-window layers


def _inputs(b, t, k, g, e, seed=0):
    rng = np.random.default_rng(seed)
    q, key, val, cot = (jnp.asarray(rng.standard_normal(s), jnp.float32)
                        for s in [(b, t, k, g, e), (b, t, k, e), (b, t, k, e), (b, t, k, g, e)])
    return q / np.sqrt(e), key, val, cot


def _specs(b, t):
    """Row 0 packs two documents and padding (segment 0), row 1 is one document; windows None and 40."""
    n = t * 2 // 5
    seg = np.array([[1] * n + [2] * n + [0] * (t - 2 * n), [3] * t])[:b]
    pos = np.arange(t)
    return [mask_spec(pos, pos, seg, seg, w) for w in WINDOWS]


def _vjp_all(fn, specs, q, key, val, cot):
    """(out, dq, dk, dv) of ``fn(q, key, val, spec)`` for every spec: one jit, compiled once, the spec (so its
    window) traced."""
    @jax.jit
    def one(spec, q, key, val, cot):
        out, pull = jax.vjp(lambda *a: fn(*a, spec), q, key, val)
        return (out,) + pull(cot)
    return [one(s, q, key, val, cot) for s in specs]


def _reference(specs, *args):
    return _vjp_all(lambda q, k_, v, spec: attention_core(q, k_, v, spec.dense(), jnp.float32), specs, *args)


def _assert_close(got, want, atol=1e-5):
    for w, (g_case, w_case) in zip(WINDOWS, zip(got, want)):
        for name, x, y in zip(["out", "dq", "dk", "dv"], g_case, w_case):
            assert x.shape == y.shape and x.dtype == jnp.float32, (w, name)
            np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=f"window {w}: {name}")


def test_splash_attention_equals_attention_core_gqa_segments_window():
    """Splash (interpret mode, T=S=256 in two 128-token blocks, head dim 16 zero-padded to 128) vs
    attention_core: 4 query heads over 2 kv heads, packed segments + padding, full causal and window 40."""
    b, t, k, g, e = 2, 256, 2, 2, 16
    args = _inputs(b, t, k, g, e)
    specs = _specs(b, t)
    got = _vjp_all(lambda q, k_, v, spec: splash_attention(q, k_, v, spec, jnp.float32, WINDOWS, interpret=True,
                                                           block=128), specs, *args)
    _assert_close(got, _reference(specs, *args))


@pytest.mark.slow
def test_splash_attention_mqa_one_block():
    """Splash's MQA kernel (one kv head, 2 query heads), T=128 in a single block (block 512 shrinks to 128)."""
    b, t, k, g, e = 1, 128, 1, 2, 128
    args = _inputs(b, t, k, g, e, seed=1)
    specs = _specs(b, t)
    got = _vjp_all(lambda q, k_, v, spec: splash_attention(q, k_, v, spec, jnp.float32, WINDOWS, interpret=True),
                   specs, *args)
    _assert_close(got, _reference(specs, *args))


def test_cudnn_wrapper_on_xla_equals_attention_core():
    """cudnn_attention with implementation="xla" vs attention_core: GQA 2x2, segments, window 40, T=S=96."""
    b, t, k, g, e = 2, 96, 2, 2, 8
    args = _inputs(b, t, k, g, e, seed=2)
    specs = _specs(b, t)
    got = _vjp_all(lambda q, k_, v, spec: cudnn_attention(q, k_, v, spec, jnp.float32, WINDOWS,
                                                          implementation="xla"), specs, *args)
    _assert_close(got, _reference(specs, *args))


def test_local_window_size_convention_matches_mask_spec():
    """jax.nn.dot_product_attention's ``local_window_size=(W - 1, 0)`` + ``is_causal`` sees exactly MaskSpec's
    ``0 <= t - s < W``: with q = 0 the weights are uniform over the visible keys, and one-hot values read
    them out."""
    t, w = 12, 4
    val = jnp.eye(t, dtype=jnp.float32)[None, :, None, :]  # [1, S, 1, E=S]
    q = jnp.zeros((1, t, 1, t), jnp.float32)
    out = jax.jit(lambda q, v: jax.nn.dot_product_attention(q, v, v, is_causal=True, local_window_size=(w - 1, 0),
                                                            implementation="xla"))(q, val)
    pos = np.arange(t)
    want = mask_spec(pos, pos, np.ones((1, t)), np.ones((1, t)), w).dense()[0, 0, 0]
    np.testing.assert_array_equal(np.asarray(out[0, :, 0] > 0), np.asarray(want))


def test_supported_checks():
    """The fallback checks: splash needs T == S, multiples of 128 (and TPU unless interpreting); cuDNN needs a
    GPU and float16/bfloat16."""
    assert splash_supported(256, 256, 64, interpret=True)
    assert splash_supported(384, 384, 128, block=512, interpret=True)  # 384 = 3 x 128 blocks
    assert not splash_supported(200, 200, 64, interpret=True)
    assert not splash_supported(256, 512, 64, interpret=True)  # decode / cross shapes
    assert splash_supported(256, 256, 64) == (jax.default_backend() == "tpu")
    assert not cudnn_supported(jnp.float32, backend="gpu")
    assert cudnn_supported(jnp.bfloat16, 2048, 2048, 128, backend="gpu")
    assert not cudnn_supported(jnp.bfloat16, 2048, 2048, 100, backend="gpu")
    assert not cudnn_supported(jnp.bfloat16, backend="cpu")
    assert cudnn_supported(jnp.bfloat16) == (jax.default_backend() == "gpu")


@pytest.mark.parametrize("impl", ["cudnn", pytest.param("splash", marks=pytest.mark.slow)])
def test_kernels_in_the_model_match_transformers(tmp_path, monkeypatch, impl):
    """The whole model with ``model.attention`` = impl (run off-accelerator: splash in Pallas interpret mode,
    the cuDNN wrapper on jax.nn's XLA path) against transformers' eager Qwen2 with one full and one sliding
    layer (window 8): logits within test_families.TOL and every parameter gradient of the mean loss within 1e-5
    of the tensor's largest, on a 256-token row (the kernels' block multiple)."""
    import dataclasses
    import functools

    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from easytune.models import attend as attend_lib
    from easytune.models import attention_kernels as kernels
    from easytune.models.hf_weights import load_hf_model
    from tests.models import test_families, test_llama

    monkeypatch.setattr(kernels, "splash_attention", functools.partial(kernels.splash_attention, interpret=True))
    monkeypatch.setattr(kernels, "cudnn_attention", functools.partial(kernels.cudnn_attention,
                                                                      implementation="xla"))
    resolve = attend_lib.resolve  # the [1, 1] init batch keeps the CPU choice
    monkeypatch.setattr(attend_lib, "resolve",
                        lambda c, t, s, *a, **kw: impl if t == 256 else resolve(
                            dataclasses.replace(c, attention="auto"), t, s, *a, **kw))
    model = test_families.hf_model(tmp_path, "qwen2_sliding")
    config, params = load_hf_model(tmp_path)
    config = dataclasses.replace(config, attention=impl)
    ids = test_families.random_ids((1, 257))
    np.testing.assert_allclose(test_families.et_logits(config, params, ids[:, :-1]),
                               test_families.hf_logits(model, ids[:, :-1]), atol=test_families.TOL, rtol=0)
    test_llama.assert_gradients_match(model, config, params, ids)
