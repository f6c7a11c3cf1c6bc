"""Orbax checkpoints under ``<output_dir>/checkpoints/<step>``: train state + JSON metadata.

A checkpoint holds the :class:`~easytune.train.step.TrainState` (trainable variables, optimizer state, RNG,
micro-step) and a JSON dict (optimizer step, epoch, data position, config). A LoRA run's trainable
variables are only the LoRA weights (and ``modules_to_save``), so its checkpoints are small; the frozen base
is reloaded from ``model.path``. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save never leaves a half-written latest checkpoint. Restoring with target shardings
reshards onto the current mesh.

References: orbax-checkpoint ``CheckpointManager`` with ``args.Composite(StandardSave, JsonSave)``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (state pytree + JSON metadata per step)."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
                item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Latest complete checkpoint's optimizer step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Saves ``state`` (pytree of arrays) and ``meta`` (JSON-serialisable) at ``step``; waits until durable."""
        self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restores ``(state, meta)`` at ``step`` onto the shapes, dtypes and shardings of ``target``.

        Args:
            target: pytree of arrays (or ``jax.ShapeDtypeStruct`` with ``sharding``) of the state's structure.
        """
        abstract = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
        out = self.manager.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step`` alone (no arrays are read)."""
        return self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
