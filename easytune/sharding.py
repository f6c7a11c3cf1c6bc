"""Device mesh, logical-axis rules and shardings: one code path from 1 CPU device to a TPU pod.

Every parameter carries logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ``kv_heads``,
``norm``, ``expert``); batches use ``batch`` and ``length``. :data:`RULES` maps them onto the mesh axes
``("data", "fsdp", "expert", "tensor")``. A dimension that a mesh axis does not divide stays unsharded on that
axis, and :func:`tree_shardings` reports it, so nothing is replicated silently.

The ``expert`` axis (``mesh.expert``, expert parallelism) splits the stacked weights of a mixture-of-experts MLP
(``[X, D, F]``, logical axes ``("expert", "embed", "mlp")``) along their leading X, and, like ``data`` and
``fsdp``, the batch: with ``mesh.expert=8`` on 8 devices each device holds X/8 experts and 1/8 of the batch rows;
XLA's SPMD partitioner inserts the collectives between them. Every other parameter is replicated over it (as
over ``data``). A ``mesh.expert`` that does not divide X is an error (:func:`check_expert_axis`), not a silent
replication.

References:
    flax ``nn.logical_to_mesh_sharding`` / ``LogicallyPartitioned`` (the same rule-table idea);
    JAX "Distributed arrays and automatic parallelization" (``jax.jit`` with ``NamedSharding``).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# the mesh axes a global batch is split over (data-parallel in the wide sense), in mesh order
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axis (or tuple of mesh axes, or None). One table for params, LoRA and activations.
RULES: dict[str, Any] = {
        "batch": BATCH_AXES,
        "length": None,
        "vocab": "tensor",
        "embed": "fsdp",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "norm": None,
        "act_embed": None,  # the hidden size of activations [B, T, D]: whole on each device (FSDP)
        "lora_rank": None,
        "layers": None,  # the leading [L] axis of stacked decoder layers (model.scan_layers)
        "expert": "expert",  # the leading [X] axis of stacked expert weights [X, D, F] / [X, F, D]
        # NF4 kernels (easytune/quant.py): flat packed codes and per-block constants, split like the kernels
        "nf4_codes": ("fsdp", "tensor"),
        "nf4_blocks": ("fsdp", "tensor"),
}


# The mesh that activation constraints refer to while a step is traced (see ``activation_mesh``).
_ACTIVATION_MESH: list[Mesh] = []


class activation_mesh:
    """``with activation_mesh(mesh):`` while tracing a step, :func:`constrain` pins activations to ``mesh``.

    Without activation constraints, XLA's SPMD partitioner may resolve the conflict between FSDP-sharded
    weights (``embed`` over ``fsdp``) and the batch (over ``data``, ``fsdp``) by all-gathering the
    *activations*, so every device computes the whole global batch (measured with bench/collectives.py:
    [B, T, D] all-gathers in every layer). Pinning the hidden states to the batch sharding makes it gather the
    weights instead and reduce-scatter their gradients: ZeRO-3 / FSDP.
    """

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    def __enter__(self):
        _ACTIVATION_MESH.append(self.mesh)

    def __exit__(self, *exc):
        _ACTIVATION_MESH.pop()
        return False


def current_mesh() -> Mesh | None:
    """The mesh set by the innermost :class:`activation_mesh` (None outside one, or for a one-device mesh)."""
    mesh = _ACTIVATION_MESH[-1] if _ACTIVATION_MESH else None
    return None if mesh is None or mesh.size == 1 else mesh


def constrain(x, axes: tuple):
    """``jax.lax.with_sharding_constraint`` of ``x`` to its logical ``axes`` (:data:`RULES`) on the mesh set by
    :class:`activation_mesh`; ``x`` unchanged outside one (a model applied without a mesh)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec, _ = logical_to_spec(axes, tuple(x.shape), mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


class MeshSizes(NamedTuple):
    """Resolved sizes of the mesh axes, in :data:`MESH_AXES` order (a tuple: ``Mesh`` reshapes by it)."""
    data: int
    fsdp: int
    expert: int
    tensor: int


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Builds a ``Mesh`` with axes :data:`MESH_AXES` (data, fsdp, expert, tensor) from ``mesh.data/fsdp/expert/
    tensor`` (-1 = the rest). Devices are laid out in order, ``tensor`` fastest-varying (neighbouring devices).

    Args:
        mesh_cfg: object with int attributes ``data``, ``fsdp``, ``tensor`` and optionally ``expert`` (default 1),
            at most one of them -1.
        devices: devices to use (default ``jax.devices()``).

    Raises:
        ValueError: the sizes do not multiply to the device count; names the keys and the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devices).reshape(mesh_sizes(mesh_cfg, len(devices))), MESH_AXES)


def mesh_sizes(mesh_cfg, n: int) -> MeshSizes:
    """:class:`MeshSizes` ``(data, fsdp, expert, tensor)`` from ``mesh.data/fsdp/expert/tensor`` with a -1 entry
    resolved against ``n`` devices. A ``mesh_cfg`` without ``expert`` (an older run's config, a hand-made
    object) has ``expert=1``.

    Raises:
        ValueError: the sizes do not multiply to ``n``; names the keys and the device count.
    """
    sizes = [int(getattr(mesh_cfg, ax, 1)) for ax in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh: {n} devices are not divisible by mesh.data*fsdp*expert*tensor (without -1) = "
                             f"{known}")
        sizes[sizes.index(-1)] = n // known
    out = MeshSizes(*sizes)
    if math.prod(sizes) != n:
        expert = f" x mesh.expert={out.expert}" if out.expert != 1 else ""
        raise ValueError(f"mesh: mesh.data={out.data} x mesh.fsdp={out.fsdp} x mesh.tensor={out.tensor}{expert} = "
                         f"{math.prod(sizes)} devices, but {n} are available")
    return out


def _axis_size(mesh: Mesh, axis: str) -> int:
    """Size of ``axis`` in ``mesh``; 1 for an axis the mesh lacks (a hand-built ``("data", "fsdp", "tensor")``)."""
    return mesh.shape.get(axis, 1)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The :data:`BATCH_AXES` ``mesh`` has."""
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a global batch is split over (``data * fsdp * expert``)."""
    return math.prod(_axis_size(mesh, a) for a in BATCH_AXES)


def check_expert_axis(expert: int, num_experts: int) -> None:
    """Checks that ``mesh.expert`` devices can split ``num_experts`` experts evenly (a dense model, 0 experts,
    takes any ``mesh.expert``: the axis then only splits the batch).

    Args:
        expert: the resolved ``mesh.expert`` (a ``Mesh``'s ``shape["expert"]`` or ``MeshSizes.expert``).
        num_experts: X, routed experts per sparse MLP (``ModelConfig.num_experts``).

    Raises:
        ValueError: ``num_experts > 0`` and ``expert`` does not divide it; names ``mesh.expert`` and
            ``num_experts``.
    """
    if num_experts and num_experts % expert:
        raise ValueError(f"mesh.expert={expert} does not divide num_experts={num_experts}: each device of the expert "
                         f"axis holds num_experts / mesh.expert experts; choose a mesh.expert that divides "
                         f"{num_experts}")


def logical_to_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[str]]:
    """Logical axis names of one array -> ``PartitionSpec`` on ``mesh``, plus the reasons for any unsharded dim.

    A mesh axis is used at most once per array, and only where it divides the dimension; mesh axes ``mesh``
    lacks count as size 1.

    Raises:
        ValueError: the dimension of logical axis ``"expert"`` (X experts) is not divisible by the mesh's
            ``expert`` axis (:func:`check_expert_axis`: names ``mesh.expert`` and ``num_experts``).
    """
    spec, used, notes = [], set(), []
    for dim, name in zip(shape, axes):
        target = RULES.get(name) if name is not None else None
        if isinstance(target, str):
            target = (target,)
        if name == "expert":
            check_expert_axis(_axis_size(mesh, "expert"), dim)
        chosen = []
        for ax in target or ():
            if ax in used or _axis_size(mesh, ax) == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[ax]) == 0:
                chosen.append(ax)
            else:
                notes.append(f"dim {dim} ({name}) not divisible by mesh.{ax}={mesh.shape[ax]}")
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec), notes


def tree_shardings(tree, axes_tree, mesh: Mesh, report: list | None = None, warn_bytes: int = 1 << 20):
    """``NamedSharding`` for every leaf of ``tree`` from the matching logical axes in ``axes_tree``.

    No silent replication: every leaf of at least ``warn_bytes`` bytes that ends up unsharded on a mesh axis
    of size > 1 gets a ``report`` line saying which and why (a dimension the axis does not divide, or no
    logical axis of the leaf maps to it).

    Args:
        tree: pytree of arrays or ``jax.ShapeDtypeStruct``.
        axes_tree: same structure, leaves are tuples of logical axis names (``None`` = replicated).
        report: if given, ``"path: reason"`` strings are appended (see above).
        warn_bytes: size threshold of the replication report, bytes.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    axes_leaves = treedef.flatten_up_to(axes_tree)
    out = []
    for (path, leaf), axes in zip(flat, axes_leaves):
        spec, notes = logical_to_spec(tuple(axes or ()), tuple(leaf.shape), mesh)
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if report is not None and nbytes >= warn_bytes:
            used = {a for part in spec if part for a in ((part,) if isinstance(part, str) else part)}
            idle = [a for a in ("fsdp", "tensor") if _axis_size(mesh, a) > 1 and a not in used]
            if notes:
                report.extend(f"{jax.tree_util.keystr(path)} ({fmt_bytes(nbytes)}): {n}" for n in notes)
            elif idle and not used:
                report.append(f"{jax.tree_util.keystr(path)} ({fmt_bytes(nbytes)}): replicated, its logical axes "
                              f"{tuple(axes or ())} map to no mesh axis")
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def per_device_bytes(leaf, sharding: NamedSharding) -> int:
    """Bytes of one device's shard of ``leaf`` (array or ``ShapeDtypeStruct``) under ``sharding``."""
    shard = sharding.shard_shape(tuple(leaf.shape))
    return math.prod(shard) * np.dtype(leaf.dtype).itemsize


def sharding_table(tree, shardings, title: str) -> tuple[list[str], int, int]:
    """Lines ``path  shape  dtype  PartitionSpec  bytes per device`` for every leaf, for ``--dry-run``.

    Returns:
        ``(lines, total bytes, bytes per device)``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    shs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    rows, total, dev = [], 0, 0
    for (path, leaf), sh in zip(flat, shs):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        per = per_device_bytes(leaf, sh)
        total, dev = total + nbytes, dev + per
        rows.append((jax.tree_util.keystr(path), "x".join(map(str, leaf.shape)) or "scalar", str(np.dtype(leaf.dtype)),
                     str(tuple(sh.spec)), fmt_bytes(per)))
    head = ("parameter", "shape", "dtype", "spec", "per device")
    widths = [max([len(r[i]) for r in rows] + [len(h)]) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [f"{title}: {len(rows)} arrays, {fmt_bytes(total)} in all, {fmt_bytes(dev)} per device",
             "  " + fmt(head)] + ["  " + fmt(r) for r in rows]
    return lines, total, dev


def lora_logical_axes(lora, param_axes):
    """Logical axes for a ``'lora'`` collection: ``lora_A`` [in, r] -> (kernel_in, lora_rank),
    ``lora_B`` [r, out] -> (lora_rank, kernel_out), from the adapted kernel's axes; expert LoRA
    (``experts/gate_up_proj``, ``experts/down_proj``) ``lora_A [X, in, r]`` -> (expert, in, lora_rank), ``lora_B
    [X, r, out]`` -> (expert, lora_rank, out), from ``gate_proj`` / ``down_proj``'s axes."""
    from flax import traverse_util
    pflat = traverse_util.flatten_dict(param_axes, is_leaf=lambda k, v: isinstance(v, tuple))
    out = {}
    for key in traverse_util.flatten_dict(lora):
        mod = key[:-1]
        if mod + ("kernel",) not in pflat:  # expert LoRA of experts/gate_up_proj or experts/down_proj: [X, in, r] /
            # [X, r, out], the stacked experts' axes (gate_up_proj's out is gate_proj's mlp axis, doubled)
            x_ax, k_in, k_out = pflat[mod[:-1] + ("down_proj" if mod[-1] == "down_proj" else "gate_proj",)]
            out[key] = (x_ax, k_in, "lora_rank") if key[-1] == "lora_A" else (x_ax, "lora_rank", k_out)
            continue
        k_in, k_out = pflat[mod + ("kernel",)]
        out[key] = (k_in, "lora_rank") if key[-1] == "lora_A" else ("lora_rank", k_out)
    return traverse_util.unflatten_dict(out)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a ``[B, T]`` batch array: batch over (data, fsdp, expert), length unsharded."""
    return NamedSharding(mesh, P(_batch_axes(mesh), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_rows(mesh: Mesh, global_rows: int) -> slice:
    """This process's rows of a ``[global_rows, T]`` batch laid out by :func:`batch_sharding`.

    The rows are those held by this process's devices (``addressable_devices_indices_map``); with the
    mesh built by :func:`make_mesh` over ``jax.devices()`` (process-major device order) they are one
    contiguous block ``[i * B/P, (i + 1) * B/P)`` for process ``i`` of ``P``, as
    ``jax.make_array_from_process_local_data`` expects. One process: ``slice(0, global_rows)``.

    Raises:
        ValueError: ``global_rows`` is not divisible by the data-parallel size ``mesh.data * mesh.fsdp *
            mesh.expert`` (names them), or this process's rows are not one contiguous block (a hand-built mesh).
    """
    dp = data_parallel_size(mesh)
    if global_rows % dp:
        axes = " x ".join(f"mesh.{a}" for a in BATCH_AXES if a != "expert" or _axis_size(mesh, a) > 1)
        raise ValueError(f"a batch of {global_rows} sequences does not split over {axes} = {dp} "
                         "data-parallel devices")
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_rows, 1))
    starts = sorted({(s[0].start or 0, global_rows if s[0].stop is None else s[0].stop) for s in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError(f"process {jax.process_index()}: its devices hold rows {starts} of the batch, not one "
                         "contiguous block; build the mesh with easytune.sharding.make_mesh")
    return slice(lo, hi)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of a batch (numpy ``[B/P, T]``, see :func:`local_rows`) -> global ``[B, T]``
    arrays sharded over the batch axis.

    Uses ``jax.make_array_from_process_local_data``, so the same call serves several hosts (each passing
    its own rows) and one host (passing the whole batch).
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Like :func:`put_batch` for a batch every process holds whole (validation): each passes its rows."""
    rows = local_rows(mesh, len(next(iter(batch.values()))))
    return put_batch({k: v[rows] for k, v in batch.items()}, mesh)


# ------------------------------------------------------------------------------------- multi-host

def check_same_config(config_json: str) -> None:
    """On a multi-process run, checks that every process was started with the same config.

    Each process hashes its config (with ``distributed.process_id`` removed, the one key that must differ)
    and the hashes are all-gathered (a collective: every process calls this at the same point).

    Raises:
        ValueError: on every process, naming the processes whose config differs from process 0's.
    """
    if jax.process_count() == 1:
        return
    import hashlib
    import json

    from jax.experimental import multihost_utils
    cfg = json.loads(config_json)
    cfg.get("distributed", {}).pop("process_id", None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).digest()[:8]
    mine = np.frombuffer(digest, dtype=np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 8]
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(f"the processes were started with different configs: process(es) {differ} differ from "
                         "process 0 (give every process the same recipe and --config overrides; only "
                         "distributed.process_id may differ)")


def to_host(tree):
    """Whole numpy copies of a pytree of (possibly sharded) arrays on every process.

    One process: ``jax.device_get``. Several: ``multihost_utils.process_allgather(tiled=True)``, a collective
    that every process must call (a process cannot read shards held by another host's devices).
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def _on_tpu_vm() -> bool:
    """A Cloud TPU VM worker (the metadata JAX's own cluster detection reads is there)."""
    return (bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_HOSTNAMES")
                 or os.environ.get("CLOUD_TPU_TASK_ID"))
            or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def _detected_process_count() -> int:
    """Processes of the TPU slice this VM belongs to, by JAX's own cluster detection (the TPU metadata server,
    or GKE's ``TPU_WORKER_HOSTNAMES``); 1 for a single-host TPU VM or a Colab runtime, and when detection
    fails, so a one-host machine never waits for peers."""
    try:
        from jax._src.clusters import cluster
        for env in cluster.ClusterEnv._cluster_types:
            if not env.opt_in_only_method and env.is_env_present():
                return int(env.get_process_count())
    except Exception:  # no metadata server, an unknown environment: treat as one host
        return 1
    return 1


def distributed_settings(dist_cfg) -> dict | None:
    """``jax.distributed.initialize`` arguments from ``distributed.*`` config keys, else the environment.

    Config keys win; unset ones fall back to ``EASYTUNE_COORDINATOR_ADDRESS``, ``EASYTUNE_NUM_PROCESSES``,
    ``EASYTUNE_PROCESS_ID`` (then JAX's own ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``). Returns ``None`` for a single-process run, and ``{}`` (JAX detects the cluster
    from the TPU metadata) on a multi-host TPU slice with nothing set and ``distributed.auto`` (a one-host
    TPU VM or a Colab TPU needs no distributed runtime).

    Raises:
        ValueError: an incomplete or inconsistent setting (names the key), e.g. a process id outside
            ``[0, num_processes)``.
    """
    def get(key, *envs):
        v = dist_cfg[key] if dist_cfg is not None else None
        if v in (None, "", -1) or (key == "num_processes" and v == 0):
            for e in envs:
                if os.environ.get(e, "") != "":
                    return os.environ[e], e
            return None, None
        return v, f"distributed.{key}"

    addr, addr_src = get("coordinator_address", "EASYTUNE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    n, n_src = get("num_processes", "EASYTUNE_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid, pid_src = get("process_id", "EASYTUNE_PROCESS_ID", "JAX_PROCESS_ID")
    if addr is None and n is None and pid is None:
        auto = (dist_cfg is None or dist_cfg.auto) and _on_tpu_vm() and _detected_process_count() > 1
        return {} if auto else None
    def as_int(v, src):
        try:
            return None if v is None else int(v)
        except ValueError:
            raise ValueError(f"{src}={v!r}: not an integer") from None

    n, pid = as_int(n, n_src), as_int(pid, pid_src)
    missing = [k for k, v in (("distributed.coordinator_address", addr), ("distributed.num_processes", n),
                              ("distributed.process_id", pid)) if v is None]
    if missing:
        raise ValueError(f"multi-host run: {', '.join(missing)} not set (set all three, as config keys or "
                         "EASYTUNE_COORDINATOR_ADDRESS / EASYTUNE_NUM_PROCESSES / EASYTUNE_PROCESS_ID)")
    host, _, port = str(addr).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{addr_src}={addr!r}: expected HOST:PORT with a port in 1..65535, e.g. 10.0.0.2:8476")
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"{pid_src}={pid} must be in [0, {n_src}={n})")
    if n == 1:
        return None
    return {"coordinator_address": str(addr), "num_processes": n, "process_id": pid}


def initialize_distributed(dist_cfg=None, log=None) -> bool:
    """Starts JAX's distributed runtime for a multi-host run (``jax.distributed.initialize``); idempotent.

    Arguments come from :func:`distributed_settings`: on a TPU VM JAX detects the pod itself; elsewhere
    (several GPU/CPU hosts, or several local processes on 127.0.0.1 in tests) give the coordinator address,
    process count and process id. On the CPU backend the gloo collectives are selected. Must run before
    anything touches a JAX device.

    A process that cannot reach the coordinator (or a coordinator whose peers never come) does not hang:
    after ``distributed.initialization_timeout`` seconds it prints which address, process and count it
    waited for and exits with status 2 (JAX's own runtime would abort with a C++ stack trace).

    Returns:
        True when a multi-process runtime is (now) up, False for a single process.

    Raises:
        ValueError: incomplete settings (see :func:`distributed_settings`).
    """
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(dist_cfg)
    if settings is None:
        return False
    timeout = int(dist_cfg.initialization_timeout) if dist_cfg is not None else 300
    if settings:  # explicit processes (CPU or GPU hosts): CPU arrays use gloo collectives
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = (f"coordinator {settings['coordinator_address']} as process {settings['process_id']} of "
             f"{settings['num_processes']}" if settings else "the TPU pod's coordinator (auto-detected)")
    (log or logging.getLogger(__name__).info)(f"distributed: connecting to {where} (timeout {timeout} s)")

    if settings and settings["process_id"] == 0:
        waiting = (f"as process 0 (the coordinator, listening on {settings['coordinator_address']}), "
                   f"the other {settings['num_processes'] - 1} process(es) did not all connect")
        advice = ("Start every process with the same num_processes and coordinator_address, process ids "
                  f"0..{settings['num_processes'] - 1}.")
    else:
        waiting = f"could not connect to {where}"
        advice = ("Check that process 0 runs and its address and port are reachable from this host, and that every "
                  "process was started with the same num_processes.")

    def give_up():
        print(f"easytune: error: distributed start-up: {waiting} within {timeout} s "
              f"(distributed.initialization_timeout). {advice}", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        # JAX's own timeout is left longer than ours, so the clear message above is what the user sees.
        jax.distributed.initialize(**settings, initialization_timeout=timeout + 60)
    except Exception as e:  # e.g. the coordinator's port is taken (JaxRuntimeError: Failed to start RPC server)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(f"distributed start-up failed for {where}: {first}"
                         + (" (is the port already in use?)" if "RPC server" in first else "")) from e
    finally:
        timer.cancel()
    return True
