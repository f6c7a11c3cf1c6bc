"""Peak host memory of loading a sharded safetensors checkpoint with ``easytune.models.hf_weights.load_hf_model``.

Writes a random Llama of about ``--size-mb`` MB (float32) with transformers ``save_pretrained`` split into
``--shards`` shards (``max_shard_size``), then loads it in a fresh subprocess per method and prints the
peak resident-set increase during the load (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``, minus ``VmRSS`` just before) next to the params' bytes and the largest shard's
bytes. Methods:

- ``easytune``: ``load_hf_model`` (shard by shard, each tensor transposed and cast as it is read).
- ``all_at_once``: every shard read with ``safetensors.numpy.load_file`` into one state dict, then
  ``state_dict_to_params`` (what loading without the shard loop costs).
- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` (torch), for scale.

Run: ``python bench/load_memory.py`` (about a minute on 2 CPU cores; needs ~1.5 GB of RAM and disk).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, pathlib, sys
import numpy as np
method, model_dir = sys.argv[1], pathlib.Path(sys.argv[2])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(key)

if method == "transformers":
    import torch, transformers
else:
    import safetensors.numpy
    from easytune.models import hf_config, hf_weights
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (the peak) to the current RSS
before = status("VmRSS")
if method == "easytune":
    _, params = hf_weights.load_hf_model(model_dir)
elif method == "all_at_once":
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    sd = {}
    for file in dict.fromkeys(index["weight_map"].values()):
        sd.update(safetensors.numpy.load_file(model_dir / file))
    config = hf_config.config_from_hf(json.loads((model_dir / "config.json").read_text()))
    params = hf_weights.state_dict_to_params(sd, config)
    del sd
else:
    params = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


def write_model(out: pathlib.Path, size_mb: float, shards: int) -> dict:
    """A random float32 Llama of about ``size_mb`` MB saved in ``shards`` shards; returns its sizes."""
    import torch
    import transformers
    hidden, layers, vocab = 512, 8, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * 1376 + 2 * hidden
    scale = size_mb * 1e6 / 4 / (2 * vocab * hidden + layers * per_layer)
    layers = max(1, round(layers * scale))  # keep the widths, scale the depth
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1376,
                                      num_hidden_layers=layers, num_attention_heads=8,
                                      num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, max_shard_size=int(total / shards * 1.02))
    files = sorted(out.glob("model-*.safetensors"))
    if len(files) != shards:
        raise RuntimeError(f"expected {shards} shards, transformers wrote {len(files)}")
    return {"params_bytes": total, "shard_bytes": [f.stat().st_size for f in files],
            "layers": layers}


def measure(method: str, model_dir: pathlib.Path) -> dict:
    """Runs one load in a fresh interpreter and returns its RSS numbers (bytes)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, method, str(model_dir)], check=True,
                         capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="model size in MB (float32)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--methods", default="easytune,all_at_once,transformers")
    args = parser.parse_args(argv)
    mb = 1e6
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / "model"
        info = write_model(model_dir, args.size_mb, args.shards)
        params, shard = info["params_bytes"], max(info["shard_bytes"])
        print(f"model: Llama, {info['layers']} layers, {params / mb:.1f} MB float32 params in "
              f"{args.shards} safetensors shards (largest {shard / mb:.1f} MB)")
        for method in args.methods.split(","):
            r = measure(method, model_dir)
            peak = r["peak"] - r["before"]
            print(f"{method:13s} peak RSS increase {peak / mb:7.1f} MB = params + "
                  f"{(peak - params) / mb:6.1f} MB ({(peak - params) / shard:4.2f} shards); "
                  f"{peak / params:4.2f}x params")


if __name__ == "__main__":
    main()
