"""Run metrics: ``metrics.jsonl`` (one JSON line per logged step) and TensorBoard scalars.

TensorBoard event files are written with the ``tensorboard`` package's own ``EventFileWriter`` and
``scalar_pb`` (no TensorFlow needed); ``tensorboard --logdir RUN_DIR/tensorboard`` shows them.

Model FLOPs utilization (MFU, PaLM paper, Chowdhery et al. 2022, appendix B): FLOPs the train step needs, from
XLA's cost analysis of the compiled step (per device, times the devices), divided by the time taken and by
the devices' peak FLOP/s. Peaks are published dense bf16 figures per device for TPUs and GPUs; on CPU the
peak is measured once per process with a float32 matmul (all simulated CPU devices share that host).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp

from easytune import paths

# TensorBoard's writer uses TensorFlow's file layer whenever TensorFlow is importable (Colab preinstalls it,
# and TensorFlow then competes with JAX for the TPU). Its own switch, a module named
# ``tensorboard.compat.notf``, makes it use the TensorFlow-free stub (local files, fsspec for gs://).
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.plugins.scalar.summary_v2 import scalar_pb  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402


class MetricsWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and writes the same scalars to TensorBoard.

    Scalar names use TensorBoard's ``group/name`` form: ``train/loss``, ``eval/loss``, ``learning_rate``,
    ``grad_norm``, ``tokens_per_second``.
    """

    def __init__(self, run_dir: str | pathlib.Path, enabled: bool = True, keep_up_to_step: int = 0):
        """Opens the logs; lines of ``metrics.jsonl`` past ``keep_up_to_step`` (left by a run that went on
        after the checkpoint being resumed) are dropped, so each step appears once. ``run_dir`` may be a
        ``gs://`` URI (:mod:`easytune.paths`)."""
        self.enabled = enabled
        run_dir = paths.run_path(run_dir)
        if enabled:
            self.path = run_dir / "metrics.jsonl"
            old = (self.path.read_text(encoding="utf-8").splitlines()
                   if keep_up_to_step and self.path.exists() else [])
            kept = [line for line in old if line.strip() and json.loads(line)["step"] <= keep_up_to_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.tb = EventFileWriter(os.fspath(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Logs ``scalars`` at optimizer step ``step`` (written at once, so a killed run keeps its log)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        paths.append_text(self.path, json.dumps({"step": int(step), **clean}) + "\n")
        now = time.time()
        for name, value in clean.items():
            event = event_pb2.Event(wall_time=now, step=int(step), summary=scalar_pb(name, value))
            self.tb.add_event(event)
        self.tb.flush()

    def close(self) -> None:
        """Closes the TensorBoard event file (``metrics.jsonl`` is appended line by line)."""
        if self.enabled:
            self.tb.close()


# Dense bf16 peak FLOP/s per JAX device, from the vendors' data sheets. TPU v2/v3 expose one device per
# TensorCore (half a chip); v4 and later one per chip (megacore). Matched as substrings of device_kind,
# most specific first.
PEAK_FLOPS = (
        ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
        ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 61.5e12), ("TPU v2", 22.5e12),
        ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10G", 70e12),
)

_CPU_PEAK: list[float] = []


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Host float32 matmul throughput in FLOP/s (``2 n^3`` per ``[n, n] @ [n, n]``), best of ``repeats``;
    measured once per process and cached."""
    if _CPU_PEAK:
        return _CPU_PEAK[0]
    dev = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _CPU_PEAK.append(2.0 * n ** 3 / best)
    return _CPU_PEAK[0]


def peak_flops(devices, override_tflops: float = 0.0) -> tuple[float, str]:
    """``(peak FLOP/s of all `devices` together, where the figure comes from)``.

    ``override_tflops`` > 0 (``train.peak_tflops``) is per device. CPU: :func:`measure_cpu_peak_flops` (the
    host, shared by simulated devices). Unknown accelerators: ``(nan, 'unknown ...')``.
    """
    devices = list(devices)
    if override_tflops > 0:
        return override_tflops * 1e12 * len(devices), f"train.peak_tflops={override_tflops} per device"
    d = devices[0]
    if d.platform == "cpu":
        return measure_cpu_peak_flops(), "measured float32 matmul on this host"
    for key, value in PEAK_FLOPS:
        if key.lower() in d.device_kind.lower():
            return value * len(devices), f"published bf16 peak of {d.device_kind} ({value / 1e12:g} TFLOP/s)"
    return float("nan"), f"unknown device {d.device_kind!r}: set train.peak_tflops for MFU"


def compiled_flops(compiled, num_devices: int) -> float:
    """FLOPs of one call of a compiled (``jax.jit(...).lower(...).compile()``) function over all devices:
    XLA's ``cost_analysis()['flops']`` is per device (the SPMD partition), so it is multiplied by
    ``num_devices``. NaN when the backend reports no cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) * num_devices if flops else float("nan")
