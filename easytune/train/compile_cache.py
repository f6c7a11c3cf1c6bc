"""JAX's persistent compilation cache, so a second run of the same model and shapes skips XLA compilation.

The cache directory is, in order: the ``path`` argument, the environment variable ``EASYTUNE_COMPILATION_CACHE``,
then ``~/.cache/easytune/jax``. The value ``"off"`` (argument or variable) disables the cache. Every compiled
program is cached (``jax_persistent_cache_min_compile_time_secs = 0``, ``jax_persistent_cache_min_entry_size_bytes
= 0``): on a CPU even a train step that compiles in seconds is worth keeping. JAX keys each entry by the
program's HLO, the jax/jaxlib versions, the backend and the compile options, so a stale entry is never used.

References:
    JAX docs, "Persistent compilation cache" (``jax_compilation_cache_dir``,
    ``jax_persistent_cache_min_compile_time_secs``, ``jax_persistent_cache_min_entry_size_bytes``).
"""

from __future__ import annotations

import os
import pathlib

ENV_VAR = "EASYTUNE_COMPILATION_CACHE"
DEFAULT_DIR = pathlib.Path("~/.cache/easytune/jax")


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The cache directory :func:`enable_compilation_cache` would use (user-expanded), or None when "off"."""
    value = path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
    if str(value).strip().lower() == "off":
        return None
    return pathlib.Path(value).expanduser()


def enable_compilation_cache(path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Turns on JAX's persistent compilation cache in ``path`` (see the module docstring for the default).

    Call it before the first ``jit`` compilation of the process. Creates the directory.

    Args:
        path: cache directory, or "off" to leave the cache disabled; None reads ``EASYTUNE_COMPILATION_CACHE``,
            else ``~/.cache/easytune/jax``.

    Returns:
        The directory used, or None when disabled.

    Raises:
        OSError: the directory cannot be created.
    """
    directory = cache_dir(path)
    if directory is None:
        return None
    import jax
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:  # JAX initializes its cache once per process, on the first compilation; re-point it if that happened
        from jax._src import compilation_cache
        if compilation_cache.is_initialized():
            compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
    return directory
