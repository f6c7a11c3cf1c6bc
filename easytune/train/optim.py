"""The optimizer, built in one function: schedule -> AdamW -> global-norm clipping -> ``optax.MultiSteps``.

Gradient accumulation: ``optax.MultiSteps(..., use_grad_mean=False)`` *sums* the micro-step gradients, and
each micro-step's loss is already divided by the supervised-token count of the whole accumulation window
(see :mod:`easytune.train.step`). The sum is then exactly the gradient of the window's token-weighted mean
loss, whatever the micro-batches hold. (The default ``use_grad_mean=True`` would average per-micro-batch
means: the gradient-accumulation bug of transformers #34191.) Clipping sits inside the accumulated
optimizer, so it sees the window's gradient; the schedule counts optimizer updates, not micro-steps.

Non-finite gradients: the inner chain is wrapped in ``optax.apply_if_finite``, so an accumulated window whose
gradient holds a NaN or Inf changes neither the parameters nor the Adam moments nor the schedule's count; the
update is skipped and counted (``ApplyIfFiniteState.total_notfinite``). The trainer stops the run after
``train.max_consecutive_nonfinite`` skipped updates in a row.

The learning-rate formula (:func:`suggest_learning_rate`) scales a pretraining learning rate by the square
root of the ratio of batch sizes in tokens, as the fine-tuning guide does.

References:
    Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW); optax ``adamw``,
    ``clip_by_global_norm``, ``warmup_cosine_decay_schedule``, ``MultiSteps``, ``apply_if_finite``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

# Pretraining learning rate and batch size (tokens per optimizer step) of model families, for the guide's
# formula. Llama 2: Touvron et al. 2023, section 2.2 (peak lr 3e-4 for 7B/13B, 4M-token batches);
# Mistral: the guide's figures (5e-5, 4M tokens). Keyed by the HF ``config.json`` ``model_type``.
PRETRAIN_HPARAMS = {
        "llama": {"family": "Llama 2", "learning_rate": 3e-4, "batch_tokens": 4_000_000},
        "mistral": {"family": "Mistral", "learning_rate": 5e-5, "batch_tokens": 4_000_000},
}

# Never apply an update with a non-finite gradient (optax.apply_if_finite gives up after this many); the
# trainer stops the run long before, after train.max_consecutive_nonfinite.
_NEVER_ACCEPT_NONFINITE = 2 ** 30


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` if set, else ``ceil(warmup_ratio * total_steps)``
    (as ``transformers.TrainingArguments.get_warmup_steps``)."""
    if optim_cfg.warmup_steps > 0:
        return int(min(optim_cfg.warmup_steps, total_steps))
    return int(math.ceil(optim_cfg.warmup_ratio * total_steps))


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step (0-based): linear warmup from 0, then cosine / linear decay or constant.

    With ``w`` warmup steps, ``T`` total steps, peak ``lr`` and ``p = (step - w) / (T - w)``: warmup
    ``lr * step / w``; cosine ``lr * (r + (1 - r) * (1 + cos(pi * p)) / 2)`` with ``r = cosine_min_lr_ratio``;
    linear ``lr * (1 - p)``; constant ``lr``. These equal transformers' ``get_cosine_with_min_lr_schedule_with_
    warmup(min_lr_rate=r)``, ``get_linear_schedule_with_warmup`` and ``get_constant_schedule_with_warmup``
    (tested against them).

    Raises:
        ValueError: an unknown ``lr_scheduler``.
    """
    peak = float(optim_cfg.learning_rate)
    warm = warmup_steps(optim_cfg, total_steps)
    decay = max(total_steps - warm, 1)
    if optim_cfg.lr_scheduler == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=float(optim_cfg.cosine_min_lr_ratio))
    elif optim_cfg.lr_scheduler == "linear":
        after = optax.linear_schedule(peak, 0.0, decay)
    elif optim_cfg.lr_scheduler == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optim.lr_scheduler: unknown scheduler {optim_cfg.lr_scheduler!r}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _decay_mask(params):
    # Decoupled weight decay on matrices only (kernels, embeddings, LoRA A/B), not on norms and biases.
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_inner(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(apply_if_finite(chain(clip_by_global_norm, adamw(schedule))), schedule)``: one optimizer update."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.max_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim_cfg.adam_beta1), b2=float(optim_cfg.adam_beta2),
                             eps=float(optim_cfg.adam_epsilon), weight_decay=float(optim_cfg.weight_decay),
                             mask=_decay_mask))
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=_NEVER_ACCEPT_NONFINITE), schedule


def _clean_reset(multi: optax.MultiSteps) -> optax.GradientTransformation:
    # optax.MultiSteps resets its accumulator as (1 - emit) * acc, and 0 * NaN = NaN: one non-finite micro-step
    # would poison every later window. Zero the accumulator explicitly at each window boundary instead.
    def update(grads, state, params=None):
        updates, state = multi.update(grads, state, params)
        acc = jax.tree_util.tree_map(lambda a: jnp.where(state.mini_step == 0, jnp.zeros_like(a), a),
                                     state.acc_grads)
        return updates, state._replace(acc_grads=acc)
    return optax.GradientTransformation(multi.init, update)


def _every_step(multi: optax.MultiSteps, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    # MultiSteps(every_k_schedule=1) without its overhead: the same state and the same numbers (every micro-step
    # emits: acc_grads back to zeros, mini_step stays 0, gradient_step + 1, the inner state replaced), but no
    # lax.cond and jnp.where over the whole state, which copy the parameters' moments several times per step
    # (measured: the update of a 20M-parameter model took 2x as long on CPU).
    def update(grads, state, params=None):
        summed = jax.tree_util.tree_map(lambda g, a: (g + a).astype(g.dtype), grads, state.acc_grads)
        updates, inner_state = inner.update(summed, state.inner_opt_state, params)
        acc = jax.tree_util.tree_map(jnp.zeros_like, state.acc_grads)
        return updates, state._replace(gradient_step=optax.safe_increment(state.gradient_step),
                                       inner_opt_state=inner_state, acc_grads=acc)
    return optax.GradientTransformation(multi.init, update)


def make_optimizer(optim_cfg, total_steps: int, accumulation_steps: int):
    """``(tx, schedule)``: MultiSteps(apply_if_finite(chain(clip_by_global_norm, adamw(schedule)))).

    Args:
        optim_cfg: the ``optim`` ConfigDict (learning_rate, lr_scheduler, warmup_*, weight_decay,
            max_grad_norm, adam_beta1/2, adam_epsilon).
        total_steps: optimizer updates in the run.
        accumulation_steps: micro-steps per update (``train.gradient_accumulation_steps``).

    Returns:
        ``tx`` (its state is an ``optax.MultiStepsState``: ``gradient_step`` counts optimizer updates) and the
        learning-rate schedule (a function of the 0-based optimizer step).
    """
    inner, schedule = make_inner(optim_cfg, total_steps)
    multi = optax.MultiSteps(inner, every_k_schedule=int(accumulation_steps), use_grad_mean=False)
    if int(accumulation_steps) == 1:
        return _every_step(multi, inner), schedule
    return _clean_reset(multi), schedule


def skipped_updates(opt_state) -> jax.Array:
    """Updates skipped so far for a non-finite gradient (int32 scalar), from :func:`make_optimizer`'s state."""
    return opt_state.inner_opt_state.total_notfinite


def suggest_learning_rate(base_lr: float, supervised_tokens_per_step: float, pretrain_batch_tokens: float) -> float:
    """The guide's fine-tuning learning rate: square-root scaling of the pretraining one by batch size.

    ``lr = base_lr * sqrt(supervised_tokens_per_step / pretrain_batch_tokens)``. Worked example (the guide):
    Mistral (``base_lr`` 5e-5, 4M-token batches), 2,000,000 supervised tokens in 350 steps (batch 1, one
    epoch) -> 5,714 tokens/step -> 1.89e-6.

    Args:
        base_lr: the model's peak pretraining learning rate.
        supervised_tokens_per_step: tokens that carry loss in one optimizer step (all devices, all
            accumulation micro-steps).
        pretrain_batch_tokens: tokens per optimizer step in pretraining.

    Raises:
        ValueError: a non-positive argument.
    """
    for name, v in (("base_lr", base_lr), ("supervised_tokens_per_step", supervised_tokens_per_step),
                    ("pretrain_batch_tokens", pretrain_batch_tokens)):
        if not v > 0:
            raise ValueError(f"suggest_learning_rate: {name} must be > 0, got {v}")
    return float(base_lr) * math.sqrt(float(supervised_tokens_per_step) / float(pretrain_batch_tokens))
