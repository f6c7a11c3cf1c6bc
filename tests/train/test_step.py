"""The train and eval steps (easytune.train.step).

Gradient accumulation against the un-accumulated step (the reference), with uneven supervised lengths; the
chunked loss (``train.loss_chunk_tokens``) against the plain full-logits loss (the reference): same loss sum and
gradients, for an untied LoRA model with LoRA on ``lm_head``, a tied full model, and a QLoRA base with an NF4
``lm_head``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import config as config_lib
from easytune import lora as lora_lib
from easytune import quant
from easytune.models import llama
from easytune.models.model_config import ModelConfig
from easytune.train import optim
from easytune.train import step as step_lib
from tests.helpers import uneven_batch

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
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
    fn = jax.jit(functools.partial(step_lib.train_step, spec=step_lib.StepSpec(model, tx)))
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
@pytest.mark.slow
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


CHUNK_CFG = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)


def _chunk_setup(kind):
    cfg = CHUNK_CFG if kind != "tied" else ModelConfig(**{**CHUNK_CFG.__dict__, "tie_word_embeddings": True})
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    if kind == "tied":
        trainable, frozen = lora_lib.split(params, None)
        return llama.LlamaForCausalLM(cfg), trainable, frozen
    if kind == "qlora":  # every kernel NF4, lm_head included (skip_modules=())
        params = quant.quantize_params(params, skip_modules=())
    lcfg = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear" if kind == "qlora" else
                               ("q_proj", "v_proj", "lm_head"))
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # nonzero lora_B: every LoRA gradient nonzero
    trainable, frozen = lora_lib.split(params, lora)
    return llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale), trainable, frozen


@pytest.mark.parametrize("kind", ["lora_lm_head", "tied", "qlora"])
@pytest.mark.slow
def test_chunked_loss_and_grads_equal_full_logits(kind):
    model, trainable, frozen = _chunk_setup(kind)
    batch = uneven_batch(np.random.default_rng(0), rows=3, seq=12, vocab=CHUNK_CFG.vocab_size)

    def loss(trainable, chunk):
        s, n = step_lib.token_loss_sum(model, lora_lib.combine(trainable, frozen), batch, chunk_tokens=chunk)
        return s / n, (s, n)

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ref, (ref_sum, ref_n)), ref_g = grad(trainable, 0)
    for chunk in (10, 1000):  # 3 rows x 12 positions: chunks of 4 (pads T to 16) and of all 12 positions
        (got, (got_sum, got_n)), got_g = grad(trainable, chunk)
        assert float(got_n) == float(ref_n)
        np.testing.assert_allclose(float(got_sum), float(ref_sum), rtol=1e-6)
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(ref_g), jax.tree_util.tree_leaves(got_g)):
            assert float(jnp.abs(a).max()) > 0
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0)
    # eval (no differentiation) goes through the primal path
    ev = jax.jit(functools.partial(step_lib.eval_step, spec=step_lib.StepSpec(model, loss_chunk_tokens=7)))(
            trainable, frozen, batch)
    np.testing.assert_allclose(float(ev["loss_sum"]), float(ref_sum), rtol=1e-6)


def test_lora_dropout_on_lm_head_falls_back_to_full_logits():
    model, trainable, frozen = _chunk_setup("lora_lm_head")
    model = model.clone(lora_dropout=0.1)
    batch = uneven_batch(np.random.default_rng(0), rows=2, seq=8, vocab=CHUNK_CFG.vocab_size)
    key = jax.random.PRNGKey(3)
    variables = lora_lib.combine(trainable, frozen)
    assert step_lib._head_fn(model, variables, key) is None  # dropout on the LoRA lm_head: no chunking
    assert step_lib._head_fn(model, variables, None) is not None  # deterministic (eval): chunked
    loss = jax.jit(lambda v, chunk: step_lib.token_loss_sum(model, v, batch, rng=key, chunk_tokens=chunk),
                   static_argnums=1)
    ref, got = loss(variables, 0), loss(variables, 4)
    assert float(got[0]) == float(ref[0])
