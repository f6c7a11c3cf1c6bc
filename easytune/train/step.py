"""The pure train and eval steps (:func:`train_step`, :func:`eval_step`) and the token loss they compute.

A batch is ``dict(input_ids, target_ids, loss_mask, segment_ids, positions)``, each ``[B, T]`` (B sequences
of T tokens; ``loss_mask`` float32, the rest int32). ``target_ids[b, t]`` is the token after
``input_ids[b, t]``; ``loss_mask`` is 1 where that target is supervised.

The loss of one micro-step is ``sum(masked token cross-entropy) / window_tokens``, where ``window_tokens`` is
the number of supervised tokens in the *whole* accumulation window (all micro-batches of one optimizer step).
With ``optax.MultiSteps(use_grad_mean=False)`` summing micro-step gradients, one optimizer step then equals
one step on the window as a single batch, also when micro-batches hold very different numbers of supervised
tokens (DESIGN.md; the bug of transformers #34191). The logged loss of a step is the sum of its micro-step
losses: the token-weighted mean over the window.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from easytune import lora as lora_lib
from easytune import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed); the frozen base is passed apart.

    Attributes:
        trainable: variables dict of what is trained (``{'lora': ...}`` and/or ``{'params': ...}``).
        opt_state: ``optax.MultiStepsState`` for ``trainable``; ``opt_state.gradient_step`` = optimizer updates.
        rng: PRNG key for dropout; folded with ``micro_step``.
        micro_step: int32 scalar, micro-steps taken.
    """
    trainable: Any
    opt_state: Any
    rng: jax.Array
    micro_step: jax.Array

    @property
    def step(self) -> jax.Array:
        """Optimizer updates done (what schedules, logs and checkpoints count)."""
        return self.opt_state.gradient_step


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the train and eval steps compute with, besides their array arguments: bound before jit
    (``jax.jit(functools.partial(train_step, spec=spec), ...)``, :func:`easytune.train.setup.jit_steps`), or
    a static argument (frozen and hashable: ``jax.jit(train_step, static_argnames="spec")``, only without
    ``in_shardings``, which ``jax.jit`` does not combine with keyword arguments).

    Attributes:
        model: the ``LlamaForCausalLM`` module (its config, ``lora_scale`` and ``lora_dropout``).
        tx: the optax optimizer, an ``optax.MultiSteps`` (:func:`easytune.train.optim.make_optimizer`).
        use_dropout: apply LoRA dropout (``lora.lora_dropout > 0`` with LoRA/QLoRA); the train step only.
        loss_chunk_tokens: ``train.loss_chunk_tokens``; > 0 computes the loss that many tokens at a time
            (:func:`token_loss_sum`), 0 materializes the full ``[B, T, V]`` logits.
        mesh: the device mesh activations are pinned to while tracing (:class:`easytune.sharding.activation_mesh`);
            None: no activation constraints.
    """
    model: Any
    tx: Any = None
    use_dropout: bool = False
    loss_chunk_tokens: int = 0
    mesh: Any = None


def router_aux_coef(model) -> float:
    """The load-balancing loss coefficient of a mixture-of-experts model (``router_aux_loss_coef``), else 0."""
    config = getattr(model, "config", None)
    return float(config.router_aux_loss_coef) if config is not None and config.is_moe else 0.0


def _window_loss(trainable, frozen, batch, window_tokens, rng, spec: StepSpec):
    """``(objective, (loss_sum, tokens, aux_share))``: the function differentiated w.r.t. ``trainable``.

    ``objective = (loss_sum + coef * aux * tokens) / window_tokens``: the cross-entropy share of the window
    mean, plus for a mixture of experts the micro-batch's load-balancing loss
    (:func:`easytune.models.moe.load_balancing_loss`, ``coef = router_aux_loss_coef``) weighted by its share of
    the window's supervised tokens (so the window's aux term is the token-weighted mean of its micro-batches';
    transformers adds ``coef * aux`` to each forward's mean loss)."""
    variables = lora_lib.combine(trainable, frozen)
    coef = router_aux_coef(spec.model)
    if coef:
        loss_sum, tokens, aux = token_loss_sum(spec.model, variables, batch, rng=rng,
                                               chunk_tokens=spec.loss_chunk_tokens, router_aux=True)
        share = coef * aux * tokens / window_tokens
    else:
        loss_sum, tokens = token_loss_sum(spec.model, variables, batch, rng=rng, chunk_tokens=spec.loss_chunk_tokens)
        share = jnp.zeros((), jnp.float32)
    return loss_sum / window_tokens + share, (loss_sum, tokens, share)


def train_step(state: TrainState, frozen, batch, window_tokens, *, spec: StepSpec):
    """One micro-step: gradients of this micro-batch's share of the window loss, fed to ``spec.tx``.

    ``loss = sum(masked token cross-entropy) / window_tokens``; ``optax.MultiSteps(use_grad_mean=False)``
    sums the micro-step gradients and applies the inner optimizer at the window's last micro-step (module
    docstring). Pure; jit it with ``spec`` bound or static and ``donate_argnums=0``.

    Args:
        state: :class:`TrainState`.
        frozen: frozen variables dict (the base model for LoRA; ``{}`` for full fine-tuning).
        batch: dict of ``[B, T]`` arrays (module docstring).
        window_tokens: float32 scalar, supervised tokens in this micro-step's accumulation window (>= 1).
        spec: :class:`StepSpec` (static).

    Returns:
        ``(new_state, metrics)``; metrics are float32 scalars: ``loss`` (this micro-step's share of the window
        mean, with a mixture of experts' load-balancing term as in transformers' training loss), ``loss_sum``
        (cross-entropy only), ``tokens``, ``aux_loss`` (the load-balancing share in ``loss``; 0 for dense
        models), ``grad_norm`` (global norm of the window's gradient so far; the full
        window's at its last micro-step).
    """
    with sharding_lib.activation_mesh(spec.mesh):
        rng = jax.random.fold_in(state.rng, state.micro_step) if spec.use_dropout else None
        (loss, (loss_sum, tokens, aux_share)), grads = jax.value_and_grad(_window_loss, has_aux=True)(
                state.trainable, frozen, batch, window_tokens, rng, spec)
        window_grads = jax.tree_util.tree_map(jnp.add, state.opt_state.acc_grads, grads)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(trainable=trainable, opt_state=opt_state, micro_step=state.micro_step + 1)
        metrics = dict(loss=loss, loss_sum=loss_sum, tokens=tokens, aux_loss=aux_share,
                       grad_norm=optax.tree.norm(window_grads))
        return new_state, metrics


def eval_step(trainable, frozen, batch, *, spec: StepSpec):
    """``dict(loss_sum, tokens)`` (float32 scalars) of one batch, without dropout; pure, jit it with ``spec``
    bound or static. Arguments as :func:`train_step`."""
    with sharding_lib.activation_mesh(spec.mesh):
        loss_sum, tokens = token_loss_sum(spec.model, lora_lib.combine(trainable, frozen), batch,
                                          chunk_tokens=spec.loss_chunk_tokens)
        return dict(loss_sum=loss_sum, tokens=tokens)


def token_loss_sum(model, variables, batch, *, rng=None, chunk_tokens: int = 0, router_aux: bool = False):
    """``(sum of masked token cross-entropy, number of supervised tokens)``, both float32 scalars; with
    ``router_aux`` a third: the mixture-of-experts load-balancing loss of the batch over its non-padding tokens
    (:func:`easytune.models.moe.load_balancing_loss`, from the statistics the sparse layers sow).

    Logits are computed in fp32 (``LlamaForCausalLM`` returns fp32) for the loss. With ``chunk_tokens > 0``
    and a model that can return its final hidden states (``LlamaForCausalLM``), the loss is
    :func:`chunked_token_loss_sum` over chunks of that many tokens: the full ``[B, T, V]`` logits are never
    materialized (same value and gradient to float32 rounding). It falls back to the plain path where the
    head would need dropout (LoRA on ``lm_head`` with ``lora_dropout > 0`` and an ``rng``).
    """
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    if router_aux:
        kwargs["mutable"] = ["intermediates"]

    def apply(**kw):
        out = model.apply(variables, batch["input_ids"], positions=batch["positions"],
                          segment_ids=batch["segment_ids"], deterministic=rng is None, **kw, **kwargs)
        if not router_aux:
            return out, ()
        from easytune.models.moe import load_balancing_loss
        out, state = out
        return out, (load_balancing_loss(state.get("intermediates", {}), model.config.num_experts),)

    head = _head_fn(model, variables, rng) if chunk_tokens > 0 else None
    if head is not None:
        hidden, aux = apply(return_hidden=True)
        head_fn, head_params = head
        return chunked_token_loss_sum(head_fn, head_params, hidden, batch["target_ids"], batch["loss_mask"],
                                      chunk_tokens) + aux
    logits, aux = apply()
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["target_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return (jnp.sum(ce * mask), jnp.sum(mask)) + aux


def _head_fn(model, variables, rng):
    """``(head(params, x [..., D]) -> float32 logits [..., V], params)`` of a ``LlamaForCausalLM``'s output layer,
    computed exactly as the model does (``Linear`` ``lm_head`` with its LoRA / QLoRA kernel, or the tied
    embedding), or None where the chunked loss does not apply (another model; dropout on a LoRA ``lm_head``)."""
    from easytune.models import llama
    from easytune.models.layers import Linear
    if not isinstance(model, llama.LlamaForCausalLM):
        return None
    c = model.config
    params = variables["params"]
    cap = lambda z: llama.softcap_logits(z, c.final_logit_softcapping)  # Gemma 2; identity elsewhere
    if c.tie_word_embeddings:
        def tied(hp, x):
            emb = hp["embedding"].astype(x.dtype)  # [V, D]
            return cap(jnp.einsum("...d,vd->...v", x, emb, preferred_element_type=jnp.float32))
        return tied, {"embedding": params["model"]["embed_tokens"]["embedding"]}
    head_vars = {"params": params["lm_head"]}
    lora = variables.get("lora", {})
    if "lm_head" in lora:
        if rng is not None and model.lora_dropout > 0:
            return None
        head_vars["lora"] = lora["lm_head"]
    layer = Linear(c.vocab_size, ("embed", "vocab"), use_bias=False, config=c, lora_scale=model.lora_scale,
                   float32_out=True)
    return (lambda hp, x: cap(layer.apply(hp, x))), head_vars


def _chunk_ce(head, head_params, h, targets, mask):
    """Masked cross-entropy sum (float32 scalar) of one chunk: ``h [B, C, D]``, ``targets`` int and ``mask``
    float32 [B, C]."""
    logits = head(head_params, h)  # [B, C, V] float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * mask)


def chunked_token_loss_sum(head, head_params, hidden, target_ids, loss_mask, chunk_tokens: int):
    """Masked token cross-entropy summed over ``[B, T]``, computed ``chunk_tokens`` tokens at a time.

    ``loss = sum_n mask_n * (logsumexp(z_n) - z_n[y_n])`` with ``z_n = head(head_params, hidden_n)``. The
    sequence is cut into chunks of ``C = ceil(chunk_tokens / B)`` positions (every row keeps its place, so a
    batch-sharded ``hidden`` stays sharded); only one chunk's float32 logits ``[B, C, V]`` exist at a time.
    The gradient is computed in the same pass (custom VJP, as Liger-Kernel's fused linear cross-entropy): per
    chunk ``dz = (softmax(z) - onehot(y)) * mask``, pulled back through ``head`` to ``d hidden`` (kept,
    ``[B, T, D]``) and ``d head_params`` (summed); the backward pass only scales them by the incoming
    cotangent. So the logits are computed once, not recomputed; a frozen head's weight gradient is dead code
    that XLA drops (measured: LoRA case A no slower than the full-logits loss).

    Args:
        head: ``head(head_params, x [..., D]) -> float32 [..., V]`` logits.
        head_params: pytree of the head's variables (float leaves get gradients; integer ones, e.g. NF4
            codes, none).
        hidden: [B, T, D] final hidden states (compute dtype).
        target_ids: int [B, T] next-token ids.
        loss_mask: [B, T], 1.0 where the target is supervised.
        chunk_tokens: tokens per chunk (> 0); T is padded up to a multiple of ``C`` with masked tokens.

    Returns:
        ``(loss_sum, tokens)``, float32 scalars (``tokens = sum(loss_mask)``).

    References:
        Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (fused linear
        cross-entropy); Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024.
    """
    b, t, d = hidden.shape
    c = int(min(-(-chunk_tokens // b), t))
    pad = -t % c
    chunks = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(
        b, (t + pad) // c, c, *x.shape[2:]), 1, 0)  # [n, B, C, ...]
    h = chunks(hidden)
    y = chunks(target_ids.astype(jnp.int32))
    m32 = loss_mask.astype(jnp.float32)
    m = chunks(m32)
    from easytune import quant
    is_float = lambda x: isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating)
    leaves, treedef = jax.tree_util.tree_flatten(head_params, is_leaf=quant.is_qtensor)  # NF4: no gradient
    float_idx = [i for i, x in enumerate(leaves) if is_float(x)]

    def merge(float_leaves, all_leaves):
        out = list(all_leaves)
        for i, x in zip(float_idx, float_leaves):
            out[i] = x
        return jax.tree_util.tree_unflatten(treedef, out)

    def primal(float_leaves, h, y, m, all_leaves):
        hp = merge(float_leaves, all_leaves)

        def body(total, xs):
            loss = _chunk_ce(head, hp, *xs)
            return total + loss, None
        total, _ = jax.lax.scan(body, jnp.zeros([], jnp.float32), (h, y, m))
        return total

    @jax.custom_vjp
    def loss_sum(float_leaves, h, y, m, all_leaves):
        return primal(float_leaves, h, y, m, all_leaves)

    def fwd(float_leaves, h, y, m, all_leaves):
        def body(carry, xs):
            total, dparams = carry
            hc, yc, mc = xs
            loss, vjp = jax.vjp(lambda p, x: _chunk_ce(head, merge(p, all_leaves), x, yc, mc), float_leaves, hc)
            dp, dh = vjp(jnp.ones([], jnp.float32))
            dparams = jax.tree_util.tree_map(lambda a, x: a + x.astype(jnp.float32), dparams, dp)
            return (total + loss, dparams), dh

        zeros = [jnp.zeros(x.shape, jnp.float32) for x in float_leaves]  # accumulated in float32
        (total, dparams), dh = jax.lax.scan(body, (jnp.zeros([], jnp.float32), zeros), (h, y, m))
        return total, (dparams, dh)

    def bwd(res, g):
        dparams, dh = res
        return ([(g * x).astype(dt) for x, dt in zip(dparams, dtypes)], (g * dh).astype(dh.dtype), None, None,
                None)

    loss_sum.defvjp(fwd, bwd)
    float_leaves = [leaves[i] for i in float_idx]
    dtypes = [x.dtype for x in float_leaves]
    total = loss_sum(float_leaves, h, y, m, leaves)
    return total, jnp.sum(m32)
