"""LoRA and QLoRA runs of every new family end to end, against the references: transformers loads the merged
export, peft the adapter on the transformers base, and both give easytune's logits for the run (fp32, 1e-4).

One tiny random transformers model per family (Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen3-MoE; 2 layers,
weights redrawn as ``tests/models/test_families.py``'s ``hf_model`` so that logits are O(1)), saved with
``save_pretrained`` and trained on the quickstart data (``tests/helpers.quickstart_base``) as ``test_export``.
References: transformers 5 ``AutoModelForCausalLM``; peft 0.21 ``PeftModel.from_pretrained`` (which, for Mixtral and
Qwen3-MoE, rewrites expert-like ``target_modules``: see :mod:`easytune.export`).
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from easytune import adapter as adapter_lib  # noqa: E402
from easytune import export, quant  # noqa: E402
from easytune import lora as lora_lib  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402
from easytune.train import loop  # noqa: E402
from easytune.train import setup as setup_lib  # noqa: E402
from tests.helpers import tiny_run_config  # noqa: E402
from tests.models.test_families import save_redrawn  # noqa: E402

IDS = np.array([[1, 5, 9, 23, 42, 7, 11, 3, 60, 2, 17, 33, 8, 19, 4, 27]], np.int32)  # longer than the windows (8)
TOL = 1e-4
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=3.0,
             final_logit_softcapping=8.0)
# family -> (transformers config class, config kwargs)
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", GEMMA),
    # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention (released configs: null)
    "gemma3_text": ("Gemma3TextConfig", dict(GEMMA, attn_logit_softcapping=None,
                                              layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=False, mlp_only_layers=[1])),
}
ATTN = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]
# (target_modules, target_parameters) of an all-linear run's adapter: the family's HF names of its linear modules
# (routers and experts are not linear). Qwen3-MoE's dense layer 1 goes by target_parameters: peft would read
# gate_proj/up_proj/down_proj in target_modules as the experts (transformers v4 names) and skip the dense MLP.
TARGETS = {"qwen3": (sorted(ATTN + MLP), None), "gemma2": (sorted(ATTN + MLP), None),
           "gemma3_text": (sorted(ATTN + MLP), None),
           "phi3": (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], None), "mixtral": (ATTN, None),
           "qwen3_moe": (ATTN, [f"model.layers.1.mlp.{m}.weight" for m in MLP])}
MOE = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart data + tokenizer (and a Llama these tests do not use)."""
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("base"))


def save_family_model(path, family, tokenizer_dir, seed=0):
    """A tiny random transformers model of ``family`` with the quickstart tokenizer's vocab and O(1) logits (weights
    std 0.15, norm weights around 1, as ``tests/models/test_families.hf_model``), saved to ``path``."""
    cls_name, kwargs = FAMILIES[family]
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**{**BASE, **ids, **kwargs, "vocab_size": len(tok)})
    save_redrawn(config, path)
    return path


@pytest.fixture(scope="module")
def family_model(base, tmp_path_factory):
    """``family -> HF model dir``, each saved once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = save_family_model(tmp_path_factory.mktemp(family), family, base["tokenizer"])
        return cache[family]
    return get


# run name -> (family, method, config overrides)
RUNS = {**{f"{f}_lora": (f, "lora", {}) for f in FAMILIES},
        **{f"{f}_qlora": (f, "qlora", {"train.max_steps": 2}) for f in FAMILIES},
        **{f"{f}_saved": (f, "lora", {"train.max_steps": 2, "lora.target_modules": "q_proj,v_proj",
                                      "lora.modules_to_save": "gate,experts"}) for f in MOE}}


@pytest.fixture(scope="module")
def family_run(base, family_model, tmp_path_factory):
    """``run name -> (run dir, (setup, trainable))``: each of :data:`RUNS` trained once for the module (3 steps,
    learning rate 2e-2: LoRA's B starts at zero, so move it enough that the adapter matters, as test_export)."""
    cache = {}

    def get(name):
        if name not in cache:
            family, method, overrides = RUNS[name]
            out = tmp_path_factory.mktemp(name)
            c = tiny_run_config(out, **{
                "method": method, "model.preset": "", "data.builtin": "", "data.val_set_size": 0,
                "train.max_steps": 3, "train.save_steps": 0, "train.sample_max_new_tokens": 0,
                "optim.warmup_steps": 1, "optim.learning_rate": 2e-2, **overrides})
            c.model.path = str(family_model(family))
            c.tokenizer.path = str(base["tokenizer"])
            c.data.train_files = [str(base["train"])]
            loop.train(c, log=lambda *a: None)
            cache[name] = (out, setup_lib.load_run(out))
        return cache[name]
    return get


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [m["train/loss"] for m in lines if "train/loss" in m]


def _easytune_logits(run):
    setup, trainable = run
    return np.asarray(setup.model.apply(lora_lib.combine(trainable, setup.frozen), IDS))


def _plain_logits(model_cfg, params):
    return np.asarray(LlamaForCausalLM(model_cfg).apply({"params": params}, IDS))


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


def _peft_adapted(model):
    """Names of the modules holding the adapter's LoRA weights in a PeftModel (LoRA Linear layers, ParamWrappers)."""
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _check_adapter_in_peft(run, adapter_dir, ours):
    """peft on the transformers base gives easytune's logits, adapting exactly the modules the file holds LoRA
    weights for; easytune's own reader (``export_merged_adapter``) merges the adapter to the same logits."""
    setup = run[0]
    tensors = safetensors.numpy.load_file(adapter_dir / "adapter_model.safetensors")
    with warnings.catch_warnings(record=True) as caught:  # peft warns of missing / unexpected adapter keys
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(_load_transformers(setup.config.model.path), str(adapter_dir)).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message) or "did not match" in str(w.message)]
    assert _peft_adapted(model) == {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_A.weight")}
    np.testing.assert_allclose(_torch_logits(model), ours, atol=TOL, rtol=0)
    merged = export.export_merged_adapter(setup.config.model.path, adapter_dir, adapter_dir.parent / "from_adapter")
    np.testing.assert_allclose(_torch_logits(_load_transformers(merged)), ours, atol=TOL, rtol=0)
    return tensors


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_lora_run_merged_and_adapter_equal_easytune(family_run, family, tmp_path):
    out, run = family_run(f"{family}_lora")
    setup = run[0]
    assert setup.model_cfg.model_type == family
    ours = _easytune_logits(run)
    base_model = _load_transformers(setup.config.model.path)
    assert np.abs(ours - _torch_logits(base_model)).max() > 1e-2  # the adapter changed the model

    merged = _load_transformers(export.export_merged(out, tmp_path / "merged", run=run))
    assert type(merged) is type(base_model)
    np.testing.assert_allclose(_torch_logits(merged), ours, atol=TOL, rtol=0)

    adapter = export.export_adapter(out, tmp_path / "adapter", run=run)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["target_modules"], cfg["target_parameters"]) == TARGETS[family]
    assert cfg["modules_to_save"] is None
    tensors = _check_adapter_in_peft(run, adapter, ours)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    assert not any(".experts" in k or ".gate." in k for k in tensors)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.slow
def test_moe_modules_to_save_adapter_loads_in_peft(family_run, family, tmp_path):
    """Routers and experts trained in full (``modules_to_save = gate, experts``) travel under the module-tree names
    peft uses (``mlp.gate.weight``, fused ``mlp.experts.gate_up_proj`` / ``down_proj``), for Mixtral too."""
    out, run = family_run(f"{family}_saved")
    setup = run[0]
    ours = _easytune_logits(run)
    base_logits = _torch_logits(_load_transformers(setup.config.model.path))
    merged = export.merged_params(*run)
    no_lora = _plain_logits(setup.model_cfg, export.merged_params(run[0], {"params": run[1]["params"]}))
    assert np.abs(no_lora - base_logits).max() > 1e-2  # the saved modules alone changed the model
    np.testing.assert_allclose(_plain_logits(setup.model_cfg, merged), ours, atol=TOL, rtol=0)
    adapter = export.export_adapter(out, tmp_path / "adapter", run=run)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["gate", "experts"] and cfg["target_modules"] == ["q_proj", "v_proj"]
    tensors = _check_adapter_in_peft(run, adapter, ours)
    x, d, f = setup.model_cfg.num_experts, setup.model_cfg.hidden_size, setup.model_cfg.moe_intermediate_size
    moe_layers = [i for i in range(setup.model_cfg.num_hidden_layers) if setup.model_cfg.layer_is_moe(i)]
    want = {f"base_model.model.model.layers.{i}.mlp.{t}": s for i in moe_layers for t, s in
            (("gate.weight", (x, d)), ("experts.gate_up_proj", (x, 2 * f, d)), ("experts.down_proj", (x, d, f)))}
    assert {k: v.shape for k, v in tensors.items() if "lora_" not in k} == want


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_qlora_run_merged_equals_easytune(family_run, family, tmp_path):
    out, run = family_run(f"{family}_qlora")
    setup, _ = run
    losses = _losses(out)
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
    flat = jax.tree_util.tree_flatten_with_path(setup.frozen["params"], is_leaf=quant.is_qtensor)[0]
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in flat}
    for path, leaf in flat.items():  # every linear kernel but lm_head and every expert weight NF4, nothing else
        nf4 = quant.is_expert_kernel(path) or (path[-1] == "kernel" and path[0] != "lm_head")
        assert quant.is_qtensor(leaf) == nf4, path
    experts = [p for p in flat if quant.is_expert_kernel(p)]
    assert len(experts) == (3 * sum(map(setup.model_cfg.layer_is_moe, range(2))) if setup.model_cfg.is_moe else 0)
    merged = _plain_logits(setup.model_cfg, export.merged_params(*run))
    np.testing.assert_allclose(_easytune_logits(run), merged, atol=TOL, rtol=0)  # NF4 + LoRA == merged
    model = _load_transformers(export.export_merged(out, tmp_path / "merged", run=run))
    np.testing.assert_allclose(_torch_logits(model), merged, atol=TOL, rtol=0)


@pytest.mark.slow
def test_adapter_reader_refuses_expert_lora_and_partial_experts(family_run, tmp_path):
    """What does not fit is refused with the tensor or entry named: expert ``target_parameters`` without their
    LoRA tensors, stray expert LoRA tensors, and a stacked expert param given for some experts only."""
    out, run = family_run("qwen3_moe_saved")
    setup = run[0]
    adapter = export.export_adapter(out, tmp_path / "adapter", run=run)
    params = export.merged_params(setup, {"params": run[1]["params"]})
    cfg_file, weights = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    good, tensors = json.loads(cfg_file.read_text()), safetensors.numpy.load_file(weights)
    lcfg, _, saved = adapter_lib.load_peft_adapter(adapter, params, setup.model_cfg)
    assert set(saved["model"]["layers_0"]["mlp"]) == {"gate", "experts"}

    cfg_file.write_text(json.dumps({**good, "target_parameters": ["mlp.experts.gate_up_proj"]}))
    with pytest.raises(ValueError, match="selects 'model.layers.0.mlp.experts.gate_up_proj' but the file has no"):
        adapter_lib.load_peft_adapter(adapter, params, setup.model_cfg)
    cfg_file.write_text(json.dumps(good))
    r = good["r"]
    lora = {"base_model.model.model.layers.0.mlp.experts.lora_A.weight": np.zeros((r, 32), np.float32)}
    safetensors.numpy.save_file({**tensors, **lora}, str(weights))
    with pytest.raises(ValueError, match="experts' is not a linear module.*not LoRA targets"):
        adapter_lib.load_peft_adapter(adapter, params, setup.model_cfg)
    per_expert = {k: v for k, v in tensors.items() if "experts.gate_up_proj" not in k}
    f = setup.model_cfg.moe_intermediate_size
    gate_up = tensors["base_model.model.model.layers.0.mlp.experts.gate_up_proj"]
    per_expert["base_model.model.model.layers.0.mlp.experts.0.gate_proj.weight"] = gate_up[0, :f]
    safetensors.numpy.save_file(per_expert, str(weights))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.experts': the file holds some experts' gate_proj only"):
        adapter_lib.load_peft_adapter(adapter, params, setup.model_cfg)


@pytest.mark.slow
def test_moe_adapter_of_some_layers_names_its_modules_in_full(family_run, tmp_path):
    """peft reduces a regex ``target_modules`` of a Mixtral / Qwen3-MoE model to the last name parts it matches
    (which would adapt every layer's), so an adapter of some layers lists the full module names instead."""
    out, (setup, trainable) = family_run("qwen3_moe_saved")
    q0 = trainable["lora"]["model"]["layers_0"]["self_attn"]["q_proj"]
    run = (setup, {**trainable, "lora": {"model": {"layers_0": {"self_attn": {"q_proj": q0}}}}})
    adapter = export.export_adapter(out, tmp_path / "adapter", run=run)
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.0.self_attn.q_proj"]
    _check_adapter_in_peft(run, adapter, _easytune_logits(run))


@pytest.mark.parametrize("targets, want", [
    (["q_proj"], ("q_proj", "model.layers.1.mlp.up_proj")),
    ("all-linear", "all-linear"),
    (r"model\.layers\.0\..*_proj", None),
])
def test_target_parameters_of_linear_modules_read_as_targets(targets, want):
    """``target_parameters`` naming linear weights (what export writes for a MoE model's dense MLPs) count as LoRA
    targets, whatever form ``target_modules`` has."""
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": targets,
           "target_parameters": ["model.layers.1.mlp.up_proj.weight"]}
    lcfg = adapter_lib.lora_config_of(cfg)
    if want is not None:
        assert lcfg.target_modules == want
    assert lora_lib.matches_target("model.layers.1.mlp.up_proj", lcfg.target_modules)
    assert lora_lib.matches_target("model.layers.1.mlp.down_proj", lcfg.target_modules) == (targets == "all-linear")
    assert lora_lib.matches_target("model.layers.0.self_attn.q_proj", lcfg.target_modules)
    assert not lora_lib.matches_target("lm_head", lcfg.target_modules)
