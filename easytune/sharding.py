"""Device mesh, logical-axis rules and shardings: one code path from 1 CPU device to a TPU pod.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``,
``norm``); batches use ``batch`` and ``length``. :data:`RULES` maps them onto the mesh axes
``("data", "fsdp", "tensor")``. A dimension that a mesh axis does not divide stays unsharded on that axis,
and :func:`tree_shardings` reports it, so nothing is replicated silently.

References:
    flax ``nn.logical_to_mesh_sharding`` / ``LogicallyPartitioned`` (the same rule-table idea);
    JAX "Distributed arrays and automatic parallelization" (``jax.jit`` with ``NamedSharding``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None). One table for params, LoRA and activations.
RULES: dict[str, Any] = {
        "batch": ("data", "fsdp"),
        "length": None,
        "vocab": "tensor",
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "norm": None,
        "lora_rank": None,
        # NF4 kernels (easytune/quant.py): flat packed codes and per-block constants, split like the kernels
        "nf4_codes": ("fsdp", "tensor"),
        "nf4_blocks": ("fsdp", "tensor"),
}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Builds a ``Mesh`` with axes (data, fsdp, tensor) from ``mesh.data/fsdp/tensor`` (-1 = the rest).

    Args:
        mesh_cfg: object with int attributes ``data``, ``fsdp``, ``tensor`` (at most one -1).
        devices: devices to use (default ``jax.devices()``).

    Raises:
        ValueError: the sizes do not multiply to the device count; names the keys and the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices).reshape(mesh_sizes(mesh_cfg, len(devices))), MESH_AXES)


def mesh_sizes(mesh_cfg, n: int) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` from ``mesh.data/fsdp/tensor`` with a -1 entry resolved against ``n`` devices.

    Raises:
        ValueError: the sizes do not multiply to ``n``; names the keys and the device count.
    """
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by mesh.data*fsdp*tensor (without -1) = {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh: mesh.data={sizes[0]} x mesh.fsdp={sizes[1]} x mesh.tensor={sizes[2]} = "
                         f"{math.prod(sizes)} devices, but {n} are available")
    return tuple(sizes)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a global batch is split over (``data * fsdp``)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_to_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[str]]:
    """Logical axis names of one array -> ``PartitionSpec`` on ``mesh``, plus the reasons for any unsharded dim.

    A mesh axis is used at most once per array, and only where it divides the dimension.
    """
    spec, used, notes = [], set(), []
    for dim, name in zip(shape, axes):
        target = RULES.get(name) if name is not None else None
        if isinstance(target, str):
            target = (target,)
        chosen = []
        for ax in target or ():
            if ax in used or mesh.shape[ax] == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[ax]) == 0:
                chosen.append(ax)
            else:
                notes.append(f"dim {dim} ({name}) not divisible by mesh.{ax}={mesh.shape[ax]}")
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec), notes


def tree_shardings(tree, axes_tree, mesh: Mesh, report: list | None = None):
    """``NamedSharding`` for every leaf of ``tree`` from the matching logical axes in ``axes_tree``.

    Args:
        tree: pytree of arrays or ``jax.ShapeDtypeStruct``.
        axes_tree: same structure, leaves are tuples of logical axis names (``None`` = replicated).
        report: if given, ``(path, note)`` strings are appended for dims left unsharded.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes_leaves = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, leaf), axes in zip(flat, axes_leaves):
        spec, notes = logical_to_spec(tuple(axes or ()), tuple(leaf.shape), mesh)
        if report is not None:
            report.extend(f"{jax.tree_util.keystr(path)}: {n}" for n in notes)
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def lora_logical_axes(lora, param_axes):
    """Logical axes for a ``'lora'`` collection: ``lora_A`` [in, r] -> (kernel_in, lora_rank),
    ``lora_B`` [r, out] -> (lora_rank, kernel_out), from the adapted kernel's axes."""
    from flax import traverse_util
    pflat = traverse_util.flatten_dict(param_axes, is_leaf=lambda k, v: isinstance(v, tuple))
    out = {}
    for key in traverse_util.flatten_dict(lora):
        k_in, k_out = pflat[key[:-1] + ("kernel",)]
        out[key] = (k_in, "lora_rank") if key[-1] == "lora_A" else ("lora_rank", k_out)
    return traverse_util.unflatten_dict(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[B, T]`` batch array: batch over (data, fsdp), length unsharded."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host numpy ``[B, T]`` arrays -> global arrays sharded over the batch axis.

    Uses ``jax.make_array_from_process_local_data`` so the same call serves several hosts (each passing
    its own slice) and one host (passing the whole batch).
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
