"""Run-directory paths that may live on Google Cloud Storage (``gs://bucket/run``) or on local disk.

A pod's hosts must share the checkpoint directory, and a TPU VM's disk is gone with the VM, so
``train.output_dir`` may be a ``gs://`` URI. Every file of a run (``config.json``, ``metrics.jsonl``,
``summary.json``, ``curves.png``, TensorBoard events, orbax checkpoints) is then written through
``etils.epath`` (the path library orbax itself uses; GCS through ``gcsfs``/fsspec, or ``tf.io.gfile`` when
TensorFlow is installed) and TensorBoard's own gfile layer. Local paths stay plain and absolute.
"""

from __future__ import annotations

import os
import pathlib

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")


def is_remote(path) -> bool:
    """True for a ``gs://`` (or ``s3://``) URI."""
    return str(path).startswith(REMOTE_PREFIXES)


def check_remote(path, key: str = "train.output_dir") -> None:
    """Fails early, naming ``key``, when ``path`` is a ``gs://``/``s3://`` URI and no library can reach it.

    Raises:
        ValueError: ``gcsfs`` (``s3fs``) is not installed and neither is TensorFlow (``tf.io.gfile``).
    """
    text = str(path)
    scheme = text.split(":", 1)[0]
    if ":" in text and scheme.lower() in ("gs", "s3") and not text.startswith(REMOTE_PREFIXES):
        raise ValueError(f"{key}={text}: write a bucket as {scheme.lower()}://BUCKET/PATH (lowercase, two slashes)")
    if not is_remote(path):
        return
    import importlib.util
    lib = "gcsfs" if str(path).startswith("gs://") else "s3fs"
    if importlib.util.find_spec(lib) is None and importlib.util.find_spec("tensorflow") is None:
        raise ValueError(f"{key}={path}: writing to {str(path).split('://')[0]}:// needs {lib}: pip install {lib}"
                         + (" (or pip install -e '.[gcs]')" if lib == "gcsfs" else ""))


def run_path(path) -> epath.Path:
    """``path`` as an ``epath.Path``: a URI kept as it is, a local path made absolute (never ``/cwd/gs:/...``)."""
    if is_remote(path):
        return epath.Path(str(path))
    return epath.Path(pathlib.Path(os.fspath(path)).absolute())


def append_text(path: epath.Path, text: str) -> None:
    """Appends ``text`` to a file: in place on local disk; on object storage, whose objects cannot be appended
    to, by rewriting the whole (small) file."""
    if is_remote(path):
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        path.write_text(old + text, encoding="utf-8")
    else:
        with open(os.fspath(path), "a", encoding="utf-8") as f:
            f.write(text)
