"""Pure train and eval steps.

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

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from easytune import lora as lora_lib


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


def token_loss_sum(model, variables, batch, *, rng=None):
    """``(sum of masked token cross-entropy, number of supervised tokens)``, both float32 scalars.

    Logits are computed in fp32 (``LlamaForCausalLM`` returns fp32) for the loss.
    """
    kwargs = {} if rng is None else {"rngs": {"dropout": rng}}
    logits = model.apply(variables, batch["input_ids"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=rng is None, **kwargs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["target_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce * mask), jnp.sum(mask)


def make_train_step(model, tx, use_dropout: bool):
    """Returns ``train_step(state, frozen, batch, window_tokens) -> (state, metrics)`` (pure; jit it).

    Args of the returned function:
        state: :class:`TrainState`.
        frozen: frozen variables dict (the base model for LoRA; ``{}`` for full fine-tuning).
        batch: dict of ``[B, T]`` arrays (module docstring).
        window_tokens: float32 scalar, supervised tokens in this micro-step's accumulation window (>= 1).

    Metrics (float32 scalars): ``loss`` (this micro-step's share of the window mean), ``loss_sum``,
    ``tokens``, ``grad_norm`` (global norm of the window's gradient so far; the full window's at its last
    micro-step).
    """
    def loss_fn(trainable, frozen, batch, window_tokens, rng):
        variables = lora_lib.combine(trainable, frozen)
        loss_sum, tokens = token_loss_sum(model, variables, batch, rng=rng)
        return loss_sum / window_tokens, (loss_sum, tokens)

    def train_step(state: TrainState, frozen, batch, window_tokens):
        rng = jax.random.fold_in(state.rng, state.micro_step) if use_dropout else None
        (loss, (loss_sum, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.trainable, frozen, batch, window_tokens, rng)
        window_grads = jax.tree_util.tree_map(jnp.add, state.opt_state.acc_grads, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        new_state = state.replace(trainable=trainable, opt_state=opt_state, micro_step=state.micro_step + 1)
        metrics = dict(loss=loss, loss_sum=loss_sum, tokens=tokens, grad_norm=optax.tree.norm(window_grads))
        return new_state, metrics

    return train_step


def make_eval_step(model):
    """Returns ``eval_step(trainable, frozen, batch) -> dict(loss_sum, tokens)`` (no dropout; jit it)."""
    def eval_step(trainable, frozen, batch):
        loss_sum, tokens = token_loss_sum(model, lora_lib.combine(trainable, frozen), batch)
        return dict(loss_sum=loss_sum, tokens=tokens)
    return eval_step
