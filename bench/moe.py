"""One mixture-of-experts MLP three ways: step time and compiled temp memory of forward + backward.

    python bench/moe.py [--tokens 256,1024,4096] [--hidden 256] [--expert-inter 512] [--experts 8] [--k 2]
                        [--steps 3] [--dtype float32]

Formulations of one layer's MLP on ``N`` tokens ``[N, D]`` (D = ``--hidden``, F = ``--expert-inter``, X =
``--experts``, top ``--k``), each as ``jax.jit(jax.value_and_grad(sum(y * cotangent)))`` w.r.t. every weight and
the input (what a full fine-tuning step does to the layer):

- ``dense``: a SwiGLU MLP of width k*F, the same *active* parameters per token as the sparse layer (3 D k F),
  no router; the reference the ratios are printed against.
- ``sparse``: easytune's layer (:mod:`easytune.models.moe`): router ``[X, D]``, ``route`` (fp32 softmax, top k,
  renormalised) and ``experts_forward`` (pairs sorted by expert, three ``jax.lax.ragged_dot`` grouped matmuls,
  fp32 scatter-add back).
- ``naive``: the same routing, then every expert on every token (``einsum`` over all X stacked experts,
  ``[N, X, F]`` intermediates) weighted by a ``[N, X]`` routing matrix that is zero off the chosen k: X/k times
  the active work. Its output equals ``sparse``'s (the ``|sparse-naive|`` column: max abs difference of the
  outputs, float rounding only).

Printed per token count: XLA's ``memory_analysis()`` temp bytes (activations kept for the backward and
workspace), the fastest of ``--steps`` timed steps after a warm-up, XLA's ``cost_analysis()`` flops of the
compiled step (what the backend really computes: a backend that lowers ``ragged_dot`` to masked dense matmuls
shows it here), and each one's ratio to ``dense``. Random weights (std 0.02) and inputs, float32 by default.
Numbers depend on the machine, its backend and its load: not a test.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMPLS = ("dense", "sparse", "naive")


def make_params(impl: str, d: int, f: int, x: int, k: int, dtype, seed: int = 0) -> dict:
    """Random weights (std 0.02) of one formulation: ``dense`` {gate, up [D, kF], down [kF, D]}; ``sparse`` /
    ``naive`` {router [X, D], gate, up [X, D, F], down [X, F, D]} (the same draw for both)."""
    import jax
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    draw = lambda key, shape: (0.02 * jax.random.normal(key, shape)).astype(dtype)  # noqa: E731
    if impl == "dense":
        return {"gate": draw(keys[0], (d, k * f)), "up": draw(keys[1], (d, k * f)), "down": draw(keys[2], (k * f, d))}
    return {"router": draw(keys[3], (x, d)), "gate": draw(keys[0], (x, d, f)), "up": draw(keys[1], (x, d, f)),
            "down": draw(keys[2], (x, f, d))}


def layer_fn(impl: str, k: int, dtype):
    """``(params, x [N, D]) -> y [N, D]`` of one formulation (module docstring)."""
    import jax
    import jax.numpy as jnp

    from easytune.models import moe

    def route(p, h):
        logits = jnp.einsum("nd,xd->nx", h, p["router"], preferred_element_type=jnp.float32)
        return moe.route(logits, k, normalize=True)

    def dense(p, h):
        return (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]

    def sparse(p, h):
        _, weights, experts = route(p, h)
        return moe.experts_forward(h, weights, experts, p["gate"], p["up"], p["down"], jax.nn.silu, dtype)

    def naive(p, h):
        _, weights, experts = route(p, h)
        mix = jnp.sum(jax.nn.one_hot(experts, p["gate"].shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
        act = jax.nn.silu(jnp.einsum("nd,xdf->nxf", h, p["gate"])) * jnp.einsum("nd,xdf->nxf", h, p["up"])
        return jnp.einsum("nxf,xfd,nx->nd", act, p["down"], mix.astype(dtype))

    return {"dense": dense, "sparse": sparse, "naive": naive}[impl]


def measure(impl: str, n: int, d: int, f: int, x: int, k: int, steps: int, dtype_name: str):
    """``(temp MiB, fastest step s, XLA GFLOP, y)`` of one fwd+bwd of ``impl`` on ``n`` tokens."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.dtype(dtype_name)
    params = make_params(impl, d, f, x, k, dtype)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    cot = jnp.asarray(rng.normal(size=(n, d)), dtype)
    fn = layer_fn(impl, k, dtype)

    def loss(p, h):
        y = fn(p, h)
        return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)), y

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = step.lower(params, h).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflop = float((cost or {}).get("flops", float("nan"))) / 1e9
    (_, y), grads = compiled(params, h)
    jax.block_until_ready(grads)
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, h))
        best = min(best, time.perf_counter() - t0)
    return temp, best, gflop, np.asarray(y, np.float32)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="256,1024,4096", help="comma-separated token counts N (batch x length)")
    p.add_argument("--hidden", type=int, default=256, help="D")
    p.add_argument("--expert-inter", type=int, default=512, help="F, one expert's intermediate size")
    p.add_argument("--experts", type=int, default=8, help="X")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args(argv)
    import jax
    devs = jax.devices()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(devs)} device(s): {devs[0].device_kind} "
          f"({devs[0]}); {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable)")
    d, f, x, k = a.hidden, a.expert_inter, a.experts, a.k
    print(f"one MoE MLP fwd+bwd, {a.dtype}: D={d}, F={f}, X={x}, top-{k}; dense = SwiGLU of width k*F={k * f} "
          f"(the active parameters); naive = all {x} experts on every token")
    print(f"{'tokens':>7} {'impl':>7} {'temp MiB':>9} {'x dense':>8} {'step ms':>9} {'x dense':>8} {'GFLOP':>8} "
          f"{'x dense':>8} {'|sparse-naive|':>15}")
    for n in map(int, a.tokens.split(",")):
        ref, outs = None, {}
        for impl in IMPLS:
            temp, sec, gflop, y = measure(impl, n, d, f, x, k, a.steps, a.dtype)
            outs[impl] = y
            ref = ref or (temp, sec, gflop)
            diff = f"{abs(outs['sparse'] - y).max():.2e}" if impl == "naive" else ""
            print(f"{n:>7} {impl:>7} {temp:>9.2f} {temp / ref[0]:>8.2f} {sec * 1e3:>9.2f} {sec / ref[1]:>8.2f} "
                  f"{gflop:>8.3f} {gflop / ref[2]:>8.2f} {diff:>15}", flush=True)


if __name__ == "__main__":
    main()
