"""Rematerialisation policies and the scan over layers against the plain per-layer model.

References (never the feature against itself): the no-remat model for every remat policy (same loss and
gradients, float32, 2e-6); the per-layer (unscanned) model for ``scan_layers`` after ``stack_layers`` (logits,
loss, gradients within 1e-5), for LoRA, full fine-tuning and QLoRA, and an end-to-end ``train()`` run without
scan for the per-step losses. Compiled memory is a relative comparison of two compiles of the same step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import config as config_lib
from easytune import config_check, quant
from easytune import lora as lora_lib
from easytune.models import llama
from easytune.models import scan as scan_lib
from easytune.models.model_config import ModelConfig

# Two layer kinds (Qwen2-style ``layer_types``) so the scanned body must pick the mask per layer.
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, o_proj_bias=False,
                        sliding_window=3, initializer_range=0.15,
                        layer_types=("sliding_attention", "full_attention", "sliding_attention"))
N = CFG.num_hidden_layers
LORA = lora_lib.LoraConfig(r=4, lora_alpha=8.0)


def _batch(rows=2, t=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (rows, t + 1)).astype(np.int32)
    seg = np.ones((rows, t), np.int32)
    seg[1, 5:] = 2  # two packed documents in row 1
    pos = np.where(seg == 2, np.arange(t) - 5, np.arange(t)).astype(np.int32)
    return jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(seg), jnp.asarray(pos)


@functools.lru_cache(maxsize=None)
def _params():
    return jax.device_get(llama.init_params(CFG, jax.random.key(0)))


def _variables(method):
    """``(trainable, frozen)`` per-layer variable dicts for ``method`` ("full", "lora", "qlora"); LoRA B is
    random (not PEFT's zeros) so that every gradient is nonzero."""
    params = _params()
    if method == "full":
        return {"params": params}, {}
    lora = lora_lib.init_lora(params, LORA, jax.random.key(1))
    rng = np.random.default_rng(2)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].key == "lora_B" else x,
        jax.device_get(lora))
    if method == "qlora":
        params = quant.quantize_params(params)
    trainable, frozen = lora_lib.split(params, lora)
    return trainable, frozen


def _loss_fn(cfg):
    ids, tgt, seg, pos = _batch()
    model = llama.LlamaForCausalLM(cfg, lora_scale=LORA.scale)

    def loss(trainable, frozen):
        logits = model.apply(lora_lib.combine(trainable, frozen), ids, positions=pos, segment_ids=seg)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
        return nll.mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_close(a, b, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference():
    """No remat, per layer: ``{method: ((loss, logits), grads)}``."""
    out = {}
    for method in ("full", "lora", "qlora"):
        trainable, frozen = _variables(method)
        out[method] = _loss_fn(CFG)(trainable, frozen)
    return out


# ------------------------------------------------------------------------------------------------ remat

def test_remat_policy_names_and_old_booleans():
    assert config_lib.remat_policy_name(True) == "full" and config_lib.remat_policy_name(False) == "none"
    assert config_lib.remat_policy_name("True") == "full" and config_lib.remat_policy_name("false") == "none"
    assert config_lib.remat_policy_name("dots_saveable") == "dots_saveable"
    assert llama.REMAT_POLICIES["checkpoint_dots"] is llama.REMAT_POLICIES["dots_saveable"]  # jax's alias
    assert set(llama.REMAT_POLICIES) == set(config_lib.REMAT_POLICY_NAMES)
    assert ModelConfig(**{**_dims(), "remat": True}).remat == "full"
    with pytest.raises(ValueError, match="dots_saveable"):
        config_lib.remat_policy_name("dots")
    # an old run's config.json ("remat": false) still loads into the defaults
    c = config_lib.defaults()
    c.update_from_flattened_dict({"model.remat": False})
    assert ModelConfig(**{**_dims(), "remat": c.model.remat}).remat == "none"
    c.model.remat = "checkpoint_dots"  # the field takes names and booleans alike
    assert c.to_dict()["model"]["remat"] == "checkpoint_dots"


def _dims():
    return dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)


def test_config_validate_names_model_remat(tmp_path):
    from tests.helpers import tiny_run_config
    c = tiny_run_config(tmp_path / "run", **{"model.remat": "dots_saveable", "model.scan_layers": True})
    config_check.validate(c)
    c.model.remat = "everything"
    with pytest.raises(config_lib.ConfigError, match=r"model\.remat.*'none', 'full', 'dots_saveable'"):
        config_check.validate(c)
    c.model.remat = True
    config_check.validate(c)
    assert isinstance(c.model.scan_layers, bool)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
@pytest.mark.slow
def test_each_remat_policy_equals_no_remat(reference, policy):
    """Loss, logits and gradients of every policy equal the no-remat model (float32, LoRA) within 2e-6 (the
    recomputed forward is fused differently by XLA, so it rounds differently; measured at most 1.2e-6)."""
    trainable, frozen = _variables("lora")
    got = _loss_fn(dataclasses.replace(CFG, remat=policy))(trainable, frozen)
    _assert_close(got, reference["lora"], 2e-6)


@pytest.mark.slow
def test_remat_lowers_compiled_temp_memory():
    """memory_analysis() of one compiled grad step: remat="full" needs fewer temp bytes than "none", per layer
    and (by far, as the loop keeps XLA from scheduling every recomputation early) under scan_layers."""
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=4)
    params = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.key(0)))
    stacked = jax.eval_shape(lambda p: scan_lib.stack_layers(p, 3), params)
    ids = jax.ShapeDtypeStruct((4, 128), jnp.int32)

    def temp_bytes(policy, scan):
        model = llama.LlamaForCausalLM(dataclasses.replace(cfg, remat=policy, scan_layers=scan))
        grad = jax.grad(lambda p, x: model.apply({"params": p}, x).mean())
        compiled = jax.jit(grad).lower(stacked if scan else params, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none", False), temp_bytes("full", False)
    assert full < none, (full, none)
    none, full = temp_bytes("none", True), temp_bytes("full", True)
    assert full < 0.5 * none, (full, none)


# ------------------------------------------------------------------------------------------------- scan

@pytest.mark.parametrize("method, policy", [("lora", "none"), ("full", "none"), ("qlora", "none"),
                                            ("lora", "full"), ("qlora", "dots_saveable")])
@pytest.mark.slow
def test_scan_layers_equals_per_layer(reference, method, policy):
    """The scanned model on ``stack_layers`` variables: same logits, loss and (unstacked) gradients as the
    per-layer model within 1e-5, with mixed sliding/full layers; with a remat policy inside the scan too."""
    trainable, frozen = _variables(method)
    st, sf = scan_lib.stack_layers(trainable, N), scan_lib.stack_layers(frozen, N)
    assert "layers" in st.get("lora", st.get("params"))["model"] and "layers_0" not in str(jax.tree.structure(st))
    (loss, logits), grads = _loss_fn(dataclasses.replace(CFG, scan_layers=True, remat=policy))(st, sf)
    (ref_loss, ref_logits), ref_grads = reference[method]
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    _assert_close(scan_lib.unstack_layers(grads), ref_grads, 1e-5)


def test_stack_unstack_round_trip_is_exact():
    """params, LoRA, logical axes and NF4 QTensor trees survive stack -> unstack bit for bit."""
    trainable, frozen = _variables("qlora")
    params = jax.device_put(_params())  # jax arrays (stacked in one jitted program), the others numpy
    axes = llama.param_logical_axes(CFG)
    frozen_axes = quant.logical_axes(frozen["params"], axes)  # QLoRA: every param frozen, kernels in NF4
    for tree, n in ((params, None), (trainable, None), (frozen, None), (axes, N), (frozen_axes, N)):
        stacked = scan_lib.stack_layers(tree, N)
        back = scan_lib.unstack_layers(stacked, n)
        is_leaf = lambda x: isinstance(x, tuple)
        assert jax.tree.structure(back, is_leaf=is_leaf) == jax.tree.structure(tree, is_leaf=is_leaf)
        for a, b in zip(jax.tree.leaves(back, is_leaf=is_leaf), jax.tree.leaves(tree, is_leaf=is_leaf)):
            if is_leaf(a):
                assert a == b
            else:
                assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # the stacked axes are what the scanned model declares; "layers" maps to no mesh axis
    assert scan_lib.stack_layers(axes, N) == llama.param_logical_axes(dataclasses.replace(CFG, scan_layers=True))
    from easytune import sharding
    assert "layers" in sharding.RULES and sharding.RULES["layers"] is None
    q = scan_lib.stack_layers(frozen, N)["params"]["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert quant.is_qtensor(q) and q.codes.shape[0] == N and q.shape == (CFG.hidden_size, CFG.intermediate_size)


def test_stack_layers_refuses_layers_that_differ():
    """A LoRA target in some layers only cannot be scanned: the error names the variable and the layers."""
    params = _params()
    lora = lora_lib.init_lora(params, dataclasses.replace(LORA, target_modules=r"model\.layers\.[01]\.mlp\.up_proj"),
                              jax.random.key(1))
    with pytest.raises(ValueError, match=r"lora_A exists for some decoder layers only \(missing in \[2\]"):
        scan_lib.stack_layers({"lora": lora}, N)
    with pytest.raises(ValueError, match="num_layers"):
        scan_lib.unstack_layers(scan_lib.stack_layers(llama.param_logical_axes(CFG), N))


def test_scan_model_refuses_kv_cache_decoding():
    cfg = dataclasses.replace(CFG, scan_layers=True)
    params = scan_lib.stack_layers(_params(), N)
    cache = llama.init_cache(CFG, 1, 8)
    with pytest.raises(ValueError, match="unstack_layers"):
        llama.LlamaForCausalLM(cfg).apply({"params": params}, jnp.zeros((1, 2), jnp.int32),
                                          positions=jnp.zeros((1, 2), jnp.int32), cache=cache, cache_index=0)


# -------------------------------------------------------------------------------------------- end to end

def _losses(run_dir):
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_train_with_scan_layers_equals_per_layer_then_exports(tmp_path):
    """``train()`` with model.scan_layers=True (LoRA, remat "full"): per-step losses equal the per-layer run's
    within 1e-5; the run's checkpoint reloads per layer (load_run), exports merged, and generates."""
    from easytune import export
    from easytune.generate import greedy_generate
    from easytune.train import loop
    from easytune.train import setup as setup_lib
    from tests.helpers import tiny_run_config

    def run(name, **kw):
        c = tiny_run_config(tmp_path / name, **{"method": "lora", "train.max_steps": 3, "train.eval_steps": 0,
                                                "train.save_steps": 0, "optim.warmup_steps": 1,
                                                "mesh.data": 1, "mesh.fsdp": 2, "train.micro_batch_size": 2,
                                                "lora.lora_dropout": 0.0, **kw})
        return loop.train(c, devices=jax.devices()[:2])

    run("layers", **{"train.sample_max_new_tokens": 0})
    summary = run("scan", **{"model.scan_layers": True, "model.remat": "full", "train.sample_max_new_tokens": 3})
    assert summary["sample"] is not None  # the end-of-run sample decodes with the per-layer model
    ref, got = _losses(tmp_path / "layers"), _losses(tmp_path / "scan")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], atol=1e-5, rtol=0)

    setup, trainable = setup_lib.load_run(tmp_path / "scan")
    assert not setup.model_cfg.scan_layers and "layers_1" in trainable["lora"]["model"]
    assert "layers_1" in setup.frozen["params"]["model"]
    _, ref_trainable = setup_lib.load_run(tmp_path / "layers")
    _assert_close(trainable, ref_trainable, 1e-5)
    export.export_merged(tmp_path / "scan", tmp_path / "merged", run=(setup, trainable))
    from easytune.models import hf_weights
    merged_cfg, merged = hf_weights.load_hf_model(tmp_path / "merged")
    variables = jax.device_get(lora_lib.combine(trainable, setup.frozen))
    ids = jnp.asarray([[1, 5, 7, 9]], jnp.int32)
    with_lora = setup.model.apply(variables, ids)
    np.testing.assert_allclose(llama.LlamaForCausalLM(merged_cfg).apply({"params": merged}, ids), with_lora,
                               atol=1e-4, rtol=0)
    out = greedy_generate(setup.model_cfg, variables["params"], [1, 5, 7], 3, lora=variables["lora"],
                          lora_scale=setup.lora_scale)
    assert len(out) <= 3 and all(0 <= i < setup.model_cfg.vocab_size for i in out)
