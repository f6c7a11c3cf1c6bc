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

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
# HF model_type of every family the decoder implements (the config side is ``hf_config``)
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe")
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
        model_type: HF model_type the config came from (one of ``MODEL_TYPES``).
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

        The fields below switch on what the other families do differently; their defaults are Llama's.

        hidden_act: the MLP's gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU, Gemma; HF
            ``hidden_activation``), the tanh approximation of GELU.
        qk_norm: RMSNorm over E on every query and key head before RoPE (Qwen3, Gemma 3: ``self_attn.q_norm``,
            ``self_attn.k_norm``, weight [E]).
        norm_unit_offset: Gemma's RMSNorm: ``cast(norm(x) * (1 + w))`` computed in float32, weights stored as
            offsets from one (initialised to zeros), instead of Llama's ``w * cast(norm(x))``.
        embed_scale: multiply the token embeddings by ``sqrt(hidden_size)`` (Gemma; the scale is cast to the
            parameter dtype first, as HF ``Gemma2ScaledWordEmbedding``).
        sandwich_norm: Gemma 2/3 block: ``x += post_attention_layernorm(attn(input_layernorm(x)))``;
            ``x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``.
        attn_logit_softcapping: c, attention scores become ``c * tanh(s / c)`` before the mask (Gemma 2), or None.
        final_logit_softcapping: c, logits become ``c * tanh(z / c)`` (Gemma 2), or None.
        query_pre_attn_scalar: attention scale ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``
            (Gemma 2/3), or None.
        rope_local_theta: RoPE base of the sliding-window layers, which then use default (unscaled) RoPE while
            full-attention layers use ``rope_theta`` and ``rope_type`` (Gemma 3 ``rope_parameters
            ["sliding_attention"]``), or None (every layer alike).
        partial_rotary_factor: the fraction of each head's E dims that RoPE rotates (the first ones; Phi-4-mini
            0.75).
        rope_short_factor, rope_long_factor: "longrope" (Phi-3) per-frequency divisors, E * partial / 2 each;
            the long ones apply once a call's longest position exceeds ``rope_original_max_position_embeddings``.
        rope_attention_factor: "longrope" cos/sin multiplier (None: ``sqrt(1 + ln(s) / ln(L0))`` with
            ``s = max_position_embeddings / L0``, 1 when ``s <= 1``; HF ``_compute_longrope_parameters``).
        fused_qkv: one ``self_attn.qkv_proj`` [D, (H + 2K) E] instead of q/k/v_proj (Phi-3; rows q, k, v).
        fused_gate_up: one ``mlp.gate_up_proj`` [D, 2F] instead of gate/up_proj (Phi-3; gate first).
        num_experts: X routed experts per sparse MLP (Mixtral ``num_local_experts``, Qwen3-MoE
            ``num_experts``); 0 is a dense model.
        num_experts_per_tok: k experts each token is routed to.
        moe_intermediate_size: F of each expert (None: ``intermediate_size``, Mixtral).
        norm_topk_prob: renormalise the k routing weights to sum to 1 (Mixtral always; Qwen3-MoE
            ``norm_topk_prob``).
        router_aux_loss_coef: coefficient of the load-balancing loss added to the training loss (Switch
            Transformer eq. 4, HF ``load_balancing_loss_func``); 0 adds none.
        moe_layers: per layer True where the MLP is sparse (Qwen3-MoE ``mlp_only_layers`` /
            ``decoder_sparse_step``); None: every layer when ``num_experts > 0``.
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
    hidden_act: str = "silu"
    qk_norm: bool = False
    norm_unit_offset: bool = False
    embed_scale: bool = False
    sandwich_norm: bool = False
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor: float | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_layers: tuple[bool, ...] | None = None

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
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(HIDDEN_ACTS)}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                     "rope_local_theta", "rope_attention_factor"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v!r}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor must be in (0, 1] and rotate an even number of dims, got "
                             f"{self.partial_rotary_factor} (head_dim {self.head_dim})")
        for name in ("rope_short_factor", "rope_long_factor"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(float(f) for f in v))
                if len(getattr(self, name)) != self.rotary_dim // 2:
                    raise ValueError(f"{name} has {len(v)} entries; longrope needs rotary_dim / 2 = "
                                     f"{self.rotary_dim // 2}")
        if self.rope_type == "longrope" and (self.rope_short_factor is None or self.rope_long_factor is None):
            raise ValueError("rope_type 'longrope' needs rope_short_factor and rope_long_factor")
        if self.num_experts < 0 or (self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts], got {self.num_experts_per_tok} "
                             f"of {self.num_experts} experts")
        if self.moe_intermediate_size is None:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.moe_layers is not None:
            object.__setattr__(self, "moe_layers", tuple(bool(b) for b in self.moe_layers))
            if len(self.moe_layers) != self.num_hidden_layers:
                raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_hidden_layers} "
                                 f"layers (num_hidden_layers)")
            if any(self.moe_layers) and not self.num_experts:
                raise ValueError("moe_layers marks sparse layers but num_experts is 0")
        if self.scan_layers and self.num_experts and len(set(self.layer_is_moe(i)
                                                            for i in range(self.num_hidden_layers))) > 1:
            raise ValueError("scan_layers needs every layer alike: this config mixes dense and sparse MLP layers "
                             "(moe_layers); set model.scan_layers=False")

    @property
    def head_dim_(self) -> int:
        """E, the resolved per-head width (same as ``head_dim`` after ``__post_init__``)."""
        return self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The number of leading dims of each head that RoPE rotates (``head_dim * partial_rotary_factor``)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        """Whether any layer has a routed-experts MLP."""
        return self.num_experts > 0 and any(self.layer_is_moe(i) for i in range(self.num_hidden_layers))

    def layer_is_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has a sparse (routed experts) MLP."""
        if not self.num_experts:
            return False
        return True if self.moe_layers is None else self.moe_layers[layer]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window (tokens) of decoder layer ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None
