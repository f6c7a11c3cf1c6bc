"""Attention implementations side by side: compiled temp memory and step time of one LoRA train step.

    python bench/attention.py [--lengths 512,1024,2048,4096] [--impls xla,blockwise] [--block 512] [--steps 3]

Model: bench/throughput.py's case A shape (dim 256, 4 layers, 8 heads, vocab 32000; LoRA r=8 on all linear
layers), micro-batch 1, random token ids, every token supervised, float32. For each sequence length and
``model.attention`` implementation one process-local ``jax.jit(train_step)`` is compiled; printed are XLA's
``memory_analysis()`` temp bytes (activations and workspace: what grows with the length) and the fastest of
``--steps`` timed steps after a warm-up step, with each implementation's ratio to the first one listed.
Numbers depend on the machine and its load: not a test.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(impl: str, seq: int, block: int, steps: int) -> tuple[float, float]:
    """(temp MiB, fastest step seconds) of one LoRA step at ``seq`` tokens with ``model.attention = impl``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.throughput import ALPHA, CASES, R, _inter, train_state
    from easytune import lora as lora_lib
    from easytune.models.llama import LlamaForCausalLM, init_params
    from easytune.models.model_config import ModelConfig
    from easytune.train import step as step_lib

    c = CASES["A"]
    cfg = ModelConfig(vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=_inter(c["dim"]),
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                      max_position_embeddings=seq, attention=impl, attention_block=block)
    params = init_params(cfg, jax.random.PRNGKey(0))
    lcfg = lora_lib.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
    trainable, frozen = lora_lib.split(params, lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1)))
    tx, state = train_state(trainable)
    spec = step_lib.StepSpec(LlamaForCausalLM(cfg, lora_scale=lcfg.scale), tx, use_dropout=False)
    ids = np.random.default_rng(0).integers(3, c["vocab"], size=(1, seq + 1)).astype(np.int32)
    batch = dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:], loss_mask=np.ones((1, seq), np.float32),
                 positions=np.arange(seq, dtype=np.int32)[None], segment_ids=np.ones((1, seq), np.int32))
    fn = jax.jit(functools.partial(step_lib.train_step, spec=spec), donate_argnums=(0,))
    compiled = fn.lower(state, frozen, batch, jnp.float32(1.0)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    state, _ = compiled(state, frozen, batch, jnp.float32(1.0))
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        state, out = compiled(state, frozen, batch, jnp.float32(1.0))
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return temp, best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--impls", default="xla,blockwise")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    impls = a.impls.split(",")
    import jax
    print(f"backend {jax.default_backend()}, {len(jax.devices())} device(s); case A shape, LoRA, micro-batch 1, "
          f"block {a.block}")
    print(f"{'seq':>6} {'attention':>10} {'temp MiB':>10} {'x first':>8} {'step s':>8} {'x first':>8}")
    for seq in map(int, a.lengths.split(",")):
        first = None
        for impl in impls:
            temp, sec = measure(impl, seq, a.block, a.steps)
            first = first or (temp, sec)
            print(f"{seq:>6} {impl:>10} {temp:>10.1f} {temp / first[0]:>8.2f} {sec:>8.3f} {sec / first[1]:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
