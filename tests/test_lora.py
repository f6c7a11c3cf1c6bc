"""LoRA against PEFT (the reference): target selection, logits with given A/B, init, step-0 identity."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from easytune import lora as lora_lib
from easytune.models import hf_weights, llama
from easytune.train import step as step_lib
from tests.helpers import save_tiny_hf_llama, uneven_batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    torch_model = save_tiny_hf_llama(path)
    cfg, params = hf_weights.load_hf_model(path)
    return path, torch_model, cfg, params


def _peft_targets(torch_model, target_modules):
    import copy

    import peft
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=4, target_modules=target_modules))
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "v_proj"], r".*layers\.1\.mlp\.(up|down)_proj"])
def test_target_selection_matches_peft(tiny, target):
    _, torch_model, _, params = tiny
    ours = sorted(lora_lib.hf_module_name(p) for p in lora_lib.select_targets(
        params, lora_lib.parse_target_modules(target if isinstance(target, str) else ",".join(target))))
    assert ours == _peft_targets(torch_model, target)


def test_no_match_lists_available_modules(tiny):
    with pytest.raises(ValueError, match=r"matches no linear module.*q_proj"):
        lora_lib.select_targets(tiny[3], ("query_key_value",))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_logits_match_peft_with_same_adapter(tiny, use_rslora):
    import peft
    _, torch_model, cfg, params = tiny
    lcfg = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj"),
                               use_rslora=use_rslora)
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(0))
    # make B non-zero so the adapter matters
    rng = np.random.default_rng(0)
    lora = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32), lora)
    pm = peft.get_peft_model(torch_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lcfg.target_modules),
                                                         use_rslora=use_rslora, lora_dropout=0.0)).eval()
    modules = dict(pm.named_modules())
    for key, value in traverse_util.flatten_dict(lora).items():
        name = "base_model.model." + lora_lib.hf_module_name(key[:-1])
        layer = getattr(modules[name], key[-1])["default"]
        layer.weight.data = torch.tensor(np.asarray(value).T.copy())
    ids = rng.integers(0, cfg.vocab_size, size=(2, 9))
    with torch.no_grad():
        ref = pm(torch.tensor(ids)).logits.numpy()
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    ours = np.asarray(model.apply({"params": params, "lora": lora}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    merged = lora_lib.merge(params, lora, lcfg.scale)
    ours_merged = np.asarray(model.apply({"params": merged}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours_merged, ref, atol=1e-4, rtol=0)
    pm.unload()


def test_init_distribution_matches_peft(tiny):
    _, _, cfg, params = tiny
    lcfg = lora_lib.LoraConfig(r=8, target_modules=("gate_proj",))
    lora = traverse_util.flatten_dict(lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1)))
    a = np.asarray(lora[("model", "layers_0", "mlp", "gate_proj", "lora_A")])
    b = np.asarray(lora[("model", "layers_0", "mlp", "gate_proj", "lora_B")])
    assert a.shape == (cfg.hidden_size, 8) and b.shape == (8, cfg.intermediate_size)
    # PEFT: nn.init.kaiming_uniform_(lora_A.weight [r, in], a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); B = 0
    ref = torch.empty(8, cfg.hidden_size)
    torch.nn.init.kaiming_uniform_(ref, a=5 ** 0.5)
    bound = 1 / np.sqrt(cfg.hidden_size)
    assert np.abs(a).max() <= bound and np.abs(ref.numpy()).max() <= bound
    assert np.abs(a).max() > 0.8 * bound and np.all(b == 0)


def test_step0_equals_base_then_only_lora_changes(tiny):
    _, _, cfg, params = tiny
    lcfg = lora_lib.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(0))
    trainable, frozen = lora_lib.split(params, lora)
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    batch = uneven_batch(np.random.default_rng(0), 4, 12, cfg.vocab_size)
    base = model.apply({"params": params}, batch["input_ids"])
    step0 = model.apply(lora_lib.combine(trainable, frozen), batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(step0), np.asarray(base))

    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    tx = optax.MultiSteps(optax.adamw(1e-3), 1, use_grad_mean=False)
    state = step_lib.TrainState(trainable, tx.init(trainable), jax.random.PRNGKey(0), jnp.int32(0))
    train_step = jax.jit(functools.partial(step_lib.train_step, spec=step_lib.StepSpec(model, tx)))
    state, _ = train_step(state, frozen, batch, jnp.float32(batch["loss_mask"].sum()))
    for key, b in traverse_util.flatten_dict(state.trainable["lora"]).items():
        if key[-1] == "lora_B":
            assert np.any(np.asarray(b) != 0), key
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_modules_to_save_is_trainable(tiny):
    params = tiny[3]
    lora = lora_lib.init_lora(params, lora_lib.LoraConfig(target_modules=("q_proj",)), jax.random.PRNGKey(0))
    trainable, frozen = lora_lib.split(params, lora, ("lm_head",))
    assert "lm_head" in trainable["params"] and "lm_head" not in frozen["params"]
    with pytest.raises(ValueError, match="matches no module"):
        lora_lib.split(params, lora, ("not_a_module",))
