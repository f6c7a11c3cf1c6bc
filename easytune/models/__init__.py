"""Model families (Flax linen) and Hugging Face checkpoint conversion."""

from easytune.models.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_model,
    params_to_state_dict,
    save_hf_model,
    save_hf_state_dict,
    state_dict_to_params,
)
from easytune.models.llama import (
    LlamaForCausalLM,
    ModelConfig,
    init_params,
    param_logical_axes,
)

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "config_from_hf",
    "config_to_hf",
    "init_params",
    "load_hf_model",
    "param_logical_axes",
    "params_to_state_dict",
    "save_hf_model",
    "save_hf_state_dict",
    "state_dict_to_params",
]
