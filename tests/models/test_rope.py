"""easytune.models.rope against transformers' ``modeling_rope_utils`` (the llama3 frequency bands).

The llama3 ``original_max_position_embeddings`` puts RoPE frequencies in all three of its bands.
"""

import dataclasses

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from easytune.models.hf_config import config_from_hf  # noqa: E402
from easytune.models.rope import rope_inv_freq  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=None, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_frequencies_match_transformers():
    """rope_inv_freq in all three llama3 bands vs transformers' ``_compute_llama3_parameters``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = transformers.LlamaConfig(**{**BASE, "hidden_size": 256, "num_attention_heads": 2,
                                     "rope_parameters": LLAMA3_ROPE})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    config = config_from_hf(hf.to_dict())
    got = rope_inv_freq(config)
    wavelen = 2 * np.pi / rope_inv_freq(dataclasses.replace(config, rope_type="default"))
    assert (wavelen < 16).any() and (wavelen > 64).any() and ((wavelen > 16) & (wavelen < 64)).any()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
