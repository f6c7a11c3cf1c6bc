"""Which sequences each optimizer step trains on: the plan (global batch, steps per epoch) and the windows.

Data order is a pure function of (seed, optimizer step): epoch ``e`` visits the training sequences in the
permutation ``default_rng(seed + e)``, so a resumed run sees exactly the batches it would have seen, on any
number of devices or hosts (each host gathers only its own rows of a window).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from easytune import config as config_lib
from easytune.data import packed

SEQ_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many sequences go where: the numbers the guide's worked example uses.

    Attributes (units): sequences per micro-batch on each data-parallel device (``micro_batch_size``),
    ``dp`` data-parallel devices, ``accum`` micro-steps per optimizer step, ``global_batch`` sequences per
    optimizer step, ``steps_per_epoch`` and ``total_steps`` optimizer steps.
    """
    num_sequences: int
    micro_batch_size: int
    dp: int
    accum: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    drop_last: bool

    @property
    def micro_rows(self) -> int:
        """Sequences in one (global) micro-batch: ``micro_batch_size * dp``."""
        return self.micro_batch_size * self.dp


def make_plan(num_sequences: int, train_cfg, dp: int) -> Plan:
    """Steps per epoch and total optimizer steps.

    ``global_batch = micro_batch_size * dp * gradient_accumulation_steps``; ``steps_per_epoch`` is
    ``num_sequences // global_batch`` with ``drop_last`` else the ceiling; ``total_steps`` is ``max_steps``
    when > 0, else ``ceil(num_epochs * steps_per_epoch)``. (Guide: 200 samples, batch 5, 1000 epochs ->
    40 batches per epoch, 40,000 updates.)

    Raises:
        ValueError: an epoch holds no full global batch (names the keys to change).
    """
    gb = train_cfg.micro_batch_size * dp * train_cfg.gradient_accumulation_steps
    spe = num_sequences // gb if train_cfg.drop_last else math.ceil(num_sequences / gb)
    if spe == 0:
        raise ValueError(
                f"train.micro_batch_size={train_cfg.micro_batch_size} x {dp} data-parallel devices x "
                f"train.gradient_accumulation_steps={train_cfg.gradient_accumulation_steps} = global batch {gb} "
                f"sequences, but the training split has only {num_sequences}; lower them or set train.drop_last=False")
    total = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(train_cfg.num_epochs * spe)
    return Plan(num_sequences, train_cfg.micro_batch_size, dp, train_cfg.gradient_accumulation_steps, gb, spe,
                int(total), bool(train_cfg.drop_last))


def window_rows(plan: Plan, step: int, seed: int) -> np.ndarray:
    """Row indices of optimizer step ``step``'s window: int64 ``[accum, micro_rows]``, -1 for the empty rows
    past the end of a partial last window (``drop_last=False``)."""
    epoch, idx = divmod(step, plan.steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(plan.num_sequences)
    rows = perm[idx * plan.global_batch:(idx + 1) * plan.global_batch]
    rows = np.concatenate([rows, np.full(plan.global_batch - len(rows), -1, rows.dtype)])
    return rows.reshape(plan.accum, plan.micro_rows)


def gather_rows(seqs, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``seqs[k][rows]`` for every key, ``[len(rows), T]`` each; a row index of -1 gives an empty row (segment 0,
    loss_mask 0). ``seqs``: :class:`easytune.data.packed.PackedSequences` (rows gathered from disk) or a dict of
    ``[N, T]`` arrays."""
    return packed.as_sequences(seqs).gather(rows)


def window_batches(seqs, plan: Plan, step: int, seed: int,
                   part: slice = slice(None)) -> list[dict[str, np.ndarray]]:
    """The ``accum`` micro-batches of optimizer step ``step`` (0-based), each ``[micro_rows, T]``, or only
    rows ``part`` of each (a process's share on a multi-host mesh: :func:`easytune.sharding.local_rows`), so
    a host gathers only the sequences it feeds.

    Rows past the end of a partial last window (``drop_last=False``) are empty: segment 0, loss_mask 0.
    """
    seqs = packed.as_sequences(seqs)
    return [seqs.gather(r[part]) for r in window_rows(plan, step, seed)]


def eval_batches(seqs, rows: int):
    """Validation split (:class:`easytune.data.packed.PackedSequences` or a dict of ``[N, T]`` arrays) in batches
    of ``rows`` sequences, the last one padded with empty rows."""
    seqs = packed.as_sequences(seqs)
    n = len(seqs)
    for start in range(0, n, rows):
        idx = np.arange(start, start + rows)
        yield seqs.gather(np.where(idx < n, idx, -1))


def eval_interval(train_cfg, plan: Plan) -> int:
    """Optimizer steps between evaluations: ``eval_steps``, or ``steps_per_epoch / evals_per_epoch``
    (rounded, at least 1); 0 = only at the start and the end."""
    if train_cfg.eval_steps:
        return int(train_cfg.eval_steps)
    if train_cfg.evals_per_epoch:
        return max(1, round(plan.steps_per_epoch / train_cfg.evals_per_epoch))
    return 0


def data_position(plan: Plan, step: int, seed: int) -> dict:
    """Where optimizer step ``step`` is in the data (epoch, batch in the epoch, sequences seen, the data's size,
    global batch and seed): saved with each checkpoint and checked on resume."""
    epoch, index = divmod(step, plan.steps_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": index, "sequences_seen": step * plan.global_batch,
            "num_sequences": plan.num_sequences, "global_batch": plan.global_batch, "seed": seed}


def check_data_position(meta: dict, plan: Plan, step: int, seed: int) -> None:
    """Raises config.ConfigError when a checkpoint's saved :func:`data_position` differs from the data now."""
    saved, now = meta.get("data_position"), data_position(plan, step, seed)
    if saved and saved != now:
        raise config_lib.ConfigError(
            f"cannot resume at optimizer step {step}: the checkpoint's data position {saved} does not match "
            f"the data now {now} (the training files or their preparation changed)")
