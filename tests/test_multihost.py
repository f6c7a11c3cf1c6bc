"""Multi-host on one machine: 2 processes x 4 CPU devices (JAX's distributed runtime, gloo collectives,
coordinator on 127.0.0.1) train exactly as 1 process x 8 devices; their checkpoint resumes on 1 x 8 and on
1 x 1; a process that cannot reach its coordinator fails fast with a clear message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from easytune import config as config_lib
from easytune import sharding as sharding_lib
from easytune.train import loop
from tests.helpers import REPO, tiny_run_config

STEPS = 4
OVERRIDES = {"train.max_steps": STEPS, "train.save_steps": 2, "train.sample_max_new_tokens": 4,
             "train.micro_batch_size": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO))
    env.pop("EASYTUNE_COORDINATOR_ADDRESS", None)
    return env


def _cli_args(out, port: int, pid: int) -> list[str]:
    args = [sys.executable, "-m", "easytune.cli", "train", str(REPO / "configs" / "quickstart.py"),
            "--config.model.preset=tiny", "--config.data.val_set_size=16", "--config.train.log_steps=1",
            f"--config.train.output_dir={out}", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
            "--config.distributed.initialization_timeout=120"]
    return args + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _rows(run) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["step"], {}).update(r)
    return rows


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The quickstart (tiny preset) trained by 2 local processes of 4 CPU devices each."""
    out = tmp_path_factory.mktemp("multihost") / "run"
    port = _free_port()
    procs = [subprocess.Popen(_cli_args(out, port, pid), cwd=REPO, env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process run did not finish in 420 s")
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{log[-4000:]}"
    return out, logs


@pytest.mark.slow
def test_two_processes_equal_one_process_and_resume_on_other_topologies(two_process_run, tmp_path):
    out, logs = two_process_run
    # only process 0 logs (its stdout has the run's lines; process 1's has none of them)
    assert "optimizer steps" in logs[0] and "run directory" in logs[0]
    assert "optimizer steps" not in logs[1] and "run directory" not in logs[1]
    assert (out / "summary.json").is_file() and (out / "checkpoints" / str(STEPS)).is_dir()
    two = _rows(out)

    # 1 process x 8 devices, same config
    ref_dir = tmp_path / "one_process"
    loop.train(tiny_run_config(ref_dir, **OVERRIDES), log=lambda *a: None)
    one = _rows(ref_dir)
    assert sorted(two) == sorted(one) == list(range(STEPS + 1))
    for s in range(1, STEPS + 1):
        np.testing.assert_allclose(two[s]["train/loss"], one[s]["train/loss"], atol=1e-5, rtol=0,
                                   err_msg=f"step {s}")
    np.testing.assert_allclose(two[STEPS]["eval/loss"], one[STEPS]["eval/loss"], atol=1e-5, rtol=0)

    # the 2 x 4 checkpoint at step 2 resumes on 1 x 8 and on 1 x 1 (resharded) with the same next losses
    for name, devices in (("resume_1x8", jax.devices()), ("resume_1x1", jax.devices()[:1])):
        run = tmp_path / name
        shutil.copytree(out, run)
        shutil.rmtree(run / "checkpoints" / str(STEPS))
        shutil.rmtree(run / "best", ignore_errors=True)
        cfg = tiny_run_config(run, **OVERRIDES)
        cfg.train.micro_batch_size = 8 // len(devices)  # the same global batch of 8 sequences
        lines: list[str] = []
        loop.train(cfg, devices=devices, log=lines.append)
        assert any("resumed from" in line and "optimizer step 2" in line for line in lines), lines[:20]
        got = _rows(run)
        for s in (3, 4):
            np.testing.assert_allclose(got[s]["train/loss"], two[s]["train/loss"], atol=1e-5, rtol=0,
                                       err_msg=f"{name} step {s}")


@pytest.mark.slow
def test_unreachable_coordinator_fails_within_the_timeout_with_a_clear_message(tmp_path):
    port = _free_port()  # nothing listens there
    args = _cli_args(tmp_path / "run", port, 1)[:-len(OVERRIDES)] + ["--config.distributed.initialization_timeout=3"]
    t0 = time.time()
    p = subprocess.run(args, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert time.time() - t0 < 60
    assert f"could not connect to coordinator 127.0.0.1:{port} as process 1 of 2 within 3 s" in p.stderr


@pytest.mark.slow
def test_processes_with_different_configs_are_refused(tmp_path):
    """Two processes whose configs differ (another learning rate on process 1) both stop with one clear error
    before any data or model work, instead of training on silently with mixed settings."""
    port = _free_port()
    out = tmp_path / "run"
    procs = [subprocess.Popen(_cli_args(out, port, pid) + ([f"--config.optim.learning_rate={0.5}"] if pid else []),
                              cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 2, log[-3000:]
        assert "the processes were started with different configs: process(es) [1] differ from process 0" in log
    assert not (out / "checkpoints").exists()


def test_distributed_settings_from_config_and_env(monkeypatch):
    for k in ("EASYTUNE_COORDINATOR_ADDRESS", "EASYTUNE_NUM_PROCESSES", "EASYTUNE_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_ACCELERATOR_TYPE",
              "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sharding_lib, "_on_tpu_vm", lambda: False)
    d = config_lib.defaults().distributed
    assert sharding_lib.distributed_settings(d) is None  # a single process: nothing to start
    monkeypatch.setenv("EASYTUNE_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    monkeypatch.setenv("EASYTUNE_NUM_PROCESSES", "4")
    monkeypatch.setenv("EASYTUNE_PROCESS_ID", "3")
    assert sharding_lib.distributed_settings(d) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                                    "process_id": 3}
    d.process_id = 1  # a config key wins over the environment
    assert sharding_lib.distributed_settings(d)["process_id"] == 1
    d.process_id = 7
    with pytest.raises(ValueError, match=r"distributed.process_id=7 must be in \[0, EASYTUNE_NUM_PROCESSES=4\)"):
        sharding_lib.distributed_settings(d)
    monkeypatch.delenv("EASYTUNE_NUM_PROCESSES")
    d.process_id = -1
    with pytest.raises(ValueError, match="distributed.num_processes not set"):
        sharding_lib.distributed_settings(d)
    monkeypatch.setenv("EASYTUNE_NUM_PROCESSES", "2")
    for bad in ("10.0.0.2", "10.0.0.2:notaport", "10.0.0.2:99999", ":8476"):
        monkeypatch.setenv("EASYTUNE_COORDINATOR_ADDRESS", bad)
        with pytest.raises(ValueError, match="expected HOST:PORT with a port in 1..65535"):
            sharding_lib.distributed_settings(d)
    monkeypatch.setenv("EASYTUNE_COORDINATOR_ADDRESS", "10.0.0.2:8476")
    monkeypatch.setenv("EASYTUNE_PROCESS_ID", "abc")  # the bad variable is the one named
    with pytest.raises(ValueError, match="EASYTUNE_PROCESS_ID='abc': not an integer"):
        sharding_lib.distributed_settings(d)
    for k in ("EASYTUNE_COORDINATOR_ADDRESS", "EASYTUNE_NUM_PROCESSES", "EASYTUNE_PROCESS_ID"):
        monkeypatch.delenv(k)
    monkeypatch.setattr(sharding_lib, "_on_tpu_vm", lambda: True)
    monkeypatch.setattr(sharding_lib, "_detected_process_count", lambda: 4)
    assert sharding_lib.distributed_settings(d) == {}  # a TPU pod slice: JAX reads the pod's metadata itself
    monkeypatch.setattr(sharding_lib, "_detected_process_count", lambda: 1)
    assert sharding_lib.distributed_settings(d) is None  # one host (or Colab): nothing to start
    monkeypatch.setattr(sharding_lib, "_detected_process_count", lambda: 4)
    d.auto = False
    assert sharding_lib.distributed_settings(d) is None
