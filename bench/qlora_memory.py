"""QLoRA step memory: NF4 kernels dequantized per layer inside ``Linear`` (``quant.qmatmul``, recomputed in the
backward pass) vs the whole frozen tree dequantized before ``model.apply`` (``quant.dequantize_tree``).

    python bench/qlora_memory.py [--hidden 2048] [--layers 8] [--seq 512] [--batch 2]

Prints, for the LoRA gradient of one batch, XLA's ``memory_analysis()`` temp bytes of both ways and (on a GPU)
the measured ``peak_bytes_in_use`` of each, next to the float size of the kernels. Each way runs in its own
subprocess so peaks do not mix. Not a test: numbers depend on the backend's scheduler.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from easytune import lora as lora_lib
    from easytune import quant
    from easytune.models.llama import LlamaForCausalLM, init_params
    from easytune.models.model_config import ModelConfig
    d = args.hidden
    cfg = ModelConfig(vocab_size=1024, hidden_size=d, intermediate_size=-(-8 * d // 3 // 64) * 64,
                      num_hidden_layers=args.layers, num_attention_heads=d // 128, num_key_value_heads=d // 128,
                      max_position_embeddings=args.seq, tie_word_embeddings=False, compute_dtype="bfloat16")
    params = jax.device_get(jax.jit(lambda: init_params(cfg, jax.random.PRNGKey(0)), backend="cpu")())
    lcfg = lora_lib.LoraConfig(r=16, lora_alpha=16)
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
    qp = jax.device_put(quant.quantize_params(params))
    kernels = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if getattr(p[-1], "key", "") == "kernel" and "lm_head" not in str(p))
    del params
    model = LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    ids = jnp.ones((args.batch, args.seq), jnp.int32)

    def loss(lora, frozen):
        if args.way == "tree":
            frozen = quant.dequantize_tree(frozen, jnp.bfloat16)
        return model.apply({"params": frozen, "lora": lora}, ids).astype(jnp.float32).mean()

    f = jax.jit(jax.grad(loss))
    compiled = f.lower(lora, qp).compile()
    m = compiled.memory_analysis()
    out = dict(way=args.way, backend=jax.default_backend(), temp_mb=m.temp_size_in_bytes / 2**20,
               args_mb=m.argument_size_in_bytes / 2**20, kernels_bf16_mb=kernels * 2 / 2**20,
               nf4_mb=quant.nbytes(qp) / 2**20)
    jax.block_until_ready(compiled(lora, qp))
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20 or None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--way", default="")
    args = ap.parse_args()
    if args.way:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for way in ("layer", "tree"):
        p = subprocess.run([sys.executable, __file__, "--way", way, "--hidden", str(args.hidden), "--layers",
                            str(args.layers), "--seq", str(args.seq), "--batch", str(args.batch)],
                           capture_output=True, text=True)
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{way} failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][7:]))
    r0 = rows[0]
    print(f"backend {r0['backend']}: hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}; "
          f"kernels {r0['kernels_bf16_mb']:.0f} MB in bf16, {r0['nf4_mb']:.0f} MB as NF4 (+ embeddings/lm_head)")
    for r in rows:
        peak = f"{r['peak_mb']:.0f} MB" if r["peak_mb"] else "n/a"
        print(f"  dequantize {r['way']:5s}: XLA temp {r['temp_mb']:8.0f} MB   measured peak {peak}")


if __name__ == "__main__":
    main()
