"""Model families (Flax linen: Llama 2/3, Mistral, Qwen2) and Hugging Face checkpoint conversion."""

from easytune.models.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_model,
    parameter_shapes,
    params_to_state_dict,
    read_config,
    save_hf_model,
    save_hf_state_dict,
    state_dict_to_params,
)
from easytune.models.llama import (
    LlamaForCausalLM,
    ModelConfig,
    init_params,
    param_logical_axes,
    rope_inv_freq,
)

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "config_from_hf",
    "config_to_hf",
    "init_params",
    "load_hf_model",
    "parameter_shapes",
    "param_logical_axes",
    "params_to_state_dict",
    "read_config",
    "rope_inv_freq",
    "save_hf_model",
    "save_hf_state_dict",
    "state_dict_to_params",
]
