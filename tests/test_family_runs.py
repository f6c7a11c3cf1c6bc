"""LoRA and QLoRA runs of every new family end to end, against the references: transformers loads the merged
export, peft the adapter on the transformers base, and both give easytune's logits for the run (fp32, 1e-4).

One tiny random transformers model per family (Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen3-MoE; 2 layers,
weights redrawn as ``tests/models/test_families.py``'s ``hf_model`` so that logits are O(1)), saved with
``save_pretrained`` and trained on the quickstart data (``tests/helpers.quickstart_base``) as ``test_export``.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from easytune import export  # noqa: E402
from easytune import lora as lora_lib  # noqa: E402
from easytune import quant  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402
from easytune.train import loop  # noqa: E402
from easytune.train import setup as setup_lib  # noqa: E402
from tests.helpers import tiny_run_config  # noqa: E402

IDS = np.array([[1, 5, 9, 23, 42, 7, 11, 3, 60, 2, 17, 33, 8, 19, 4, 27]], np.int32)
TOL = 1e-4
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, attn_logit_softcapping=3.0,
             final_logit_softcapping=8.0)
# family -> (transformers config class, config kwargs)
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "gemma2": ("Gemma2Config", GEMMA),
    "gemma3_text": ("Gemma3TextConfig", dict(GEMMA, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=False, mlp_only_layers=[1])),
}
ATTN = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]
# the PEFT target_modules of an all-linear run: HF names of the linear modules (routers and experts are not)
TARGETS = {"qwen3": sorted(ATTN + MLP), "gemma2": sorted(ATTN + MLP), "gemma3_text": sorted(ATTN + MLP),
           "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], "mixtral": ATTN,
           "qwen3_moe": sorted(ATTN + MLP)}  # layer 1 is dense (mlp_only_layers)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart data + tokenizer (the Llama quickstart_base also saves is not used here)."""
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("base"))


def _vocab_and_ids(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return len(tok), dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=pad)


def save_family_model(path, family, tokenizer_dir, seed=0):
    """A tiny random transformers model of ``family`` with the quickstart tokenizer's vocab and O(1) logits."""
    cls_name, kwargs = FAMILIES[family]
    vocab, ids = _vocab_and_ids(tokenizer_dir)
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**{**BASE, **ids, **kwargs, "vocab_size": vocab})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


_MODELS = {}


@pytest.fixture(scope="module")
def family_model(base, tmp_path_factory):
    """``family -> HF model dir``, each saved once for the module."""
    def get(family):
        if family not in _MODELS:
            _MODELS[family] = save_family_model(tmp_path_factory.mktemp(family), family, base["tokenizer"])
        return _MODELS[family]
    yield get
    _MODELS.clear()


def _train(base, model_dir, out, **overrides):
    defaults = {"method": "lora", "model.preset": "", "data.builtin": "", "data.val_set_size": 0,
                "train.max_steps": 3, "train.save_steps": 0, "train.sample_max_new_tokens": 0,
                "optim.warmup_steps": 1, "optim.learning_rate": 2e-2}  # B starts at zero: make the adapter matter
    c = tiny_run_config(out, **{**defaults, **overrides})
    c.model.path = str(model_dir)
    c.tokenizer.path = str(base["tokenizer"])
    c.data.train_files = [str(base["train"])]
    losses = []
    loop.train(c, log=lambda *a: losses.append(a))
    return out


_RUNS = {}


@pytest.fixture(scope="module")
def family_run(base, family_model, tmp_path_factory):
    """``(family, method) -> (run dir, loaded (setup, trainable))``, each trained once for the module."""
    def get(family, method):
        key = (family, method)
        if key not in _RUNS:
            out = tmp_path_factory.mktemp(f"{family}_{method}")
            steps = {"lora": 3, "qlora": 2}[method]
            _train(base, family_model(family), out, method=method, **{"train.max_steps": steps})
            _RUNS[key] = (out, setup_lib.load_run(out))
        return _RUNS[key]
    yield get
    _RUNS.clear()


def _easytune_logits(run):
    setup, trainable = run
    return np.asarray(setup.model.apply(lora_lib.combine(trainable, setup.frozen), IDS))


def _merged_logits(run):
    setup, trainable = run
    params = export.merged_params(setup, trainable)
    return np.asarray(LlamaForCausalLM(setup.model_cfg).apply({"params": params}, IDS))


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _load_transformers(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_lora_run_merged_and_adapter_equal_easytune(family_run, family, tmp_path):
    out, run = family_run(family, "lora")
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
    assert cfg["target_modules"] == TARGETS[family] and cfg["modules_to_save"] is None
    tensors = safetensors.numpy.load_file(adapter / "adapter_model.safetensors")
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in tensors)
    model = peft.PeftModel.from_pretrained(base_model, str(adapter)).eval()
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert adapted == {export._PREFIX + k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_A.weight")}
    np.testing.assert_allclose(_torch_logits(model), ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.slow
def test_qlora_run_merged_equals_easytune(family_run, family, tmp_path):
    out, run = family_run(family, "qlora")
    setup, trainable = run
    losses = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else None
    del losses
    flat = jax.tree_util.tree_flatten_with_path(setup.frozen["params"], is_leaf=quant.is_qtensor)[0]
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in flat}
    for path, leaf in flat.items():
        if quant.is_expert_kernel(path) or (path[-1] == "kernel" and "lm_head" not in path):
            assert quant.is_qtensor(leaf), path
        else:
            assert not quant.is_qtensor(leaf), path
    if setup.model_cfg.is_moe:
        assert any(quant.is_expert_kernel(p) for p in flat)
        assert all(not quant.is_qtensor(v) for p, v in flat.items() if quant.is_router(p))
    merged_logits = _merged_logits(run)
    np.testing.assert_allclose(_easytune_logits(run), merged_logits, atol=TOL, rtol=0)
    merged = _load_transformers(export.export_merged(out, tmp_path / "merged", run=run))
    np.testing.assert_allclose(_torch_logits(merged), merged_logits, atol=TOL, rtol=0)
