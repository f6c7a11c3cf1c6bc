"""Every supported family against transformers: logits (fp32, bf16) and greedy generation.

Reference: a tiny random transformers model per family (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``Phi3ForCausalLM``,
``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``; eager attention, CPU), saved with ``save_pretrained`` and loaded with
``easytune.models.hf_weights.load_hf_model``. Tolerances: 1e-4 max abs on float32 logits (whole model); bf16 as
``test_llama.test_bf16_compute_error_no_worse_than_transformers_bf16`` (at most 2x transformers' own
bf16 error against its fp32 logits); generation: equal token ids.

The cases are chosen so that each feature changes the logits: sequences longer than the sliding window
and than ``max_position_embeddings`` (dynamic RoPE), and a llama3 ``original_max_position_embeddings``
that puts RoPE frequencies in all three of its bands.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.generate import generate  # noqa: E402
from easytune.models.hf_config import config_from_hf, config_to_hf  # noqa: E402
from easytune.models.hf_weights import load_hf_model, save_hf_model  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402

TOL = 1e-4  # float32 whole-model logits, max abs
VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=None, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (transformers config class, config kwargs)
FAMILIES = {
    "llama2": ("LlamaConfig", dict(rms_norm_eps=1e-5)),
    "llama2_tied_biases": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True,
                                               mlp_bias=True)),
    "llama3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5)),
    "llama_linear_rope": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear",
                                                               "rope_theta": 10000.0,
                                                               "factor": 4.0})),
    # dynamic NTK: the 40-token sequences run past max_position_embeddings=24, so the base grows
    "llama_dynamic_rope": ("LlamaConfig", dict(max_position_embeddings=24, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, head_dim=32)),  # head_dim != D / H
    # Qwen2 with sliding window from layer 1 on: one full and one sliding layer
    "qwen2_sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8,
                                          max_window_layers=1)),
    # Qwen3: RMSNorm on every q and k head, head_dim != D / H, no biases
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    # Gemma 2: GeGLU, (1 + w) norms around every branch, sqrt(D) embeddings, tied head, query_pre_attn_scalar,
    # one sliding (8) and one global layer, soft-capping small enough to bend the scores and logits
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    # Gemma 3: + q/k norms, the sliding layer with its own RoPE base, the global one with linear scaling
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"],
                                        rope_parameters={
                                            "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1000000.0},
                                            "sliding_attention": {"rope_type": "default",
                                                                  "rope_theta": 10000.0}})),
    # Phi-3: fused qkv_proj / gate_up_proj, a sliding window on every layer
    "phi3": ("Phi3Config", dict(sliding_window=8)),
    # Phi-3 128k / Phi-4-mini style: longrope (the 40-token sequences pass the original 16 positions, so
    # the long factors apply) with partial rotary (half of each head rotates)
    "phi3_longrope": ("Phi3Config", dict(partial_rotary_factor=0.5, original_max_position_embeddings=16,
                                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                          "short_factor": [1.0, 1.5, 2.0, 3.0],
                                                          "long_factor": [1.5, 4.0, 9.0, 20.0]})),
    # Mixtral: 4 experts, top-2 with renormalised weights, on every layer
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    # Qwen3-MoE: q/k norms, top-2 of 4 without renormalisation, layer 1 a dense MLP (mlp_only_layers)
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=48, norm_topk_prob=False, mlp_only_layers=[1])),
}


def hf_model(path, family, seed=0, **overrides):
    """A tiny random transformers model of ``family`` with O(1) activations, saved to ``path``.

    HF's default init (std 0.02) makes logits nearly constant, which would hide errors (and make greedy
    ties likely); weights are redrawn with std 0.15, norm weights around 1, biases nonzero.
    """
    cls_name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cls_name)(**{**BASE, **kwargs, **overrides})
    return save_redrawn(config, path)


def save_redrawn(config, path):
    """A transformers model of ``config`` (eager attention) with O(1) activations, saved to ``path``: weights
    redrawn with std 0.15, norm weights around 1 (torch's global seed; set it first)."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def et_logits(config, params, ids):
    apply = jax.jit(lambda p, x: LlamaForCausalLM(config).apply({"params": p}, x))
    return np.asarray(apply(params, jnp.asarray(ids)))


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(2, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(tmp_path, family):
    model = hf_model(tmp_path, family)
    config, params = load_hf_model(tmp_path)
    assert config.model_type == model.config.model_type
    ids = random_ids((2, 40))
    want = hf_logits(model, ids)
    got = et_logits(config, params, ids)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-constant logits
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # what we would export describes the same model to transformers
    assert config_from_hf(config_to_hf(config)) == config
    save_hf_model(params, config, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                              attn_implementation="eager").eval()
    assert type(again) is type(model)
    np.testing.assert_allclose(hf_logits(again, ids), want, atol=TOL, rtol=0)


# family -> ModelConfig fields that, reset to Llama's, must change the logits
FEATURES = {"mistral": {}, "llama3": {}, "qwen2_sliding": {},
            "gemma2": dict(attn_logit_softcapping=None, final_logit_softcapping=None),
            "gemma3": dict(rope_local_theta=None, rope_type="default"),
            "phi3_longrope": dict(rope_type="default", rope_short_factor=None, rope_long_factor=None,
                                  rope_attention_factor=None),
            "qwen3_moe": dict(norm_topk_prob=True)}


@pytest.mark.parametrize("family", list(FEATURES))
def test_the_feature_changes_the_logits(tmp_path, family):
    """Dropping the window / the scaling / the capping moves the logits far beyond TOL: the cases test
    something."""
    model = hf_model(tmp_path, family)
    config, params = load_hf_model(tmp_path)
    reset = FEATURES[family] or dict(sliding_window=None, layer_types=None, rope_type="default")
    plain = dataclasses.replace(config, **reset)
    ids = random_ids((1, 40))
    assert np.abs(et_logits(plain, params, ids) - hf_logits(model, ids)).max() > 100 * TOL


def bf16_errors(tmp_path, family):
    """``(ours [B, T], theirs)``: easytune's bfloat16 (params + compute) max abs logit error per token against
    transformers' float32 logits, and transformers' own largest bfloat16 error on the same weights and ids."""
    model = hf_model(tmp_path, family)
    ids = random_ids((2, 40))
    want = hf_logits(model, ids)
    theirs = np.abs(hf_logits(model.to(torch.bfloat16), ids) - want).max()
    config, params = load_hf_model(tmp_path, dtype="bfloat16")
    config = dataclasses.replace(config, compute_dtype="bfloat16")
    return np.abs(et_logits(config, params, ids) - want).max(-1), theirs


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2_sliding", "gemma2", "gemma3", "phi3_longrope"])
def test_bf16_compute_error_no_worse_than_transformers_bf16(tmp_path, family):
    """bfloat16 params + compute vs the float32 reference: our max abs error <= 2x transformers' own
    bfloat16 error on the same weights and ids (bf16 rounds to 2^-9 relative per op)."""
    ours, theirs = bf16_errors(tmp_path, family)
    assert ours.max() <= 2 * theirs, (ours.max(), theirs)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_moe_error_no_worse_than_transformers_bf16_outside_routing_flips(tmp_path, family):
    """As the test above for mixtures of experts, token by token: routing is discontinuous, and a bfloat16
    near-tie between two experts' router logits can send a token to another expert (in transformers as in
    easytune; seen here on 1 of 80 tokens), which moves that token's logits by O(1). At most 3% of the tokens
    may exceed 2x transformers' largest bfloat16 error; the others must not."""
    ours, theirs = bf16_errors(tmp_path, family)
    assert np.mean(ours > 2 * theirs) <= 0.03, (np.sort(ours.ravel())[-5:], theirs)


@pytest.mark.parametrize("family", ["llama2", "llama3", "llama_dynamic_rope", "mistral", "qwen2", "qwen3", "gemma2",
                                    "gemma3", "phi3", "phi3_longrope", "mixtral", "qwen3_moe"])
@pytest.mark.slow
def test_greedy_generation_matches_transformers(tmp_path, family):
    """64 greedy tokens equal ``generate(do_sample=False)`` token for token; for Mistral the window (8)
    is far shorter than prompt + 64, so decoding must drop old keys exactly as transformers; dynamic
    RoPE passes max_position_embeddings (24) after 13 tokens, so every later step grows the base."""
    model = hf_model(tmp_path, family, seed=1)
    config, params = load_hf_model(tmp_path)
    # longrope: a prompt past original_max_position_embeddings (16), so every step is in the long regime
    # (transformers' Phi3ForCausalLM re-encodes the whole prefix when generation crosses that boundary;
    # easytune's KV cache keeps the short-factor keys of a shorter prompt: docs/guide/models.md)
    prompt = random_ids((1, 20 if family == "phi3_longrope" else 11), seed=3)
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt, dtype=torch.long), do_sample=False,
                             max_new_tokens=64, min_new_tokens=64, eos_token_id=None, pad_token_id=0)
    want = out[0, prompt.shape[1]:].tolist()
    got = generate(config, params, prompt.tolist(), 64, eos_token_id=[])[0]
    assert len(want) == 64
    assert got == want


def test_gemma3_ignores_attn_logit_softcapping_as_transformers(tmp_path):
    """``Gemma3Attention`` never passes ``attn_logit_softcapping`` to its attention (unlike Gemma 2): a config that
    sets it reads as no cap, and the logits still equal transformers'."""
    model = hf_model(tmp_path, "gemma3", attn_logit_softcapping=1.0)
    config, params = load_hf_model(tmp_path)
    assert config.attn_logit_softcapping is None
    ids = random_ids((1, 40))
    np.testing.assert_allclose(et_logits(config, params, ids), hf_logits(model, ids), atol=TOL, rtol=0)
