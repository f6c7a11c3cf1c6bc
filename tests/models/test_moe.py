"""Mixture-of-experts layer and training objective against transformers: the training loss with the
router load-balancing term equals ``MixtralForCausalLM(labels=..., output_router_logits=True).loss``; the
grouped-matmul dispatch equals running every expert on every token; ``model.router_aux_loss_coef``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune import config as config_lib  # noqa: E402
from easytune.models import moe  # noqa: E402
from easytune.models.hf_weights import load_hf_model  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402
from easytune.train import step as step_lib  # noqa: E402
from tests.models.test_families import hf_model, random_ids  # noqa: E402


def test_experts_forward_equals_every_expert_on_every_token():
    rng = np.random.default_rng(0)
    n, d, f, x_, k = 37, 8, 12, 5, 2
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    gate, up = (jnp.asarray(rng.normal(size=(x_, d, f)), jnp.float32) for _ in range(2))
    down = jnp.asarray(rng.normal(size=(x_, f, d)), jnp.float32)
    probs, weights, experts = moe.route(jnp.asarray(rng.normal(size=(n, x_)), jnp.float32), k, True)
    got = moe.experts_forward(x, weights, experts, gate, up, down, jax.nn.silu, jnp.float32)
    every = jnp.einsum("xnf,xfd->xnd", jax.nn.silu(jnp.einsum("nd,xdf->xnf", x, gate))
                       * jnp.einsum("nd,xdf->xnf", x, up), down)  # [X, N, D]: all experts, all tokens
    dense_w = jnp.sum(jax.nn.one_hot(experts, x_) * weights[..., None], axis=1)  # [N, X], zero off the top k
    want = jnp.einsum("xnd,nx->nd", every, dense_w)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.sum(weights, -1), 1.0, atol=1e-6)  # renormalised top-k


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_training_objective_equals_transformers_loss_with_router_aux(tmp_path, family):
    """easytune's differentiated objective (cross-entropy mean + coef * load-balancing loss, one micro-batch
    that is the whole window) equals transformers' ``loss`` with ``output_router_logits=True``, and so does its
    gradient with respect to the router weights (through the aux term and the routing weights)."""
    model = hf_model(tmp_path, family, router_aux_loss_coef=0.3)
    config, params = load_hf_model(tmp_path)
    config = dataclasses.replace(config, router_aux_loss_coef=0.3)  # as model.router_aux_loss_coef=0.3
    ids = random_ids((2, 24))
    batch = {"input_ids": jnp.asarray(ids[:, :-1]), "target_ids": jnp.asarray(ids[:, 1:]),
             "loss_mask": jnp.ones((2, 23), jnp.float32), "segment_ids": jnp.ones((2, 23), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(23, dtype=jnp.int32), (2, 23))}
    spec = step_lib.StepSpec(model=LlamaForCausalLM(config))

    def objective(p):
        return step_lib._window_loss({"params": p}, {}, batch, jnp.float32(46.0), None, spec)

    (ours, (loss_sum, tokens, share)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    tids = torch.as_tensor(ids, dtype=torch.long)
    model.zero_grad()
    full = model(tids[:, :-1], output_router_logits=True)  # the same 23 input tokens per row as easytune's batch
    ce = torch.nn.functional.cross_entropy(full.logits.reshape(-1, full.logits.shape[-1]).float(),
                                           tids[:, 1:].reshape(-1))
    want = ce + 0.3 * full.aux_loss
    want.backward()
    assert float(share) > 0
    np.testing.assert_allclose(float(ours), want.item(), atol=1e-5, rtol=0)
    g_ours = np.asarray(grads["model"]["layers_0"]["mlp"]["gate"]["weight"])
    g_want = model.model.layers[0].mlp.gate.weight.grad.numpy()
    np.testing.assert_allclose(g_ours, g_want, atol=1e-5, rtol=1e-4)


def test_router_aux_loss_coef_key(tmp_path):
    from easytune.models import loading
    c = config_lib.defaults()
    assert c.model.router_aux_loss_coef == -1.0
    assert "router_aux_loss_coef" not in loading.runtime_fields(c)  # -1: the checkpoint's value
    c.model.router_aux_loss_coef = 0.02
    assert loading.runtime_fields(c)["router_aux_loss_coef"] == 0.02
    c.model.router_aux_loss_coef = -2.0
    with pytest.raises(config_lib.ConfigError, match="model.router_aux_loss_coef"):
        from easytune import config_check
        config_check.validate_compute(c)
