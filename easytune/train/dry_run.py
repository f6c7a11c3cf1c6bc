"""``easytune train CONFIG --dry-run``: what a run would place where, without training.

Prints the mesh, every array's ``PartitionSpec`` and bytes per device (trainable parameters, frozen base,
optimizer state), the parameters left unsharded and why, and the compiled train step's per-device memory
(XLA ``memory_analysis()``: arguments, outputs, temporaries), so a user sees before a long run whether the
plan fits and whether anything is silently replicated.
"""

from __future__ import annotations

import jax

from easytune import sharding as sharding_lib


def _shardings(tree):
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def report(setup, state, lowered, plan, log=print) -> dict:
    """Logs the dry-run tables and returns their totals.

    Args:
        setup: :class:`easytune.train.setup.Setup` (params already placed with their shardings).
        state: the fresh :class:`~easytune.train.step.TrainState` (optimizer state placed like the params).
        lowered: ``jax.jit(train_step).lower(...)`` of one micro-step; compiled here for its memory analysis.
        plan: the :class:`~easytune.train.batches.Plan` (printed already by the caller).

    Returns:
        ``{"dry_run": True, "mesh": {...}, "devices": n, "trainable_bytes", "frozen_bytes", "optimizer_bytes"
        (totals, bytes), "per_device_bytes" (params + optimizer state on one device), "compiled": {...}
        (bytes per device from ``memory_analysis()``, absent where the backend gives none), "unsharded": [...]}``.
    """
    mesh = setup.mesh
    log(f"dry run: mesh {dict(mesh.shape)} over {mesh.size} devices "
        f"({jax.process_count()} process{'es' if jax.process_count() > 1 else ''}); global batch "
        f"{plan.global_batch} sequences = {plan.micro_rows} per micro-step split over "
        f"{sharding_lib.data_parallel_size(mesh)} data-parallel devices x {plan.accum} micro-steps")
    out = {"dry_run": True, "mesh": dict(mesh.shape), "devices": mesh.size, "unsharded": list(setup.sharding_notes)}
    per_device = 0
    for name, tree in (("trainable", setup.trainable), ("frozen", setup.frozen), ("optimizer", state.opt_state)):
        if not jax.tree_util.tree_leaves(tree):
            out[f"{name}_bytes"] = 0
            continue
        lines, total, dev = sharding_lib.sharding_table(tree, _shardings(tree), name)
        for line in (lines[:1] if name == "optimizer" else lines):  # its arrays follow the params': a summary
            log(line)
        out[f"{name}_bytes"] = total
        per_device += dev
    out["per_device_bytes"] = per_device
    log(f"parameters + optimizer state: {sharding_lib.fmt_bytes(per_device)} per device")
    if setup.sharding_notes:
        log(f"warning: {len(setup.sharding_notes)} arrays of at least mesh.replicated_warn_bytes are not sharded "
            "on every mesh axis:")
        for note in setup.sharding_notes:
            log(f"  {note}")
    else:
        log("every array of at least mesh.replicated_warn_bytes is sharded over the mesh's fsdp/tensor axes "
            "(or the mesh has none)")
    mem = lowered.compile().memory_analysis()
    if mem is not None:
        compiled = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
                    if hasattr(mem, f"{k}_size_in_bytes")}
        out["compiled"] = compiled
        log("compiled train step, per device: " + ", ".join(
            f"{k} {sharding_lib.fmt_bytes(v)}" for k, v in compiled.items())
            + " (XLA memory_analysis; temp = activations and workspace)")
    log("dry run: nothing was trained or saved")
    return out


__all__ = ["report"]
