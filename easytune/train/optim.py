"""The optimizer, built in one function: schedule -> AdamW -> global-norm clipping -> ``optax.MultiSteps``.

Gradient accumulation: ``optax.MultiSteps(..., use_grad_mean=False)`` *sums* the micro-step gradients, and
each micro-step's loss is already divided by the supervised-token count of the whole accumulation window
(see :mod:`easytune.train.step`). The sum is then exactly the gradient of the window's token-weighted mean
loss, whatever the micro-batches hold. (The default ``use_grad_mean=True`` would average per-micro-batch
means: the gradient-accumulation bug of transformers #34191.) Clipping sits inside the accumulated
optimizer, so it sees the window's gradient; the schedule counts optimizer updates, not micro-steps.

References:
    Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (AdamW); optax ``adamw``,
    ``clip_by_global_norm``, ``warmup_cosine_decay_schedule``, ``MultiSteps``.
"""

from __future__ import annotations

import jax
import optax


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """Warmup length in optimizer steps: ``warmup_steps`` if set, else ``round(warmup_ratio * total_steps)``."""
    if optim_cfg.warmup_steps > 0:
        return int(min(optim_cfg.warmup_steps, total_steps))
    return int(round(optim_cfg.warmup_ratio * total_steps))


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup from 0, then cosine / linear decay or constant.

    Cosine decays to ``cosine_min_lr_ratio * learning_rate`` at ``total_steps``; linear decays to 0.
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


def make_optimizer(optim_cfg, total_steps: int, accumulation_steps: int):
    """``(tx, schedule)``: MultiSteps(chain(clip_by_global_norm, adamw(schedule))).

    Args:
        optim_cfg: the ``optim`` ConfigDict (learning_rate, lr_scheduler, warmup_*, weight_decay,
            max_grad_norm, adam_beta1/2, adam_epsilon).
        total_steps: optimizer updates in the run.
        accumulation_steps: micro-steps per update (``train.gradient_accumulation_steps``).
    """
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.max_grad_norm)))
    parts.append(optax.adamw(schedule, b1=float(optim_cfg.adam_beta1), b2=float(optim_cfg.adam_beta2),
                             eps=float(optim_cfg.adam_epsilon), weight_decay=float(optim_cfg.weight_decay),
                             mask=_decay_mask))
    tx = optax.MultiSteps(optax.chain(*parts), every_k_schedule=int(accumulation_steps), use_grad_mean=False)
    return tx, schedule
