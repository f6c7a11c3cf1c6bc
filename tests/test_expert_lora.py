"""LoRA on the experts of Mixtral / Qwen3-MoE (``lora.target_parameters``) equals peft 0.21's ``ParamWrapper`` on
transformers 5's fused expert parameters.

For tiny random Mixtral and Qwen3-MoE models with random nonzero LoRA weights on the experts (``gate_up_proj`` and
``down_proj``) and on attention: easytune's logits equal peft's (the adapter easytune exports, loaded with
``PeftModel.from_pretrained`` on the transformers base) within 1e-4 fp32; the exported tensors have the names and
shapes peft's own ``save_pretrained`` writes; easytune reads the adapter back exactly; the merged export loads in
transformers with the same logits; scanned layers, an expert-sharded mesh and NF4 experts (QLoRA) give the same
function; bad values are refused. A 2-step LoRA run (slow) trains the expert LoRA.

References: peft 0.21 ``tuners/lora/layer.py`` ``ParamWrapper``, ``tuners/tuners_utils.py``
``BaseTuner._inject_parameters``; transformers 5.25 ``MixtralExperts`` / ``Qwen3MoeExperts``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from easytune import adapter as adapter_lib  # noqa: E402
from easytune import config as config_lib  # noqa: E402
from easytune import config_check, export, quant  # noqa: E402
from easytune import lora as lora_lib  # noqa: E402
from easytune import sharding as sharding_lib  # noqa: E402
from easytune.models import hf_weights, moe  # noqa: E402
from easytune.models import scan as scan_lib  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402
from tests.models.test_families import save_redrawn  # noqa: E402

IDS = np.array([[1, 5, 9, 23, 42, 7, 11, 3, 60, 2, 17, 33, 8, 19, 4, 27]], np.int32)
TOL = 1e-4
R, ALPHA = 2, 6.0  # scale 3: a wrong scale shows
BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1])),
}
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ATTN = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """``family -> HF model dir`` of a tiny random model, saved once."""
    cache = {}

    def get(family):
        if family not in cache:
            cls_name, kwargs = FAMILIES[family]
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(family)
            save_redrawn(getattr(transformers, cls_name)(**BASE, **kwargs), path)
            cache[family] = path
        return cache[family]
    return get


def _random_lora(params, lcfg, seed=0):
    """The LoRA collection of ``lcfg`` with every ``lora_B`` (zeros at init) redrawn nonzero, as numpy fp32."""
    lora = traverse_util.flatten_dict(lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict({k: np.asarray(v) if k[-1] == "lora_A" else
                                         (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
                                         for k, v in lora.items()})


def _logits(model_cfg, params, lora=None, scale=1.0):
    variables = {"params": params, **({"lora": lora} if lora is not None else {})}
    apply = jax.jit(lambda v, x: LlamaForCausalLM(model_cfg, lora_scale=scale).apply(v, x))
    return np.asarray(apply(variables, jnp.asarray(IDS)))


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _transformers(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()


def _export(base_dir, model_cfg, params, lcfg, lora, out):
    """``export.export_adapter`` of an in-memory "run" (base at ``base_dir``)."""
    setup = types.SimpleNamespace(config=types.SimpleNamespace(method="lora", model=types.SimpleNamespace(
        path=str(base_dir))), model_cfg=model_cfg, lora_cfg=lcfg, frozen={"params": params}, tokenizer=None,
        base_vocab_size=None, base_rows=None)
    return export.export_adapter(out.parent, out, run=(setup, {"lora": lora}))


def _setting(family_dir, family, targets=EXPERTS, modules=ATTN, use_rslora=False):
    base = family_dir(family)
    model_cfg, params = hf_weights.load_hf_model(base, dtype="float32")
    lcfg = lora_lib.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=modules, target_parameters=tuple(targets),
                               use_rslora=use_rslora)
    return base, model_cfg, jax.device_get(params), lcfg, _random_lora(params, lcfg)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_lora_equals_peft(family_dir, family, tmp_path):
    """easytune's logits with attention + expert LoRA = peft's on transformers with easytune's exported adapter;
    the adapter's tensor names and shapes are those peft's own ``save_pretrained`` writes; easytune reads it back
    exactly; merged (by easytune from the run, and from the adapter dir) it loads in transformers with the same
    logits."""
    base, model_cfg, params, lcfg, lora = _setting(family_dir, family)
    ours = _logits(model_cfg, params, lora, lcfg.scale)
    assert np.abs(ours - _logits(model_cfg, params)).max() > 1e-2  # the LoRA matters

    adapter = _export(base, model_cfg, params, lcfg, lora, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["lora_dropout"] == 0.0
    tensors = safetensors.numpy.load_file(adapter / "adapter_model.safetensors")

    # the names and shapes peft writes for the same targets
    ref = peft.get_peft_model(_transformers(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ATTN),
                                                                   target_parameters=list(EXPERTS)))
    ref.save_pretrained(str(tmp_path / "peft_own"))
    want = safetensors.numpy.load_file(tmp_path / "peft_own" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in want.items()}
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in tensors  # gate_up_proj

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_transformers(base), str(adapter)).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message) or "did not match" in str(w.message)]
    np.testing.assert_allclose(_torch_logits(model), ours, atol=TOL, rtol=0)

    got_cfg, got, saved = adapter_lib.load_peft_adapter(adapter, params, model_cfg)
    assert got_cfg.target_parameters == ("mlp.experts.down_proj", "mlp.experts.gate_up_proj") and not saved
    flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(lora)
    assert set(flat_got) == set(flat_want)
    for k in flat_want:
        np.testing.assert_array_equal(flat_got[k], flat_want[k])

    merged = lora_lib.merge(params, lora, lcfg.scale)
    hf_weights.save_hf_model(jax.device_get(merged), model_cfg, tmp_path / "merged")
    np.testing.assert_allclose(_torch_logits(_transformers(tmp_path / "merged")), ours, atol=TOL, rtol=0)
    from_adapter = export.export_merged_adapter(base, adapter, tmp_path / "from_adapter")
    np.testing.assert_allclose(_torch_logits(_transformers(from_adapter)), ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("targets, rslora", [(("gate_up_proj",), True), (("model.layers.0.mlp.experts.down_proj",),
                                                                         False)])
def test_one_expert_param_and_rslora_equal_peft(family_dir, targets, rslora, tmp_path):
    """One expert parameter (bare suffix; or one layer's by full name, written as such), experts only
    (``target_modules`` empty), rsLoRA's scale: peft's logits again; peft's key has no ``base_layer`` then."""
    base, model_cfg, params, lcfg, lora = _setting(family_dir, "mixtral", targets, (), rslora)
    ours = _logits(model_cfg, params, lora, lcfg.scale)
    adapter = _export(base, model_cfg, params, lcfg, lora, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    full = targets[0].startswith("model.")
    assert cfg["target_parameters"] == (list(targets) if full else ["mlp.experts." + targets[0]])
    tensors = safetensors.numpy.load_file(adapter / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.{i}.mlp.experts.lora_{w}.weight"
                                     for i in ([0] if full else [0, 1]) for w in "AB")
    model = peft.PeftModel.from_pretrained(_transformers(base), str(adapter)).eval()
    np.testing.assert_allclose(_torch_logits(model), ours, atol=TOL, rtol=0)


def test_scanned_layers_and_expert_mesh_equal_plain(family_dir):
    """``model.scan_layers`` (the lora collection stacked like params) and a mesh splitting the experts (and F over
    tensor) give the plain forward's logits; the expert LoRA's logical axes lead with ``expert``."""
    base, model_cfg, params, lcfg, lora = _setting(family_dir, "mixtral")
    ours = _logits(model_cfg, params, lora, lcfg.scale)
    variables = scan_lib.stack_layers({"params": params, "lora": lora}, model_cfg.num_hidden_layers)
    scanned = _logits(dataclasses.replace(model_cfg, scan_layers=True), variables["params"], variables["lora"],
                      lcfg.scale)
    np.testing.assert_allclose(scanned, ours, atol=1e-5, rtol=0)

    from easytune.models import llama
    axes = sharding_lib.lora_logical_axes(lora, llama.param_logical_axes(model_cfg))
    experts = axes["model"]["layers_0"]["mlp"]["experts"]
    assert experts["gate_up_proj"] == {"lora_A": ("expert", "embed", "lora_rank"),
                                       "lora_B": ("expert", "lora_rank", "mlp")}
    assert experts["down_proj"] == {"lora_A": ("expert", "mlp", "lora_rank"),
                                    "lora_B": ("expert", "lora_rank", "embed")}

    mesh = sharding_lib.make_mesh(_mesh_cfg(data=2, expert=2, tensor=2))
    with sharding_lib.activation_mesh(mesh):
        sharded = _logits(model_cfg, params, lora, lcfg.scale)
    np.testing.assert_allclose(sharded, ours, atol=1e-5, rtol=0)


def _mesh_cfg(**sizes):
    m = config_lib.defaults().mesh
    for k in ("data", "fsdp", "tensor", "expert"):
        m[k] = sizes.get(k, 1)
    return m


def test_expert_lora_under_nf4_experts(family_dir):
    """QLoRA: NF4 experts with expert LoRA give the float forward on the dequantized weights (the same function),
    and the float model's logits up to NF4 error (mean over the logits: as large as without LoRA)."""
    base, model_cfg, params, lcfg, lora = _setting(family_dir, "qwen3_moe")
    q = quant.quantize_params(params)
    assert quant.is_qtensor(q["model"]["layers_0"]["mlp"]["experts"]["gate_proj"])
    nf4 = _logits(model_cfg, q, lora, lcfg.scale)
    dequantized = quant.dequantize_tree(q)
    np.testing.assert_allclose(nf4, _logits(model_cfg, dequantized, lora, lcfg.scale), atol=1e-5, rtol=0)
    ours = _logits(model_cfg, params, lora, lcfg.scale)
    plain_err = np.abs(_logits(model_cfg, q) - _logits(model_cfg, params)).mean()  # NF4's error without LoRA
    err = np.abs(nf4 - ours).mean()
    assert err < 2 * plain_err, (err, plain_err)  # measured 0.23 vs 0.21 (a routed token may flip expert)
    assert err < 0.5 * np.abs(ours - _logits(model_cfg, params)).mean()  # well below what the LoRA changes (0.71)


def test_experts_forward_lora_equals_dense_reference():
    """:func:`easytune.models.moe.experts_forward` with expert LoRA = each token's k experts computed densely with
    ``W_e + s * A_e @ B_e`` (gate rows first in gate_up's B)."""
    rng = np.random.default_rng(0)
    n, d, f, x, k, r, s = 7, 6, 5, 3, 2, 2, 1.7
    xs = rng.standard_normal((n, d)).astype(np.float32)
    gate, up = (rng.standard_normal((x, d, f)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((x, f, d)).astype(np.float32)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    a_gu, b_gu, a_d, b_d = normal(x, d, r), normal(x, r, 2 * f), normal(x, f, r), normal(x, r, d)
    experts = np.array([[0, 2], [1, 0], [2, 1], [2, 0], [0, 1], [1, 2], [0, 2]], np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    got = moe.experts_forward(jnp.asarray(xs), jnp.asarray(weights), jnp.asarray(experts), gate, up, down,
                              jax.nn.silu, jnp.float32, {"gate_up_proj": (a_gu, b_gu), "down_proj": (a_d, b_d)}, s)
    want = np.zeros((n, d), np.float32)
    for i in range(n):
        for j in range(k):
            e = experts[i, j]
            gu = np.concatenate([gate[e], up[e]], 1) + s * a_gu[e] @ b_gu[e]
            h = np.asarray(jax.nn.silu(xs[i] @ gu[:, :f])) * (xs[i] @ gu[:, f:])
            want[i] += weights[i, j] * (h @ (down[e] + s * a_d[e] @ b_d[e]))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)


def _config(**overrides):
    c = config_lib.defaults()
    c.method = "lora"
    c.model.preset = ""
    c.model.path = overrides.pop("model.path", "")
    c.data.builtin = "quickstart"
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def test_bad_target_parameters_refused(family_dir, tmp_path):
    """Config: entries that are not fused expert params (the router, a per-projection name), dropout, a preset or a
    dense model; at load: an entry matching nothing, a model without experts."""
    moe_dir = str(family_dir("mixtral"))
    config_check.validate(_config(**{"model.path": moe_dir, "lora.target_parameters": "gate_up_proj,down_proj"}))
    cases = [({"lora.target_parameters": "mlp.gate.weight"}, "router mlp.gate is never a LoRA target"),
             ({"lora.target_parameters": "gate_proj"}, "one fused parameter: gate_up_proj"),
             ({"lora.target_parameters": "down_proj", "lora.lora_dropout": 0.1}, "lora.lora_dropout.*must be 0")]
    for overrides, msg in cases:
        with pytest.raises(config_lib.ConfigError, match=msg):
            config_check.validate(_config(**{"model.path": moe_dir, **overrides}))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(config_lib.ConfigError, match="model_type 'llama', which has no mixture-of-experts"):
        config_check.validate(_config(**{"model.path": str(dense), "lora.target_parameters": "down_proj"}))
    with pytest.raises(config_lib.ConfigError, match="is a dense model"):
        config_check.validate(_config(**{"model.preset": "tiny", "lora.target_parameters": "down_proj"}))

    _, params = hf_weights.load_hf_model(moe_dir, dtype="float32")
    with pytest.raises(ValueError, match="entry 'model.layers.7.mlp.experts.down_proj' matches no expert parameter"):
        lora_lib.select_expert_targets(params, ("model.layers.7.mlp.experts.down_proj",))
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        lora_lib.select_expert_targets({"model": {"layers_0": {"mlp": {"up_proj": {"kernel": np.zeros((2, 2))}}}}},
                                       ("down_proj",))


@pytest.mark.slow
def test_lora_run_trains_expert_lora(family_dir, tmp_path):
    """A 2-step LoRA run with ``lora.target_parameters`` trains the expert LoRA (its B leaves zero), loss finite;
    its adapter loads in peft with the run's logits."""
    from easytune.train import loop
    from easytune.train import setup as setup_lib
    from tests.helpers import quickstart_base, tiny_run_config
    data = quickstart_base(tmp_path / "base")
    model_dir = tmp_path / "model"
    tok = transformers.AutoTokenizer.from_pretrained(str(data["tokenizer"]))
    cls_name, kwargs = FAMILIES["qwen3_moe"]
    torch.manual_seed(0)
    save_redrawn(getattr(transformers, cls_name)(**{**BASE, **kwargs, "vocab_size": len(tok)}), model_dir)
    out = tmp_path / "run"
    c = tiny_run_config(out, **{"method": "lora", "model.preset": "", "data.builtin": "", "data.val_set_size": 0,
                                "train.max_steps": 2, "train.save_steps": 0, "train.sample_max_new_tokens": 0,
                                "optim.warmup_steps": 1, "optim.learning_rate": 2e-2,
                                "lora.target_modules": "q_proj", "lora.target_parameters": "gate_up_proj,down_proj"})
    c.model.path, c.tokenizer.path = str(model_dir), str(data["tokenizer"])
    c.data.train_files = [str(data["train"])]
    loop.train(c, log=lambda *a: None)
    losses = [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in x]
    assert len(losses) == 2 and all(np.isfinite(losses))
    setup, trainable = setup_lib.load_run(out)
    b = traverse_util.flatten_dict(trainable["lora"])[("model", "layers_0", "mlp", "experts", "down_proj", "lora_B")]
    assert np.abs(np.asarray(b)).max() > 0
    ours = np.asarray(setup.model.apply(lora_lib.combine(trainable, setup.frozen), IDS))
    adapter = export.export_adapter(out, tmp_path / "adapter", run=(setup, trainable))
    model = peft.PeftModel.from_pretrained(_transformers(model_dir), str(adapter)).eval()
    np.testing.assert_allclose(_torch_logits(model), ours, atol=TOL, rtol=0)
