"""The learning-curve diagnosis on synthetic curves of each kind, the plot, and a real run that overfits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from easytune import cli
from easytune import config as config_lib
from easytune.tokenizer import load_tokenizer
from easytune.train import curves, loop
from easytune.train import setup as setup_lib
from tests.helpers import tiny_run_config

STEPS = np.arange(1, 201)
EVAL_STEPS = np.arange(0, 201, 20)


def _decay(steps, start, end, tau):
    return end + (start - end) * np.exp(-steps / tau)


def test_overfit_names_the_minimum_step():
    """Validation loss falls to a minimum at step 80, then rises: overfit, stop at 80."""
    train = _decay(STEPS, 4.0, 0.2, 40)
    val = 1.5 + 0.0001 * (EVAL_STEPS - 80) ** 2
    d = curves.diagnose(STEPS, train, EVAL_STEPS, val)
    assert d["verdict"] == "overfit" and d["best_step"] == 80
    assert d["best_eval_loss"] == pytest.approx(1.5)
    assert "stop at step 80" in d["suggestion"] and "train.max_steps=80" in d["suggestion"]


def test_underfit_flat_and_still_falling():
    rng = np.random.default_rng(0)
    flat = 5.0 + 0.01 * rng.standard_normal(len(STEPS))
    d = curves.diagnose(STEPS, flat, EVAL_STEPS, np.full(len(EVAL_STEPS), 5.0))
    assert d["verdict"] == "underfit" and "flat" in d["reason"]
    falling = _decay(STEPS, 4.0, 1.0, 400)  # a time constant twice the run: far from its plateau
    d = curves.diagnose(STEPS, falling, EVAL_STEPS, _decay(EVAL_STEPS, 4.1, 1.1, 400))
    assert d["verdict"] == "underfit" and "still falling steeply" in d["reason"]


def test_well_fit_reports_the_gap():
    """Both plateau: well-fit, gap = final validation minus the final smoothed (trailing mean) train loss."""
    rng = np.random.default_rng(1)
    train = _decay(STEPS, 4.0, 1.0, 15) + 0.02 * rng.standard_normal(len(STEPS))
    val = _decay(EVAL_STEPS, 4.1, 1.1, 15)
    d = curves.diagnose(STEPS, train, EVAL_STEPS, val)
    assert d["verdict"] == "well-fit"
    expected_gap = val[-1] - np.mean(train[-20:])  # window = len // 10 = 20 logged points
    assert d["generalization_gap"] == pytest.approx(expected_gap, abs=1e-12)
    assert 0.05 < d["generalization_gap"] < 0.15


def test_plot_cli_writes_png_and_summary(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    train = _decay(STEPS, 4.0, 0.2, 40)
    val = 1.5 + 0.0001 * (EVAL_STEPS - 80) ** 2
    rows = [{"step": int(s), "train/loss": float(loss), "learning_rate": 1e-3, "grad_norm": 1.0, "epoch": s / 50}
            for s, loss in zip(STEPS, train)]
    rows += [{"step": int(s), "eval/loss": float(v)} for s, v in zip(EVAL_STEPS, val)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "diagnosis: overfit" in out and "stop at step 80" in out
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "summary.json").read_text())["diagnosis"]["best_step"] == 80
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\nnot json\n')
    assert cli.main(["plot", str(run)]) == 2
    assert "metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
    # a run killed mid-write leaves a half last line (no newline): it is skipped, the rest still plots
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "train/l')
    assert cli.main(["plot", str(run)]) == 0
    assert "stop at step 80" in capsys.readouterr().out


@pytest.mark.slow
def test_real_run_overfits_and_early_stopping_keeps_the_best(tmp_path, capsys):
    """A tiny model memorises 24 records whose answers are random digits: validation loss falls (the format
    is learnable), then rises. Early stopping ends the run, keeps the best checkpoint, and the diagnosis says
    overfit at that step."""
    from easytune.data import quickstart
    assets = quickstart.build_quickstart(tmp_path / "assets", num_records=200)
    rng = np.random.default_rng(0)
    records = [{"instruction": "Repeat the code.", "input": "",
                "output": "".join(map(str, rng.integers(0, 10, 8)))} for _ in range(40)]
    data = tmp_path / "random.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    patience, every = 2, 4
    c = tiny_run_config(tmp_path / "run", **{
            "data.builtin": "", "data.format": "alpaca", "data.val_set_size": 16, "data.packing": False,
            "data.sequence_len": 48, "train.micro_batch_size": 3, "train.max_steps": 120,
            "train.eval_steps": every, "train.early_stopping_patience": patience,
            "train.early_stopping_min_delta": 0.001, "train.sample_max_new_tokens": 0,
            "optim.learning_rate": 5e-3, "optim.warmup_steps": 0, "optim.lr_scheduler": "constant",
            # lr 5e-3: at 1e-2 the path was chaotic (float rounding decided whether the run learned at all);
            # the full-logits loss: the chunked loss's float32 rounding (equal within 1e-5 per step,
            # tests/train/test_loss_chunk.py) ends it elsewhere
            "train.loss_chunk_tokens": 0, "mesh.fsdp": 1})
    c.tokenizer.path = str(assets["tokenizer_dir"])
    c.data.train_files = [str(data)]
    import jax
    s = loop.train(c, devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "24 sequences / 3 = 8 steps/epoch" in out and "global batch 3 sequences" in out
    stopped, best = s["stopped_early_at"], s["best_step"]
    assert stopped is not None and stopped < 120, s
    # no decrease > min_delta in the last `patience` evaluations; the best checkpoint is the minimum
    assert stopped - best <= patience * every
    assert (tmp_path / "run" / "best" / str(best)).is_dir()
    assert f"best validation loss {s['best_eval_loss']:.4f} at step {best}" in out
    d = s["diagnosis"]
    assert d["verdict"] == "overfit" and d["best_step"] == best, d
    assert (tmp_path / "run" / "curves.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert min(evals, key=evals.get) == best and max(evals) == stopped
    # Throughput: XLA's FLOPs for a step against Kaplan et al. 2020's C = 6 N T (N non-embedding parameters,
    # here the lm_head included as it is a matmul; T tokens per step, padding computed too), and 0 < MFU < 1.
    import re
    flops = float(re.search(r"throughput: ([0-9.e+]+) FLOPs per optimizer step", out).group(1))
    vocab = len(load_tokenizer(assets["tokenizer_dir"]))
    hidden = 64  # the tiny preset
    n_matmul = s["trainable_params"] - vocab * hidden - 2 * 2 * hidden - hidden  # no embedding, no norms
    kaplan = 6 * n_matmul * 3 * 48
    assert 0.9 < flops / kaplan < 1.3, (flops, kaplan)
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    assert mfu and all(0 < m < 1 for m in mfu)
    # the kept best checkpoint (what `easytune export RUN --step BEST` loads) scores the logged best loss
    from easytune.data import prepare
    setup, trainable = setup_lib.load_run(tmp_path / "run", step=best)
    _, val, _ = prepare.prepare_dataset(c.data, setup.tokenizer)
    import functools

    import jax

    from easytune.train import step as step_lib
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, spec=step_lib.StepSpec(setup.model)))
    ev = loop.evaluate(eval_fn, setup, trainable, val, 8)  # 8 devices
    assert abs(ev["eval/loss"] - s["best_eval_loss"]) < 1e-5


def test_plot_reads_only_min_delta_from_the_run_config(tmp_path):
    """A config.json with keys this easytune does not know (another version, a hand edit) still plots."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train/loss": 2.0 / s} for s in range(1, 30)] + [{"step": 29, "eval/loss": 0.1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"train": {"bogus_key": 1, "early_stopping_min_delta": 0.25},
                                                 "lora": {"r": "eight"}}))
    assert curves._run_min_delta(run / "config.json") == 0.25
    assert curves.plot_run(run)["curves_png"].endswith("curves.png")
    (run / "config.json").write_text("[]")
    assert curves._run_min_delta(run / "config.json") == config_lib.defaults().train.early_stopping_min_delta


def test_a_plateau_without_validation_is_not_called_well_fit():
    """Without validation losses only the training curve is known: a plateau is ``unknown``, with the advice to hold
    out data, never ``well-fit`` (that needs the generalization gap)."""
    train = _decay(STEPS, 4.0, 1.0, 60)  # a fast decay that has long plateaued
    d = curves.diagnose(STEPS, train, [], [])
    assert d["verdict"] == "unknown" and "no validation loss" in d["reason"]
    assert "data.val_set_size" in d["suggestion"] and d["generalization_gap"] is None
