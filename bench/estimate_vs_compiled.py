"""easytune's memory estimate vs XLA's own figure for the compiled train step (``compiled.memory_analysis()``).

For a few tiny configs, compiles the real jitted train step (easytune/train/step.py, the optimizer of
easytune/train/optim.py, the NF4 base of easytune/quant.py for QLoRA) on one CPU device and prints
``argument + output - alias + temp`` bytes next to :func:`easytune.estimate.estimate`'s total.

    python bench/estimate_vs_compiled.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from easytune import config as config_lib
from easytune import estimate as est_lib
from easytune import lora as lora_lib
from easytune import presets, quant
from easytune.models import llama
from easytune.models.model_config import ModelConfig
from easytune.train import optim as optim_lib
from easytune.train import step as step_lib

# name -> (method, micro_batch_size, sequence_len, remat, model overrides)
CONFIGS = {
        "full-fp32-b8x64": ("full", 8, 64, False, {}),
        "lora-fp32-b8x64": ("lora", 8, 64, False, {"num_hidden_layers": 4}),
        "qlora-fp32-b4x128": ("qlora", 4, 128, False, {"hidden_size": 128, "intermediate_size": 344}),
}


def tiny_model(**overrides) -> ModelConfig:
    """The ``tiny`` preset with a 512-token vocabulary (the quickstart tokenizer's size)."""
    kw = dict(presets.PRESETS["tiny"], vocab_size=512)
    kw.update(overrides)
    return ModelConfig(**kw)


def compiled_bytes(cfg, method: str, batch: int, seq: int, r: int = 8) -> int:
    """``argument + output - alias + temp`` bytes of the compiled, donated train step on one device."""
    params = llama.init_params(cfg, jax.random.PRNGKey(0))
    if method == "full":
        trainable, frozen = lora_lib.split(params, None)
    else:
        if method == "qlora":
            params = quant.quantize_params(params)
        lora = lora_lib.init_lora(params, lora_lib.LoraConfig(r=r), jax.random.PRNGKey(1))
        trainable, frozen = lora_lib.split(params, lora)
    optim = config_lib.defaults().optim
    tx, _ = optim_lib.make_optimizer(optim, 10, 1)
    state = step_lib.TrainState(trainable=trainable, opt_state=tx.init(trainable), rng=jax.random.PRNGKey(2),
                                micro_step=jnp.zeros([], jnp.int32))
    model = llama.LlamaForCausalLM(cfg, lora_scale=2.0)
    b = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
         for k in ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")}
    fn = jax.jit(step_lib.train_step, static_argnames="spec", donate_argnums=0)
    m = fn.lower(state, frozen, b, jnp.float32(1.0), spec=step_lib.StepSpec(model, tx)).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def compare(name: str) -> tuple[float, float]:
    """``(estimate, compiled)`` bytes for one entry of :data:`CONFIGS`."""
    method, batch, seq, remat, over = CONFIGS[name]
    cfg = tiny_model(remat=remat, **over)
    est = est_lib.estimate(cfg, method=method, micro_batch_size=batch, sequence_len=seq, remat=remat, lora_r=8)
    return est.total, float(compiled_bytes(cfg, method, batch, seq))


def main() -> int:
    print(f"{'config':24s}{'estimate MB':>14s}{'XLA compiled MB':>18s}{'ratio':>8s}")
    for name in CONFIGS:
        e, c = compare(name)
        print(f"{name:24s}{e / 1e6:14.2f}{c / 1e6:18.2f}{e / c:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
