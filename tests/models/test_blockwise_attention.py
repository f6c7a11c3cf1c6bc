"""easytune.models.attention.blockwise_attention and the ``model.attention`` choice (easytune.models.attend).

References: ``attention_core`` with ``MaskSpec.dense()`` (itself tested against JAX autodiff of the textbook
softmax in test_attention.py) for the function; transformers' eager models (Llama, Mistral's sliding window,
Qwen2's mixed full / sliding layers) for whole-model logits and gradients with the blockwise implementation
and blocks much shorter than the sequence (so padding, skipped block pairs and several blocks are exercised).
Memory: XLA's compiled temp bytes of the attention backward grow linearly in length for ``blockwise`` and
quadratically for ``xla`` (a measurement of the compiled program, not of wall time).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune.models import attend as attend_lib
from easytune.models.attention import attention_core, blockwise_attention, mask_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.models.hf_weights import load_hf_model  # noqa: E402
from tests.models import test_families, test_llama  # noqa: E402


def _operands(b, t, s, k, g, e, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, k, g, e), (b, s, k, e), (b, s, k, e), (b, t, k, g, e)]
    return [jnp.asarray(rng.standard_normal(x), jnp.float32).astype(dtype) for x in shapes]


def _vjp(fn, cot, *args):
    out, pull = jax.vjp(fn, *args)
    return (out,) + pull(cot.astype(out.dtype))


@pytest.mark.parametrize("window,block,softcap", [(None, 8, None), (7, 8, None), (None, 64, None),
                                                 (7, 64, None), (7, 8, 2.0)])
def test_blockwise_equals_attention_core(window, block, softcap):
    """Output and dq, dk, dv within 1e-5 of attention_core's (float32): GQA 2 kv heads x 2, two packed
    documents and padding in one row, one document in the other, T = 40 not a multiple of the block; with
    Gemma 2's logit soft-cap too."""
    b, t, k, g, e = 2, 40, 2, 2, 8
    q, key, val, cot = _operands(b, t, t, k, g, e)
    seg = np.array([[1] * 15 + [2] * 20 + [0] * 5, [3] * t])
    spec = mask_spec(np.arange(t), np.arange(t), seg, seg, window)
    want = jax.jit(lambda *a: _vjp(lambda q, k_, v: attention_core(q, k_, v, spec.dense(), jnp.float32, softcap),
                                   cot, *a))(q, key, val)
    got = jax.jit(lambda *a: _vjp(lambda q, k_, v: blockwise_attention(q, k_, v, spec, jnp.float32, block,
                                                                       softcap), cot, *a))(q, key, val)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        assert x.shape == y.shape and x.dtype == jnp.float32, name
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)


def test_blockwise_decode_shape_and_bfloat16():
    """A decode shape (5 queries at cache slots 20..24 of 33 slots, sliding window 6, left padding in segment
    0 of one row) equals attention_core; bfloat16 compute stays within 3e-2 of the float32 result."""
    b, t, s, k, g, e = 2, 5, 33, 2, 3, 16
    q, key, val, cot = _operands(b, t, s, k, g, e, seed=1)
    k_seg = np.array([[0] * 4 + [1] * 29, [1] * s])
    spec = mask_spec(20 + np.arange(t), np.arange(s), np.ones((b, t)), k_seg, 6)
    want = _vjp(lambda q, k_, v: attention_core(q, k_, v, spec.dense(), jnp.float32), cot, q, key, val)
    got = _vjp(lambda q, k_, v: blockwise_attention(q, k_, v, spec, jnp.float32, 8), cot, q, key, val)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
    low = [x.astype(jnp.bfloat16) for x in (q, key, val)]
    got16 = _vjp(lambda q, k_, v: blockwise_attention(q, k_, v, spec, jnp.bfloat16, 8), cot, *low)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got16, want):
        assert x.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=3e-2 * max(1.0, float(np.abs(y).max())),
                                   rtol=0, err_msg=name)


def _temp_bytes(fn, t):
    """Compiled temp bytes of the attention's backward at length t (B=1, 4 kv heads x 2, head dim 16)."""
    q, key, val, cot = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _operands(1, 8, 8, 4, 2, 16))
    q, cot = (jax.ShapeDtypeStruct((1, t, 4, 2, 16), jnp.float32) for _ in range(2))
    key = val = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
    seg = np.ones((1, t), np.int32)
    grad = jax.jit(lambda q, k_, v, c: jax.vjp(lambda *a: fn(*a, mask_spec(np.arange(t), np.arange(t), seg, seg,
                                                                           None)), q, k_, v)[1](c))
    return grad.lower(q, key, val, cot).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
    """Temp bytes at 4096 tokens over those at 1024: at most 4.5x for blockwise (linear: ~4x), at least 10x for
    the unblocked attention_core (its [T, S] probabilities: ~16x)."""
    block = lambda q, k_, v, spec: blockwise_attention(q, k_, v, spec, jnp.float32, 256)
    core = lambda q, k_, v, spec: attention_core(q, k_, v, spec.dense(), jnp.float32)
    b1, b4 = _temp_bytes(block, 1024), _temp_bytes(block, 4096)
    c1, c4 = _temp_bytes(core, 1024), _temp_bytes(core, 4096)
    assert b4 <= 4.5 * b1, (b1, b4)
    assert c4 >= 10 * c1, (c1, c4)
    assert b4 < c4 / 10


@pytest.mark.parametrize("case", ["mha_untied", "gqa_theta", "head_dim"])
def test_blockwise_logits_match_transformers(tmp_path, case):
    """Whole-model logits with attention="blockwise" in blocks of 16 tokens (40-token rows: three blocks, the
    last padded) within test_llama's TOL of transformers' eager model."""
    model = test_llama.hf_model(tmp_path, **test_llama.CASES[case])
    config, params = load_hf_model(tmp_path)
    config = dataclasses.replace(config, attention="blockwise", attention_block=16)
    ids = test_llama.random_ids((2, 40))
    np.testing.assert_allclose(test_llama.et_logits(config, params, ids), test_llama.hf_logits(model, ids),
                               atol=test_llama.TOL, rtol=0)


def test_blockwise_packed_segments_and_gradients_match_transformers(tmp_path):
    """Packed documents under blockwise attention equal transformers on each document alone, and every
    parameter gradient of the mean loss equals torch autograd (1e-5 of the tensor's largest gradient)."""
    model = test_llama.hf_model(tmp_path, num_key_value_heads=2)
    config, params = load_hf_model(tmp_path)
    config = dataclasses.replace(config, attention="blockwise", attention_block=16)
    doc1, doc2 = test_llama.random_ids((1, 19), seed=1), test_llama.random_ids((1, 17), seed=2)
    ids = np.concatenate([doc1, doc2, np.zeros((1, 4), np.int32)], axis=1)
    segment_ids = np.array([[1] * 19 + [2] * 17 + [0] * 4], np.int32)
    positions = np.array([list(range(19)) + list(range(17)) + [0] * 4], np.int32)
    got = test_llama.et_logits(config, params, ids, positions=jnp.asarray(positions),
                               segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(got[:, :19], test_llama.hf_logits(model, doc1), atol=test_llama.TOL, rtol=0)
    np.testing.assert_allclose(got[:, 19:36], test_llama.hf_logits(model, doc2), atol=test_llama.TOL, rtol=0)

    test_llama.assert_gradients_match(model, config, params, test_llama.random_ids((2, 41)))


def test_attention_core_softcap_equals_autodiff_of_the_textbook():
    """attention_core's hand-written backward through ``c * tanh(s / c)`` equals JAX autodiff of the plain
    formula (Gemma 2's ``eager_attention_forward``: scores soft-capped, then masked, then softmax)."""
    b, t, k, g, e = 1, 12, 2, 2, 8
    q, key, val, cot = _operands(b, t, t, k, g, e, seed=3)
    spec = mask_spec(np.arange(t), np.arange(t), np.ones((b, t)), np.ones((b, t)), None)
    mask = spec.dense()

    def textbook(q, key, val):
        s = jnp.einsum("btkge,bske->bkgts", q, key)
        s = jnp.where(mask, 2.0 * jnp.tanh(s / 2.0), -jnp.inf)
        return jnp.einsum("bkgts,bske->btkge", jax.nn.softmax(s, axis=-1), val)

    want = _vjp(textbook, cot, q, key, val)
    got = _vjp(lambda *a: attention_core(*a, mask, jnp.float32, 2.0), cot, q, key, val)
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(np.asarray(got[0]) - np.asarray(attention_core(q, key, val, mask, jnp.float32))).max() > 1e-2


@pytest.mark.parametrize("family", ["mistral", "qwen2_sliding", "gemma2", "gemma3", "mixtral"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_blockwise_sliding_windows_match_transformers(tmp_path, family, scan_layers):
    """Mistral (every layer slides, window 8), Qwen2 (one full, one sliding layer), Gemma 2 (soft-capped
    scores), Gemma 3 (the sliding layer's own RoPE table, a scanned per-layer choice) and Mixtral (routed
    experts inside the scan) with blockwise attention in blocks of 16, unrolled and as one ``nn.scan`` (the
    window is a scanned per-layer int32), equal transformers' logits on 40-token rows."""
    from easytune.models import scan as scan_lib
    model = test_families.hf_model(tmp_path, family)
    config, params = load_hf_model(tmp_path)
    config = dataclasses.replace(config, attention="blockwise", attention_block=16)
    if scan_layers:
        params = scan_lib.stack_layers(params, config.num_hidden_layers)
        config = dataclasses.replace(config, scan_layers=True)
    ids = test_families.random_ids((2, 40))
    np.testing.assert_allclose(test_families.et_logits(config, params, ids), test_families.hf_logits(model, ids),
                               atol=test_families.TOL, rtol=0)


def test_resolve_picks_by_length_backend_and_names_what_cannot_run():
    """On CPU "auto" is the unblocked attention up to one block of queries and blockwise beyond (decoding
    too); "splash" and "cudnn" named explicitly raise a ValueError naming the backend."""
    from easytune.models.model_config import ModelConfig
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_block=512)
    assert attend_lib.resolve(cfg, 512, 512, jnp.float32) == "xla"
    assert attend_lib.resolve(cfg, 513, 513, jnp.float32) == "blockwise"
    assert attend_lib.resolve(cfg, 1, 4096, jnp.float32, decode=True) == "xla"
    for name in ("splash", "cudnn"):
        c = dataclasses.replace(cfg, attention=name)
        for decode in (False, True):
            with pytest.raises(ValueError, match=f"model.attention='{name}' needs a .*backend cpu"):
                attend_lib.resolve(c, 1024, 1024, jnp.bfloat16, decode=decode)
    assert attend_lib.resolve(cfg, 1024, 4096, jnp.float32, decode=True) == "blockwise"
    assert attend_lib.resolve(dataclasses.replace(cfg, attention="xla"), 8192, 8192, jnp.float32) == "xla"
    with pytest.raises(ValueError, match="unknown attention"):
        dataclasses.replace(cfg, attention="flash")


def test_blockwise_on_a_mesh_equals_one_device():
    """On a data 2 x fsdp 2 x tensor 2 mesh of CPU devices (under ``activation_mesh``) blockwise attention runs per
    shard (``shard_map`` over rows and kv heads) and its output and gradients equal the one-device result."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from easytune import sharding
    from easytune.models.model_config import ModelConfig
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    cfg = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention="blockwise", attention_block=16)
    b, t, k, g, e = 4, 40, 2, 2, 16
    q, key, val, cot = _operands(b, t, t, k, g, e, seed=3)
    seg = np.array([[1] * 15 + [2] * 25, [1] * t, [1] * 30 + [0] * 10, [5] * 20 + [6] * 20])
    spec = mask_spec(np.arange(t), np.arange(t), seg, seg, None)
    fn = lambda q, k_, v: attend_lib.attend(q, k_, v, spec, jnp.float32, cfg)
    want = jax.jit(lambda *a: _vjp(fn, cot, *a))(q, key, val)

    def on_mesh(*a):
        with sharding.activation_mesh(mesh):
            return _vjp(fn, cot, *a)

    put = lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
    got = jax.jit(on_mesh)(*(put(x) for x in (q, key, val)))
    text = jax.jit(on_mesh).lower(q, key, val).as_text()
    assert "manual_computation" in text  # the blocked loops run inside shard_map, per device
    for name, x, y in zip(["out", "dq", "dk", "dv"], got, want):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
