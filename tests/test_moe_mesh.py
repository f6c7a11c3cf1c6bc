"""Mixture-of-experts training on the ``expert`` mesh axis equals one device, and the load-balancing loss equals
transformers'.

A tiny random transformers Mixtral (8 experts, top-2, ``output_router_logits`` with ``router_aux_loss_coef`` so the
load-balancing loss is part of the objective and of the gradient) trained a few steps through the Trainer's own
pieces (as tests/train/test_mesh.py) on meshes with ``mesh.expert=4`` of the 8 simulated CPU devices
(tests/conftest.py) gives one device's per-step losses within 1e-5 and the same final parameters, for full
fine-tuning and LoRA; the stacked expert weights (and their Adam moments) are really split over the expert axis,
and no all-gather of the compiled step puts all X experts' weights on a device. The expert work per device
(XLA's flop count of the compiled layer) is a share of one device's (each device sorts its own rows'
pairs under ``jax.shard_map``; a global sort made XLA replicate the whole batch's expert work). The
load-balancing loss equals transformers' ``aux_loss`` on a padded batch (Mixtral, and Qwen3-MoE with a dense
layer).

Reference: transformers 5.25 ``models/mixtral/modeling_mixtral.py`` (``MixtralForCausalLM``,
``load_balancing_loss_func``), ``models/qwen3_moe/modeling_qwen3_moe.py``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune import sharding as sharding_lib  # noqa: E402
from easytune.tokenizer import load_tokenizer  # noqa: E402
from tests.models.test_families import save_redrawn  # noqa: E402
from tests.train import test_mesh as mesh_test  # noqa: E402

X, K, COEF = 8, 2, 0.1  # experts, experts per token, router_aux_loss_coef (large: the aux gradient matters)
HIDDEN, EXPERT_INTER = 32, 16
GLOBAL_BATCH = 8
STEPS = 4
# (data, fsdp, expert, tensor) on the 8 devices
MESHES = [(1, 2, 4, 1), (2, 1, 4, 1), (1, 1, 4, 2)]
EXPERTS = ("model", "layers_0", "mlp", "experts")


def _save_tiny_moe(path, vocab: int, family: str = "mixtral", seed: int = 0):
    """A tiny random transformers MoE of ``family`` (``mixtral``: every layer sparse; ``qwen3_moe``: layer 1 a
    dense MLP, top-k weights not renormalised) with the load-balancing loss on (``output_router_logits``,
    ``router_aux_loss_coef`` = COEF), weights std 0.15 (routing far from uniform), saved to ``path``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=K,
                  output_router_logits=True, router_aux_loss_coef=COEF, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=EXPERT_INTER, num_local_experts=X,
                                         sliding_window=None)
    else:
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=EXPERT_INTER,
                                          num_experts=X, head_dim=8, norm_topk_prob=False, mlp_only_layers=[1])
    return save_redrawn(cfg, path)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart data + tokenizer and a tiny Mixtral with that vocab: ``{"model", "tokenizer", "train"}``."""
    from easytune.data import quickstart
    root = tmp_path_factory.mktemp("moe_base")
    assets = quickstart.build_quickstart(root / "assets", num_records=200)
    vocab = len(load_tokenizer(str(assets["tokenizer_dir"])))
    _save_tiny_moe(root / "model", vocab)
    return {"model": root / "model", "tokenizer": assets["tokenizer_dir"], "train": assets["train_file"]}


def _config(base, out, method, mesh):
    return mesh_test._config(base, out, method, mesh, steps=STEPS)


def _train(config, devices):
    """``(losses [STEPS], aux shares [STEPS], setup, state, compiled train step)`` of ``STEPS`` optimizer steps
    through the Trainer's own pieces (:func:`tests.train.test_mesh.run_steps`)."""
    metrics, setup, state, compiled = mesh_test.run_steps(config, devices, STEPS)
    assert setup.model_cfg.is_moe and setup.model_cfg.router_aux_loss_coef == COEF
    return (np.array([m["loss"] for m in metrics]), np.array([m["aux_loss"] for m in metrics]), setup, state,
            compiled)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _all_gather_shapes(hlo: str) -> list[tuple[int, ...]]:
    """The result shapes of every all-gather in compiled HLO text (a tuple-valued one gives each element)."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"= (.*?) all-gather(?:-start)?\(", line)
        if m:
            out += [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([0-9,]*)\]", m.group(1))]
    return out


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.slow
def test_expert_meshes_match_one_device(base, tmp_path, method):
    """Per-step losses (cross-entropy + router_aux_loss_coef * load-balancing) within 1e-5 of one device's, the
    final trainable parameters equal; expert weights split [X/4, ...] per device, other weights not over it."""
    one, aux1, _, state1, _ = _train(_config(base, tmp_path / "one", method, (1, 1, 1, 1)), jax.devices()[:1])
    assert np.all(np.isfinite(one)) and one[-1] < one[0], one  # it trains
    assert np.all(aux1 > 0), aux1  # the load-balancing term is in the loss
    want = _flat(state1.trainable)
    for mesh in MESHES:
        got, aux, setup, state, compiled = _train(_config(base, tmp_path / str(mesh), method, mesh), jax.devices())
        np.testing.assert_allclose(got, one, atol=1e-5, rtol=0, err_msg=f"{method} losses on mesh {mesh}")
        np.testing.assert_allclose(aux, aux1, atol=1e-6, rtol=0, err_msg=f"{method} aux on mesh {mesh}")
        params = _flat(state.trainable)
        assert params.keys() == want.keys()
        for key, value in params.items():
            np.testing.assert_allclose(value, want[key], atol=2e-5, rtol=0, err_msg=f"{method} {key} on {mesh}")
        # the stacked experts are split over the expert axis: X/4 experts per device (and D over fsdp)
        data, fsdp, expert, tensor = mesh
        tree = state.trainable if method == "full" else setup.frozen
        experts = traverse_util.flatten_dict(tree["params"])
        for name, (dim_in, dim_out) in {"gate_proj": (HIDDEN, EXPERT_INTER), "up_proj": (HIDDEN, EXPERT_INTER),
                                        "down_proj": (EXPERT_INTER, HIDDEN)}.items():
            w = experts[EXPERTS + (name,)]
            assert w.shape == (X, dim_in, dim_out)
            assert w.sharding.spec[0] == "expert", (name, w.sharding.spec)
            shard = w.addressable_shards[0].data.shape
            assert shard[0] == X // expert and np.prod(shard) * expert * fsdp * tensor == w.size, (name, shard)
        # ... and stay split: no all-gather in the compiled step stacks more than this device's X/4 experts (an
        # fsdp gather of its own experts' shards, ZeRO-3 within the expert group, is allowed; all X are not)
        matrices = {(HIDDEN, EXPERT_INTER), (EXPERT_INTER, HIDDEN)} | {
                tuple(experts[EXPERTS + (n,)].addressable_shards[0].data.shape[1:]) for n in ("gate_proj", "down_proj")}
        for shape in _all_gather_shapes(compiled.as_text()):
            assert not (len(shape) == 3 and shape[1:] in matrices and shape[0] != X // expert), (mesh, shape)
        router = experts[EXPERTS[:-1] + ("gate", "weight")]
        assert "expert" not in jax.tree_util.tree_leaves(tuple(router.sharding.spec)), router.sharding.spec
        if method == "full":  # the Adam moments of the experts are split the same way
            mu = traverse_util.flatten_dict(state.opt_state.inner_opt_state.inner_state[1][0].mu["params"])
            assert mu[EXPERTS + ("gate_proj",)].sharding.spec == experts[EXPERTS + ("gate_proj",)].sharding.spec


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_aux_loss_equals_transformers_with_padding(tmp_path, family):
    """``moe.load_balancing_loss`` of the sown router statistics equals transformers' ``aux_loss``
    (``load_balancing_loss_func`` over every sparse layer's router logits, padding excluded by the attention
    mask) on a right-padded batch; the padding changes the value (the mask is really applied). Qwen3-MoE's
    dense layer 1 (``mlp_only_layers``) contributes nothing in either."""
    from easytune.models.hf_weights import load_hf_model
    from easytune.models.llama import LlamaForCausalLM
    from easytune.models.moe import load_balancing_loss
    vocab, t = 64, 12
    model = _save_tiny_moe(tmp_path, vocab, family)
    config, params = load_hf_model(tmp_path)
    assert config.is_moe and config.num_experts == X
    ids = np.random.default_rng(0).integers(2, vocab, (3, t)).astype(np.int32)
    lengths = np.array([t, 7, 3])
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int32)  # 1 = token, 0 = right padding
    ids = np.where(mask > 0, ids, 0)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), ids.shape)

    def ours(segment_ids):
        _, state = LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids), positions=positions,
                                                  segment_ids=jnp.asarray(segment_ids), mutable=["intermediates"])
        return float(load_balancing_loss(state["intermediates"], X))

    def theirs(attention_mask):
        with torch.no_grad():
            out = model(torch.as_tensor(ids, dtype=torch.long), output_router_logits=True,
                        attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask))
        assert len(out.router_logits) == (2 if family == "mixtral" else 1)  # the sparse layers only
        return float(out.aux_loss)

    want = theirs(mask)
    np.testing.assert_allclose(ours(mask), want, rtol=1e-5, atol=0)
    unmasked = theirs(None)
    np.testing.assert_allclose(ours(np.ones_like(mask)), unmasked, rtol=1e-5, atol=0)
    assert abs(want - unmasked) > 1e-3 * want, (want, unmasked)


def test_expert_work_is_split_over_the_mesh():
    """The routed experts' forward + backward on 8 devices (``mesh.data=8``; ``data=2 x expert=4``) does at most
    1/4 of one device's work per device (ideal 1/8; XLA's ``cost_analysis`` flops of the compiled step) and gives
    the same outputs and gradients."""
    from ml_collections import ConfigDict

    from easytune.models import moe
    n, d, f = 1024, 64, 128
    rng = np.random.default_rng(0)
    draw = lambda *shape: jnp.asarray(0.1 * rng.normal(size=shape), jnp.float32)  # noqa: E731
    params = {"router": draw(X, d), "gate": draw(X, d, f), "up": draw(X, d, f), "down": draw(X, f, d)}
    h, cot = draw(n, d), draw(n, d)

    def make_step():  # a fresh function per mesh: jit caches a trace per function, and the mesh is read in it
        def loss(p, h):
            _, weights, experts = moe.route(h @ p["router"].T, K, True)
            y = moe.experts_forward(h, weights, experts, p["gate"], p["up"], p["down"], jax.nn.silu, jnp.float32)
            return jnp.sum(y * cot)
        return jax.value_and_grad(loss, argnums=(0, 1))

    one = jax.jit(make_step()).lower(params, h).compile()
    want = one(params, h)
    for data, expert in ((8, 1), (2, 4)):
        mesh = sharding_lib.make_mesh(ConfigDict(dict(data=data, fsdp=1, expert=expert, tensor=1)), jax.devices())
        w_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
        p_sh = {"router": sharding_lib.replicated(mesh), "gate": w_sh, "up": w_sh, "down": w_sh}
        with sharding_lib.activation_mesh(mesh):
            compiled = jax.jit(make_step(), in_shardings=(p_sh, sharding_lib.batch_sharding(mesh))).lower(
                params, h).compile()
        got = compiled(params, h)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-5)
        ratio = compiled.cost_analysis()["flops"] / one.cost_analysis()["flops"]
        assert ratio <= 0.25, f"data={data} x expert={expert}: each device does {ratio:.2f} of one device's work"
