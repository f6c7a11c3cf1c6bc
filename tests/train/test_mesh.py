"""One code path from 1 device to a mesh: the same config on (data, fsdp, tensor) meshes of the 8 simulated
CPU devices gives the same per-step losses as one device, for full fine-tuning, LoRA and QLoRA; parameters
and optimizer state are really sharded; ``--dry-run`` reports shardings and bytes per device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import sharding as sharding_lib
from easytune.tokenizer import load_tokenizer
from easytune.train import batches as batches_lib
from easytune.train import loop
from easytune.train import optim as optim_lib
from easytune.train import setup as setup_lib
from tests.helpers import quickstart_base, tiny_run_config

MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (8, 1, 1)]
GLOBAL_BATCH = 8
STEPS = 5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return quickstart_base(tmp_path_factory.mktemp("mesh_base"))


def _config(base, out, method, mesh, devices=None, steps=STEPS):
    """A run config on ``base`` for ``mesh`` = (data, fsdp, tensor) or (data, fsdp, expert, tensor), with the same
    global batch on every mesh."""
    data, fsdp, expert, tensor = mesh if len(mesh) == 4 else (mesh[0], mesh[1], 1, mesh[2])
    c = tiny_run_config(out, **{"method": method, "model.path": str(base["model"]),
                                "tokenizer.path": str(base["tokenizer"]), "data.builtin": "",
                                "data.train_files": str(base["train"]), "data.format": "alpaca",
                                "lora.target_modules": "all-linear", "lora.lora_dropout": 0.0,
                                "optim.learning_rate": 3e-3, "optim.warmup_steps": 0,
                                "train.max_steps": steps, "train.sample_max_new_tokens": 0})
    c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = data, fsdp, expert, tensor
    c.train.micro_batch_size = GLOBAL_BATCH // (data * fsdp * expert)  # the same global batch on every mesh
    return c


def run_steps(config, devices, steps=STEPS):
    """``(metrics, setup, state, compiled)`` of ``steps`` optimizer steps through the Trainer's own pieces (build,
    init_state, jit_steps, window_batches over this process's rows, put_batch): ``metrics`` one dict of floats per
    step, ``compiled`` the compiled train step."""
    from easytune.data import prepare
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    tokenizer = load_tokenizer(config.tokenizer.path)
    train_seqs, _, _ = prepare.prepare_dataset(config.data, tokenizer)
    setup = setup_lib.build(config, tokenizer, mesh)
    plan = batches_lib.make_plan(len(train_seqs["input_ids"]), config.train, sharding_lib.data_parallel_size(mesh))
    assert plan.global_batch == GLOBAL_BATCH
    tx, _ = optim_lib.make_optimizer(config.optim, plan.total_steps, plan.accum)
    state = setup_lib.init_state(setup, tx, config.train.seed)
    train_fn, _ = setup_lib.jit_steps(setup, state, setup_lib.step_spec(setup, tx))
    part = sharding_lib.local_rows(mesh, plan.micro_rows)
    out, compiled = [], None
    for step in range(steps):
        (m,) = batches_lib.window_batches(train_seqs, plan, step, config.data.seed, part)
        window_tokens = jnp.float32(max(float(m["loss_mask"].sum()), 1.0))
        args = (state, setup.frozen, sharding_lib.put_batch(m, mesh), window_tokens)
        if compiled is None:
            compiled = train_fn.lower(*args).compile()
        state, metrics = compiled(*args)
        out.append({k: float(v) for k, v in metrics.items()})
    return out, setup, state, compiled


def _losses(config, devices):
    """Per-step losses of ``STEPS`` optimizer steps (:func:`run_steps`); also returns the setup and final state."""
    metrics, setup, state, _ = run_steps(config, devices)
    return np.array([m["loss"] for m in metrics]), setup, state


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.slow
def test_meshes_match_one_device(base, tmp_path, method):
    one, _, _ = _losses(_config(base, tmp_path / "one", method, (1, 1, 1), None), jax.devices()[:1])
    assert np.all(np.isfinite(one)) and one[-1] < one[0], one  # it trains
    for mesh in MESHES:
        got, setup, state = _losses(_config(base, tmp_path / str(mesh), method, mesh, None), jax.devices())
        np.testing.assert_allclose(got, one, atol=1e-5, rtol=0, err_msg=f"{method} on mesh {mesh}")
        if mesh == (2, 2, 2):  # really sharded: a kernel and its Adam moment split over fsdp x tensor
            from flax import traverse_util
            key = ("model", "layers_0", "mlp", "gate_proj")
            if method == "full":
                kernel = traverse_util.flatten_dict(state.trainable["params"])[key + ("kernel",)]
                assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
                assert kernel.addressable_shards[0].data.size == kernel.size // 4
                mu = traverse_util.flatten_dict(state.opt_state.inner_opt_state.inner_state[1][0].mu["params"])
                assert mu[key + ("kernel",)].sharding.spec == kernel.sharding.spec
            else:
                lora_b = traverse_util.flatten_dict(state.trainable["lora"])[key + ("lora_B",)]
                assert lora_b.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")


def test_batch_the_mesh_does_not_divide_is_an_error_naming_both():
    mesh = sharding_lib.make_mesh(type("M", (), dict(data=2, fsdp=4, tensor=1))(), jax.devices())
    with pytest.raises(ValueError, match=r"batch of 12 sequences does not split over mesh.data x mesh.fsdp = 8"):
        sharding_lib.local_rows(mesh, 12)
    assert sharding_lib.local_rows(mesh, 16) == slice(0, 16)  # one process holds every row
    with pytest.raises(ValueError, match=r"mesh.data=3 x mesh.fsdp=2 x mesh.tensor=1 = 6 devices, but 8"):
        sharding_lib.make_mesh(type("M", (), dict(data=3, fsdp=2, tensor=1))(), jax.devices())


def test_large_unsharded_parameters_are_named_with_the_reason():
    from jax.sharding import PartitionSpec as P
    mesh = sharding_lib.make_mesh(type("M", (), dict(data=1, fsdp=4, tensor=2))(), jax.devices())
    tree = {"embed": jax.ShapeDtypeStruct((1001, 64), jnp.float32),  # 1001 % 2 != 0: vocab stays whole
            "norm": jax.ShapeDtypeStruct((64,), jnp.float32),  # small: not reported
            "big_norm": jax.ShapeDtypeStruct((4096,), jnp.float32),  # no axis maps to the mesh
            "kernel": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
    axes = {"embed": ("vocab", "embed"), "norm": ("norm",), "big_norm": ("norm",), "kernel": ("embed", "mlp")}
    notes: list[str] = []
    sh = sharding_lib.tree_shardings(tree, axes, mesh, notes, warn_bytes=16 * 1024)
    assert sh["kernel"].spec == P("fsdp", "tensor") and sh["embed"].spec == P(None, "fsdp")
    assert sorted(notes) == [
        "['big_norm'] (16.00 KiB): replicated, its logical axes ('norm',) map to no mesh axis",
        "['embed'] (250.25 KiB): dim 1001 (vocab) not divisible by mesh.tensor=2"], notes
    assert sharding_lib.per_device_bytes(tree["kernel"], sh["kernel"]) == 64 * 128 * 4 // 8


@pytest.mark.slow
def test_dry_run_prints_shardings_and_bytes_without_training(tmp_path, capsys):
    c = tiny_run_config(tmp_path / "run", **{"train.max_steps": 2})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    lines: list[str] = []
    out = loop.train(c, dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert out["dry_run"] and out["mesh"] == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    assert "['params']['model']['layers_0']['mlp']['gate_proj']['kernel']" in text
    assert "('fsdp', 'tensor')" in text and "per device" in text
    assert out["per_device_bytes"] < (out["trainable_bytes"] + out["optimizer_bytes"]) / 4  # sharded, not copied
    assert out["compiled"]["temp"] > 0
    assert "nothing was trained or saved" in text
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
