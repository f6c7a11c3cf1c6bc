"""Llama-family decoder (Llama 2 / 3 / 3.1, Mistral, Qwen2 / 2.5) in Flax linen.

The module tree and parameter names mirror Hugging Face ``LlamaForCausalLM`` one-to-one, so loading a
checkpoint is a rename and a transpose (see ``easytune/models/hf_weights.py``). Kernels are stored
``[in, out]`` (HF ``weight.T``). The architecture is a :class:`~easytune.models.model_config.ModelConfig`; the
building blocks live in ``layers.py`` (``Linear``, ``RMSNorm``), ``rope.py`` and ``attention.py``.

Axis letters: the legend in :mod:`easytune.models` (``B T S D H K G E F V``).

Logical axis names on parameters (for ``easytune/sharding.py``): ``vocab``, ``embed``, ``heads``,
``kv_heads``, ``mlp``, ``norm``; with ``ModelConfig.scan_layers`` the stacked decoder layers add a leading
``layers`` axis (see ``easytune/models/scan.py``).

References:
    Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models", 2023.
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models", 2023.
    Shazeer, "GLU Variants Improve Transformer", 2020 (SwiGLU).
    transformers ``models/llama/modeling_llama.py`` (v5): the numerics matched here; ``models/qwen2`` (q/k/v
    bias, no o_proj bias).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from easytune import sharding
from easytune.models.attend import attend
from easytune.models.attention import NO_WINDOW, MaskSpec, mask_spec
from easytune.models.layers import Linear, RMSNorm, activation, param_init
from easytune.models.model_config import ModelConfig
from easytune.models.moe import SparseMoeBlock
from easytune.models.rope import apply_rope, rope_cos_sin

Array = jax.Array
PyTree = Any

# ``model.remat`` name (``config.REMAT_POLICY_NAMES``) -> what ``jax.checkpoint`` may keep from a decoder layer's
# forward pass for the backward pass (everything else is recomputed). None: no rematerialisation (every
# intermediate is kept).
REMAT_POLICIES = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,       # keep only the layer's input
        "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep every matmul output, recompute the rest
        "checkpoint_dots": jax.checkpoint_policies.checkpoint_dots,  # jax's alias of dots_saveable
        # keep the projections' outputs, recompute the attention score matmuls (they have a batch dim)
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE.

    .. math::
        \\mathrm{softmax}_{fp32}\\big(q k^T / \\sqrt{E} + \\mathrm{mask}\\big) v

    Query head ``h`` reads kv head ``h // G`` (HF ``repeat_kv``).

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, spec: MaskSpec, deterministic: bool,
                 cache: dict | None = None, cache_index: Array | None = None):
        """Attends ``x [B, T, D]`` to the keys ``spec`` lets each query see; returns [B, T, D].

        The implementation is ``config.attention`` (:func:`easytune.models.attend.attend`). With ``cache``
        (``{'k', 'v'}``, each [B, S, K, E] in the compute dtype, keys after RoPE) the new
        keys and values are written at slots ``[cache_index, cache_index + T)``, the queries attend to
        all S slots (``spec`` decides which count), and ``(out, new_cache)`` is returned.
        """
        c = self.config
        h, k, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        g = h // k
        dtype = jnp.dtype(c.compute_dtype)
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  use_bias=c.attention_bias)
        b, t, _ = x.shape
        if c.fused_qkv:  # Phi-3: one projection, rows [q | k | v] (HF Phi3Attention)
            qkv = Linear((h + 2 * k) * e, ("embed", "heads"), name="qkv_proj", **kw)(x, deterministic)
            q, key, val = jnp.split(qkv, [h * e, (h + k) * e], axis=-1)
        else:
            q = Linear(h * e, ("embed", "heads"), name="q_proj", **kw)(x, deterministic)
            key = Linear(k * e, ("embed", "kv_heads"), name="k_proj", **kw)(x, deterministic)
            val = Linear(k * e, ("embed", "kv_heads"), name="v_proj", **kw)(x, deterministic)
        q, key = q.reshape(b, t, h, e), key.reshape(b, t, k, e)
        if c.qk_norm:  # Qwen3 / Gemma 3: RMSNorm over each head's E dims, before RoPE
            q = RMSNorm(c, name="q_norm")(q)
            key = RMSNorm(c, name="k_norm")(key)
        q = apply_rope(q, cos, sin)  # [B, T, H, E]
        key = apply_rope(key, cos, sin)  # [B, S, K, E]
        val = val.reshape(b, t, k, e)  # [B, S, K, E]
        if cache is not None:  # decode: the keys/values are the whole cache, this chunk written in
            key = jax.lax.dynamic_update_slice(
                cache["k"], key.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            val = jax.lax.dynamic_update_slice(
                cache["v"], val.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            cache = {"k": key, "v": val}
        # the 1/sqrt(E) scale (Gemma: query_pre_attn_scalar ** -0.5) goes on q ([B,T,H,E], S/E times fewer
        # elements than the scores; exact when E is a power of 4), as transformers' sdpa path folds it in
        scale = (e if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar) ** -0.5
        q = q.reshape(b, t, k, g, e) * jnp.asarray(scale, dtype)  # [B, T, K, G, E]
        out = attend(q, key, val, spec, dtype, c, decode=cache is not None).reshape(b, t, h * e)
        o_bias = c.attention_bias if c.o_proj_bias is None else c.o_proj_bias
        out = Linear(c.hidden_size, ("heads", "embed"), name="o_proj",
                     **{**kw, "use_bias": o_bias})(out, deterministic)
        return out if cache is None else (out, cache)


class LlamaMLP(nn.Module):
    """Gated feed-forward: ``down(act(gate(x)) * up(x))`` (SwiGLU; GeGLU with Gemma's gelu_pytorch_tanh).

    With ``config.fused_gate_up`` (Phi-3) gate and up are one ``gate_up_proj`` [D, 2F], gate columns first.

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        """Maps ``x [B, T, D]`` through ``[B, T, F]`` back to [B, T, D]."""
        c = self.config
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                  use_bias=c.mlp_bias)
        f = c.intermediate_size
        if c.fused_gate_up:
            gate, up = jnp.split(Linear(2 * f, ("embed", "mlp"), name="gate_up_proj", **kw)(x, deterministic), 2,
                                 axis=-1)
        else:
            gate = Linear(f, ("embed", "mlp"), name="gate_proj", **kw)(x, deterministic)
            up = Linear(f, ("embed", "mlp"), name="up_proj", **kw)(x, deterministic)
        return Linear(c.hidden_size, ("mlp", "embed"), name="down_proj", **kw)(
            activation(c.hidden_act)(gate) * up, deterministic)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder block: ``x += attn(norm(x)); x += mlp(norm(x))``.

    Gemma 2/3 (``config.sandwich_norm``) also norm each branch's output: ``x += post_attention_layernorm(attn(
    input_layernorm(x))); x += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``. The MLP is a
    :class:`~easytune.models.moe.SparseMoeBlock` in the layers ``config.layer_is_moe`` marks.

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
        moe: this layer's MLP is routed experts (static; ``config.layer_is_moe(i)``).
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    moe: bool = False

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, spec: MaskSpec, deterministic: bool,
                 cache: dict | None = None, cache_index: Array | None = None):
        """Applies one block to ``x [B, T, D]``; returns [B, T, D] in the compute dtype.

        ``cos``/``sin`` are this layer's RoPE tables. With ``cache`` (this layer's ``{'k', 'v'}``, see
        ``LlamaAttention``) returns ``(x, new_cache)``.
        """
        c = self.config
        kw = dict(config=c, lora_scale=self.lora_scale, lora_dropout=self.lora_dropout)
        h = RMSNorm(c, name="input_layernorm")(x)
        attn = LlamaAttention(name="self_attn", **kw)(h, cos, sin, spec, deterministic, cache,
                                                      cache_index)
        if cache is not None:
            attn, cache = attn
        if c.sandwich_norm:
            x = x + RMSNorm(c, name="post_attention_layernorm")(attn)
            h = RMSNorm(c, name="pre_feedforward_layernorm")(x)
        else:
            x = x + attn
            h = RMSNorm(c, name="post_attention_layernorm")(x)
        if self.moe:
            mlp = SparseMoeBlock(c, self.lora_scale, name="mlp")(h, spec.q_segments > 0)
        else:
            mlp = LlamaMLP(name="mlp", **kw)(h, deterministic)
        if c.sandwich_norm:
            mlp = RMSNorm(c, name="post_feedforward_layernorm")(mlp)
        x = x + mlp
        return x if cache is None else (x, cache)


def _with_window(spec: MaskSpec, window: int | None) -> MaskSpec:
    """``spec`` for a layer with sliding window ``window`` (tokens; None = full causal)."""
    return spec._replace(window=jnp.asarray(NO_WINDOW if window is None else window, jnp.int32))


def _is_local(config: ModelConfig, layer: int) -> bool:
    """Whether ``layer`` uses the local RoPE table (Gemma 3: the sliding-window layers when
    ``rope_local_theta`` is set)."""
    return config.rope_local_theta is not None and config.layer_window(layer) is not None


def rope_tables(positions: Array, dtype, config: ModelConfig):
    """``((cos, sin), local)``: the RoPE tables ``[B, T, R]`` (R = ``config.rotary_dim``) of the full-attention
    layers, and ``local`` the sliding layers' own ``(cos, sin)`` when ``config.rope_local_theta`` is set (Gemma 3),
    else None."""
    tables = rope_cos_sin(positions, config.head_dim, config.rope_theta, dtype, config=config)
    local = None
    if config.rope_local_theta is not None:
        local = rope_cos_sin(positions, config.head_dim, config.rope_local_theta, dtype, config=config, local=True)
    return tables, local


def layer_rope(tables, config: ModelConfig, layer: int) -> tuple[Array, Array]:
    """The ``(cos, sin)`` of decoder layer ``layer`` from :func:`rope_tables`."""
    main, local = tables
    return local if _is_local(config, layer) else main


def _constrain(x: Array) -> Array:
    """Hidden states [B, T, D] kept sharded over the batch (see ``easytune.sharding.activation_mesh``)."""
    return sharding.constrain(x, ("batch", "length", "act_embed"))


class LlamaModel(nn.Module):
    """Embedding, decoder stack and final norm (HF ``LlamaModel``).

    Attributes:
        config: model config.
        lora_scale, lora_dropout: forwarded to each ``Linear``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.compute_dtype),
            param_dtype=jnp.dtype(c.dtype), embedding_init=param_init(c, ("vocab", "embed")))
        layer_cls = LlamaDecoderLayer
        policy = REMAT_POLICIES[c.remat]
        if policy is not None:  # argnum 5 = deterministic (argnum 0 is the module); inside a scan the
            # loop boundary already keeps XLA from merging the recomputation into the forward pass
            layer_cls = nn.remat(LlamaDecoderLayer, static_argnums=(5,), policy=policy,
                                 prevent_cse=not c.scan_layers)
        if c.scan_layers:  # one module; nn.scan in __call__ gives its variables a leading [L] axis
            self.layers = layer_cls(c, self.lora_scale, self.lora_dropout, c.is_moe)
        else:
            self.layers = [layer_cls(c, self.lora_scale, self.lora_dropout, c.layer_is_moe(i), name=f"layers_{i}")
                           for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c)

    def __call__(self, input_ids: Array, positions: Array, segment_ids: Array,
                 deterministic: bool, cache: dict | None = None, cache_index: Array | None = None):
        """Returns final hidden states [B, T, D] (compute dtype) for ``input_ids`` int [B, T].

        With ``cache`` (see ``init_cache``) returns ``(hidden, new_cache)``; see ``LlamaForCausalLM``.
        """
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        x = self.embed_tokens(input_ids)  # [B, T, D]
        if c.embed_scale:  # Gemma: sqrt(D), cast to the parameter dtype first (HF Gemma2ScaledWordEmbedding)
            x = x * jnp.asarray(c.hidden_size**0.5, jnp.dtype(c.dtype)).astype(x.dtype)
        x = x.astype(dtype)
        tables = rope_tables(positions, dtype, c)
        if cache is not None:
            return self._decode(x, tables, segment_ids, deterministic, cache, cache_index)
        idx = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        spec = mask_spec(idx, idx, segment_ids, segment_ids, None)  # causal and same-segment, no window
        x = _constrain(x)
        if c.scan_layers:
            return self.norm(self._scan(x, tables, spec, deterministic))
        for i, layer in enumerate(self.layers):
            cos, sin = layer_rope(tables, c, i)
            x = _constrain(layer(x, cos, sin, _with_window(spec, c.layer_window(i)), deterministic))
        return self.norm(x)

    def _scan(self, x, tables, spec, deterministic):
        """The decoder stack as ``nn.scan`` over the stacked layer ``self.layers``.

        Every variable collection (``params``, ``lora``, sown ``intermediates``) is scanned over its leading [L]
        axis (logical axis "layers"); ``params`` and ``dropout`` rngs are split per layer. Layers with different
        windows (Qwen2 ``layer_types``, Gemma's alternating layers) share the loop: each layer's window is a
        scanned int32 (``MaskSpec.window``), and with Gemma 3's local RoPE base a scanned flag picks the table.
        """
        c = self.config
        windows = jnp.asarray([NO_WINDOW if c.layer_window(i) is None else c.layer_window(i)
                               for i in range(c.num_hidden_layers)], jnp.int32)  # [L] tokens
        local = jnp.asarray([_is_local(c, i) for i in range(c.num_hidden_layers)])  # [L] bool

        def body(layer, x, window, is_local, tables, spec):
            (cos, sin), local_tables = tables
            if local_tables is not None:
                cos = jnp.where(is_local, local_tables[0], cos)
                sin = jnp.where(is_local, local_tables[1], sin)
            return _constrain(layer(x, cos, sin, spec._replace(window=window), deterministic)), None

        scan = nn.scan(body, variable_axes={True: 0}, split_rngs={True: True},
                       in_axes=(0, 0, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = scan(self.layers, x, windows, local, tables, spec)
        return x

    def _decode(self, x, tables, segment_ids, deterministic, cache, cache_index):
        """The decoder stack over a KV cache: query slot ``cache_index + t`` sees slots ``s`` with
        ``s <= cache_index + t`` and the same segment id (the training mask, in cache-slot order), and in
        sliding-window layers only ``cache_index + t - s < W``. A row's tokens fill consecutive slots
        (left padding first), so slot distance is token distance, as HF's cache positions."""
        if self.config.scan_layers:
            raise ValueError("a scan_layers model does not decode with a KV cache: convert the params with "
                             "easytune.models.scan.unstack_layers and use scan_layers=False")
        t, s = x.shape[1], cache["segment_ids"].shape[1]
        key_segments = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))  # [B, S]
        slots = cache_index + jnp.arange(t, dtype=jnp.int32)  # [T]
        spec = mask_spec(slots, jnp.arange(s, dtype=jnp.int32), segment_ids, key_segments, None)
        new_layers = []
        for i, (layer, layer_cache) in enumerate(zip(self.layers, cache["layers"])):
            cos, sin = layer_rope(tables, self.config, i)
            x, layer_cache = layer(x, cos, sin, _with_window(spec, self.config.layer_window(i)), deterministic,
                                   layer_cache, cache_index)
            new_layers.append(layer_cache)
        return self.norm(x), {"segment_ids": key_segments, "layers": new_layers}

    def attend(self, x: Array) -> Array:
        """Tied-embedding logits ``x [B, T, D] @ embedding.T`` -> float32 [B, T, V]."""
        emb = self.embed_tokens.embedding.astype(x.dtype)  # [V, D]
        return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)


class LlamaForCausalLM(nn.Module):
    """Llama causal language model returning float32 next-token logits.

    The attention mask is causal AND same-segment: token t attends to s <= t only when
    ``segment_ids[b, t] == segment_ids[b, s]``. Padding (segment 0) attends causally among padding, so
    its rows are finite (and meaningless).

    Attributes:
        config: model config.
        lora_scale: LoRA scale (alpha / r, or alpha / sqrt(r)); used only where a ``lora`` variable exists.
        lora_dropout: dropout rate on LoRA inputs (rng ``'dropout'``, only when not deterministic).

    Example:
        ``model.apply({'params': params}, ids)`` or
        ``model.apply({'params': params, 'lora': lora}, ids, deterministic=False, rngs={'dropout': key})``.
    """

    config: ModelConfig
    lora_scale: float = 1.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, input_ids: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, deterministic: bool = True,
                 cache: dict | None = None, cache_index: Array | None = None, return_hidden: bool = False):
        """Computes logits (or, with ``return_hidden``, the final hidden states the logits are made of).

        Args:
            input_ids: int32 [B, T] token ids.
            positions: int32 [B, T] RoPE positions (default ``arange(T)`` per row; restart per packed doc).
            segment_ids: int32 [B, T] document ids (default all ones; 0 marks padding).
            deterministic: disable LoRA dropout.
            cache: optional KV cache from ``init_cache`` (decoding). The T tokens occupy cache slots
                ``[cache_index, cache_index + T)``; each attends to earlier-or-equal slots holding the
                same segment id (so left padding with segment 0 is invisible to the prompt). Give
                ``positions`` explicitly: the default ``arange(T)`` is only right for the first chunk.
            cache_index: int32 scalar, first cache slot of this chunk (with ``cache`` only).
            return_hidden: return the final (normed) hidden states [B, T, D] in the compute dtype instead of
                the logits; ``lm_head`` (or the tied embedding) is not applied. Used by the chunked loss
                (``easytune.train.step.chunked_token_loss_sum``).

        Returns:
            float32 [B, T, V] logits (or [B, T, D] hidden states); with ``cache``, ``(logits, new_cache)``.
        """
        c = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        model = LlamaModel(c, self.lora_scale, self.lora_dropout, name="model")
        if cache is not None:
            if cache_index is None:
                raise ValueError("cache_index is required with cache")
            x, cache = model(input_ids, positions, segment_ids, deterministic, cache,
                             jnp.asarray(cache_index, jnp.int32))
        else:
            x = model(input_ids, positions, segment_ids, deterministic)
        if return_hidden:
            return x if cache is None else (x, cache)
        if c.tie_word_embeddings:
            logits = model.attend(x)
        else:
            logits = Linear(c.vocab_size, ("embed", "vocab"), use_bias=False, config=c,
                            lora_scale=self.lora_scale, lora_dropout=self.lora_dropout,
                            float32_out=True, name="lm_head")(x, deterministic)
        logits = softcap_logits(logits, c.final_logit_softcapping)
        return logits if cache is None else (logits, cache)


def softcap_logits(logits: Array, cap: float | None) -> Array:
    """Gemma 2's final logit soft-capping ``cap * tanh(logits / cap)`` in float32 (identity when ``cap`` is None).

    Reference: transformers ``Gemma2ForCausalLM.forward`` (``final_logit_softcapping``).
    """
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def init_cache(config: ModelConfig, batch: int, length: int) -> PyTree:
    """An empty KV cache for ``LlamaForCausalLM(..., cache=..., cache_index=...)``.

    Args:
        config: model config (layers, kv heads, head dim, compute dtype).
        batch: B.
        length: S, number of cache slots (prompt + generated tokens).

    Returns:
        ``{'segment_ids': int32 [B, S] zeros, 'layers': [{'k', 'v'}: [B, S, K, E] zeros] * layers}``;
        keys are stored after RoPE, K kv heads only (GQA).
    """
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    dtype = jnp.dtype(config.compute_dtype)
    return {"segment_ids": jnp.zeros((batch, length), jnp.int32),
            "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                       for _ in range(config.num_hidden_layers)]}


def _boxed_init(config: ModelConfig, rng: Array) -> PyTree:
    """``model.init`` on a [1, 1] dummy batch; returns the boxed ``params`` collection."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return LlamaForCausalLM(config).init(rng, ids)["params"]


def init_params(config: ModelConfig, rng: Array) -> PyTree:
    """Randomly initialized parameters as HF ``LlamaPreTrainedModel._init_weights``.

    Kernels and embeddings ~ Normal(0, initializer_range), biases 0, norm weights 1.

    Args:
        config: model config.
        rng: PRNG key.

    Returns:
        Plain nested dict (unboxed) mirroring HF names, arrays in ``config.dtype``.
    """
    return jax.jit(lambda r: nn.meta.unbox(_boxed_init(config, r)))(rng)


def param_logical_axes(config: ModelConfig) -> PyTree:
    """Logical axis names of every parameter, without allocating any.

    Args:
        config: model config.

    Returns:
        Nested dict with the structure of ``init_params(config, rng)`` whose leaves are tuples of logical
        axis names, e.g. ``('embed', 'heads')``. Tuples are pytree nodes in JAX: map over it with
        ``is_leaf=lambda x: isinstance(x, tuple)``.
    """
    boxed = jax.eval_shape(lambda r: _boxed_init(config, r), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: tuple(x.names) if is_box(x) else (None,) * len(x.shape),
                        boxed, is_leaf=is_box)
