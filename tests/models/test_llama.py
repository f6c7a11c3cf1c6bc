"""easytune.models.llama against transformers' LlamaForCausalLM (eager attention, CPU, float32).

Reference: a tiny random ``transformers.LlamaForCausalLM`` saved with ``save_pretrained`` and loaded
with ``easytune.models.hf_weights.load_hf_model``. Tolerances: 1e-4 max abs on float32 logits (whole model).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.models.hf_weights import load_hf_model, params_to_state_dict  # noqa: E402
from easytune.models.llama import LlamaForCausalLM, init_params, param_logical_axes  # noqa: E402
from easytune.models.model_config import ModelConfig  # noqa: E402

TOL = 1e-4  # float32 whole-model logits, max abs
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)


def hf_model(tmp_path, seed=0, **overrides):
    """A tiny random HF Llama with O(1) activations, saved to ``tmp_path``; returns the torch model.

    HF's default init (std 0.02) makes logits nearly constant, which would hide errors; weights are
    redrawn with std 0.15, norm weights around 1 and biases nonzero.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def hf_logits(model, ids):
    """Reference float32 logits [B, T, V] from transformers for int ids [B, T]."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def et_logits(config, params, ids, **kw):
    """easytune logits [B, T, V] (float32), jitted (one XLA program compiles faster than eager ops)."""
    apply = jax.jit(lambda p, x, kw: LlamaForCausalLM(config).apply({"params": p}, x, **kw))
    return np.asarray(apply(params, jnp.asarray(ids), kw))


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], shape).astype(np.int32)


CASES = {
    "mha_untied": {},
    "gqa_theta": dict(num_key_value_heads=2, rope_theta=500.0),
    "tied": dict(tie_word_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
    "head_dim": dict(head_dim=32, num_key_value_heads=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    model = hf_model(tmp_path, **CASES[case])
    config, params = load_hf_model(tmp_path)
    assert config.head_dim == model.config.head_dim
    ids = random_ids((2, 24))
    want = hf_logits(model, ids)
    got = et_logits(config, params, ids)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(want).max() > 1.0  # the comparison is not between near-constant logits
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_packed_segments_match_separate_documents(tmp_path):
    """Two packed docs (positions restarting) equal transformers on each doc alone; padding finite."""
    model = hf_model(tmp_path, num_key_value_heads=2)
    config, params = load_hf_model(tmp_path)
    doc1, doc2 = random_ids((1, 7), seed=1), random_ids((1, 9), seed=2)
    pad = 4
    ids = np.concatenate([doc1, doc2, np.zeros((1, pad), np.int32)], axis=1)
    segment_ids = np.array([[1] * 7 + [2] * 9 + [0] * pad], np.int32)
    positions = np.array([list(range(7)) + list(range(9)) + [0] * pad], np.int32)
    got = et_logits(config, params, ids, positions=jnp.asarray(positions),
                    segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_allclose(got[:, :7], hf_logits(model, doc1), atol=TOL, rtol=0)
    np.testing.assert_allclose(got[:, 7:16], hf_logits(model, doc2), atol=TOL, rtol=0)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("case", ["gqa_theta", "head_dim"])
def test_gradients_match_transformers(tmp_path, case):
    """Every parameter gradient of the mean next-token loss equals torch autograd through transformers'
    eager model (so the hand-written attention backward and the flattened Linear dots are checked against
    a reference), within 1e-5 of the largest gradient of that tensor (measured: at most 2e-6)."""
    model = hf_model(tmp_path, **CASES[case])
    config, params = load_hf_model(tmp_path)
    assert_gradients_match(model, config, params, random_ids((2, 24)))


def assert_gradients_match(model, config, params, ids):
    """Every parameter gradient of the mean next-token loss over ``ids`` int [B, T + 1] from easytune's model
    equals torch autograd through the transformers ``model`` within 1e-5 of that tensor's largest gradient."""
    x = torch.as_tensor(ids, dtype=torch.long)
    model.zero_grad()
    logits = model(x[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
    want = {name: p.grad.numpy() for name, p in model.named_parameters()}

    def loss(p):
        out = LlamaForCausalLM(config).apply({"params": p}, jnp.asarray(ids[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), jnp.asarray(ids[:, 1:, None]), -1))

    got = params_to_state_dict(jax.jit(jax.grad(loss))(params), config)
    assert set(got) == set(want)
    for name, w in want.items():
        assert np.abs(w).max() > 0, name
        np.testing.assert_allclose(got[name], w, atol=1e-5 * np.abs(w).max(), rtol=0, err_msg=name)


def test_bf16_compute_error_no_worse_than_transformers_bf16(tmp_path):
    """bfloat16 params + compute vs the float32 reference.

    Tolerance: our max abs error <= 2x transformers' own bfloat16 error (same weights, same ids).
    Measured here: ours 0.11, transformers' 0.13, on logits up to about 5 (bf16 rounds to 2^-9
    relative per op, and two layers of matmuls, norms and residual adds accumulate many).
    """
    model = hf_model(tmp_path, num_key_value_heads=2)
    ids = random_ids((2, 24))
    want = hf_logits(model, ids)
    hf_bf16 = hf_logits(model.to(torch.bfloat16), ids)
    config, params = load_hf_model(tmp_path, dtype="bfloat16")
    config = dataclasses.replace(config, compute_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    got = et_logits(config, params, ids)
    assert got.dtype == np.float32
    ours, theirs = np.abs(got - want).max(), np.abs(hf_bf16 - want).max()
    assert ours <= 2 * theirs, (ours, theirs)


@pytest.fixture(scope="module")
def small():
    """(config, params) of a random easytune model shared by the tests below.

    Params are drawn in numpy over ``param_logical_axes``' tree (as ``hf_model``: std 0.15, norms
    around 1): compiling ``init_params``' per-leaf normal draws costs seconds on CPU and is tested once
    in ``test_init_params_dtype_shapes_and_logical_axes``.
    """
    config = ModelConfig(**{**TINY, "num_key_value_heads": 2, "num_hidden_layers": 1})
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (1.0 if path[-1].key == "weight" else 0.0)
        + (0.1 if path[-1].key == "weight" else 0.15) * rng.standard_normal(s.shape, np.float32),
        shapes)
    return config, params


def test_padding_and_remat_finite_and_equal(small):
    """Padding (segment 0, incl. an all-padding row) gives finite logits and grads; nn.remat per
    layer changes neither."""
    config, params = small
    ids = jnp.asarray(random_ids((2, 8)))
    segment_ids = jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0], [0] * 8], jnp.int32)

    def loss(p, cfg):
        return LlamaForCausalLM(cfg).apply({"params": p}, ids, segment_ids=segment_ids).mean()

    remat = dataclasses.replace(config, remat=True)
    (l1, g1), (l2, g2) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                          for c in (config, remat)]
    assert np.isfinite(l1) and all(np.isfinite(g).all() for g in jax.tree.leaves(g1))
    np.testing.assert_allclose(l2, l1, atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_init_params_dtype_shapes_and_logical_axes():
    """Init as HF ``_init_weights``: kernels/embeddings ~ N(0, initializer_range), norms 1, biases 0;
    logical axis names per SPEC."""
    config = ModelConfig(**{**TINY, "num_key_value_heads": 2, "attention_bias": True,
                            "num_hidden_layers": 1, "initializer_range": 0.05}, dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    axes = param_logical_axes(config)
    is_tuple = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_tuple)
    for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(axes, is_leaf=is_tuple)):
        assert p.dtype == jnp.bfloat16 and len(a) == p.ndim and all(isinstance(n, str) for n in a)
    attn = params["model"]["layers_0"]["self_attn"]
    assert attn["k_proj"]["kernel"].shape == (64, 2 * 16)
    np.testing.assert_allclose(np.std(np.asarray(params["model"]["embed_tokens"]["embedding"],
                                                 np.float32)), 0.05, rtol=0.05)
    assert (np.asarray(attn["q_proj"]["bias"]) == 0).all()
    assert (np.asarray(params["model"]["norm"]["weight"]) == 1).all()
    layer_axes = axes["model"]["layers_0"]
    assert layer_axes["self_attn"]["q_proj"] == {"kernel": ("embed", "heads"), "bias": ("heads",)}
    assert layer_axes["self_attn"]["k_proj"]["kernel"] == ("embed", "kv_heads")
    assert layer_axes["self_attn"]["o_proj"] == {"kernel": ("heads", "embed"), "bias": ("embed",)}
    assert layer_axes["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
    assert layer_axes["input_layernorm"]["weight"] == ("norm",)
    assert axes["model"]["embed_tokens"]["embedding"] == ("vocab", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")
    tied = param_logical_axes(dataclasses.replace(config, tie_word_embeddings=True))
    assert "lm_head" not in tied


def test_lora_hook_equals_merged_kernel(small):
    """x W + s (x A) B equals x (W + s A B): the LoRA branch (PEFT's forward) vs a merged kernel."""
    config, params = small
    ids = jnp.asarray(random_ids((2, 8)))
    ka, kb = jax.random.split(jax.random.key(3))
    a, b = jax.random.normal(ka, (64, 4)) * 0.3, jax.random.normal(kb, (4, 32)) * 0.3
    scale = 2.0
    lora = {"model": {"layers_0": {"self_attn": {"v_proj": {"lora_A": a, "lora_B": b}}}}}
    model = LlamaForCausalLM(config, lora_scale=scale, lora_dropout=0.5)

    @jax.jit
    def run(params, lora, rng):
        """(LoRA logits, merged-kernel logits, base logits, LoRA logits with dropout on)."""
        with_lora = model.apply({"params": params, "lora": lora}, ids)
        merged = jax.tree.map(lambda x: x, params)
        v = merged["model"]["layers_0"]["self_attn"]["v_proj"]
        v["kernel"] = v["kernel"] + scale * lora["model"]["layers_0"]["self_attn"]["v_proj"][
            "lora_A"] @ lora["model"]["layers_0"]["self_attn"]["v_proj"]["lora_B"]
        merged_logits = model.apply({"params": merged}, ids)
        base = model.apply({"params": params}, ids)
        dropped = model.apply({"params": params, "lora": lora}, ids, deterministic=False,
                              rngs={"dropout": rng})
        return with_lora, merged_logits, base, dropped

    got, want, base, dropped = map(np.asarray, run(params, lora, jax.random.key(0)))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(got - base).max() > 1e-2  # the branch is live
    assert np.abs(dropped - got).max() > 1e-3  # dropout acts only when not deterministic
