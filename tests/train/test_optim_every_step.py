"""``make_optimizer(accumulation_steps=1)`` (its fast path without MultiSteps' cond and selects) against
``optax.MultiSteps(every_k_schedule=1)`` wrapped as for accumulation (the reference): bitwise the same
parameters and optimizer state over steps that include a non-finite gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easytune import config as config_lib
from easytune.train import optim


def test_accumulation_1_equals_multisteps():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.max_grad_norm, ocfg.weight_decay = 1e-2, 0.5, 0.1
    fast, _ = optim.make_optimizer(ocfg, total_steps=10, accumulation_steps=1)
    ref = optim._clean_reset(optax.MultiSteps(optim.make_inner(ocfg, 10)[0], 1, use_grad_mean=False))

    def run(tx):
        p, st = params, tx.init(params)
        update = jax.jit(lambda p, st, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, st, p)))
        for i in range(4):
            g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng_g.normal(size=x.shape), jnp.float32), params)
            if i == 1:
                g["w"] = g["w"].at[0, 0].set(jnp.nan)
            p, st = update(p, st, g)
        return p, st

    rng_g = np.random.default_rng(1)
    got = run(fast)
    rng_g = np.random.default_rng(1)
    want = run(ref)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got[1].gradient_step) == 4 and int(optim.skipped_updates(got[1])) == 1
