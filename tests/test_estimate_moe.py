"""The estimator (easytune/estimate.py) on the new families: total and active parameters of mixture-of-experts
models counted exactly (by hand for a tiny config; published totals of Mixtral-8x7B, Qwen3-30B-A3B, Phi-3-mini,
Gemma-2-2B, Qwen3-0.6B and Qwen2.5-0.5B), FLOPs from the active parameters, and the expert weights per device
split over ``mesh.expert``."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from easytune import cli
from easytune import config as config_lib
from easytune import estimate as est_lib
from easytune.models.model_config import ModelConfig

REPO = pathlib.Path(__file__).resolve().parents[1]

# 3 layers, the middle one dense: V=64, D=16, F=48, H=4, K=2, E=4, X=4 experts of F=8, k=2, q/k norms (Qwen3-MoE)
TINY_MOE = dict(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, qk_norm=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                moe_layers=(True, False, True), model_type="qwen3_moe")


def _est(cfg, **kw):
    return est_lib.estimate(cfg, **{"method": "full", "micro_batch_size": 1, "sequence_len": 8, **kw})


def test_tiny_moe_total_and_active_params_by_hand():
    cfg = ModelConfig(**TINY_MOE)
    embed = 64 * 16 + 16 * 64                       # embed_tokens, lm_head
    norms = 3 * (2 * 16 + 2 * 4) + 16               # 2 RMSNorms + q_norm, k_norm [E] per layer; the final norm
    attn = 3 * (16 * 16 + 16 * 8 + 16 * 8 + 16 * 16)  # q, k, v, o
    dense_mlp = 3 * 16 * 48                          # layer 1: gate, up, down
    router = 2 * 4 * 16                              # layers 0, 2: mlp.gate [X, D]
    experts = 2 * 3 * 4 * 16 * 8                     # layers 0, 2: gate/up [X, D, F], down [X, F, D]
    active_experts = 2 * 3 * 2 * 16 * 8              # k = 2 of the 4
    est = _est(cfg)
    assert est.params == embed + norms + attn + dense_mlp + router + experts == 9992
    assert est.active_params == est.params - experts + active_experts == 8456
    assert est.expert_params == experts and (est.num_experts, est.experts_per_tok, est.moe_layers) == (4, 2, 2)
    # FLOPs from the active parameters: 6 N_active D (full), 4 N_active D + 6 N_lora D (LoRA)
    assert est.flops_per_step == 6 * 8456 * 8
    lora = _est(cfg, method="lora", lora_r=2, target_modules=("q_proj", "v_proj"))
    n_lora = 3 * (2 * (16 + 16) + 2 * (16 + 8))
    assert lora.trainable_params == n_lora
    assert lora.flops_per_step == 4 * 8456 * 8 + 6 * n_lora * 8
    # the experts and routers are no LoRA targets: all-linear adapts q, k, v, o and the dense layer's MLP
    assert lora.weights == 4 * (9992 + n_lora)
    k_o = 3 * (2 * (16 + 8) + 2 * (16 + 16))
    dense_lora = 2 * (16 + 48) + 2 * (16 + 48) + 2 * (48 + 16)   # layer 1's gate, up, down
    assert _est(cfg, method="lora", lora_r=2).trainable_params == n_lora + k_o + dense_lora == 1056
    # QLoRA: every kernel but lm_head and every expert (each on its own) in NF4; the routers stay float
    qlora = _est(cfg, method="qlora", lora_r=2, target_modules=("q_proj", "v_proj"))
    assert qlora.quantized_params == attn + dense_mlp + experts
    nf4_128 = 2 * 32 + 2 + 4 + 4                     # one 16 x 8 expert kernel: 2 blocks of 64, double quant
    assert qlora.expert_weights == 2 * 3 * 4 * nf4_128
    skip = _est(cfg, method="qlora", lora_r=2, target_modules=("q_proj",), skip_modules=("lm_head", "experts"))
    assert skip.quantized_params == attn + dense_mlp and skip.expert_weights == 4 * experts
    # a dense model counts every parameter as active
    dense = _est(ModelConfig(**{**TINY_MOE, "num_experts": 0, "moe_layers": None}))
    assert dense.active_params == dense.params and dense.expert_params == 0


def test_counts_equal_the_model_tree():
    """Parameters, NF4 kernels and their bytes, and LoRA weights as the model (easytune/models), quant.py and
    lora.py make them, for the tiny MoE and its dense / fused / sandwich-norm / biased variants."""
    jax = pytest.importorskip("jax")
    from flax import traverse_util

    from easytune import lora as lora_lib
    from easytune import quant
    from easytune.models import llama
    for extra in [{}, dict(fused_qkv=True, fused_gate_up=True, num_experts=0, moe_layers=None),
                  dict(sandwich_norm=True, norm_unit_offset=True, tie_word_embeddings=True),
                  dict(attention_bias=True, o_proj_bias=False, mlp_bias=True)]:
        cfg = ModelConfig(**{**TINY_MOE, **extra})
        shapes = jax.eval_shape(lambda: llama.init_params(cfg, jax.random.PRNGKey(0)))  # traced, not compiled
        params = jax.tree_util.tree_map(lambda x: np.random.default_rng(0).normal(size=x.shape).astype(np.float32),
                                        shapes)
        est = _est(cfg, method="qlora", lora_r=2)
        assert est.params == sum(x.size for x in jax.tree_util.tree_leaves(params)), extra
        qtree = traverse_util.flatten_dict(quant.quantize_params(params))
        assert est.quantized_params == quant.summary(quant.quantize_params(params))["params"], extra
        assert est.expert_weights == sum(v.nbytes for k, v in qtree.items() if quant.is_qtensor(v)
                                         and k[-2] == "experts"), extra
        lora = lora_lib.init_lora(params, lora_lib.LoraConfig(r=2), jax.random.PRNGKey(1))
        assert est.trainable_params == sum(x.size for x in jax.tree_util.tree_leaves(lora)), extra


def test_expert_memory_per_device_halves_when_mesh_expert_doubles():
    cfg = ModelConfig(**{**TINY_MOE, "hidden_size": 1024, "moe_intermediate_size": 2048, "num_experts": 8,
                         "num_attention_heads": 8, "num_key_value_heads": 8})
    experts = 2 * 3 * 8 * 1024 * 2048
    one, two, four = (_est(cfg, mesh=(1, 1, x, 1)) for x in (1, 2, 4))
    assert one.expert_weights == 4 * experts
    assert two.expert_weights == one.expert_weights / 2 and four.expert_weights == two.expert_weights / 2
    # only the experts split over mesh.expert: the rest is replicated over it (as over data)
    assert one.weights - one.expert_weights == two.weights - two.expert_weights
    assert two.gradients == two.weights and two.optimizer == 3 * two.weights
    # the batch splits over it too: twice the tokens per step
    assert two.tokens_per_step == 2 * one.tokens_per_step and two.devices == 2
    # fsdp and tensor split the experts as well ([X, D, F] -> (expert, embed -> fsdp, mlp -> tensor))
    assert _est(cfg, mesh=(1, 2, 2, 2)).expert_weights == one.expert_weights / 8
    # the 3-tuple (data, fsdp, tensor) of before still means mesh.expert = 1
    assert _est(cfg, mesh=(1, 2, 1)).expert_weights == one.expert_weights / 2

    def per_device(est):
        line = next(x for x in est_lib.report(est, "h100", "full").splitlines() if "(of which experts" in x)
        return float(re.findall(r"([\d.,]+) MB", line)[0].replace(",", ""))

    assert per_device(two) == pytest.approx(per_device(one) / 2, abs=0.01)
    assert per_device(four) == pytest.approx(per_device(two) / 2, abs=0.01)
    text = est_lib.report(two, "h100", "full")
    assert "mesh.expert=2" in text and "6·N_active·D" in text
    assert f"{two.active_params:,} params active per token (2 of 8 experts in 2 sparse layers)" in text


def test_mesh_expert_that_does_not_divide_num_experts_is_refused():
    cfg = ModelConfig(**{**TINY_MOE, "num_experts": 6})
    with pytest.raises(ValueError, match=r"mesh.expert=4 does not divide num_experts=6"):
        _est(cfg, mesh=(1, 1, 4, 1))
    _est(cfg, mesh=(1, 1, 3, 1))
    _est(ModelConfig(**{**TINY_MOE, "num_experts": 0, "moe_layers": None}), mesh=(1, 1, 4, 1))  # dense: any


def test_easytune_estimate_reports_the_experts(monkeypatch, capsys):
    cfg = ModelConfig(**{**TINY_MOE, "num_experts": 6})
    monkeypatch.setattr(est_lib, "model_config", lambda config: cfg)  # the model.path reading is hf_config's
    recipe = str(REPO / "configs" / "stories260k_lora.py")
    args = ["estimate", recipe, "--config.method=full", "--device", "h100", "--num-devices", "6",
            "--config.mesh.expert=6", "--config.mesh.fsdp=-1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "params active per token (2 of 6 experts in 2 sparse layers)" in out and "mesh.expert=6" in out
    config = config_lib.apply_overrides(config_lib.load_config(recipe), ["--config.mesh.expert=4"])
    with pytest.raises(ValueError, match=r"mesh.expert=4 does not divide num_experts=6"):
        est_lib.estimate_config(config, num_devices=8)
    assert cli.main(args[:-2] + ["--num-devices", "8", "--config.mesh.expert=4"]) == 2
    assert "mesh.expert=4 does not divide num_experts=6" in capsys.readouterr().err


# Published totals (the models' safetensors / model cards), counted from the configs alone
def test_mixtral_8x7b_total_and_active():
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
                      model_type="mixtral")
    est = _est(cfg)
    assert est.params == 46_702_792_704                 # "46.7B total"
    assert est.active_params == 12_879_925_248          # "12.9B active"


def test_qwen3_30b_a3b_total_and_active():
    cfg = ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128, qk_norm=True, num_experts=128,
                      num_experts_per_tok=8, moe_intermediate_size=768, model_type="qwen3_moe")
    est = _est(cfg)
    assert est.params == 30_532_122_624                 # "30.5B total"
    assert est.active_params == 3_353_032_704           # "3.3B activated"


@pytest.mark.parametrize("name, fields, params", [
    ("phi3-mini-4k", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, fused_qkv=True, fused_gate_up=True,
                          model_type="phi3"), 3_821_079_552),
    ("gemma-2-2b", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True,
                        sandwich_norm=True, norm_unit_offset=True, model_type="gemma2"), 2_614_341_888),
    ("qwen3-0.6b", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                        qk_norm=True, model_type="qwen3"), 596_049_920),
    ("qwen2.5-0.5b", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          attention_bias=True, o_proj_bias=False, model_type="qwen2"), 494_032_768),
])
def test_dense_family_totals(name, fields, params):
    est = _est(ModelConfig(**fields))
    assert est.params == est.active_params == params, name
    assert est.expert_params == 0 and "mixture of experts" not in est_lib.report(est, "h100", "full")


def test_phi3_fused_modules_are_lora_targets():
    """Phi-3's fused ``qkv_proj`` [D, (H + 2K) E] and ``gate_up_proj`` [D, 2F] are the linear modules LoRA sees."""
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, fused_qkv=True, fused_gate_up=True)
    est = _est(cfg, method="lora", lora_r=2, target_modules=("qkv_proj", "gate_up_proj"))
    assert est.trainable_params == 2 * (16 + (4 + 2 * 2) * 4) + 2 * (16 + 2 * 48)
    with pytest.raises(ValueError, match=r"matches no linear module.*gate_up_proj.*qkv_proj"):
        _est(cfg, method="lora", target_modules=("q_proj",))
