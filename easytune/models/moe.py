"""Routed mixture-of-experts MLP (Mixtral, Qwen3-MoE) and its load-balancing loss.

Each token's hidden state goes through a router (``mlp.gate``, a ``[X, D]`` weight in HF layout: it is not a
:class:`~easytune.models.layers.Linear`, so LoRA's ``all-linear`` never adapts it and QLoRA never quantizes it),
a float32 softmax over the X experts, the top k of them (renormalised to sum to 1 when ``norm_topk_prob``), and
the weighted sum of those k experts' SwiGLU MLPs. Nothing is dropped: no capacity factor, every routed token is
computed, as transformers does. The experts are stacked ``[X, D, F]`` / ``[X, F, D]`` (logical axis ``expert``
first, sharded over the ``expert`` mesh axis) and run as three grouped matmuls (``jax.lax.ragged_dot``) over
the tokens sorted by expert: the work is k tokens' worth of MLP per token, not X.

Axis letters: the legend in :mod:`easytune.models`, plus ``X`` experts, ``N`` tokens (B * T) and ``k`` experts
per token.

References:
    Jiang et al., "Mixtral of Experts", 2024, section 2.1 (top-2 routing, softmax over the chosen logits).
    Fedus et al., "Switch Transformers", 2021, eq. 4-6 (the auxiliary load-balancing loss).
    transformers v5 ``models/mixtral/modeling_mixtral.py`` (``MixtralTopKRouter``, ``MixtralExperts``,
    ``load_balancing_loss_func``), ``models/qwen3_moe/modeling_qwen3_moe.py`` (``norm_topk_prob``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from easytune import quant, sharding
from easytune.models.layers import activation, param_init
from easytune.models.model_config import ModelConfig

Array = jax.Array
ROUTER_STATS = "router_stats"  # the name sown into the ``intermediates`` collection by every sparse layer


def route(logits: Array, k: int, normalize: bool) -> tuple[Array, Array, Array]:
    """Top-k routing as transformers' ``MixtralTopKRouter`` / ``Qwen3MoeTopKRouter``.

    Args:
        logits: ``[N, X]`` router logits (any float dtype).
        k: experts per token.
        normalize: divide the k chosen probabilities by their sum (``norm_topk_prob``).

    Returns:
        ``(probs fp32 [N, X], weights fp32 [N, k], experts int32 [N, k])``: the softmax over all experts, the
        chosen experts' weights and ids (highest first; ties to the lower id, as ``torch.topk``).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def _expert_weight(w, dtype) -> Array:
    """A stacked expert weight in the compute dtype (an NF4 :class:`~easytune.quant.QTensor` is dequantized)."""
    if quant.is_qtensor(w):
        return quant.dequantize(w, dtype)
    return w.astype(dtype)


def experts_forward(x: Array, weights: Array, experts: Array, gate_w: Array, up_w: Array, down_w: Array,
                    act, dtype, lora: dict | None = None, lora_scale: float = 1.0) -> Array:
    """The weighted sum of each token's k experts' gated MLPs, computed only for the chosen pairs.

    .. math::
        y_n = \\sum_{j<k} w_{nj}\\, W^{down}_{e_{nj}} \\big(\\mathrm{act}(W^{gate}_{e_{nj}} x_n) \\odot
        W^{up}_{e_{nj}} x_n\\big)

    The N*k (token, expert) pairs are sorted by expert (stable, so each expert sees its tokens in order) and
    the three projections are grouped matmuls (``jax.lax.ragged_dot``, float32 accumulation) with one group
    per expert; the results are scattered back with a float32 sum.

    With expert LoRA (``lora``, peft's ``target_parameters`` on ``mlp.experts.gate_up_proj`` / ``down_proj``), each
    projection adds ``lora_scale * (x A_e) B_e`` for the pair's expert e, as two more grouped matmuls (rank r) over
    the same sorted pairs: ``[gate | up] += s (x A^{gu}_e) B^{gu}_e`` (one update of the fused ``[D, 2F]`` matrix,
    its first F columns to gate) and ``down += s (h A^{d}_e) B^{d}_e``; the rank-r product ``x A`` is taken in the
    compute dtype and the second matmul accumulates in float32, as :class:`~easytune.models.layers.Linear`.

    Under a multi-device :func:`easytune.sharding.current_mesh` this runs per device (``jax.shard_map``,
    :func:`_experts_per_shard`): each device sorts only its own rows' pairs, so the work is split over the
    batch axes instead of every device sorting and computing the whole global batch (what XLA's partitioner
    does with a global sort and ``ragged_dot``: measured, the expert work of a ``mesh.data=8`` step was that
    of one device, and ``mesh.expert`` divided it only by its own size).

    Args:
        x: ``[N, D]`` tokens in the compute dtype.
        weights: fp32 ``[N, k]`` routing weights; experts: int32 ``[N, k]`` expert ids.
        gate_w, up_w: ``[X, D, F]``; down_w: ``[X, F, D]`` (compute dtype).
        act: the gate activation.
        dtype: compute dtype of the matmul operands and of the result.
        lora: None, or ``{"gate_up_proj": (A [X, D, r], B [X, r, 2F]), "down_proj": (A [X, F, r], B [X, r, D])}``
            (either key may be absent; compute dtype).
        lora_scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).

    Returns:
        ``[N, D]`` in ``dtype``.

    References:
        peft 0.21 ``tuners/lora/layer.py`` ``ParamWrapper`` (the delta ``scale * B[:, :, e] @ A[e]`` of each expert
        of the fused parameter).
    """
    gu, dn = _lora_parts(lora, gate_w.shape[-1])
    mesh = sharding.current_mesh()
    if mesh is None:
        return _experts_sum(x, weights, experts, gate_w, up_w, down_w, act, dtype, gu, dn,
                            lora_scale).astype(dtype)
    return _experts_per_shard(mesh, x, weights, experts, gate_w, up_w, down_w, act, dtype, gu, dn, lora_scale)


def _lora_parts(lora, f: int):
    """``(gu, dn)``: the gate_up LoRA as ``(A, B_gate, B_up)`` (B split at column ``f``) and the down LoRA as
    ``(A, B)``; each None when absent."""
    lora = lora or {}
    gu = dn = None
    if "gate_up_proj" in lora:
        a, b = lora["gate_up_proj"]
        gu = (a, b[..., :f], b[..., f:])
    if "down_proj" in lora:
        dn = tuple(lora["down_proj"])
    return gu, dn


def _experts_sum(x, weights, experts, gate_w, up_w, down_w, act, dtype, gu=None, dn=None, scale=1.0) -> Array:
    """:func:`experts_forward` on one device as a float32 ``[N, D]`` sum; pairs whose expert id is ``>= X``
    (``gate_w.shape[0]``: experts another device holds) sort last, outside every group, and add nothing. ``gu``
    ``(A [X, D, r], B_gate [X, r, F], B_up [X, r, F])`` and ``dn`` ``(A [X, F, r], B [X, r, D])``: the expert LoRA
    (None: none)."""
    n, k = experts.shape
    num_experts = gate_w.shape[0]
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    token = order // k  # the token of each sorted pair
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [X] pairs per expert (ids >= X dropped)
    xs = jnp.take(x, token, axis=0)  # [N*k, D]
    gate = jax.lax.ragged_dot(xs, gate_w, sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, up_w, sizes, preferred_element_type=jnp.float32)
    if gu is not None:
        low = jax.lax.ragged_dot(xs, gu[0], sizes).astype(dtype)  # [N*k, r]
        gate = gate + scale * jax.lax.ragged_dot(low, gu[1], sizes, preferred_element_type=jnp.float32)
        up = up + scale * jax.lax.ragged_dot(low, gu[2], sizes, preferred_element_type=jnp.float32)
    h = (act(gate.astype(dtype)) * up.astype(dtype)).astype(dtype)  # [N*k, F]
    y = jax.lax.ragged_dot(h, down_w, sizes, preferred_element_type=jnp.float32)  # [N*k, D]
    if dn is not None:
        low = jax.lax.ragged_dot(h, dn[0], sizes).astype(dtype)  # [N*k, r]
        y = y + scale * jax.lax.ragged_dot(low, dn[1], sizes, preferred_element_type=jnp.float32)
    y = y.astype(dtype)
    mine = (jnp.take(flat, order) < num_experts)[:, None]  # rows past sum(sizes) are not this device's
    y = jnp.where(mine, y.astype(jnp.float32) * jnp.take(weights.reshape(-1), order)[:, None], 0.0)
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y)


def _experts_per_shard(mesh, x, weights, experts, gate_w, up_w, down_w, act, dtype, gu=None, dn=None,
                       scale=1.0) -> Array:
    """:func:`experts_forward` under ``jax.shard_map`` on ``mesh``: rows over the batch axes, experts over
    ``expert``, F over ``tensor`` (D whole: the ``fsdp`` shards of the local experts are gathered on entry,
    ZeRO-3, and their gradients reduce-scattered).

    Per device: the rows of its ``expert`` group are all-gathered (E x its own), the pairs routed to its X/E
    experts computed, and the float32 results summed back with a reduce-scatter over ``expert`` (a psum over
    ``tensor`` first): exact, nothing dropped, no capacity. Communication per layer: one all-gather and one
    reduce-scatter of E x local rows x D over ``expert``, instead of the global-batch all-reduces XLA inserts
    for a global sort.

    Expert LoRA (``gu``, ``dn``): the A factors and ``dn``'s B split over ``expert`` like the experts, down's A over
    F like ``down_proj`` (its rank-r products are then partial sums, summed with the rest by the psum over
    ``tensor``); gate/up's B over ``expert`` and F like ``gate_proj`` / ``up_proj``.
    """
    rows, _ = sharding.logical_to_spec(("batch", None), x.shape, mesh)
    up_spec, _ = sharding.logical_to_spec(("expert", None, "mlp"), gate_w.shape, mesh)
    down_spec, _ = sharding.logical_to_spec(("expert", "mlp", None), down_w.shape, mesh)
    row_axes = rows[0] if isinstance(rows[0], tuple) else (() if rows[0] is None else (rows[0],))
    spread = dict(mesh.shape).get("expert", 1) > 1
    gathered = spread and "expert" in row_axes  # the rows are split over expert too: gather the group's
    lora = (() if gu is None else tuple(gu)) + (() if dn is None else tuple(dn))
    whole = P(up_spec[0], None, None)  # [X, *, *]: experts split, the rest whole
    lora_specs = ((() if gu is None else (whole, up_spec, up_spec))
                  + (() if dn is None else (P(up_spec[0], down_spec[1], None), whole)))

    def local(x, weights, experts, gate_w, up_w, down_w, *lora):
        if spread:
            if gathered:
                x, weights, experts = (jax.lax.all_gather(a, "expert", axis=0, tiled=True)
                                       for a in (x, weights, experts))
            held = gate_w.shape[0]  # X / E experts on this device, ids [first, first + held)
            experts = experts - jax.lax.axis_index("expert") * held
            experts = jnp.where((experts >= 0) & (experts < held), experts, held)
        lgu = lora[:3] if gu is not None else None
        ldn = lora[-2:] if dn is not None else None
        y = _experts_sum(x, weights, experts, gate_w, up_w, down_w, act, dtype, lgu, ldn, scale)
        if up_spec[2] is not None:  # F split over tensor: down_proj's products are partial sums
            y = jax.lax.psum(y, up_spec[2])
        if gathered:
            y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        elif spread:
            y = jax.lax.psum(y, "expert")
        return y.astype(dtype)

    return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, up_spec, up_spec, down_spec) + lora_specs,
                         out_specs=rows, check_vma=False)(x, weights, experts, gate_w, up_w, down_w, *lora)


class Router(nn.Module):
    """The router ``mlp.gate``: logits ``x @ weight^T`` with ``weight [X, D]`` in HF layout (no bias).

    Attributes:
        config: model config (``num_experts``, dtypes, init range).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``x [N, D]`` -> logits ``[N, X]`` in the compute dtype (float32 accumulation), as HF's ``F.linear``."""
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        weight = self.param("weight", param_init(c, (None, "embed")), (c.num_experts, x.shape[-1]),
                            jnp.dtype(c.dtype))
        return jnp.einsum("nd,xd->nx", x.astype(dtype), weight.astype(dtype),
                          preferred_element_type=jnp.float32).astype(dtype)


class Experts(nn.Module):
    """The stacked expert MLPs ``mlp.experts``: ``gate_proj``, ``up_proj`` ``[X, D, F]`` and ``down_proj``
    ``[X, F, D]`` (each may be an NF4 :class:`~easytune.quant.QTensor` in a QLoRA run).

    Expert LoRA (``lora.target_parameters``): the ``lora`` collection may hold ``gate_up_proj/{lora_A [X, D, r],
    lora_B [X, r, 2F]}`` and ``down_proj/{lora_A [X, F, r], lora_B [X, r, D]}`` at this module's path, peft's
    ``ParamWrapper`` on transformers v5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` (see
    :func:`experts_forward`); no dropout (peft refuses it there).

    Attributes:
        config: model config.
        lora_scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); used only where expert LoRA exists.
    """

    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array, weights: Array, experts: Array) -> Array:
        """``x [N, D]``, routing ``weights`` fp32 ``[N, k]`` and ``experts`` int32 ``[N, k]`` -> ``[N, D]``."""
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        d, f, n_exp = x.shape[-1], c.moe_intermediate_size, c.num_experts

        def weight(name, shape, axes):
            if self.has_variable("params", name) and quant.is_qtensor(self.get_variable("params", name)):
                return self.get_variable("params", name)  # NF4 (QLoRA): dequantized below
            return self.param(name, param_init(c, axes), shape, jnp.dtype(c.dtype))

        kernels = (weight("gate_proj", (n_exp, d, f), ("expert", "embed", "mlp")),
                   weight("up_proj", (n_exp, d, f), ("expert", "embed", "mlp")),
                   weight("down_proj", (n_exp, f, d), ("expert", "mlp", "embed")))
        lora = {name: (self.get_variable("lora", name)["lora_A"].astype(dtype),
                       self.get_variable("lora", name)["lora_B"].astype(dtype))
                for name in ("gate_up_proj", "down_proj") if self.has_variable("lora", name)}
        act, scale = activation(c.hidden_act), self.lora_scale
        run = lambda inputs, w: experts_forward(*inputs[:3], *(_expert_weight(k, dtype) for k in w), act, dtype,
                                                inputs[3], scale)
        inputs = (x.astype(dtype), weights, experts, lora)
        if any(quant.is_qtensor(k) for k in kernels):
            # dequantized inside a checkpoint and again in the backward pass, so a step holds one layer's float
            # experts at a time (as quant.qmatmul does for a Linear)
            return quant.qapply(run, inputs, kernels, dtype)
        return run(inputs, kernels)


class SparseMoeBlock(nn.Module):
    """The routed-experts MLP of one decoder layer (HF ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``).

    Parameters (HF module names): ``gate/weight`` ``[X, D]`` (router, HF layout), ``experts/gate_proj`` and
    ``experts/up_proj`` ``[X, D, F]``, ``experts/down_proj`` ``[X, F, D]``.

    Sows ``intermediates/router_stats`` (for :func:`load_balancing_loss`): ``counts`` fp32 [X] (routed
    (token, slot) pairs per expert over the valid tokens), ``probs`` fp32 [X] (the summed router softmax over
    the valid tokens) and ``tokens`` fp32 [] (how many valid tokens). Sowing happens only when the caller makes
    ``intermediates`` mutable.

    Attributes:
        config: model config (``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``,
            ``norm_topk_prob``, ``hidden_act``).
        lora_scale: the LoRA scale of the expert LoRA (:class:`Experts`).
    """

    config: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array, valid: Array | None = None) -> Array:
        """Maps ``x [B, T, D]`` to ``[B, T, D]`` (compute dtype); ``valid`` bool ``[B, T]`` marks the tokens that
        count in the router statistics (None: all)."""
        c = self.config
        dtype = jnp.dtype(c.compute_dtype)
        b, t, d = x.shape
        xf = x.reshape(-1, d).astype(dtype)  # [N, D]
        logits = Router(c, name="gate")(xf)  # [N, X]
        probs, weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob)
        mask = jnp.ones((b * t,), jnp.float32) if valid is None else valid.reshape(-1).astype(jnp.float32)
        slots = jnp.sum(jax.nn.one_hot(experts, c.num_experts, dtype=jnp.float32), axis=1)  # [N, X]
        self.sow("intermediates", ROUTER_STATS, {"counts": mask @ slots, "probs": mask @ probs,
                                                 "tokens": jnp.sum(mask)})
        y = Experts(c, self.lora_scale, name="experts")(xf, weights, experts)
        return y.reshape(b, t, d)


def load_balancing_loss(intermediates: Any, num_experts: int) -> Array:
    """Switch Transformer's auxiliary loss over every sparse layer, as transformers'
    ``load_balancing_loss_func`` with the padding mask.

    .. math::
        L_{aux} = X \\sum_e f_e P_e,\\quad f_e = \\frac{\\#\\{(n, j): e_{nj} = e\\}}{L N},\\quad
        P_e = \\frac{1}{L N} \\sum_{l, n} p_{l n e}

    over the L sparse layers and the N valid tokens (transformers concatenates the layers' router logits
    before taking the means, so the layers' statistics are pooled, not their losses averaged).

    Args:
        intermediates: the ``intermediates`` collection returned by ``model.apply(..., mutable=
            ["intermediates"])`` (any nesting; scanned layers stack their statistics).
        num_experts: X.

    Returns:
        fp32 scalar (0 when nothing was sown).
    """
    counts, probs, tokens = [], [], []

    def visit(path, leaf):
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        if ROUTER_STATS in keys:
            name = keys[-1]
            {"counts": counts, "probs": probs, "tokens": tokens}[name].append(leaf)

    jax.tree_util.tree_map_with_path(visit, intermediates)
    if not counts:
        return jnp.zeros((), jnp.float32)
    c = sum(jnp.sum(x.reshape(-1, num_experts), axis=0) for x in counts)  # [X]
    p = sum(jnp.sum(x.reshape(-1, num_experts), axis=0) for x in probs)  # [X]
    n = jnp.maximum(sum(jnp.sum(x) for x in tokens), 1.0)
    return num_experts * jnp.sum((c / n) * (p / n))
