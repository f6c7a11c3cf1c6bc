"""``train.output_dir=gs://bucket/run``: every run file goes through etils.epath / TensorBoard's gfile
(fsspec), never a local ``./gs:/bucket`` folder. GCS is replaced by fsspec's in-memory filesystem registered
for ``gs://``; orbax writes checkpoint arrays with tensorstore's own GCS driver, which cannot be faked
offline, so checkpoints are redirected to a local folder here (orbax's GCS support is orbax's to test)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from easytune import paths
from easytune.train import checkpoint as ckpt_lib
from easytune.train import loop
from tests.helpers import tiny_run_config


class FakeGCS(MemoryFileSystem):
    """An in-memory filesystem answering for gs:// (epath passes ``finalize_on_close`` as gcsfs takes it)."""
    protocol = ("gs", "gcs")

    def __init__(self, *args, finalize_on_close=None, **kwargs):
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    registry = sys.modules["fsspec.registry"]._registry  # fsspec's own table, restored afterwards
    saved = {n: registry.get(n) for n in ("gs", "gcs")}
    for n in ("gs", "gcs"):
        fsspec.register_implementation(n, FakeGCS, clobber=True)
    local = tmp_path / "gcs_checkpoints"
    real = ckpt_lib.Checkpointer

    class LocalCheckpointer(real):
        def __init__(self, directory, *a, **k):
            assert str(directory).startswith("gs://bucket/"), directory  # the trainer kept the URI
            super().__init__(local / str(directory)[len("gs://"):], *a, **k)

    monkeypatch.setattr(ckpt_lib, "Checkpointer", LocalCheckpointer)
    monkeypatch.setenv("EASYTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "check_remote", lambda *a, **k: None)  # gcsfs is faked, not installed
    yield local
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs.clear()
    for n, cls in saved.items():
        if cls is None:
            registry.pop(n, None)
        else:
            registry[n] = cls


def test_gs_output_without_gcsfs_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n in ("gcsfs", "tensorflow") else real(n, *a))
    cfg = tiny_run_config("gs://bucket/run", **{"train.max_steps": 1})
    with pytest.raises(ValueError, match=r"train.output_dir=gs://bucket/run: writing to gs:// needs gcsfs"):
        loop.train(cfg, log=lambda *a: None)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "gs:").exists()


def test_run_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.run_path("gs://bucket/run")) == "gs://bucket/run"
    assert str(paths.run_path("runs/x")) == str(tmp_path / "runs" / "x")
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/gs/b")
    for typo in ("gs:/bucket/run", "GS://bucket/run", "s3:bucket"):  # never a local ./gs:/ folder
        with pytest.raises(ValueError, match=r"write a bucket as (gs|s3)://BUCKET/PATH"):
            paths.check_remote(typo)
    paths.check_remote("runs/x")  # local: nothing to check


@pytest.mark.slow
def test_training_into_a_gs_output_dir_writes_every_run_file_there(fake_gcs, tmp_path, monkeypatch):
    local_ckpt = fake_gcs
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run_config("gs://bucket/run", **{"train.max_steps": 2, "train.sample_max_new_tokens": 2})
    summary = loop.train(cfg, log=lambda *a: None)
    assert summary["optimizer_steps"] == 2 and summary["run_dir"] == "gs://bucket/run"
    store = {k[len("gs://bucket/run/"):]: v for k, v in FakeGCS.store.items() if k.startswith("gs://bucket/run/")}
    files = set(store)
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert name in files, sorted(files)
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files), sorted(files)
    rows = [json.loads(x) for x in store["metrics.jsonl"].getvalue().decode().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert store["curves.png"].getvalue()[:4] == b"\x89PNG"
    assert (local_ckpt / "bucket" / "run" / "checkpoints" / "2").is_dir()
    assert not (tmp_path / "gs:").exists()  # the old pathlib bug: a local ./gs:/bucket/run folder
    assert pathlib.Path(os.environ["EASYTUNE_CACHE"], "quickstart").is_dir()  # the data was built locally
