"""Schedules against transformers' schedulers, the guide's learning-rate formula, skipping non-finite updates,
the accumulation-1 fast path against optax.MultiSteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easytune import config as config_lib
from easytune.train import optim


def test_guide_learning_rate_worked_example():
    """The guide: Mistral (5e-5, 4M-token batches), 2,000,000 supervised tokens, 350 steps (1 epoch, batch 1)."""
    lr = optim.suggest_learning_rate(5e-5, 2_000_000 / 350, 4_000_000)
    assert f"{lr:.3g}" == "1.89e-06"
    assert optim.PRETRAIN_HPARAMS["mistral"]["learning_rate"] == 5e-5
    assert optim.PRETRAIN_HPARAMS["llama"]["batch_tokens"] == 4_000_000
    with pytest.raises(ValueError, match="supervised_tokens_per_step must be > 0"):
        optim.suggest_learning_rate(5e-5, 0, 4_000_000)


@pytest.mark.parametrize("name, warmup_steps, warmup_ratio, min_ratio", [
        ("cosine", 10, 0.0, 0.1), ("cosine", 0, 0.05, 0.0), ("linear", 7, 0.0, 0.0), ("constant", 0, 0.1, 0.0)])
def test_schedules_equal_transformers(name, warmup_steps, warmup_ratio, min_ratio):
    """Reference: transformers' LambdaLR schedulers (warmup by ratio = ceil(ratio * total), as TrainingArguments)."""
    import math

    import torch
    from transformers import optimization as hf
    total, peak = 100, 1e-3
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.lr_scheduler = peak, name
    ocfg.warmup_steps, ocfg.warmup_ratio, ocfg.cosine_min_lr_ratio = warmup_steps, warmup_ratio, min_ratio
    sched = optim.make_schedule(ocfg, total)
    warm = warmup_steps or math.ceil(warmup_ratio * total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    ref = {"cosine": lambda: hf.get_cosine_with_min_lr_schedule_with_warmup(opt, warm, total, min_lr_rate=min_ratio),
           "linear": lambda: hf.get_linear_schedule_with_warmup(opt, warm, total),
           "constant": lambda: hf.get_constant_schedule_with_warmup(opt, warm)}[name]()
    expected = []
    for _ in range(total):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    ours = [float(sched(s)) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6 * peak)  # float32 schedule near 0


def test_nonfinite_window_is_skipped_and_counted():
    """A window whose gradient holds a NaN changes neither params nor Adam moments; the next finite one applies."""
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.warmup_steps = 0.1, 0
    tx, _ = optim.make_optimizer(ocfg, total_steps=10, accumulation_steps=2)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    good = {"w": jnp.full((2, 2), 0.5)}
    bad = {"w": jnp.array([[jnp.nan, 0.5], [0.5, 0.5]])}
    for g in (good, bad):  # one window: a finite micro-step, then a NaN one
        upd, state = tx.update(g, state, params)
        params = jax.tree_util.tree_map(jnp.add, params, upd)
    np.testing.assert_array_equal(np.asarray(params["w"]), np.ones((2, 2)))
    assert int(optim.skipped_updates(state)) == 1 and int(state.gradient_step) == 1
    adam_mu = jax.tree_util.tree_leaves(state.inner_opt_state.inner_state)
    assert all(np.all(np.asarray(x) == 0) for x in adam_mu if np.asarray(x).dtype == np.float32)
    for g in (good, good):
        upd, state = tx.update(g, state, params)
        params = jax.tree_util.tree_map(jnp.add, params, upd)
    # AdamW's first step moves each weight by lr * sign(g) (bias-corrected m / sqrt(v) = 1, eps aside)
    np.testing.assert_allclose(np.asarray(params["w"]), np.full((2, 2), 0.9), atol=1e-6)
    assert int(optim.skipped_updates(state)) == 1


def test_lr_cli_on_real_data(shared_data, tmp_path, capsys):
    """stories260K (model_type llama -> Llama 2: 3e-4, 4M tokens) on Tiny Shakespeare as the recipe prepares it:
    128-token text chunks supervise every token, so a step of 32 sequences per data-parallel device holds
    32 * 128 = 4096 supervised tokens per device (one chunk of the 5146 is a token short), and the guide's
    formula gives 3e-4 * sqrt(4096 / 4e6) = 9.6e-6 on one device."""
    import pathlib
    import re

    from easytune import cli
    repo = pathlib.Path(__file__).resolve().parents[2]
    model_dir = tmp_path / "stories260K"
    assert cli.main(["convert", str(shared_data / "models" / "stories260K" / "stories260K.gguf"), str(model_dir)]) == 0
    corpus = shared_data / "corpus" / "tinyshakespeare" / "input.txt"
    args = ["lr", str(repo / "configs" / "stories260k_lora.py"), f"--config.model.path={model_dir}",
            f"--config.data.train_files={corpus}"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    per_step = float(re.search(r"-> ([0-9,]+) supervised tokens per optimizer step", out).group(1).replace(",", ""))
    expected_tokens = 32 * 128 * jax.device_count()  # the recipe: micro-batch 16 x accumulation 2, per device
    assert abs(per_step - expected_tokens) <= 1, out
    assert f"= {3e-4 * np.sqrt(expected_tokens / 4e6):.3g}" in out and "Llama 2" in out
    assert cli.main(args + ["--config.optim.pretrain_learning_rate=5e-5",
                            "--config.optim.pretrain_batch_tokens=2000000"]) == 0
    assert f"= {5e-5 * np.sqrt(expected_tokens / 2e6):.3g}" in capsys.readouterr().out


def test_schedule_warmup_then_cosine():
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.warmup_steps, ocfg.cosine_min_lr_ratio = 1e-3, 10, 0.1
    sched = optim.make_schedule(ocfg, 110)
    assert float(sched(0)) == 0.0
    assert abs(float(sched(10)) - 1e-3) < 1e-9
    assert abs(float(sched(60)) - (1e-4 + 0.5 * 9e-4)) < 1e-8  # cosine midpoint
    assert abs(float(sched(110)) - 1e-4) < 1e-9


def test_accumulation_1_equals_multisteps():
    """``make_optimizer(accumulation_steps=1)`` (its fast path without MultiSteps' cond and selects) against
    ``optax.MultiSteps(every_k_schedule=1)`` wrapped as for accumulation (the reference): bitwise the same
    parameters and optimizer state over steps that include a non-finite gradient."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
    ocfg = config_lib.defaults().optim
    ocfg.learning_rate, ocfg.max_grad_norm, ocfg.weight_decay = 1e-2, 0.5, 0.1
    fast, _ = optim.make_optimizer(ocfg, total_steps=10, accumulation_steps=1)
    ref = optim._clean_reset(optax.MultiSteps(optim.make_inner(ocfg, 10)[0], 1, use_grad_mean=False))

    def run(tx):
        p, st = params, tx.init(params)
        update = jax.jit(lambda p, st, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, st, p)))
        for i in range(4):
            g = jax.tree_util.tree_map(lambda x: jnp.asarray(rng_g.normal(size=x.shape), jnp.float32), params)
            if i == 1:
                g["w"] = g["w"].at[0, 0].set(jnp.nan)
            p, st = update(p, st, g)
        return p, st

    rng_g = np.random.default_rng(1)
    got = run(fast)
    rng_g = np.random.default_rng(1)
    want = run(ref)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got[1].gradient_step) == 4 and int(optim.skipped_updates(got[1])) == 1
