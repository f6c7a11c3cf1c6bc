"""Orbax checkpoints under ``<output_dir>/checkpoints/<step>``: train state + JSON metadata.

A checkpoint holds the :class:`~easytune.train.step.TrainState` (trainable variables, optimizer state, RNG,
micro-step) and a JSON dict (optimizer step, epoch, data position, config). A LoRA run's trainable
variables are only the LoRA weights (and ``modules_to_save``), so its checkpoints are small; the frozen base
is reloaded from ``model.path``. Orbax writes each step to a temporary directory and renames it when
complete, so a crash mid-save never leaves a half-written latest checkpoint. Restoring with target shardings
reshards onto the current mesh.

A checkpoint damaged afterwards (a truncated or missing file, a full disk, a bad copy) fails to restore;
:meth:`Checkpointer.restore_latest` then moves it aside to ``<output_dir>/checkpoints_corrupt/<step>`` with a
warning and falls back to the previous one.

:func:`resume_point` decides which checkpoint a run continues from: the newest, provided the run's config
differs from the checkpoint's only in :data:`RESUMABLE_CHANGES`.

References: orbax-checkpoint ``CheckpointManager`` with ``args.Composite(StandardSave, JsonSave)``.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from easytune import config as config_lib
from easytune import paths


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (state pytree + JSON metadata per step)."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
        self.directory = paths.run_path(directory)  # local (absolute) or gs://
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

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(s) for s in self.manager.all_steps())

    def quarantine(self, step: int, reason: str, log: Callable[[str], Any]) -> None:
        """Moves checkpoint ``step`` to ``<output_dir>/checkpoints_corrupt/<step>`` (kept for inspection) and
        logs a warning with ``reason``."""
        src = self.directory / str(step)
        dst = self.directory.parent / "checkpoints_corrupt" / str(step)
        if dst.exists():
            dst.rmtree()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if paths.is_remote(src):  # object storage has no directory rename: copy, then delete
            for f in src.rglob("*"):
                if f.is_file():
                    target = dst / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    f.copy(target)
            src.rmtree()
        else:
            shutil.move(str(src), str(dst))
        self.manager.reload()
        log(f"warning: checkpoint {src} is unreadable ({reason}); moved to {dst}, falling back to the previous one")

    def latest_meta(self, log: Callable[[str], Any]) -> tuple[int, dict] | None:
        """``(step, meta)`` of the newest checkpoint whose metadata reads; unreadable ones are quarantined."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.read_meta(step)
            except Exception as e:  # orbax/json raise many types for a damaged file
                self.quarantine(step, f"{type(e).__name__}: {str(e)[:200]}", log)
        return None

    def restore_latest(self, target: Any, log: Callable[[str], Any], max_step: int | None = None,
                       move_aside: bool = True):
        """Restores the newest checkpoint (at most ``max_step``) that reads completely.

        A checkpoint that fails (truncated or missing array files, bad metadata) is moved aside with
        :meth:`quarantine` (or, with ``move_aside=False``, for read-only callers such as export, only
        reported through ``log``) and the previous one is tried.

        Returns:
            ``(step, state, meta)``, or None when no checkpoint restores.
        """
        for step in reversed(self.all_steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                state, meta = self.restore(step, target)
                jax.block_until_ready(state)
                return step, state, meta
            except Exception as e:  # tensorstore/orbax/json errors of a damaged checkpoint
                reason = f"{type(e).__name__}: {str(e)[:200]}"
                if move_aside:
                    self.quarantine(step, reason, log)
                else:
                    log(f"warning: checkpoint {self.directory / str(step)} is unreadable ({reason}); "
                        f"using the previous one")
        return None

    def close(self) -> None:
        """Waits for pending saves, then closes the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


# Keys that may differ between a checkpoint's config and a resumed run: logging, intervals, where to save,
# the mesh and the processes (orbax reshards on restore) and the run length (the LR schedule then stretches,
# noted in the log).
# With data.builtin, the data and tokenizer paths are derived from the run dir (which may have moved).
RESUMABLE_CHANGES = ("train.max_steps", "train.num_epochs", "train.eval_steps", "train.save_steps",
                     "train.log_steps", "train.save_total_limit", "train.sample_max_new_tokens",
                     "train.output_dir", "train.evals_per_epoch", "train.early_stopping_patience",
                     "train.early_stopping_min_delta", "train.max_consecutive_nonfinite", "train.peak_tflops",
                     "optim.pretrain_learning_rate", "optim.pretrain_batch_tokens",
                     "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.expert", "mesh.replicated_warn_bytes",
                     # another device count needs another split of the same global batch
                     # (batches.check_data_position refuses a different global batch)
                     "train.micro_batch_size", "train.gradient_accumulation_steps",
                     # the same math computed another way (rematerialised, or the loss in chunks)
                     "model.remat", "train.loss_chunk_tokens", "model.attention", "model.attention_block",
                     # the same prepared data made another way (processes, batch size); bad_records /
                     # max_bad_fraction either give the same examples or stop the prepare with an error
                     "data.num_proc", "data.batch_records", "data.bad_records", "data.max_bad_fraction",
                     "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
                     "distributed.initialization_timeout", "distributed.auto")


def resume_point(ckpt: Checkpointer, config, resume: bool, log) -> int:
    """Newest checkpoint step to continue from (0: a fresh run).

    A run directory that holds checkpoints is resumed automatically (``--resume`` only makes it explicit);
    checkpoints whose metadata cannot be read are moved aside with a warning and the previous one is used.

    Raises:
      config.ConfigError: the config differs from the checkpoint's in a key outside
        :data:`RESUMABLE_CHANGES` (names each key with both values; another run lives in that directory).
    """
    found = ckpt.latest_meta(log)
    if found is None:
        if resume:
            log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
        return 0
    latest, meta = found
    saved = traverse_util.flatten_dict(meta["config"], sep=".")
    now = traverse_util.flatten_dict(config.to_dict(), sep=".")
    # an old checkpoint says remat false (now "none") and train_files "a,b" (now ["a", "b"])
    saved, now = config_lib.canonical_flat(saved), config_lib.canonical_flat(now)
    defaults = traverse_util.flatten_dict(config_lib.defaults().to_dict(), sep=".")
    for key in now:  # a key added to easytune after the checkpoint was written: it had the default then
        if key not in saved and key in defaults:
            saved[key] = defaults[key]
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    derived = ("data.train_files", "tokenizer.path", "data.format") if now.get("data.builtin") else ()
    refused = [k for k in diff if k not in RESUMABLE_CHANGES and k not in derived]
    if refused:
        raise config_lib.ConfigError(
            f"cannot resume the run in {ckpt.directory.parent} (checkpoint at step {latest}): the config differs "
            "from the checkpoint's in " + "; ".join(
                f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in refused) +
            "; choose another train.output_dir for a new run, or delete the directory")
    if not resume:
        log(f"{ckpt.directory} holds checkpoints (latest: step {latest}): resuming that run")
    if {"train.max_steps", "train.num_epochs"} & set(diff):
        log("note: the run length changed since the checkpoint, so the learning-rate schedule changes too")
    return latest
