"""Compiled memory and compile time of one training gradient for every ``model.remat`` policy, with the decoder
layers as a Python loop (``scan_layers=False``) and as one ``nn.scan`` (``scan_layers=True``).

    python bench/remat_memory.py [--hidden 512] [--layers 8] [--seq 512] [--batch 8] [--vocab 4096]
                                 [--methods lora,full] [--policies none,full,...] [--compute-dtype float32]

For each (method, layout, policy) it lowers and compiles ``grad(token_loss_sum)`` with respect to the trainable
variables (LoRA r=16 on all linear layers, or every parameter for "full"), on abstract inputs (nothing is
allocated), and prints XLA's ``memory_analysis()``: temp (activations and other scratch), argument, output and
alias bytes, with the compile time in seconds and the FLOPs of ``cost_analysis()``. Not a test: the numbers
depend on the backend's scheduler (XLA:CPU does not schedule for memory, so per-layer remat saves little there;
a scan's loop boundary keeps the recomputation in the backward pass on every backend). ``cost_analysis`` counts
a while loop's body once, so the FLOPs of a scanned model read about L times too low.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(cfg, method: str, batch: int, seq: int) -> dict:
    """Compiles one gradient of the token loss for ``cfg``; returns bytes, seconds and FLOPs."""
    import jax
    import jax.numpy as jnp

    from easytune import lora as lora_lib
    from easytune.models import llama
    from easytune.models import scan as scan_lib
    from easytune.train import step as step_lib

    base = dataclasses.replace(cfg, scan_layers=False)
    lcfg = lora_lib.LoraConfig(r=16, lora_alpha=16)

    def variables():
        params = llama.init_params(base, jax.random.PRNGKey(0))
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1)) if method == "lora" else None
        trainable, frozen = lora_lib.split(params, lora)
        if cfg.scan_layers:
            n = cfg.num_hidden_layers
            trainable, frozen = scan_lib.stack_layers(trainable, n), scan_lib.stack_layers(frozen, n)
        return trainable, frozen

    trainable, frozen = jax.eval_shape(variables)
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale if method == "lora" else 1.0)
    i32 = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    batch_avals = {"input_ids": i32, "target_ids": i32, "segment_ids": i32, "positions": i32,
                   "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}

    def grad_fn(trainable, frozen, b):
        def loss(t):
            total, tokens = step_lib.token_loss_sum(model, lora_lib.combine(t, frozen), b)
            return total / jnp.maximum(tokens, 1.0)
        return jax.value_and_grad(loss)(trainable)

    t0 = time.perf_counter()
    compiled = jax.jit(grad_fn).lower(trainable, frozen, batch_avals).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp": mem.temp_size_in_bytes, "argument": mem.argument_size_in_bytes,
            "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes, "compile_s": seconds,
            "flops": float((cost or {}).get("flops", float("nan")))}


def main(argv=None) -> None:
    from easytune.models import llama
    from easytune.models.model_config import ModelConfig
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--methods", default="lora,full")
    p.add_argument("--policies", default=",".join(k for k in llama.REMAT_POLICIES if k != "checkpoint_dots"))
    p.add_argument("--compute-dtype", default="float32")
    args = p.parse_args(argv)
    import jax
    d = args.hidden
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=-(-8 * d // 3 // 64) * 64,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.heads, max_position_embeddings=args.seq,
                            compute_dtype=args.compute_dtype)
    print(f"# {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); hidden {d}, intermediate "
          f"{cfg.intermediate_size}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, batch "
          f"{args.batch} x seq {args.seq}, compute {args.compute_dtype}; MiB = 2**20 bytes")
    print("| method | layout | remat | temp MiB | argument MiB | output MiB | alias MiB | compile s | GFLOPs* |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    mib = lambda b: f"{b / 2**20:.1f}"
    for method in args.methods.split(","):
        for scan in (False, True):
            for policy in args.policies.split(","):
                r = measure(dataclasses.replace(cfg, remat=policy, scan_layers=scan), method, args.batch, args.seq)
                print(f"| {method} | {'scan' if scan else 'per-layer'} | {policy} | {mib(r['temp'])} | "
                      f"{mib(r['argument'])} | {mib(r['output'])} | {mib(r['alias'])} | {r['compile_s']:.1f} | "
                      f"{r['flops'] / 1e9:.1f} |", flush=True)
    print("* XLA cost_analysis; a scan's loop body is counted once")


if __name__ == "__main__":
    main()
