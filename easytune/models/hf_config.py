"""Hugging Face ``config.json`` <-> :class:`~easytune.models.model_config.ModelConfig`.

Families (HF ``model_type`` -> transformers class) and what each fixes:

- ``llama`` (``LlamaForCausalLM``; Llama 2, 3, 3.1): optional ``attention_bias`` / ``mlp_bias``; no sliding window.
- ``mistral`` (``MistralForCausalLM``): no biases; ``sliding_window`` (default 4096) on every layer.
- ``qwen2`` (``Qwen2ForCausalLM``; Qwen2 / 2.5): q/k/v biases, none on o_proj or the MLP; a sliding window only
  with ``use_sliding_window``, on the layers ``layer_types`` (or ``max_window_layers`` onwards) name.
- ``qwen3`` (``Qwen3ForCausalLM``): ``qk_norm``; ``attention_bias`` on q/k/v/o; ``head_dim`` default 128;
  sliding window as qwen2.
- ``gemma2`` (``Gemma2ForCausalLM``): GeGLU (``hidden_activation`` gelu_pytorch_tanh), (1 + w) RMSNorm,
  embeddings scaled by sqrt(D), sandwich norms, tied embeddings by default, ``query_pre_attn_scalar``,
  attention and final logit soft-capping, ``sliding_window`` on the ``layer_types`` sliding layers
  (default: every other layer, starting with layer 0).
- ``gemma3_text`` (``Gemma3ForCausalLM``): gemma2 + ``qk_norm``; RoPE per layer type (v5 ``rope_parameters``
  ``{"full_attention": {...}, "sliding_attention": {...}}``, or v4 ``rope_theta`` + ``rope_scaling`` for the
  full layers and ``rope_local_base_freq`` for the sliding ones): the full layers' RoPE may be scaled, the
  sliding layers' must be default (``rope_local_theta``); sliding layers from ``layer_types`` or
  ``sliding_window_pattern`` (default 6: five sliding, one full).
- ``phi3`` (``Phi3ForCausalLM``; Phi-3, 3.5, 4-mini): fused ``qkv_proj`` and ``gate_up_proj``, no biases;
  ``sliding_window`` on every layer when set; RoPE "default" or "longrope" (``short_factor`` / ``long_factor``,
  top-level ``original_max_position_embeddings``, optional ``attention_factor`` or ``factor``) with
  ``partial_rotary_factor``.
- ``mixtral`` (``MixtralForCausalLM``): every layer a sparse MLP of ``num_local_experts`` experts of width
  ``intermediate_size``, top ``num_experts_per_tok``, routing weights renormalised; ``sliding_window`` on every
  layer when set.
- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): qwen3 attention (``qk_norm``, ``attention_bias``) with
  ``sliding_window`` on every layer when ``use_sliding_window`` (Qwen3MoeAttention reads no ``layer_types``);
  layer i sparse iff ``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``
  (experts of width ``moe_intermediate_size``, ``norm_topk_prob``), else a dense MLP of ``intermediate_size``.

For the two MoE families ``router_aux_loss_coef`` is kept only when ``output_router_logits`` is true (the
transformers CausalLM adds the load-balancing loss only then), else it becomes 0.

Refused, with the field named: any other ``model_type``; an activation other than the family's (silu, or
gelu_pytorch_tanh for Gemma); RoPE types other than default / linear / dynamic / llama3 (phi3: default /
longrope only; longrope only on phi3), ``partial_rotary_factor`` != 1 outside phi3, a non-default RoPE on
Gemma 3's sliding layers, a flat (not per layer type) ``rope_parameters`` on gemma3_text; a ``sliding_window``
on llama, sliding layers without a window, no window at all on Gemma (``Gemma2Model`` always builds the
sliding mask); ``use_bidirectional_attention``; non-zero ``attention_dropout`` (the new families),
``resid_pdrop`` / ``embd_pdrop`` (phi3) and ``router_jitter_noise`` (mixtral), which easytune does not
implement; mistyped sizes.

References:
    transformers 5.25 ``models/{llama,mistral,qwen2,qwen3,gemma2,gemma3,phi3,mixtral,qwen3_moe}/``
    ``configuration_*.py`` (keys and defaults) and ``modeling_*.py`` (what the keys change);
    ``modeling_rope_utils.py`` (``rope_parameters`` / ``rope_scaling``, ``_compute_longrope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

from easytune.models.model_config import ROPE_TYPES, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral",
                         "qwen3_moe")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
_GEMMA = ("gemma2", "gemma3_text")
# families whose config_to_hf follows config.model_type (the first three are inferred from the fields)
_NAMED_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
# RoPE types every family but phi3 computes (transformers would run longrope on them too; easytune keeps it
# to phi3, the one family that ships it)
_ROPE_TYPES_COMMON = tuple(t for t in ROPE_TYPES if t != "longrope")
_ROPE_TYPES_PHI3 = ("default", "longrope")
# transformers config-class defaults (the class attributes of each ``*Config``); a missing
# num_key_value_heads / head_dim means: as num_attention_heads / hidden_size // num_attention_heads
_COMMON = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
               head_dim=None, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
               pad_token_id=None, sliding_window=None)
_DEFAULTS = {
    "llama": dict(_COMMON, vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(_COMMON, vocab_size=32000, intermediate_size=14336, max_position_embeddings=4096 * 32,
                    bos_token_id=1, eos_token_id=2, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(_COMMON, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None, num_key_value_heads=32, sliding_window=4096,
                  max_window_layers=28),
    "qwen3": dict(_COMMON, vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None, num_key_value_heads=32, head_dim=128,
                  sliding_window=4096, max_window_layers=28),
    "gemma2": dict(_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                   query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(_COMMON, vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131_072, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                        tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=None, attn_logit_softcapping=None, rope_theta=1_000_000.0,
                        rope_local_base_freq=10_000.0, sliding_window_pattern=6),
    "phi3": dict(_COMMON, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 max_position_embeddings=4096, original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "mixtral": dict(_COMMON, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                    rope_theta=1_000_000.0, num_local_experts=8, num_experts_per_tok=2,
                    router_aux_loss_coef=0.001),
    "qwen3_moe": dict(_COMMON, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      num_hidden_layers=24, num_key_value_heads=4, max_position_embeddings=32768,
                      bos_token_id=None, eos_token_id=None, sliding_window=4096, decoder_sparse_step=1,
                      moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128, norm_topk_prob=False,
                      router_aux_loss_coef=0.001),
}
# fields easytune does not implement (training-time noise), accepted only at 0
_ZERO_ONLY = {"qwen3": ("attention_dropout",), "gemma2": ("attention_dropout",),
              "gemma3_text": ("attention_dropout",), "phi3": ("attention_dropout", "resid_pdrop", "embd_pdrop"),
              "mixtral": ("attention_dropout", "router_jitter_noise"), "qwen3_moe": ("attention_dropout",)}


def _first(token_id):
    """First id of a list-valued special token (Llama 3 ``eos_token_id: [...]``), else the id."""
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


def _get(hf: dict, key: str, model_type: str):
    """``hf[key]``, or the transformers default of ``model_type``'s config class when the key is missing."""
    return hf[key] if key in hf else _DEFAULTS[model_type].get(key)


def _parse_rope(rope: dict, where: str, allowed: tuple[str, ...], model_type: str) -> dict:
    """``ModelConfig`` RoPE fields (type, theta, scaling) of one resolved RoPE dict (``rope_theta`` set).

    ``where`` names the dict in errors ("rope_parameters", "rope_parameters.full_attention").
    """
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config.convert_rope_params_to_dict BC
        rope_type = "longrope"
    if rope_type not in allowed:
        raise ValueError(f"unsupported {where}.rope_type {rope_type!r} for model_type {model_type!r} "
                         f"(supported: {', '.join(allowed)})")
    out = dict(rope_type=rope_type, rope_theta=float(rope["rope_theta"]))
    if rope_type in ("linear", "dynamic", "llama3"):
        if "factor" not in rope:
            raise ValueError(f"{where} of rope_type {rope_type!r} has no \"factor\"")
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise ValueError(f"{where} of rope_type 'llama3' has no {key!r}")
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"))
    return out


def _longrope_fields(rope: dict, hf: dict) -> dict:
    """Phi-3 "longrope" fields, as ``_compute_longrope_parameters`` reads them after ``Phi3Config``'s
    ``standardize_rope_params`` (which sets the dict's pretraining length from the top-level
    ``original_max_position_embeddings``, default 4096)."""
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, (list, tuple)) or not all(isinstance(f, (int, float)) for f in v):
            raise ValueError(f"rope_parameters of rope_type 'longrope' has no list of numbers {key!r}")
    original = _get(hf, "original_max_position_embeddings", "phi3")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None and rope.get("factor") is not None:
        # transformers derives the cos/sin scale from ``factor`` when given (else from max_position_embeddings)
        factor = float(rope["factor"])
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(rope_short_factor=tuple(float(f) for f in rope["short_factor"]),
                rope_long_factor=tuple(float(f) for f in rope["long_factor"]),
                rope_original_max_position_embeddings=original,
                rope_attention_factor=None if attention_factor is None else float(attention_factor))


def _check_partial(rope: dict, hf: dict, model_type: str, where: str = "rope_parameters") -> float:
    """The ``partial_rotary_factor`` transformers applies (``rope_parameters`` first, then top level); only
    phi3's rotary embedding slices the head, so anything but 1 elsewhere is refused."""
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else partial
    if model_type != "phi3" and partial != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {partial!r} in {where} for model_type "
                         f"{model_type!r} (only 1.0; only phi3 rotates part of each head)")
    if not isinstance(partial, (int, float)) or isinstance(partial, bool):
        raise ValueError(f"field 'partial_rotary_factor' must be a number, got {partial!r}")
    return float(partial)


def _rope_fields(hf: dict, model_type: str) -> dict:
    """``ModelConfig`` RoPE fields from v5 ``rope_parameters`` or v4 ``rope_scaling`` + ``rope_theta``."""
    if model_type == "gemma3_text":
        return _gemma3_rope_fields(hf)
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope.setdefault("rope_theta", _get(hf, "rope_theta", model_type))
    if rope["rope_theta"] is None:
        rope["rope_theta"] = _DEFAULTS[model_type]["rope_theta"]
    partial = _check_partial(rope, hf, model_type)
    allowed = _ROPE_TYPES_PHI3 if model_type == "phi3" else _ROPE_TYPES_COMMON
    out = _parse_rope(rope, "rope_parameters", allowed, model_type)
    if model_type == "phi3":
        out["partial_rotary_factor"] = partial
        if out["rope_type"] == "longrope":
            out.update(_longrope_fields(rope, hf))
    return out


def _gemma3_rope_fields(hf: dict) -> dict:
    """Gemma 3: RoPE per layer type, as ``Gemma3TextConfig.convert_rope_params_to_dict`` resolves it: the
    v4 ``rope_scaling`` updates the full layers' dict, ``rope_theta`` (default 1e6) and ``rope_local_base_freq``
    (default 1e4) fill in the full and sliding layers' base."""
    params = hf.get("rope_parameters") or {}
    if params and not ({"full_attention", "sliding_attention"} & set(params)):
        raise ValueError("unsupported rope_parameters layout for model_type 'gemma3_text': transformers reads it "
                         "per layer type ({'full_attention': {...}, 'sliding_attention': {...}}) and would ignore "
                         f"the flat dict {params!r}")
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    sliding = dict(params.get("sliding_attention") or {"rope_type": "default"})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", _get(hf, "rope_theta", "gemma3_text"))
    sliding.setdefault("rope_theta", _get(hf, "rope_local_base_freq", "gemma3_text"))
    _check_partial(full, hf, "gemma3_text", "rope_parameters.full_attention")
    _check_partial(sliding, hf, "gemma3_text", "rope_parameters.sliding_attention")
    out = _parse_rope(full, "rope_parameters.full_attention", _ROPE_TYPES_COMMON, "gemma3_text")
    local = _parse_rope(sliding, "rope_parameters.sliding_attention", _ROPE_TYPES_COMMON, "gemma3_text")
    if local["rope_type"] != "default":
        raise ValueError(f"unsupported rope_parameters.sliding_attention.rope_type {local['rope_type']!r} "
                         f"(easytune's sliding layers use default RoPE with base rope_local_theta; only the "
                         f"full_attention layers may be scaled)")
    out["rope_local_theta"] = local["rope_theta"]
    return out


def _layer_types_fields(hf: dict, model_type: str, layers: int, window) -> dict:
    """``sliding_window`` + ``layer_types`` of the families that choose the sliding layers per layer; a config
    where no layer slides becomes ``sliding_window=None, layer_types=None``."""
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type in ("qwen2", "qwen3"):  # Qwen2Config / Qwen3Config.__post_init__
            first = _get(hf, "max_window_layers", model_type)
            sliding = [window is not None and i >= first for i in range(layers)]
        elif model_type == "gemma2":  # Gemma2Config.__post_init__
            sliding = [bool((i + 1) % 2) for i in range(layers)]
        else:  # Gemma3TextConfig.__post_init__
            pattern = _get(hf, "sliding_window_pattern", model_type)
            sliding = [bool((i + 1) % pattern) for i in range(layers)]
        layer_types = ["sliding_attention" if s else "full_attention" for s in sliding]
    layer_types = tuple(layer_types)
    if "sliding_attention" in layer_types and window is None:
        raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None "
                         "(or use_sliding_window is false)")
    if window is None or "sliding_attention" not in layer_types:
        if len(layer_types) != layers:  # still say so: ModelConfig would have
            raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers (num_hidden_layers)")
        bad = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if bad:
            raise ValueError(f"unsupported layer_types {bad}; supported: full_attention, sliding_attention")
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=window, layer_types=layer_types)


def _attention_fields(hf: dict, model_type: str, layers: int) -> dict:
    """Biases and sliding window per family, as the transformers modeling code hard-wires them."""
    if model_type == "llama":
        if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
            raise ValueError(f"unsupported sliding_window {hf.get('sliding_window')!r} for model_type "
                             f"'llama' (LlamaForCausalLM has no sliding window; use model_type "
                             f"'mistral')")
        return dict(attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False))
    if model_type in ("mistral", "phi3", "mixtral"):  # no biases; every layer slides when a window is set
        return dict(attention_bias=False, mlp_bias=False, sliding_window=_get(hf, "sliding_window", model_type),
                    layer_types=None)
    if model_type == "qwen3_moe":  # Qwen3MoeAttention: getattr(config, "sliding_window") on every layer
        window = _get(hf, "sliding_window", model_type) if hf.get("use_sliding_window") else None
        return dict(attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=False, sliding_window=window,
                    layer_types=None)
    if model_type in ("qwen2", "qwen3"):  # sliding only with use_sliding_window
        window = _get(hf, "sliding_window", model_type) if hf.get("use_sliding_window") else None
        out = _layer_types_fields(hf, model_type, layers, window)
        if model_type == "qwen2":  # q/k/v biased, o_proj and MLP not
            return dict(attention_bias=True, o_proj_bias=False, mlp_bias=False, **out)
        return dict(attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=False, **out)
    # gemma2, gemma3_text
    window = _get(hf, "sliding_window", model_type)
    if window is None:
        raise ValueError(f"unsupported sliding_window None for model_type {model_type!r} (the transformers model "
                         f"always builds the sliding-window mask and raises without one)")
    return dict(attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=False,
                **_layer_types_fields(hf, model_type, layers, window))


def _router_aux_loss_coef(hf: dict, model_type: str) -> float:
    """The load-balancing coefficient the transformers CausalLM applies: ``router_aux_loss_coef`` when
    ``output_router_logits`` (else it adds no auxiliary loss)."""
    coef = _get(hf, "router_aux_loss_coef", model_type)
    return float(coef) if hf.get("output_router_logits") and coef else 0.0


def _num_experts(hf: dict, model_type: str) -> int:
    """X from ``num_local_experts`` / ``num_experts`` (an ``attribute_map`` alias of each other in both MoE
    config classes; ``to_dict`` writes ``num_local_experts``)."""
    given = {k: hf[k] for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
    if len(set(given.values())) > 1:
        raise ValueError(f"num_experts and num_local_experts disagree: {given}")
    if given:
        return next(iter(given.values()))
    return _DEFAULTS[model_type]["num_local_experts" if model_type == "mixtral" else "num_experts"]


def _family_fields(hf: dict, model_type: str, layers: int) -> dict:
    """The fields that switch on what a family does differently from Llama."""
    if model_type == "qwen3":
        return dict(qk_norm=True)
    if model_type in _GEMMA:
        scalar = _get(hf, "query_pre_attn_scalar", model_type)
        if scalar is None:  # Gemma2Attention: config.query_pre_attn_scalar**-0.5
            raise ValueError(f"unsupported query_pre_attn_scalar None for model_type {model_type!r} (the attention "
                             f"scale is query_pre_attn_scalar ** -0.5)")
        if float(scalar) != int(scalar):  # Gemma2Config / Gemma3TextConfig take an integer
            raise ValueError(f"field 'query_pre_attn_scalar' must be an integer for model_type {model_type!r}, "
                             f"got {scalar!r}")
        caps = {k: None if _get(hf, k, model_type) is None else float(_get(hf, k, model_type))
                for k in ("attn_logit_softcapping", "final_logit_softcapping")}
        if model_type == "gemma3_text":  # Gemma3Attention never passes attn_logit_softcapping to its attention
            caps["attn_logit_softcapping"] = None
        return dict(hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, embed_scale=True, sandwich_norm=True,
                    qk_norm=model_type == "gemma3_text", query_pre_attn_scalar=float(scalar), **caps)
    if model_type == "phi3":
        return dict(fused_qkv=True, fused_gate_up=True)
    if model_type == "mixtral":
        return dict(num_experts=_num_experts(hf, model_type),
                    num_experts_per_tok=_get(hf, "num_experts_per_tok", model_type), norm_topk_prob=True,
                    router_aux_loss_coef=_router_aux_loss_coef(hf, model_type))
    if model_type == "qwen3_moe":
        experts = _num_experts(hf, model_type)
        step = _get(hf, "decoder_sparse_step", model_type)
        only = hf.get("mlp_only_layers") or []
        if not isinstance(only, (list, tuple)) or not all(isinstance(i, int) for i in only):
            raise ValueError(f"field 'mlp_only_layers' must be a list of layer indices, got {only!r}")
        sparse = tuple(i not in only and experts > 0 and (i + 1) % step == 0 for i in range(layers))
        return dict(qk_norm=True, num_experts=experts,
                    num_experts_per_tok=_get(hf, "num_experts_per_tok", model_type),
                    moe_intermediate_size=_get(hf, "moe_intermediate_size", model_type),
                    norm_topk_prob=bool(_get(hf, "norm_topk_prob", model_type)),
                    router_aux_loss_coef=_router_aux_loss_coef(hf, model_type),
                    moe_layers=None if not experts or all(sparse) else sparse)
    return {}


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "original_max_position_embeddings",
               "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
               "max_window_layers", "sliding_window_pattern")
_POSITIVE_FIELDS = ("rms_norm_eps", "rope_theta", "initializer_range", "query_pre_attn_scalar",
                    "attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq")


_NOT_NULL = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "rms_norm_eps", "num_experts_per_tok", "decoder_sparse_step", "sliding_window_pattern",
             "max_window_layers", "moe_intermediate_size", "num_local_experts")
_BOOL_FIELDS = ("tie_word_embeddings", "norm_topk_prob", "output_router_logits", "use_sliding_window",
                "attention_bias", "mlp_bias", "use_bidirectional_attention")


def _check_types(hf: dict) -> None:
    """ValueError naming a mistyped size (a hand-edited ``"hidden_size": "64"`` must not reach the model)."""
    for field in _INT_FIELDS:
        v = hf.get(field)
        if field in ("num_experts", "num_local_experts"):
            continue
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"field {field!r} must be a positive integer, got {v!r}")
    for field in ("num_experts", "num_local_experts"):  # 0: a dense Qwen3-MoE (transformers writes it so)
        v = hf.get(field)
        least = 1 if hf.get("model_type") == "mixtral" else 0  # MixtralSparseMoeBlock on every layer
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            raise ValueError(f"field {field!r} must be a{' positive' if least else ' non-negative'} integer, "
                             f"got {v!r}")
    for field in _NOT_NULL:  # present as null: transformers would fail later, easytune deep inside the model
        if field in hf and hf[field] is None:
            raise ValueError(f"field {field!r} is null; it needs a value (or leave the key out for the default)")
    for field in _BOOL_FIELDS:  # "false" is a true string: a JSON boolean only
        v = hf.get(field)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"field {field!r} must be true or false (a JSON boolean), got {v!r}")
    v = hf.get("layer_types")
    if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
        raise ValueError(f"field 'layer_types' must be a list of strings, one per layer, got {v!r}")
    for field in _POSITIVE_FIELDS:
        v = hf.get(field)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"field {field!r} must be a positive number, got {v!r}")


def _check_unimplemented(hf: dict, model_type: str) -> str:
    """ValueError naming a field that changes the math in a way easytune does not implement; returns the
    family's ``hidden_act``."""
    if model_type in _GEMMA:  # Gemma2MLP / Gemma3MLP read hidden_activation, never hidden_act
        act = hf.get("hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"unsupported hidden_activation {act!r} (only 'gelu_pytorch_tanh')")
        if hf.get("use_bidirectional_attention"):
            raise ValueError("unsupported use_bidirectional_attention True (easytune attends causally)")
    elif hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    for field in _ZERO_ONLY.get(model_type, ()):
        v = hf.get(field)
        if v:
            raise ValueError(f"unsupported {field} {v!r} for model_type {model_type!r} (easytune trains without "
                             f"it: only 0)")
    return "gelu_pytorch_tanh" if model_type in _GEMMA else "silu"


def config_from_hf(hf: dict) -> ModelConfig:
    """Builds a ``ModelConfig`` from a HF ``config.json`` dict (transformers v4 or v5 layout).

    Families: ``llama`` (Llama 2, 3, 3.1), ``mistral`` (sliding window on every layer, default 4096),
    ``qwen2`` (q/k/v biases; a window only with ``use_sliding_window``, on the layers ``layer_types`` or
    ``max_window_layers`` choose), ``qwen3`` (qwen2's window rule, ``qk_norm``, ``attention_bias`` on q/k/v/o),
    ``gemma2`` / ``gemma3_text`` (GeGLU, (1 + w) norms, sqrt(D) embedding scale, sandwich norms,
    ``query_pre_attn_scalar``, soft-capping, windows on the ``layer_types`` sliding layers; Gemma 3 adds
    ``qk_norm`` and a per-layer-type RoPE: ``rope_local_theta`` for the sliding layers), ``phi3`` (fused
    ``qkv_proj`` / ``gate_up_proj``, window on every layer, "longrope" with ``partial_rotary_factor``),
    ``mixtral`` and ``qwen3_moe`` (routed experts; Qwen3-MoE's ``mlp_only_layers`` / ``decoder_sparse_step``
    become ``moe_layers``, None when every layer is sparse). The module docstring lists each family's fixed
    choices. RoPE comes from v5 ``rope_parameters`` or v4 ``rope_scaling`` + ``rope_theta``. Missing keys take
    the defaults of the matching transformers config class. ``dtype`` is the checkpoint's ``dtype``/
    ``torch_dtype`` when that is float32, bfloat16 or float16, else float32. A list-valued ``bos_token_id``/
    ``eos_token_id`` (Llama 3) keeps its first id. The MoE ``router_aux_loss_coef`` is kept only when
    ``output_router_logits`` is true (transformers adds the loss only then), else 0.

    Args:
        hf: the parsed ``config.json``.

    Returns:
        The model config.

    Raises:
        ValueError: naming the field: ``model_type`` not in ``SUPPORTED_MODEL_TYPES``; ``hidden_act`` other
            than silu (``hidden_activation`` other than gelu_pytorch_tanh on Gemma); a rope_type other than
            default / linear / dynamic / llama3 (phi3: default / longrope; yarn and others everywhere) or a
            ``partial_rotary_factor`` other than 1 outside phi3; missing scaling keys (``factor``, llama3's
            ``low_freq_factor`` / ``high_freq_factor``, longrope's ``short_factor`` / ``long_factor``); a
            non-default ``rope_parameters.sliding_attention`` or a flat ``rope_parameters`` on gemma3_text;
            ``sliding_window`` on a ``llama`` config, sliding layers without a window, a Gemma config without
            ``sliding_window``; ``layer_types`` values other than full_attention / sliding_attention;
            ``use_bidirectional_attention``; non-zero ``attention_dropout`` (qwen3, gemma2, gemma3_text, phi3,
            mixtral, qwen3_moe), ``resid_pdrop`` / ``embd_pdrop`` (phi3), ``router_jitter_noise`` (mixtral);
            ``num_experts`` and ``num_local_experts`` that disagree; mistyped sizes.
    """
    model_type = hf.get("model_type")
    _check_types(hf)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    hidden_act = _check_unimplemented(hf, model_type)
    heads = _get(hf, "num_attention_heads", model_type)
    layers = _get(hf, "num_hidden_layers", model_type)
    kv_heads = _get(hf, "num_key_value_heads", model_type)
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    fields = dict(
        vocab_size=_get(hf, "vocab_size", model_type),
        hidden_size=_get(hf, "hidden_size", model_type),
        intermediate_size=_get(hf, "intermediate_size", model_type),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads if kv_heads is None else kv_heads,
        head_dim=_get(hf, "head_dim", model_type),  # None: hidden_size // num_attention_heads
        rms_norm_eps=_get(hf, "rms_norm_eps", model_type),
        max_position_embeddings=_get(hf, "max_position_embeddings", model_type),
        tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", model_type)),
        bos_token_id=_first(_get(hf, "bos_token_id", model_type)),
        eos_token_id=_first(_get(hf, "eos_token_id", model_type)),
        pad_token_id=_first(_get(hf, "pad_token_id", model_type)),
        model_type=model_type,
        initializer_range=hf.get("initializer_range", 0.02),
        dtype=dtype if dtype in _DTYPES else "float32",
        hidden_act=hidden_act,
        **_rope_fields(hf, model_type),
        **_attention_fields(hf, model_type, layers),
    )
    fields.update(_family_fields(hf, model_type, layers))
    return ModelConfig(**fields)


def _family(config: ModelConfig) -> str:
    """The HF family that expresses ``config`` exactly; ValueError naming the field when none does."""
    if config.model_type in _NAMED_FAMILIES:
        return config.model_type
    o_bias = config.attention_bias if config.o_proj_bias is None else config.o_proj_bias
    if config.model_type == "qwen2":
        if not (config.attention_bias and not o_bias and not config.mlp_bias):
            raise ValueError("a qwen2 config needs attention_bias=True, o_proj_bias=False, "
                             "mlp_bias=False (Qwen2Attention / Qwen2MLP hard-wire them)")
        return "qwen2"
    if config.sliding_window is not None or config.model_type == "mistral":
        if config.attention_bias or o_bias or config.mlp_bias:
            raise ValueError("a mistral config (sliding_window) cannot carry attention_bias, "
                             "o_proj_bias or mlp_bias (MistralAttention has none)")
        if config.layer_types is not None and "full_attention" in config.layer_types:
            raise ValueError("layer_types mixing full and sliding attention needs model_type 'qwen2'")
        return "mistral"
    if o_bias != config.attention_bias:
        raise ValueError(f"o_proj_bias={config.o_proj_bias} differs from attention_bias="
                         f"{config.attention_bias}: only model_type 'qwen2' expresses that")
    return "llama"


# ModelConfig fields that choose how easytune runs, not what the model computes
_RUNTIME_FIELDS = ("model_type", "remat", "scan_layers", "attention", "attention_block", "compute_dtype")
_MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef", "moe_layers")


def _semantics(c: ModelConfig) -> dict:
    """The fields of ``c`` that change what the model computes, with equivalent spellings made equal (per-layer
    windows instead of ``sliding_window`` + ``layer_types``, resolved ``o_proj_bias``, no scaling keys of an
    unscaled RoPE, ...)."""
    d = dataclasses.asdict(c)
    for f in _RUNTIME_FIELDS:
        d.pop(f)
    d["o_proj_bias"] = c.attention_bias if c.o_proj_bias is None else c.o_proj_bias
    windows = tuple(c.layer_window(i) for i in range(c.num_hidden_layers))
    d.pop("layer_types")
    d["sliding_window"] = windows
    if all(w is None for w in windows):
        d.pop("rope_local_theta")
    elif c.rope_local_theta is None and c.rope_type == "default":
        d["rope_local_theta"] = c.rope_theta
    d["query_pre_attn_scalar"] = float(c.query_pre_attn_scalar or c.head_dim)
    if c.rope_type == "default":
        d.pop("rope_factor")
    if c.rope_type != "llama3":
        d.pop("rope_low_freq_factor")
        d.pop("rope_high_freq_factor")
    if c.rope_type in ("llama3", "longrope"):
        d["rope_original_max_position_embeddings"] = (c.rope_original_max_position_embeddings
                                                      or c.max_position_embeddings)
    else:
        d.pop("rope_original_max_position_embeddings")
    if c.rope_type != "longrope":
        for f in ("rope_short_factor", "rope_long_factor", "rope_attention_factor"):
            d.pop(f)
    if c.num_experts:
        d["moe_layers"] = tuple(c.layer_is_moe(i) for i in range(c.num_hidden_layers))
    else:
        for f in _MOE_FIELDS:
            d.pop(f)
    return d


def _check_expressed(config: ModelConfig, out: dict) -> None:
    """ValueError naming the fields of ``config`` that the written family does not compute as ``config`` does
    (read back through ``config_from_hf``)."""
    family = out["model_type"]
    try:
        back = config_from_hf(out)
    except ValueError as e:
        raise ValueError(f"model_type {family!r} cannot express this config: {e}") from e
    want, got = _semantics(config), _semantics(back)
    missing = object()
    bad = sorted(k for k in set(want) | set(got) if want.get(k, missing) != got.get(k, missing))
    if bad:
        raise ValueError(f"model_type {family!r} ({_ARCHITECTURES[family]}) cannot express "
                         + ", ".join(f"{k}={want.get(k)!r}" for k in bad)
                         + " (it would compute " + ", ".join(f"{k}={got.get(k)!r}" for k in bad) + ")")


def _rope_dict(c: ModelConfig) -> dict:
    """The v5 ``rope_parameters`` of ``c``'s (full-attention) layers."""
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type in ("linear", "dynamic", "llama3"):
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=(c.rope_original_max_position_embeddings
                                                      or c.max_position_embeddings))
    if c.rope_type == "longrope":
        rope.update(short_factor=list(c.rope_short_factor or ()), long_factor=list(c.rope_long_factor or ()),
                    original_max_position_embeddings=(c.rope_original_max_position_embeddings
                                                      or c.max_position_embeddings))
        if c.rope_attention_factor is not None:
            rope["attention_factor"] = c.rope_attention_factor
    return rope


def _layer_types_out(c: ModelConfig) -> list[str]:
    """``layer_types`` naming each layer of ``c`` by whether it slides."""
    return ["sliding_attention" if c.layer_window(i) is not None else "full_attention"
            for i in range(c.num_hidden_layers)]


def _aux_loss_keys(c: ModelConfig) -> dict:
    """``output_router_logits`` + ``router_aux_loss_coef``: transformers adds the loss only with the former."""
    return dict(output_router_logits=c.router_aux_loss_coef > 0, router_aux_loss_coef=float(c.router_aux_loss_coef))


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict of the transformers class that computes exactly what ``config`` does.

    ``model_type`` is ``config.model_type`` for qwen3, gemma2, gemma3_text, phi3, mixtral and qwen3_moe; for the
    others it is ``llama`` (``LlamaForCausalLM``) unless the config needs ``mistral`` (a sliding window) or is
    ``qwen2``. RoPE is written both as v5 ``rope_parameters`` and as the v4 keys (``rope_theta`` /
    ``rope_scaling``; Gemma 3 also ``rope_local_base_freq``, per-layer-type ``rope_parameters``; Phi-3 the
    ``{"type": "longrope", "short_factor", "long_factor"}`` ``rope_scaling`` with top-level
    ``original_max_position_embeddings`` and ``partial_rotary_factor``); the dtype both as v5 ``dtype`` and v4
    ``torch_dtype``. A Gemma config without a window gets the class default 4096 (no layer slides); the MoE
    ``router_aux_loss_coef`` comes with ``output_router_logits`` true when it is non-zero.

    Args:
        config: model config.

    Returns:
        JSON-serializable dict; ``config_from_hf(config_to_hf(c)) == c`` for every ``c`` that
        ``config_from_hf`` returns (runtime fields such as ``remat`` aside); for other configs the result
        computes the same model (e.g. ``rope_local_theta=None`` reads back as the value it implied).

    Raises:
        ValueError: the family cannot express the config (e.g. a sliding window with biases on mistral,
            ``qk_norm=False`` on qwen3, a Gemma ``query_pre_attn_scalar`` that is no integer), naming the fields.
    """
    c = config
    family = _family(c)
    rope = _rope_dict(c)
    out = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": c.hidden_act,
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if c.rope_type == "default" else dict(rope),
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "dtype": c.dtype,
        "torch_dtype": c.dtype,
    }
    if family == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    elif family == "mistral":
        out["sliding_window"] = c.sliding_window
    elif family in ("qwen2", "qwen3"):
        if family == "qwen3":
            out["attention_bias"] = c.attention_bias
        out.update(use_sliding_window=c.sliding_window is not None,
                   sliding_window=c.sliding_window, max_window_layers=c.num_hidden_layers,
                   layer_types=_layer_types_out(c))
    elif family in _GEMMA:
        scalar = c.query_pre_attn_scalar if c.query_pre_attn_scalar is not None else c.head_dim
        if scalar != int(scalar):
            raise ValueError(f"query_pre_attn_scalar={scalar!r}: {_ARCHITECTURES[family]}'s config takes an integer")
        out.update(hidden_activation=c.hidden_act, attention_bias=c.attention_bias, query_pre_attn_scalar=int(scalar),
                   sliding_window=c.sliding_window if c.sliding_window is not None else 4096,
                   layer_types=_layer_types_out(c), attn_logit_softcapping=c.attn_logit_softcapping,
                   final_logit_softcapping=c.final_logit_softcapping, use_bidirectional_attention=False)
        if family == "gemma3_text":
            local = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
            full = dict(rope)
            out.update(rope_parameters={"full_attention": full,
                                        "sliding_attention": {"rope_type": "default", "rope_theta": local}},
                       rope_scaling=None if c.rope_type == "default" else {k: v for k, v in full.items()
                                                                            if k != "rope_theta"},
                       rope_local_base_freq=local)
    elif family == "phi3":
        out.update(sliding_window=c.sliding_window, resid_pdrop=0.0, embd_pdrop=0.0,
                   partial_rotary_factor=c.partial_rotary_factor,
                   original_max_position_embeddings=(c.rope_original_max_position_embeddings
                                                     or c.max_position_embeddings))
        out["rope_parameters"]["partial_rotary_factor"] = c.partial_rotary_factor
        if c.rope_type == "longrope":  # v4 Phi3Config: exactly type, short_factor, long_factor
            out["rope_scaling"] = {"type": "longrope", "short_factor": rope["short_factor"],
                                   "long_factor": rope["long_factor"]}
            if c.rope_attention_factor is not None:
                out["rope_scaling"]["attention_factor"] = c.rope_attention_factor
    elif family == "mixtral":
        out.update(sliding_window=c.sliding_window, num_local_experts=c.num_experts,
                   num_experts_per_tok=c.num_experts_per_tok, router_jitter_noise=0.0, **_aux_loss_keys(c))
    else:  # qwen3_moe
        out.update(attention_bias=c.attention_bias, use_sliding_window=c.sliding_window is not None,
                   sliding_window=c.sliding_window, decoder_sparse_step=1,
                   mlp_only_layers=[i for i in range(c.num_hidden_layers) if not c.layer_is_moe(i)]
                   if c.num_experts else [],
                   num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                   moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=c.norm_topk_prob,
                   **_aux_loss_keys(c))
    _check_expressed(c, out)
    return out


def read_json(path: pathlib.Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or no object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """``config_from_hf`` of ``model_dir/config.json``, reading no weights.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: invalid JSON, or as ``config_from_hf``; the message starts with the file's path.
    """
    path = pathlib.Path(model_dir) / "config.json"
    hf = read_json(path)
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
