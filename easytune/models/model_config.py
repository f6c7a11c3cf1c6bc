"""The architecture of a Llama-family model (:class:`ModelConfig`): the fields of HF ``LlamaConfig`` that change
the math, validated on construction.

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).

References:
    transformers ``models/llama/configuration_llama.py`` (v5) and ``modeling_rope_utils.py`` (the RoPE
    variants); ``masking_utils.py`` ``sliding_window_overlay`` (the sliding window's meaning).
"""

from __future__ import annotations

import dataclasses

from easytune import config as config_lib

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family model (the fields of HF ``LlamaConfig`` that change the math).

    ``head_dim=None`` resolves to ``hidden_size // num_attention_heads`` in ``__post_init__``, so
    ``config.head_dim`` is always an int after construction (``config.head_dim_`` is the same value).

    Attributes:
        vocab_size: V, number of token ids.
        hidden_size: D, residual stream width.
        intermediate_size: F, SwiGLU hidden width.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: H, query heads.
        num_key_value_heads: K, key/value heads (K divides H; K == H is multi-head attention).
        head_dim: E, per-head width (None: D // H).
        rms_norm_eps: epsilon inside RMSNorm's square root.
        rope_theta: RoPE base frequency.
        max_position_embeddings: longest context the checkpoint was trained for (informational).
        tie_word_embeddings: logits use ``embed_tokens`` transposed; no ``lm_head`` parameter.
        attention_bias: q/k/v/o projections carry a bias (as HF Llama ``attention_bias``).
        mlp_bias: gate/up/down projections carry a bias.
        bos_token_id, eos_token_id, pad_token_id: special token ids (or None).
        model_type: HF model_type the config came from ("llama", "mistral" or "qwen2").
        rope_type: RoPE variant as HF ``rope_parameters["rope_type"]``: "default", "linear" (positions
            divided by ``rope_factor``), "dynamic" (NTK-aware base growth once a call's longest position
            exceeds ``max_position_embeddings``) or "llama3" (Llama 3.1 frequency-band scaling).
        rope_factor: the RoPE scaling ``factor`` (unused by "default").
        rope_low_freq_factor, rope_high_freq_factor: "llama3" band edges (HF ``low_freq_factor``,
            ``high_freq_factor``).
        rope_original_max_position_embeddings: "llama3" pretraining context length in tokens (None:
            ``max_position_embeddings``).
        sliding_window: W in tokens, or None. Layers of type "sliding_attention" let query index t see
            key index s only when ``t - s < W`` (HF ``sliding_window_overlay``: the window holds the
            token itself and the W - 1 before it).
        layer_types: per layer "full_attention" or "sliding_attention" (HF v5 ``layer_types``); None means
            every layer slides when ``sliding_window`` is set (Mistral), else none does.
        o_proj_bias: whether o_proj carries a bias; None follows ``attention_bias`` (Llama). Qwen2 has
            biases on q/k/v only: ``attention_bias=True, o_proj_bias=False``.
        initializer_range: standard deviation of the normal init of kernels and embeddings.
        dtype: parameter storage dtype name ("float32", "bfloat16", "float16").
        compute_dtype: activation dtype name; RMSNorm and softmax run in float32, logits are float32.
        remat: rematerialisation policy of each decoder layer, a name of
            :data:`easytune.models.llama.REMAT_POLICIES`: "none" (keep every activation), "full" (keep only the
            layer input, recompute the layer in the backward pass), "dots_saveable" / "checkpoint_dots" (keep
            matmul outputs), "dots_with_no_batch_dims_saveable" (keep the projections' outputs).
            Booleans are accepted (True = "full", False = "none").
        scan_layers: run the decoder stack as one ``nn.scan`` over a single stacked layer (compiles one
            layer instead of L). Parameters are then stacked: ``model/layers/...`` with a leading [L] axis
            (logical axis "layers"); ``easytune.models.scan.stack_layers`` converts the per-layer layout.
            Decoding with a KV cache needs the per-layer layout.
        attention: the attention implementation (``config.ATTENTION_NAMES``, dispatched by
            :func:`easytune.models.attention.attend`): "auto", "blockwise", "xla", "cudnn" or "splash".
        attention_block: blockwise attention's query and key block length in tokens.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    initializer_range: float = 0.02
    dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention: str = "auto"
    attention_block: int = 512
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    o_proj_bias: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "remat", config_lib.remat_policy_name(self.remat))
        object.__setattr__(self, "scan_layers", bool(self.scan_layers))
        if self.attention not in config_lib.ATTENTION_NAMES:
            raise ValueError(f"unknown attention {self.attention!r}; one of {', '.join(config_lib.ATTENTION_NAMES)}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be > 0 for rope_type {self.rope_type!r}, "
                             f"got {self.rope_factor}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError(f"llama3 RoPE needs high_freq_factor > low_freq_factor, got "
                             f"{self.rope_high_freq_factor} <= {self.rope_low_freq_factor}")
        if self.sliding_window is not None and (int(self.sliding_window) != self.sliding_window
                                                or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got "
                             f"{self.sliding_window!r}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_hidden_layers} layers (num_hidden_layers)")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"unsupported layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def head_dim_(self) -> int:
        """E, the resolved per-head width (same as ``head_dim`` after ``__post_init__``)."""
        return self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window (tokens) of decoder layer ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None
