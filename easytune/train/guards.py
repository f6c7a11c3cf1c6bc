"""Context managers a run wraps its work in: process 0 first where it writes shared files (:class:`main_first`),
SIGINT/SIGTERM recorded instead of fatal until a checkpoint is saved (:class:`SignalGuard`)."""

from __future__ import annotations

import signal
import threading

import jax


class main_first:
    """``with main_first(name):`` process 0 runs the block first, the others after it (a barrier): for
    work that writes shared files (the prepared-data cache, built-in datasets). One process: no barrier."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if jax.process_count() > 1 and jax.process_index() != 0:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"easytune:{self.name}")

    def __exit__(self, exc_type, *rest):
        if jax.process_count() > 1 and jax.process_index() == 0 and exc_type is None:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"easytune:{self.name}")
        return False


class SignalGuard:
    """Records SIGINT/SIGTERM instead of dying, so the loop can save a checkpoint first (main thread only)."""

    def __init__(self):
        self.received: list[int] = []
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False
