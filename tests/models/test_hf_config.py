"""easytune.models.hf_config: ``config.json`` <-> ModelConfig for the llama, mistral and qwen2 families (v4 and
v5 layouts, published configs), and the errors that name an unsupported or mistyped field.
"""

import dataclasses
import json
import re

import pytest

from easytune.models.hf_config import config_from_hf, config_to_hf
from easytune.models.model_config import ModelConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma", "phi", None])
def test_unsupported_model_type(model_type):
    with pytest.raises(ValueError, match=f"unsupported model_type {model_type!r}"):
        config_from_hf({**config_to_hf(ModelConfig(**TINY)), "model_type": model_type})


@pytest.mark.parametrize("field, value, named", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 8.0}, "rope_parameters.rope_type"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4},
     "rope_parameters.rope_type"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
    ("sliding_window", 4096, "sliding_window"),  # LlamaForCausalLM has none: say so, don't ignore it
    ("hidden_act", "gelu", "hidden_act"),
])
def test_unsupported_fields_are_rejected(field, value, named):
    hf = {**config_to_hf(ModelConfig(**TINY)), field: value}
    if field == "rope_scaling":  # a v4 file: no rope_parameters
        del hf["rope_parameters"]
    with pytest.raises(ValueError, match=f"unsupported {re.escape(named)} "):
        config_from_hf(hf)


def test_config_from_hf_v4_layout_and_round_trip():
    """A transformers-4 style Llama 3 config.json (top-level rope_theta, torch_dtype, eos list)."""
    v4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
          "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "rope_scaling": None, "max_position_embeddings": 8192,
          "bos_token_id": 128000, "eos_token_id": [128001, 128009], "torch_dtype": "bfloat16",
          "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False}
    config = config_from_hf(v4)
    assert (config.rope_theta, config.head_dim, config.dtype) == (500000.0, 128, "bfloat16")
    assert (config.bos_token_id, config.eos_token_id) == (128000, 128001)
    assert config_from_hf(config_to_hf(config)) == config
    mistral = {**v4, "model_type": "mistral"}
    assert config_from_hf(mistral).sliding_window == 4096  # MistralConfig's default
    assert config_from_hf({**mistral, "sliding_window": None}).model_type == "mistral"
    assert dataclasses.replace(config, model_type="mistral") == config_from_hf(
        {**mistral, "sliding_window": None})


def test_published_v4_configs_parse():
    """config.json files as published (transformers 4 layout) for Llama 3.1 8B, Mistral 7B v0.1 and
    Qwen2.5 0.5B (abridged to the fields that matter) give the fields transformers reads from them."""
    llama31 = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
               "num_key_value_heads": 8, "num_hidden_layers": 32, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "rope_scaling": {
                   "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    c = config_from_hf(llama31)
    assert (c.rope_type, c.rope_theta, c.rope_factor, c.rope_original_max_position_embeddings) == (
        "llama3", 500000.0, 8.0, 8192)
    mistral = {"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 32,
               "num_key_value_heads": 8, "sliding_window": 4096, "rope_theta": 10000.0}
    c = config_from_hf(mistral)
    assert (c.sliding_window, c.layer_types, c.layer_window(31)) == (4096, None, 4096)
    qwen25 = {"model_type": "qwen2", "hidden_size": 896, "num_attention_heads": 14,
              "num_key_value_heads": 2, "num_hidden_layers": 24, "use_sliding_window": False,
              "sliding_window": 32768, "max_window_layers": 21, "tie_word_embeddings": True,
              "rope_theta": 1000000.0, "bos_token_id": 151643, "eos_token_id": 151643}
    c = config_from_hf(qwen25)
    assert (c.sliding_window, c.attention_bias, c.o_proj_bias, c.head_dim) == (None, True, False, 64)
    with pytest.raises(ValueError, match="rope_type 'llama3' has no 'low_freq_factor'"):
        config_from_hf({**llama31, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="unsupported layer_types \\['chunked_attention'\\]"):
        config_from_hf({**qwen25, "use_sliding_window": True,
                        "layer_types": ["chunked_attention"] * 24})
    with pytest.raises(ValueError, match="layer_types has 3 entries for 24 layers"):
        config_from_hf({**qwen25, "use_sliding_window": True, "layer_types": ["full_attention"] * 3})


@pytest.mark.parametrize("field, value", [("hidden_size", "64"), ("num_hidden_layers", 0), ("rms_norm_eps", "x")])
def test_mistyped_config_fields_are_named(tmp_path, field, value):
    """A hand-edited config.json with a string or non-positive size: an error naming the file and the field,
    never a shape error deep inside jax."""
    hf = {**config_to_hf(ModelConfig(**TINY)), field: value}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from easytune.models.hf_config import read_config
    with pytest.raises(ValueError, match=f"config.json: field '{field}' must be a positive"):
        read_config(tmp_path)
