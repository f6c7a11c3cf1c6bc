"""The trainer's windows (easytune.train.batches): deterministic epochs, resumable by step, padded partial
windows, per-host row slices that put together give the global window; the plan and the evaluation interval."""

from __future__ import annotations

import types

import numpy as np
import pytest

from easytune import config as config_lib
from easytune import config_check
from easytune.train import batches
from tests.helpers import tiny_run_config


def _seqs(n, T=4):
    ids = np.arange(n * T, dtype=np.int32).reshape(n, T)
    return {"input_ids": ids, "target_ids": ids + 1, "loss_mask": np.ones((n, T), np.float32),
            "segment_ids": np.ones((n, T), np.int32), "positions": np.tile(np.arange(T, dtype=np.int32), (n, 1))}


def _plan(n, micro_batch_size, dp, accum=1, drop_last=True, max_steps=7):
    cfg = types.SimpleNamespace(micro_batch_size=micro_batch_size, gradient_accumulation_steps=accum,
                                drop_last=drop_last, max_steps=max_steps, num_epochs=1.0)
    return batches.make_plan(n, cfg, dp)


def test_windows_follow_the_epoch_permutation_and_depend_only_on_the_step():
    seqs, plan = _seqs(10), _plan(10, 2, 2)  # global batch 4: 2 steps per epoch, 2 rows dropped
    assert plan.steps_per_epoch == 2
    for step in range(7):  # crosses epoch boundaries; the same step always gives the same rows
        epoch, idx = divmod(step, 2)
        perm = np.random.default_rng(3 + epoch).permutation(10)
        (m,) = batches.window_batches(seqs, plan, step, seed=3)
        np.testing.assert_array_equal(m["input_ids"], seqs["input_ids"][perm[idx * 4:(idx + 1) * 4]])


def test_host_slices_put_together_give_the_global_window():
    seqs, plan = _seqs(12), _plan(12, 1, 6, accum=2)  # 6 rows per micro-batch, 2 micro-batches
    full = batches.window_batches(seqs, plan, 1, seed=0)
    parts = [batches.window_batches(seqs, plan, 1, seed=0, part=slice(2 * i, 2 * i + 2)) for i in range(3)]
    for j in range(2):
        for k in full[j]:
            np.testing.assert_array_equal(np.concatenate([p[j][k] for p in parts]), full[j][k])
    assert parts[1][0]["input_ids"].shape == (2, 4)


def test_a_partial_last_window_is_padded_with_empty_rows():
    seqs, plan = _seqs(5), _plan(5, 4, 1, drop_last=False)
    (last,) = batches.window_batches(seqs, plan, 1, seed=0)  # rows 4..7 of 5: one real, three empty
    assert last["segment_ids"][1:].sum() == 0 and last["loss_mask"][1:].sum() == 0
    assert last["segment_ids"][0].sum() == 4
    assert (batches.window_rows(plan, 1, 0)[0, 1:] == -1).all()


def test_plan_matches_guide_example():
    """The guide: 200 samples, batch 5, 1000 epochs -> 40 batches per epoch, 40,000 updates."""
    t = config_lib.defaults().train
    t.micro_batch_size, t.num_epochs = 5, 1000
    plan = batches.make_plan(200, t, dp=1)
    assert (plan.steps_per_epoch, plan.total_steps, plan.global_batch) == (40, 40000, 5)
    t.drop_last = True
    with pytest.raises(ValueError, match="global batch 250"):
        t.micro_batch_size = 250
        batches.make_plan(200, t, dp=1)


def test_eval_interval_from_evals_per_epoch():
    """40 steps per epoch (the guide's example) and 4 evaluations per epoch: every 10 optimizer steps."""
    t = config_lib.defaults().train
    t.micro_batch_size, t.num_epochs, t.evals_per_epoch = 5, 1000, 4
    plan = batches.make_plan(200, t, dp=1)
    assert batches.eval_interval(t, plan) == 10
    t.evals_per_epoch, t.eval_steps = 0, 7
    assert batches.eval_interval(t, plan) == 7
    c = tiny_run_config("/tmp/unused", **{"train.eval_steps": 5, "train.evals_per_epoch": 2})
    with pytest.raises(config_lib.ConfigError, match="train.evals_per_epoch.*not both"):
        config_check.validate(c)
