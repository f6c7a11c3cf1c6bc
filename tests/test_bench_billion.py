"""bench/billion.py: its streamed safetensors writer, and every stage of its ``--tiny`` run completing and printing
peak RSS, estimate and ratio."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("billion", REPO / "bench" / "billion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_streamed_safetensors_read_back(tmp_path, monkeypatch):
    import safetensors

    from easytune.models import hf_config
    bench = _bench()
    monkeypatch.setattr(bench, "CHUNK", 1000)  # several chunks per tensor
    cfg = bench.hf_config(tiny=True, layers=1)
    shapes = bench.tensor_shapes(cfg)
    path = tmp_path / "model.safetensors"
    size = bench.write_safetensors(path, shapes)
    assert size == path.stat().st_size
    with safetensors.safe_open(path, framework="np") as f:
        assert {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()} == shapes
        emb = f.get_tensor("model.embed_tokens.weight").astype(np.float32)
        norm = f.get_tensor("model.norm.weight")
    assert str(norm.dtype) == "bfloat16" and (norm.astype(np.float32) == 1).all()
    assert abs(emb.std() - 0.02) < 1e-3 and abs(emb.mean()) < 1e-3
    # the published Llama 3.2 1B config reads as 1.24 B parameters, llama3 RoPE scaling included
    full = hf_config.config_from_hf(bench.LLAMA_3_2_1B)
    assert full.rope_type == "llama3" and full.rope_factor == 32.0 and full.tie_word_embeddings
    assert sum(int(np.prod(s)) for s in bench.tensor_shapes(bench.LLAMA_3_2_1B).values()) == 1_235_814_400


@pytest.mark.slow
def test_tiny_run_completes_every_stage(tmp_path, shared_data):
    bench = _bench()
    p = subprocess.run([sys.executable, str(REPO / "bench" / "billion.py"), "--tiny", "--work", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {}
    for line in p.stdout.splitlines():
        m = re.fullmatch(r"(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)", line)
        if m:
            rows[m[1]] = [float(x) for x in m.groups()[1:]]
    assert list(rows) == list(bench.STAGES), p.stdout
    for stage, (peak, est, ratio, _) in rows.items():
        assert peak > 0.3 and est > 0.3, (stage, peak, est)  # GB: at least the interpreter with JAX
        assert ratio == pytest.approx(peak / est, abs=0.03)  # all three printed to 2 decimals
    assert "largest deviation from the estimate" in p.stdout
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    assert (tmp_path / "runs" / "qlora" / "summary.json").is_file()
