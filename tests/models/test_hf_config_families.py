"""easytune.models.hf_config for qwen3, gemma2, gemma3_text, phi3, mixtral and qwen3_moe: the fields read from
tiny transformers 5.25 configs, the round trips (``config_to_hf`` -> transformers config -> ``config_from_hf``),
the structure of the transformers model built from what we write (per-layer window, norms, biases, experts,
RoPE frequencies), and the refusals that name the field. No weights, no network.
"""

import dataclasses
import math
import re

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from easytune.models.hf_config import config_from_hf, config_to_hf  # noqa: E402

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
GEMMA3_LINEAR = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
PHI3_IDS = dict(eos_token_id=1, pad_token_id=0)  # Phi3Config's 32000 lies outside the tiny vocabulary

# name -> (transformers config class, kwargs, expected ModelConfig fields)
CASES = {
    "qwen3": ("Qwen3Config", dict(head_dim=16, attention_bias=True, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1),
              dict(model_type="qwen3", qk_norm=True, head_dim=16, attention_bias=True, o_proj_bias=None,
                   mlp_bias=False, sliding_window=8, layer_types=("full_attention",) + ("sliding_attention",) * 3,
                   hidden_act="silu", bos_token_id=None, eos_token_id=None, num_experts=0)),
    "qwen3_no_window": ("Qwen3Config", dict(),  # Qwen3Config's head_dim default is 128, not D / H
                        dict(head_dim=128, sliding_window=None, layer_types=None, attention_bias=False)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8),
               dict(model_type="gemma2", hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, embed_scale=True,
                    sandwich_norm=True, qk_norm=False, tie_word_embeddings=True, query_pre_attn_scalar=16.0,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8,
                    layer_types=("sliding_attention", "full_attention") * 2, rope_local_theta=None,
                    bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                             sliding_window_pattern=2),
                    dict(model_type="gemma3_text", qk_norm=True, norm_unit_offset=True, embed_scale=True,
                         sandwich_norm=True, hidden_act="gelu_pytorch_tanh", attn_logit_softcapping=None,
                         final_logit_softcapping=None, rope_type="default", rope_theta=1e6,
                         rope_local_theta=1e4, layer_types=("sliding_attention", "full_attention") * 2)),
    # Gemma 3 4B+: linear x8 on the global layers only
    "gemma3_linear": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                               rope_parameters=GEMMA3_LINEAR),
                      dict(rope_type="linear", rope_factor=8.0, rope_theta=1e6, rope_local_theta=1e4,
                           query_pre_attn_scalar=256.0)),
    # Phi-3.5 / Phi-4-mini style: longrope + partial rotary; Phi-3-mini-4k style window on every layer
    "phi3": ("Phi3Config", dict(PHI3_IDS, original_max_position_embeddings=64, partial_rotary_factor=0.5,
                                sliding_window=16, rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5],
                                                                 "long_factor": [2.0, 3.0]}),
             dict(model_type="phi3", fused_qkv=True, fused_gate_up=True, attention_bias=False, mlp_bias=False,
                  rope_type="longrope", partial_rotary_factor=0.5, rope_short_factor=(1.0, 1.5),
                  rope_long_factor=(2.0, 3.0), rope_original_max_position_embeddings=64,
                  rope_attention_factor=None, sliding_window=16, layer_types=None, rms_norm_eps=1e-5)),
    "phi3_factor": ("Phi3Config", dict(PHI3_IDS, original_max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "factor": 4.0,
        "rope_theta": 1e4}),
        dict(rope_attention_factor=math.sqrt(1 + math.log(4.0) / math.log(64)), partial_rotary_factor=1.0)),
    "phi3_default_rope": ("Phi3Config", dict(PHI3_IDS),
                          dict(rope_type="default", rope_original_max_position_embeddings=None, sliding_window=None)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                      output_router_logits=True, router_aux_loss_coef=0.02),
                dict(model_type="mixtral", num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                     moe_intermediate_size=48, router_aux_loss_coef=0.02, moe_layers=None, sliding_window=8,
                     layer_types=None, rope_theta=1e6, rms_norm_eps=1e-5, attention_bias=False)),
    # transformers adds the load-balancing loss only with output_router_logits
    "mixtral_no_aux": ("MixtralConfig", dict(num_local_experts=4, router_aux_loss_coef=0.02),
                       dict(router_aux_loss_coef=0.0, sliding_window=None)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         norm_topk_prob=True, mlp_only_layers=[0]),
                  dict(model_type="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, norm_topk_prob=True, router_aux_loss_coef=0.0,
                       moe_layers=(False, True, True, True), head_dim=8, sliding_window=None)),
    "qwen3_moe_step": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2,
                                              mlp_only_layers=[3], use_sliding_window=True, sliding_window=8,
                                              output_router_logits=True, router_aux_loss_coef=0.01),
                       dict(moe_layers=(False, True, False, False), norm_topk_prob=False, sliding_window=8,
                            layer_types=None, router_aux_loss_coef=0.01)),
    "qwen3_moe_all_sparse": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2),
                             dict(moe_layers=None, num_experts=4)),
}


def hf_config(case):
    cls_name, kwargs, _ = CASES[case]
    return getattr(transformers, cls_name)(**{**BASE, **kwargs})


def through_transformers(d: dict) -> dict:
    """``d`` as transformers reads it and writes it back (``AutoConfig.for_model(**d).to_dict()``)."""
    return transformers.AutoConfig.for_model(**d).to_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_fields_from_transformers_config(case):
    config = config_from_hf(hf_config(case).to_dict())
    want = CASES[case][2]
    got = {k: getattr(config, k) for k in want}
    assert got == pytest.approx(want) if case == "phi3_factor" else got == want


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case):
    config = config_from_hf(hf_config(case).to_dict())
    written = config_to_hf(config)
    assert config_from_hf(written) == config
    assert config_from_hf(through_transformers(written)) == config


def _expected_inv_freq(theta, dim, factor=1.0):
    return 1.0 / (theta ** (np.arange(0, dim, 2) / dim)) / factor


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_model_from_written_config_has_the_structure(case):
    """What transformers builds from ``config_to_hf`` has, layer by layer, the window, norms, biases, scale,
    experts and RoPE the ModelConfig describes."""
    pytest.importorskip("torch")
    c = config_from_hf(hf_config(case).to_dict())
    hf = transformers.AutoConfig.for_model(**config_to_hf(c))
    model = transformers.AutoModelForCausalLM.from_config(hf)
    assert type(model).__name__ == config_to_hf(c)["architectures"][0]
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert getattr(attn, "sliding_window", model.config.sliding_window) == c.layer_window(i), i
        assert hasattr(attn, "q_norm") == c.qk_norm
        assert hasattr(attn, "qkv_proj") == c.fused_qkv
        assert ((attn.qkv_proj if c.fused_qkv else attn.q_proj).bias is not None) == c.attention_bias
        if not c.fused_qkv:
            assert (attn.o_proj.bias is not None) == c.attention_bias  # o_proj_bias None: follows
        assert attn.head_dim == c.head_dim
        assert attn.scaling == pytest.approx((c.query_pre_attn_scalar or c.head_dim) ** -0.5)
        assert getattr(attn, "attn_logit_softcapping", None) == c.attn_logit_softcapping
        assert hasattr(layer, "pre_feedforward_layernorm") == c.sandwich_norm
        is_moe = hasattr(layer.mlp, "experts")
        assert is_moe == c.layer_is_moe(i), i
        if is_moe:
            experts = layer.mlp.experts
            assert tuple(experts.down_proj.shape) == (c.num_experts, c.hidden_size, c.moe_intermediate_size)
            assert layer.mlp.gate.top_k == c.num_experts_per_tok
            assert getattr(layer.mlp.gate, "norm_topk_prob", True) == c.norm_topk_prob
        else:
            width = c.intermediate_size
            assert hasattr(layer.mlp, "gate_up_proj") == c.fused_gate_up
            proj = layer.mlp.gate_up_proj if c.fused_gate_up else layer.mlp.gate_proj
            assert proj.out_features == (2 * width if c.fused_gate_up else width)
    assert getattr(model.config, "final_logit_softcapping", None) == c.final_logit_softcapping
    embed = model.model.embed_tokens
    assert hasattr(embed, "embed_scale") == c.embed_scale
    if c.embed_scale:
        assert float(embed.embed_scale) == pytest.approx(c.hidden_size ** 0.5)
    assert (model.lm_head.weight.data_ptr() == embed.weight.data_ptr()) == c.tie_word_embeddings
    # RoPE: frequencies and cos/sin scale of each layer type
    rotary = model.model.rotary_emb
    if c.model_type == "gemma3_text":
        full = _expected_inv_freq(c.rope_theta, c.rotary_dim, c.rope_factor if c.rope_type == "linear" else 1.0)
        np.testing.assert_allclose(rotary.full_attention_inv_freq.numpy(), full, rtol=1e-6)
        np.testing.assert_allclose(rotary.sliding_attention_inv_freq.numpy(),
                                   _expected_inv_freq(c.rope_local_theta, c.rotary_dim), rtol=1e-6)
    elif c.rope_type == "longrope":
        short = np.asarray(c.rope_short_factor)
        np.testing.assert_allclose(rotary.inv_freq.numpy(), _expected_inv_freq(c.rope_theta, c.rotary_dim) / short,
                                   rtol=1e-6)
        L0 = c.rope_original_max_position_embeddings
        s = c.max_position_embeddings / L0
        scale = c.rope_attention_factor or (math.sqrt(1 + math.log(s) / math.log(L0)) if s > 1 else 1.0)
        assert rotary.attention_scaling == pytest.approx(scale)
        assert rotary.original_max_seq_len == c.max_position_embeddings
        assert model.config.rope_parameters["original_max_position_embeddings"] == L0
    else:
        assert rotary.inv_freq.shape[0] == c.rotary_dim // 2
        np.testing.assert_allclose(rotary.inv_freq.numpy(), _expected_inv_freq(c.rope_theta, c.rotary_dim), rtol=1e-6)


def test_gemma3_v4_layout_matches_v5():
    """A transformers-4 Gemma 3 config.json (``rope_scaling`` for the global layers, ``rope_local_base_freq``,
    ``sliding_window_pattern``) gives the same ModelConfig as the v5 per-layer-type ``rope_parameters``."""
    v5 = hf_config("gemma3_linear").to_dict()
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    v4.update(rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6, rope_local_base_freq=1e4,
              sliding_window_pattern=2)
    assert config_from_hf(v4) == config_from_hf(v5)
    old = transformers.Gemma3TextConfig(**BASE, head_dim=16, sliding_window=8, sliding_window_pattern=2,
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6,
                                        rope_local_base_freq=1e4)
    assert config_from_hf(old.to_dict()) == config_from_hf(v5)
    written = config_to_hf(config_from_hf(v5))
    assert (written["rope_scaling"], written["rope_theta"], written["rope_local_base_freq"]) == (
        {"rope_type": "linear", "factor": 8.0}, 1e6, 1e4)
    # the published 1B layout: no layer_types, pattern 6 -> five sliding layers per global one
    c = config_from_hf({"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 512,
                        "sliding_window_pattern": 6, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                        "rope_scaling": None, "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu"})
    assert [c.layer_window(i) for i in range(12)] == ([512] * 5 + [None]) * 2
    assert (c.rope_type, c.rope_theta, c.rope_local_theta, c.head_dim, c.max_position_embeddings) == (
        "default", 1e6, 1e4, 256, 131072)


def test_missing_keys_take_the_config_class_defaults():
    """A config.json with only model_type reads as the transformers class with no arguments does."""
    for model_type in ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"):
        cls = transformers.AutoConfig.for_model(model_type)
        assert config_from_hf({"model_type": model_type}) == config_from_hf(cls.to_dict()), model_type


def test_published_style_configs():
    """Abridged config.json files in the layout they are published in (transformers 4)."""
    phi3_mini_4k = {"model_type": "phi3", "hidden_size": 3072, "num_attention_heads": 32, "num_hidden_layers": 32,
                    "intermediate_size": 8192, "max_position_embeddings": 4096,
                    "original_max_position_embeddings": 4096, "rope_scaling": None, "rope_theta": 10000.0,
                    "sliding_window": 2047, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0,
                    "vocab_size": 32064, "torch_dtype": "bfloat16"}
    c = config_from_hf(phi3_mini_4k)
    assert (c.layer_window(0), c.layer_window(31), c.num_key_value_heads, c.head_dim, c.dtype) == (
        2047, 2047, 32, 96, "bfloat16")
    phi35 = {**phi3_mini_4k, "max_position_embeddings": 131072, "sliding_window": 262144,
             "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.5] * 48}}
    c = config_from_hf(phi35)
    assert (c.rope_type, c.rope_original_max_position_embeddings, len(c.rope_long_factor)) == ("longrope", 4096, 48)
    assert config_from_hf(through_transformers(config_to_hf(c))) == c
    qwen3_30b_a3b = {"model_type": "qwen3_moe", "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48, "num_experts": 128,
                     "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
                     "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False,
                     "sliding_window": None, "max_window_layers": 48, "output_router_logits": False,
                     "router_aux_loss_coef": 0.001, "rope_theta": 1000000.0, "rope_scaling": None}
    c = config_from_hf(qwen3_30b_a3b)
    assert (c.head_dim, c.moe_layers, c.is_moe, c.router_aux_loss_coef, c.sliding_window) == (128, None, True, 0.0,
                                                                                            None)
    mixtral_8x7b = {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                    "sliding_window": None, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
                    "output_router_logits": False, "router_jitter_noise": 0.0}
    c = config_from_hf(mixtral_8x7b)
    assert (c.num_experts, c.moe_intermediate_size, c.num_key_value_heads, c.rms_norm_eps) == (8, 14336, 8, 1e-5)


REFUSED = [  # (case, changes to its to_dict(), field named)
    ("qwen3", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"attention_dropout": 0.1}, "attention_dropout"),
    ("qwen3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                   "long_factor": [1.0] * 8}}, "rope_parameters.rope_type"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type"),
    ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation"),
    ("gemma2", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma2", {"sliding_window": None}, "sliding_window"),
    ("gemma2", {"query_pre_attn_scalar": "16"}, "query_pre_attn_scalar"),
    ("gemma2", {"query_pre_attn_scalar": None}, "query_pre_attn_scalar"),
    ("gemma3_text", {"rope_parameters": {**GEMMA3_LINEAR, "sliding_attention": GEMMA3_LINEAR["full_attention"]}},
     "rope_parameters.sliding_attention.rope_type"),
    ("gemma3_text", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters"),
    ("gemma3_text", {"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ("phi3", {"resid_pdrop": 0.1}, "resid_pdrop"),
    ("phi3", {"embd_pdrop": 0.1}, "embd_pdrop"),
    ("phi3", {"attention_dropout": 0.1}, "attention_dropout"),
    ("phi3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_parameters.rope_type"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.0]}},
     "long_factor"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("mixtral", {"num_local_experts": 0}, "num_local_experts"),
    ("qwen3_moe", {"num_experts": 8}, "num_experts"),  # to_dict wrote num_local_experts=4
    ("qwen3_moe", {"mlp_only_layers": "0"}, "mlp_only_layers"),
    ("qwen3_moe", {"attention_dropout": 0.1}, "attention_dropout"),
]


@pytest.mark.parametrize("case, change, named", REFUSED, ids=[f"{c}-{n}" for c, _, n in REFUSED])
def test_refused_fields_are_named(case, change, named):
    hf = {**hf_config(case).to_dict(), **change}
    with pytest.raises(ValueError, match=re.escape(named)):
        config_from_hf(hf)


@pytest.mark.parametrize("case, change, named", [
    ("qwen3", dict(qk_norm=False), "qk_norm"),
    ("qwen3", dict(mlp_bias=True), "mlp_bias"),
    ("qwen3", dict(o_proj_bias=False), "o_proj_bias"),  # q/k/v biased but o_proj not: that is qwen2
    ("gemma2", dict(query_pre_attn_scalar=10.5), "query_pre_attn_scalar"),
    ("gemma2", dict(norm_unit_offset=False), "norm_unit_offset"),
    ("gemma3_text", dict(rope_type="linear", rope_factor=8.0, rope_local_theta=None), "rope_local_theta"),
    ("phi3", dict(attention_bias=True), "attention_bias"),
    ("phi3", dict(layer_types=("full_attention", "sliding_attention") * 2), "sliding_window"),
    ("mixtral", dict(moe_intermediate_size=16), "moe_intermediate_size"),
    ("mixtral", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("qwen3_moe", dict(layer_types=("full_attention", "sliding_attention") * 2, sliding_window=8), "sliding_window"),
])
def test_config_to_hf_refuses_what_the_family_cannot_express(case, change, named):
    config = dataclasses.replace(config_from_hf(hf_config(case).to_dict()), **change)
    with pytest.raises(ValueError, match=re.escape(named)):
        config_to_hf(config)


def test_legacy_family_refuses_new_fields():
    """A llama config carrying a field only another family computes is not written as llama silently."""
    c = config_from_hf({"model_type": "llama", **BASE})
    with pytest.raises(ValueError, match="qk_norm"):
        config_to_hf(dataclasses.replace(c, qk_norm=True))
    with pytest.raises(ValueError, match="num_experts"):
        config_to_hf(dataclasses.replace(c, num_experts=4))


def test_equivalent_spellings_are_written():
    """Configs built by hand (not by config_from_hf) that a family computes are written, and read back as the
    canonical spelling of the same model."""
    c = config_from_hf(hf_config("gemma3_text").to_dict())
    assert config_from_hf(config_to_hf(dataclasses.replace(c, rope_local_theta=None, rope_theta=5e5))) == (
        dataclasses.replace(c, rope_local_theta=5e5, rope_theta=5e5))
    g2 = config_from_hf(hf_config("gemma2").to_dict())
    no_window = dataclasses.replace(g2, sliding_window=None, layer_types=None, query_pre_attn_scalar=None)
    written = config_to_hf(no_window)
    assert (written["sliding_window"], set(written["layer_types"]), written["query_pre_attn_scalar"]) == (
        4096, {"full_attention"}, 16)
    assert config_from_hf(through_transformers(written)) == dataclasses.replace(no_window, query_pre_attn_scalar=16.0)


@pytest.mark.parametrize("field,value,message", [
    ("tie_word_embeddings", "false", "JSON boolean"),  # bool("false") is True
    ("norm_topk_prob", "false", "JSON boolean"),
    ("num_experts_per_tok", None, "is null"),
    ("rms_norm_eps", None, "is null"),
    ("layer_types", "sliding_attention", "list of strings"),
])
def test_mistyped_values_are_named(field, value, message):
    """Values transformers refuses (a string boolean, a null size, a string for a list) are refused by name instead
    of being read as something else."""
    hf = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2).to_dict()
    hf[field] = value
    with pytest.raises(ValueError, match=f"field {field!r}.*{message}"):
        config_from_hf(hf)


def test_dense_qwen3_moe_has_no_experts():
    """``Qwen3MoeConfig(num_experts=0)`` (transformers writes ``num_local_experts: 0``) is a dense model."""
    assert not config_from_hf(transformers.Qwen3MoeConfig(num_experts=0).to_dict()).is_moe


def test_non_integer_query_pre_attn_scalar_is_refused_at_load():
    """Gemma's config classes take an integer query_pre_attn_scalar: refused when read, not only at export."""
    hf = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8).to_dict()
    hf["query_pre_attn_scalar"] = 16.5
    with pytest.raises(ValueError, match="query_pre_attn_scalar' must be an integer"):
        config_from_hf(hf)
