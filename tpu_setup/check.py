"""Check that JAX sees every accelerator of this host and of the whole slice, and can all-reduce.

Run on every worker of a TPU VM / pod slice at once (tpu_setup/setup.sh does this), or alone on any
machine: on CPU it reports 1 process and the CPU devices. Prints jax.devices(), the process index and
count, the device kind; then checks
  * jax.device_count() == jax.local_device_count() * jax.process_count()   (JAX multi-host model:
    every host owns the same number of local devices), and
  * a psum of 1.0 over all devices (jax.shard_map over a 1-D mesh of every device) equals
    jax.device_count().
Exit status 0 when both hold, 1 with a one-line `check.py: error: ...` otherwise.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run the checks and print a report; returns the process exit status (0 ok, 1 failed)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    # On a multi-host TPU slice the hosts must be connected before any computation. easytune's own start-up
    # does it as `easytune train` will: on a TPU VM that JAX's cluster detection (GCE metadata) places in a
    # slice of several hosts, jax.distributed.initialize(); or from EASYTUNE_COORDINATOR_ADDRESS /
    # EASYTUNE_NUM_PROCESSES / EASYTUNE_PROCESS_ID; a one-host TPU VM, Colab or a CPU/GPU machine stays
    # single-process.
    from easytune import sharding
    sharding.initialize_distributed(None, log=print)

    devices = jax.devices()
    n, n_local, n_proc = jax.device_count(), jax.local_device_count(), jax.process_count()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    print(f"process {jax.process_index()} of {n_proc}")
    print(f"device kind: {devices[0].device_kind}")
    print(f"devices ({n} total, {n_local} local): {devices}")
    if n != n_local * n_proc:
        print(f"check.py: error: jax.device_count()={n} but local_device_count()={n_local} x "
              f"process_count()={n_proc} = {n_local * n_proc}; some hosts are missing devices", file=sys.stderr)
        return 1

    mesh = Mesh(np.array(devices), ("d",))
    ones = jax.make_array_from_callback(
        (n,), NamedSharding(mesh, P("d")), lambda idx: np.ones((1,), np.float32))
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh,
                                  in_specs=P("d"), out_specs=P()))(ones)
    got = float(np.asarray(total.addressable_data(0))[0])
    print(f"psum of 1.0 over all devices: {got:g} (expected {n})")
    if got != n:
        print(f"check.py: error: psum over {n} devices gave {got:g}, expected {n}; "
              "the interconnect between devices/hosts is not working", file=sys.stderr)
        return 1
    print("check.py: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
