"""Never lose a run: SIGTERM / SIGKILL / resume bit for bit, a corrupt latest checkpoint, non-finite updates."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from easytune.train import batches as batches_lib
from easytune.train import loop
from easytune.train import metrics as metrics_lib
from tests.helpers import tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[2]
KEYS = {"train.max_steps": 10, "train.save_steps": 2, "train.eval_steps": 0, "train.sample_max_new_tokens": 0,
        "optim.warmup_steps": 2, "mesh.fsdp": 1, "data.builtin": "", "data.val_set_size": 16}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """200 quickstart records and their tokenizer, shared by the runs below (built once)."""
    from easytune.data import quickstart
    a = quickstart.build_quickstart(tmp_path_factory.mktemp("assets"), num_records=200)
    return {"tokenizer.path": str(a["tokenizer_dir"]), "data.train_files": str(a["train_file"])}


def _cfg(out, assets, **extra):
    return tiny_run_config(out, **{**KEYS, **assets, **extra})


def _train(out, assets, **kw):
    import jax
    return loop.train(_cfg(out, assets), devices=jax.devices()[:1], **kw)


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """An uninterrupted 10-step run (full fine-tuning of the tiny preset, one device)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(out, assets)
    return out, _losses(out)


@pytest.mark.slow
def test_sigterm_sigkill_corrupt_checkpoint_then_resume_is_bit_identical(reference, assets, tmp_path, monkeypatch):
    """SIGTERM at a random step saves a checkpoint there; a resumed process SIGKILLed at a random later step
    loses only the steps after its last checkpoint; that latest checkpoint is then truncated (a full disk, a
    killed copy) and the last resume falls back to the previous one with a warning. The final run repeats
    the uninterrupted run's loss at every step exactly (float equality, not a tolerance)."""
    _, ref = reference
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    k_term, k_kill = rnd.randint(1, 4), rnd.randint(5, 8)
    run = tmp_path / "run"

    # 1. SIGTERM arrives while training (sent from the metrics writer, as `kill PID` would arrive mid-run)
    original = metrics_lib.MetricsWriter.write

    def write(self, step, scalars):
        original(self, step, scalars)
        if step == k_term and "train/loss" in scalars:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)
    with pytest.raises(loop.Interrupted, match=f"SIGTERM after optimizer step {k_term}; checkpoint saved"):
        _train(run, assets)
    monkeypatch.undo()
    assert (run / "checkpoints" / str(k_term)).is_dir(), f"seed {seed}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))

    # 2. a separate process resumes the run (automatically: the dir holds checkpoints) and is SIGKILLed
    script = ("import json, sys, jax; from easytune.train import loop; from tests.helpers import tiny_run_config; "
              "loop.train(tiny_run_config(sys.argv[1], **json.loads(sys.argv[2])), devices=jax.devices()[:1])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(run), json.dumps({**KEYS, **assets})], cwd=REPO,
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            if max(_losses(run), default=0) >= k_kill:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: {err.decode()[-2000:]}"
    killed_after = max(_losses(run))
    assert k_kill <= killed_after < 10, f"seed {seed}"

    # 3. truncate the array files of the newest complete checkpoint
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    latest, previous = steps[-1], steps[-2]
    damaged = [p for p in (run / "checkpoints" / str(latest) / "state").rglob("*")
               if p.is_file() and p.parent.name == "d"]
    assert damaged
    for p in damaged:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    # 4. resume to the end
    lines = []
    _train(run, assets, resume=True, log=lines.append)
    text = "\n".join(lines)
    assert f"checkpoints/{latest} is unreadable" in text and "falling back to the previous one" in text, text
    assert f"resumed from {run / 'checkpoints' / str(previous)} (optimizer step {previous}" in text
    assert (run / "checkpoints_corrupt" / str(latest)).is_dir()
    after = _losses(run)
    assert sorted(after) == list(range(1, 11))
    mismatched = {s: (after[s], ref[s]) for s in ref if after[s] != ref[s]}
    assert not mismatched, (f"seed {seed}, SIGTERM at {k_term}, SIGKILL after {killed_after}, corrupt "
                            f"{latest}: {mismatched}")


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_then_stop_the_run(assets, tmp_path, monkeypatch):
    """NaN in the loss at step 2 (skipped, training goes on), then at steps 5, 6, 7: the third in a row stops
    the run naming step 7, with step 4's checkpoint (the last before the streak) kept."""
    poisoned = {2, 5, 6, 7}  # 1-based optimizer steps
    original = batches_lib.window_batches

    def window_batches(seqs, plan, step, seed, part=slice(None)):
        micro = original(seqs, plan, step, seed, part)
        if step + 1 in poisoned:
            micro[0] = {**micro[0], "loss_mask": np.where(micro[0]["loss_mask"] > 0, np.nan, 0).astype(np.float32)}
        return micro

    monkeypatch.setattr(batches_lib, "window_batches", window_batches)
    run = tmp_path / "run"
    with pytest.raises(loop.NonFiniteError, match=r"optimizer step 7: 3 updates in a row.*\(step 4\) is kept"):
        import jax
        loop.train(_cfg(run, assets, **{"train.max_consecutive_nonfinite": 3}), devices=jax.devices()[:1])
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert np.isnan(rows[2]["train/loss"]) and np.isfinite(rows[3]["train/loss"])
    assert [rows[s]["skipped_updates"] for s in range(1, 8)] == [0, 1, 1, 1, 2, 3, 4]
    # step 2 and 6 fell inside non-finite streaks, so only step 4 was saved
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4]
