"""Model sizes for training from scratch (``model.preset``) and the dimension names ``model.config_overrides`` may set.

A preset gives a :class:`easytune.models.model_config.ModelConfig`'s dimensions (Hugging Face config names);
``vocab_size`` and the special token ids come from the tokenizer.
"""

from __future__ import annotations

# Model sizes for training from scratch (``model.preset``); vocab_size comes from the tokenizer.
PRESETS = {
        "quickstart": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=True),
        "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                     rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def _ladder(hidden, inter, layers, heads, kv_heads, tied, max_pos=2048, theta=10000.0):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, max_position_embeddings=max_pos, rope_theta=theta,
                rms_norm_eps=1e-5, tie_word_embeddings=tied)


# The pretraining ladder: a name is the total parameter count (embeddings included) with Llama 2's 32000-token
# vocab, within 6%; a smaller vocab gives a smaller model (tests/test_tokenizer.py prints both). Llama shapes:
# SwiGLU width ~8/3 D (multiple of 8 or 256), head_dim 64 from 25m up (8/32 below), tied embeddings up to 3b
# as Llama 3.2 1B/3B. "1b" and "3b" are Llama-3.2-1B/3B's dims (GQA 8 kv heads, rope_theta 500000, without the
# 128k rope scaling); "7b" is Llama-2-7B's config.json exactly: 6,738,415,616 parameters.
PRESETS.update({
        "1m": _ladder(32, 88, 2, 4, 4, True),                 # 1.05M (97% embedding at 32000 vocab)
        "10m": _ladder(192, 512, 8, 6, 6, True),              # 9.7M
        "25m": _ladder(384, 1024, 8, 6, 6, True),             # 26.5M
        "50m": _ladder(512, 1408, 10, 8, 8, True),            # 48.5M
        "125m": _ladder(768, 2048, 14, 12, 12, True),         # 123.7M
        "350m": _ladder(1024, 2816, 24, 16, 16, True),        # 341.1M
        "1b": _ladder(2048, 8192, 16, 32, 8, True, 8192, 500000.0),   # 1.04B
        "3b": _ladder(3072, 8192, 28, 24, 8, True, 8192, 500000.0),   # 2.92B
        "7b": _ladder(4096, 11008, 32, 32, 32, False, 4096),  # 6.74B
})


# ``model.config_overrides`` may set these (HF config.json names).
MODEL_DIMS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
              "initializer_range", "attention_bias", "mlp_bias")
