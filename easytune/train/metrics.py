"""Run metrics: ``metrics.jsonl`` (one JSON line per logged step) and TensorBoard scalars.

TensorBoard event files are written with the ``tensorboard`` package's own ``EventFileWriter`` and
``scalar_pb`` (no TensorFlow needed); ``tensorboard --logdir RUN_DIR/tensorboard`` shows them.
"""

from __future__ import annotations

import json
import pathlib
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
    """Appends ``{"step": s, **scalars}`` to ``metrics.jsonl`` and writes the same scalars to TensorBoard.

    Scalar names use TensorBoard's ``group/name`` form: ``train/loss``, ``eval/loss``, ``learning_rate``,
    ``grad_norm``, ``tokens_per_second``.
    """

    def __init__(self, run_dir: str | pathlib.Path, enabled: bool = True, keep_up_to_step: int = 0):
        """Opens the logs; lines of ``metrics.jsonl`` past ``keep_up_to_step`` (left by a run that went on
        after the checkpoint being resumed) are dropped, so each step appears once."""
        self.enabled = enabled
        run_dir = pathlib.Path(run_dir)
        if enabled:
            path = run_dir / "metrics.jsonl"
            old = path.read_text(encoding="utf-8").splitlines() if path.is_file() and keep_up_to_step else []
            kept = [line for line in old if line.strip() and json.loads(line)["step"] <= keep_up_to_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.jsonl = open(path, "a", encoding="utf-8")
            self.tb = EventFileWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Logs ``scalars`` at optimizer step ``step`` (flushed at once, so a killed run keeps its log)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items()}
        self.jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self.jsonl.flush()
        now = time.time()
        for name, value in clean.items():
            event = event_pb2.Event(wall_time=now, step=int(step), summary=scalar_pb(name, value))
            self.tb.add_event(event)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
