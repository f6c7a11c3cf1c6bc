"""Gradient accumulation against the un-accumulated step (the reference): uneven supervised lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import config as config_lib
from easytune import lora as lora_lib
from easytune.models import llama
from easytune.train import optim, step as step_lib
from tests.helpers import uneven_batch

CFG = llama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)


def _one_optimizer_step(batch, accum, method, use_grad_mean=False):
    params = llama.init_params(CFG, jax.random.PRNGKey(0))
    if method == "lora":
        lcfg = lora_lib.LoraConfig(r=4, lora_alpha=8)
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
        trainable, frozen = lora_lib.split(params, lora)
        model = llama.LlamaForCausalLM(CFG, lora_scale=lcfg.scale)
    else:
        trainable, frozen = lora_lib.split(params, None)
        model = llama.LlamaForCausalLM(CFG)
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.max_grad_norm, ocfg.weight_decay = 1e-3, 0.5, 0.1
    tx, _ = optim.make_optimizer(ocfg, total_steps=10, accumulation_steps=accum)
    if use_grad_mean:  # the transformers #34191 bug: averaging per-micro-batch means
        import optax
        tx = optax.MultiSteps(optim.make_inner(ocfg, 10)[0], accum, use_grad_mean=True)
    state = step_lib.TrainState(trainable, tx.init(trainable), jax.random.PRNGKey(0), jnp.int32(0))
    fn = jax.jit(step_lib.make_train_step(model, tx, use_dropout=False))
    rows = len(batch["input_ids"]) // accum
    window = jnp.float32(batch["loss_mask"].sum())
    loss = 0.0
    for i in range(accum):
        micro = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
        denom = jnp.float32(micro["loss_mask"].sum()) if use_grad_mean else window
        state, m = fn(state, frozen, micro, denom)
        loss += float(m["loss"])
    assert int(state.step) == 1
    return state.trainable, loss


@pytest.mark.parametrize("method", ["full", "lora"])
def test_batch8_equals_batch2_x_accum4(method):
    batch = uneven_batch(np.random.default_rng(0), rows=8, seq=16, vocab=CFG.vocab_size)
    ref, ref_loss = _one_optimizer_step(batch, 1, method)
    acc, acc_loss = _one_optimizer_step(batch, 4, method)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(acc)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert abs(ref_loss - acc_loss) < 1e-5
    # The default MultiSteps averaging (mean of micro-batch means) gives a different update here.
    bug, _ = _one_optimizer_step(batch, 4, method, use_grad_mean=True)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(bug)))
    assert diff > 1e-4


def test_schedule_warmup_then_cosine():
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.warmup_steps, ocfg.cosine_min_lr_ratio = 1e-3, 10, 0.1
    sched = optim.make_schedule(ocfg, 110)
    assert float(sched(0)) == 0.0
    assert abs(float(sched(10)) - 1e-3) < 1e-9
    assert abs(float(sched(60)) - (1e-4 + 0.5 * 9e-4)) < 1e-8  # cosine midpoint
    assert abs(float(sched(110)) - 1e-4) < 1e-9
