"""The persistent compilation cache: directory resolution, and a second process loading what the first compiled."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from easytune.train import compile_cache

REPO = pathlib.Path(__file__).resolve().parents[2]

_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from easytune.train.compile_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
used = enable_compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.tanh(x @ x.T) * 3.0)(jnp.ones((16, 16))).block_until_ready()
print(json.dumps(dict(dir=str(used), hits=events.count("/jax/compilation_cache/cache_hits"))))
"""


def _run(arg, env=None):
    p = subprocess.run([sys.executable, "-c", _CHILD, str(arg)], capture_output=True, text=True, cwd=REPO,
                       env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.cache_dir() == pathlib.Path("~/.cache/easytune/jax").expanduser()
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.cache_dir() == tmp_path / "env"
    assert compile_cache.cache_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.cache_dir() is None
    assert compile_cache.enable_compilation_cache() is None
    assert compile_cache.cache_dir("OFF") is None


@pytest.mark.slow
def test_second_process_loads_the_compiled_program(tmp_path):
    first = _run(tmp_path / "cache")
    assert first == dict(dir=str(tmp_path / "cache"), hits=0)
    assert any((tmp_path / "cache").iterdir())  # the executable was written
    assert _run(tmp_path / "cache")["hits"] >= 1
