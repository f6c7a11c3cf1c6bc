"""Collectives in the compiled train step on a simulated 8-device mesh, against the FSDP plan.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python bench/collectives.py \
        [--method full|lora] [--mesh 1,8,1] [--layers 4] [--scan]

Builds a model with ``--layers`` decoder layers (hidden 256, 8 heads, vocab 4096, seq 128, one sequence per
device), jits the Trainer's own train step (``easytune.train.setup.jit_steps``) on the mesh, and counts the
``all-gather``, ``reduce-scatter``, ``all-reduce``, ``all-to-all`` and ``collective-permute`` ops in the
optimized HLO (``compiled.as_text()``), with the per-layer figure from two layer counts (the difference
divided by the layer difference). ZeRO-3 / FSDP plan (Rajbhandari et al. 2020; PyTorch FSDP): per layer and
step, each sharded weight is all-gathered for the forward (and again for the backward, unless XLA keeps the
gathered copy), and its gradient is reduce-scattered; a pure data-parallel mesh (8,1,1) all-reduces gradients
instead. Printed, not asserted: XLA may fuse or combine collectives (``all-gather-start``/``-done`` pairs
count once here).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def count(method: str, mesh: tuple[int, int, int], layers: int, scan: bool) -> collections.Counter:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from easytune import config as config_lib
    from easytune import lora as lora_lib
    from easytune import sharding as sharding_lib
    from easytune.models import llama
    from easytune.models.model_config import ModelConfig
    from easytune.train import optim as optim_lib
    from easytune.train import setup as setup_lib

    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=8, scan_layers=False)
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    c = config_lib.defaults()
    c.method = method
    c.lora.target_modules = "all-linear"
    c.model.scan_layers = scan
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    m = sharding_lib.make_mesh(c.mesh)
    axes = llama.param_logical_axes(cfg)
    if method == "lora":
        lcfg = setup_lib.lora_config(c)
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
        trainable, frozen = lora_lib.split(params, lora)
        t_axes, f_axes = lora_lib.split(axes, sharding_lib.lora_logical_axes(lora, axes))
    else:
        lcfg = None
        trainable, frozen = lora_lib.split(params, None)
        t_axes, f_axes = lora_lib.split(axes, None)
    if scan:
        from easytune.models import scan as scan_lib
        trainable, frozen = scan_lib.stack_layers(trainable, layers), scan_lib.stack_layers(frozen, layers)
        t_axes, f_axes = scan_lib.stack_layers(t_axes, layers), scan_lib.stack_layers(f_axes, layers)
        cfg = ModelConfig(**{**cfg.__dict__, "scan_layers": True})
    trainable = jax.device_put(trainable, sharding_lib.tree_shardings(trainable, t_axes, m))
    frozen = jax.device_put(frozen, sharding_lib.tree_shardings(frozen, f_axes, m))
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale if lcfg else 1.0)
    setup = setup_lib.Setup(c, None, cfg, model, m, trainable, frozen, t_axes, f_axes, lcfg, [])
    tx, _ = optim_lib.make_optimizer(c.optim, 10, 1)
    state = setup_lib.init_state(setup, tx, 0)
    train_jit, _ = setup_lib.jit_steps(setup, state, setup_lib.step_spec(setup, tx))
    rows, seq = m.size, 128
    ids = np.random.default_rng(0).integers(0, 4096, (rows, seq + 1)).astype(np.int32)
    batch = dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:], loss_mask=np.ones((rows, seq), np.float32),
                 segment_ids=np.ones((rows, seq), np.int32),
                 positions=np.tile(np.arange(seq, dtype=np.int32), (rows, 1)))
    hlo = train_jit.lower(state, frozen, sharding_lib.put_batch(batch, m), jnp.float32(1.0)).compile().as_text()
    out = collections.Counter()
    for op in OPS:  # an async pair (start/done) counts once; a combined (tuple-typed) op counts once
        out[op] = len(re.findall(rf" {op}(-start)?\(", hlo))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="full", choices=("full", "lora"))
    p.add_argument("--mesh", default="1,8,1")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scan", action="store_true")
    a = p.parse_args()
    mesh = tuple(int(x) for x in a.mesh.split(","))
    lo, hi = count(a.method, mesh, a.layers, a.scan), count(a.method, mesh, 2 * a.layers, a.scan)
    kernels = 7  # q, k, v, o, gate, up, down per layer
    print(f"{a.method} on mesh (data, fsdp, tensor) = {mesh}, {'scanned' if a.scan else 'per-layer'} layers; "
          f"{kernels} kernels per layer")
    print(f"{'collective':20s} {a.layers:>4d} layers {2 * a.layers:>4d} layers  per layer")
    for op in OPS:
        print(f"{op:20s} {lo[op]:>11d} {hi[op]:>11d}  {(hi[op] - lo[op]) / a.layers:>9.2f}")


if __name__ == "__main__":
    main()
