"""The ``expert`` mesh axis (``mesh.expert``): stacked expert weights [X, D, F] split along X, the batch split over
it like ``data`` and ``fsdp``, a ``mesh.expert`` that does not divide ``num_experts`` refused by name, and a
sharded expert computation equal to the unsharded one (XLA inserts the collectives). Uses the 8 simulated CPU
devices of tests/conftest.py."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from easytune import config as config_lib
from easytune import config_check
from easytune import sharding as sharding_lib

EXPERT_AXES = ("expert", "embed", "mlp")


def _mesh(data=1, fsdp=1, expert=1, tensor=1):
    return sharding_lib.make_mesh(ConfigDict(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor)),
                                  jax.devices()[:data * fsdp * expert * tensor])


def test_make_mesh_has_the_expert_axis():
    mesh = _mesh(fsdp=2, expert=4)
    assert mesh.axis_names == sharding_lib.MESH_AXES == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    # a mesh config without the key (an older run's, a hand-made object) has mesh.expert = 1
    old = sharding_lib.make_mesh(type("M", (), dict(data=2, fsdp=4, tensor=1))())
    assert dict(old.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}


def test_mesh_sizes_with_expert():
    sizes = sharding_lib.mesh_sizes(ConfigDict(dict(data=1, fsdp=-1, expert=4, tensor=1)), 8)
    assert sizes == (1, 2, 4, 1) and (sizes.data, sizes.fsdp, sizes.expert, sizes.tensor) == (1, 2, 4, 1)
    assert sharding_lib.mesh_sizes(ConfigDict(dict(data=2, fsdp=1, expert=-1, tensor=2)), 16).expert == 4
    assert sharding_lib.mesh_sizes(type("M", (), dict(data=1, fsdp=-1, tensor=2))(), 8) == (1, 4, 1, 2)
    with pytest.raises(ValueError, match=r"mesh.data=1 x mesh.fsdp=2 x mesh.tensor=1 x mesh.expert=2 = 4 devices, "
                                         r"but 8 are available"):
        sharding_lib.mesh_sizes(ConfigDict(dict(data=1, fsdp=2, expert=2, tensor=1)), 8)
    with pytest.raises(ValueError, match=r"not divisible by mesh.data\*fsdp\*expert\*tensor \(without -1\) = 3"):
        sharding_lib.mesh_sizes(ConfigDict(dict(data=1, fsdp=-1, expert=3, tensor=1)), 8)


def test_expert_weights_map_onto_the_expert_axis():
    spec, notes = sharding_lib.logical_to_spec(EXPERT_AXES, (8, 64, 128), _mesh(expert=8))
    assert spec == P("expert", None, None) and not notes
    spec, _ = sharding_lib.logical_to_spec(("expert", "mlp", "embed"), (8, 128, 64), _mesh(fsdp=2, expert=2, tensor=2))
    assert spec == P("expert", "tensor", "fsdp")
    # stacked by model.scan_layers: [L, X, D, F]
    spec, _ = sharding_lib.logical_to_spec(("layers",) + EXPERT_AXES, (2, 8, 64, 128), _mesh(fsdp=2, expert=4))
    assert spec == P(None, "expert", "fsdp", None)
    # every other parameter is replicated over the expert axis, as over data
    spec, _ = sharding_lib.logical_to_spec(("embed", "heads"), (64, 64), _mesh(fsdp=2, expert=4))
    assert spec == P("fsdp", None)


def test_the_batch_is_split_over_the_expert_axis():
    mesh = _mesh(data=2, expert=4)
    assert sharding_lib.data_parallel_size(mesh) == 8
    assert sharding_lib.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)
    assert sharding_lib.logical_to_spec(("batch", "length", "act_embed"), (16, 4, 8), mesh)[0] == P(
        ("data", "expert"), None, None)
    assert sharding_lib.local_rows(mesh, 16) == slice(0, 16)
    with pytest.raises(ValueError, match=r"batch of 12 sequences does not split over mesh.data x mesh.fsdp x "
                                         r"mesh.expert = 8"):
        sharding_lib.local_rows(mesh, 12)
    # a hand-built mesh without the axis still works (mesh.expert = 1)
    old = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    assert sharding_lib.data_parallel_size(old) == 4
    assert sharding_lib.batch_sharding(old).spec == P(("data", "fsdp"), None)
    assert sharding_lib.logical_to_spec(EXPERT_AXES, (8, 64, 128), old)[0] == P(None, "fsdp", "tensor")


def test_expert_axis_that_does_not_divide_num_experts_is_an_error():
    msg = r"mesh.expert=4 does not divide num_experts=6"
    with pytest.raises(ValueError, match=msg):
        sharding_lib.check_expert_axis(4, 6)
    sharding_lib.check_expert_axis(4, 8)
    sharding_lib.check_expert_axis(4, 0)  # a dense model: the axis only splits the batch
    tree = {"mlp": {"experts": {"gate_proj": jax.ShapeDtypeStruct((6, 16, 32), jnp.float32)}}}
    axes = {"mlp": {"experts": {"gate_proj": EXPERT_AXES}}}
    with pytest.raises(ValueError, match=msg):
        sharding_lib.tree_shardings(tree, axes, _mesh(fsdp=2, expert=4), [])
    sh = sharding_lib.tree_shardings(tree, axes, _mesh(fsdp=4, expert=2), [])
    assert sh["mlp"]["experts"]["gate_proj"].spec == P("expert", "fsdp", None)


def test_each_device_holds_its_share_of_every_expert_tensor():
    """mesh.expert=8 on 8 devices: each holds 1/8 of every expert tensor (one expert) and 1/8 of the batch rows;
    a routed-experts MLP computed under jit on that layout equals the unsharded one."""
    mesh = _mesh(expert=8)
    x_, d, f, b, t, k = 8, 16, 32, 16, 4, 2
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {"gate": jax.random.normal(keys[0], (x_, d)) * 0.1,  # the router [X, D], HF layout
              "experts": {"gate_proj": jax.random.normal(keys[1], (x_, d, f)) * 0.1,
                          "up_proj": jax.random.normal(keys[2], (x_, d, f)) * 0.1,
                          "down_proj": jax.random.normal(keys[3], (x_, f, d)) * 0.1}}
    axes = {"gate": (None, "embed"), "experts": {"gate_proj": EXPERT_AXES, "up_proj": EXPERT_AXES,
                                                 "down_proj": ("expert", "mlp", "embed")}}
    report: list[str] = []
    shardings = sharding_lib.tree_shardings(params, axes, mesh, report, warn_bytes=0)
    placed = jax.device_put(params, shardings)
    for leaf in jax.tree_util.tree_leaves(placed["experts"]):
        assert leaf.addressable_shards[0].data.shape == (1,) + leaf.shape[1:]
        assert sharding_lib.per_device_bytes(leaf, leaf.sharding) * 8 == leaf.nbytes
    hidden = jax.random.normal(keys[4], (b, t, d))

    def moe(p, h):  # top-k routing, every expert computed densely and weighted (exact, not fast)
        logits = h @ p["gate"].T
        weights, chosen = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
        dense = jnp.sum(jax.nn.one_hot(chosen, x_) * weights[..., None], axis=-2)  # [B, T, X]
        e = p["experts"]
        y = jnp.einsum("btd,xdf->btxf", h, e["gate_proj"])
        y = jax.nn.silu(y) * jnp.einsum("btd,xdf->btxf", h, e["up_proj"])
        return jnp.einsum("btxf,xfd,btx->btd", y, e["down_proj"], dense)

    want = moe(params, hidden)
    h_sharded = jax.device_put(hidden, jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"))))
    assert h_sharded.addressable_shards[0].data.shape == (b // 8, t, d)
    got = jax.jit(moe)(placed, h_sharded)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def _tiny_moe(**kw):
    from easytune.models.model_config import ModelConfig
    return ModelConfig(**{**dict(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=8, model_type="mixtral"), **kw})


def test_the_model_on_the_expert_axis_equals_one_device():
    """The MoE decoder's own params and logical axes (easytune/models) on data=1 x fsdp=2 x expert=4: expert
    weights split over experts, routers and attention replicated over it; logits equal the unsharded ones; a
    mesh.expert that does not divide num_experts is refused when the shardings are built."""
    from easytune.models import llama
    cfg = _tiny_moe()
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    axes = llama.param_logical_axes(cfg)
    model = llama.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 6), 0, cfg.vocab_size)
    want = model.apply({"params": params}, ids)
    mesh = _mesh(fsdp=2, expert=4)
    placed = jax.device_put(params, sharding_lib.tree_shardings(params, axes, mesh))
    mlp = placed["model"]["layers_0"]["mlp"]
    assert mlp["experts"]["gate_proj"].sharding.spec == P("expert", "fsdp", None)
    assert mlp["experts"]["down_proj"].sharding.spec == P("expert", None, "fsdp")
    assert mlp["experts"]["up_proj"].addressable_shards[0].data.shape == (2, 8, 8)  # 8 experts / 4, D / 2
    assert mlp["gate"]["weight"].sharding.spec == P(None, "fsdp")
    with sharding_lib.activation_mesh(mesh):
        got = jax.jit(lambda p, x: model.apply({"params": p}, x))(
            placed, jax.device_put(ids, sharding_lib.batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"mesh.expert=8 does not divide num_experts=4"):
        cfg4 = _tiny_moe(num_experts=4)
        shapes = jax.eval_shape(lambda: llama.init_params(cfg4, jax.random.PRNGKey(0)))
        sharding_lib.tree_shardings(shapes, llama.param_logical_axes(cfg4), _mesh(expert=8))


def test_nf4_experts_split_over_the_expert_axis():
    """QLoRA: a stack of NF4 experts (quant.quantize of [X, in, out]) keeps its leading [X] on every array."""
    from easytune import quant
    from easytune.models import llama
    cfg = _tiny_moe()
    shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.PRNGKey(0)))
    params = jax.tree_util.tree_map(lambda x: np.random.default_rng(0).normal(size=x.shape).astype(np.float32),
                                    shapes)
    q = quant.quantize_params(params)
    axes = quant.logical_axes(q, llama.param_logical_axes(cfg))
    sh = sharding_lib.tree_shardings(q, axes, _mesh(fsdp=2, expert=4))
    codes = sh["model"]["layers_0"]["mlp"]["experts"]["gate_proj"].codes
    assert codes.spec == P("expert", "fsdp")
    assert sh["model"]["layers_0"]["mlp"]["experts"]["gate_proj"].offset.spec == P("expert")


def test_config_key_mesh_expert():
    assert config_lib.defaults().mesh.expert == 1
    recipe = pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"

    def validate(*overrides):
        config_check.validate(config_lib.apply_overrides(config_lib.load_config(recipe), list(overrides)))

    for bad in ("0", "-2"):
        with pytest.raises(config_lib.ConfigError, match=r"mesh\.expert"):
            validate(f"--config.mesh.expert={bad}")
    # -1 = the remaining devices, as for the other axes; at most one -1 (quickstart's mesh.fsdp is -1)
    with pytest.raises(config_lib.ConfigError, match=r"at most one of mesh.data/fsdp/tensor/expert may be -1"):
        validate("--config.mesh.expert=-1")
    validate("--config.mesh.expert=-1", "--config.mesh.fsdp=1")
    validate("--config.mesh.expert=2")


@pytest.mark.slow
def test_training_on_the_expert_axis_equals_one_device(tmp_path):
    """A dense tiny model on data=1 x fsdp=2 x expert=4 (the expert axis then only splits the batch) gives one
    device's per-step losses: the batch rows, put_batch and the loss normalisation see the expert axis."""
    import json

    from easytune.train import loop
    from tests.helpers import tiny_run_config

    def losses(out, devices, **mesh):
        c = tiny_run_config(out, **{"method": "full", "train.max_steps": 3, "train.eval_steps": 0,
                                    "train.save_steps": 0, "train.sample_max_new_tokens": 0,
                                    "optim.warmup_steps": 0, **mesh})
        summary = loop.train(c, devices=devices)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return summary, [r["train/loss"] for r in rows if "train/loss" in r]

    s8, l8 = losses(tmp_path / "x", jax.devices(), **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4})
    s1, l1 = losses(tmp_path / "one", jax.devices()[:1], **{"mesh.data": 1, "mesh.fsdp": 1,
                                                            "train.micro_batch_size": 8})
    assert s8["global_batch"] == s1["global_batch"] == 8 and len(l8) == 3
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
