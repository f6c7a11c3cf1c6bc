"""Build a run's base model from its config: from ``model.path`` or ``model.preset``, float or NF4."""

from __future__ import annotations

import dataclasses

import jax

from easytune import config as config_lib
from easytune import presets, quant
from easytune.models import hf_weights, llama
from easytune.models.model_config import ModelConfig


def runtime_fields(config) -> dict:
    """The ``ModelConfig`` fields a run's ``model.*`` keys set over the checkpoint's: dtypes, remat, attention,
    and ``router_aux_loss_coef`` when ``model.router_aux_loss_coef`` is not -1."""
    m = config.model
    out = dict(dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat, attention=m.attention,
               attention_block=m.attention_block)
    coef = m.get("router_aux_loss_coef", -1.0)
    if coef != -1:
        out["router_aux_loss_coef"] = float(coef)
    return out


def load_model(config, tokenizer):
    """``(ModelConfig, params)``: from ``model.path`` (HF dir) or initialised from ``model.preset``."""
    m = config.model
    if m.path:
        model_cfg, params = hf_weights.load_hf_model(m.path, dtype=m.dtype)
    else:
        preset = {**presets.PRESETS[m.preset], **config_lib.parse_config_overrides(m.config_overrides)}
        model_cfg = ModelConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                dtype=m.dtype, **preset)
        params = llama.init_params(model_cfg, jax.random.PRNGKey(config.train.seed))
    return dataclasses.replace(model_cfg, **runtime_fields(config)), params


def skip_modules(config) -> tuple[str, ...]:
    """Modules kept in float for a QLoRA run: ``qlora.llm_int8_skip_modules`` plus ``lora.modules_to_save``
    (those are trained in full)."""
    return tuple(dict.fromkeys([*config.qlora.llm_int8_skip_modules, *config.lora.modules_to_save]))


def load_quantized(config, tokenizer):
    """``(ModelConfig, params)`` for a ``method="qlora"`` run: the base model with NF4 kernels.

    From ``model.path`` the checkpoint is quantized tensor by tensor
    (:func:`easytune.models.hf_weights.load_hf_quantized`); a ``model.preset`` is initialised in float
    (:func:`load_model`) and then quantized.
    """
    m = config.model
    skip = skip_modules(config)
    dq = bool(config.qlora.bnb_4bit_use_double_quant)
    if m.path:
        model_cfg, params = hf_weights.load_hf_quantized(m.path, dtype=m.dtype, skip_modules=skip,
                                                         double_quant=dq)
        return dataclasses.replace(model_cfg, **runtime_fields(config)), params
    model_cfg, params = load_model(config, tokenizer)
    return model_cfg, quant.quantize_params(params, skip, dq)
