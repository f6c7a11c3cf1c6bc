"""launch/tpu.py (gcloud command lines, --dry-run only, no network) and tpu_setup/check.py on CPU.

Expected argument lists are transcribed from the Cloud SDK reference pages
(gcloud compute tpus tpu-vm create/scp/ssh/stop/delete, gcloud compute tpus queued-resources create/delete).
"""

import os
import shlex
import subprocess
import sys

import pytest

from launch import tpu

from .conftest import REPO

LOC = ["--zone=us-central2-b", "--project=my-proj"]
BASE = ["--zone", "us-central2-b", "--project", "my-proj", "--dry-run"]


def dry(capsys, *argv):
    """Run launch.tpu.main in --dry-run; return the printed commands as argument lists."""
    assert tpu.main([*argv, *BASE]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines()]


@pytest.mark.parametrize("accel,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5p-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create(capsys, accel, version):
    assert dry(capsys, "create", "my-tpu", "--accelerator-type", accel, "--spot") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *LOC,
         f"--accelerator-type={accel}", f"--version={version}", "--spot"]]


def test_create_queued_and_explicit_version(capsys):
    assert dry(capsys, "create", "pod", "--accelerator-type", "v4-32", "--queued", "--version", "v2-alpha-tpuv4") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "pod", "--node-id=pod", *LOC,
         "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv4"]]


def test_copy_setup_train_logs_stop_delete(capsys):
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *LOC]
    assert dry(capsys, "copy", "my-tpu", "--src", "/src/easytune") == [
        [*ssh, "--worker=all", "--command=rm -rf easytune"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "/src/easytune", "my-tpu:~/easytune",
         *LOC, "--worker=all"]]
    assert dry(capsys, "copy", "my-tpu", "--git", "https://example.org/easytune.git") == [
        [*ssh, "--worker=all",
         "--command=rm -rf easytune && git clone --depth=1 https://example.org/easytune.git easytune"]]
    assert dry(capsys, "setup", "my-tpu") == [
        [*ssh, "--worker=all", "--command=cd easytune && bash tpu_setup/setup.sh"]]
    assert dry(capsys, "train", "my-tpu", "configs/a.yaml", "--config.output_dir=gs://bkt/run 1") == [
        [*ssh, "--worker=all",
         "--command=cd easytune && PATH=\"$HOME/.local/bin:$PATH\" nohup easytune train configs/a.yaml "
         "'--config.output_dir=gs://bkt/run 1' > ~/easytune-train.log 2>&1 < /dev/null &"]]
    assert dry(capsys, "logs", "my-tpu") == [
        [*ssh, "--worker=0", "--command=tail -n 200 -f ~/easytune-train.log"]]
    assert dry(capsys, "stop", "my-tpu") == [["gcloud", "compute", "tpus", "tpu-vm", "stop", "my-tpu", *LOC]]
    assert dry(capsys, "delete", "my-tpu") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOC, "--quiet"]]
    assert dry(capsys, "delete", "my-tpu", "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu", *LOC, "--force", "--quiet"]]


@pytest.mark.parametrize("argv,needle", [
    (["create", "my-tpu", "--accelerator-type", "v9-8"], "unknown TPU accelerator type 'v9-8'"),
    (["create", "--accelerator-type", "v4-8"], "required: NAME"),
    (["create", "My_TPU", "--accelerator-type", "v4-8"], "not a valid TPU name"),
    (["train", "my-tpu", "c.yaml", "--lr=1"], "overrides look like --config.KEY=VALUE"),
])
def test_bad_input_one_line(capsys, argv, needle):
    try:
        rc = tpu.main([*argv, "--zone", "z", "--dry-run"])
    except SystemExit as e:   # argparse errors (missing NAME) exit directly
        rc = e.code
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("launch/tpu.py: error:") and needle in err, err


def test_cli_entry_points():
    """Both `python launch/tpu.py` and `python -m launch.tpu` run."""
    for argv in (["launch/tpu.py"], ["-m", "launch.tpu"]):
        r = subprocess.run([sys.executable, *argv, "stop", "t", "--zone", "z", "--dry-run"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "gcloud compute tpus tpu-vm stop t --zone=z\n"


def test_check_py_on_cpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    r = subprocess.run([sys.executable, "tpu_setup/check.py"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "process 0 of 1" in r.stdout and "device kind: cpu" in r.stdout
    assert "psum of 1.0 over all devices: 4 (expected 4)" in r.stdout
