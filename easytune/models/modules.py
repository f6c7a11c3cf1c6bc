"""``easytune modules MODEL_DIR``: a Hugging Face model's parameter names and shapes, and which modules a LoRA
``target_modules`` value selects (the guide's "print the model's modules" script, with PEFT's matching rule)."""

from __future__ import annotations

import math
import os
import pathlib

import jax

from easytune import lora as lora_lib
from easytune.models import hf_config, hf_weights, llama


def active_parameters(config, shapes: dict) -> tuple[int, int]:
    """``(total, active per token)`` parameter counts: a token runs ``num_experts_per_tok`` of each sparse layer's
    X experts (so ``k / X`` of the expert parameters), and every other parameter (embeddings and head included,
    as the Mixtral paper's 13B-of-47B count). Equal for a dense model.

    Args:
        config: the ModelConfig.
        shapes: :func:`easytune.models.hf_weights.parameter_shapes` of it (one entry per expert).
    """
    total = sum(math.prod(s) for _, s in shapes.values())
    experts = sum(math.prod(s) for p, s in shapes.values() if isinstance(p[-1], int))  # one entry per expert
    if not experts:
        return total, total
    return total, total - experts + experts // config.num_experts * config.num_experts_per_tok


def modules_report(model_dir: str | os.PathLike, target_modules: str = "all-linear") -> str:
    """One line per parameter (HF name, torch shape ``[out, in]``), LoRA targets marked, and a count.

    Only ``config.json`` is read: shapes come from ``jax.eval_shape`` of the model's init, no weights are loaded.
    A mixture-of-experts model lists each expert's tensors by their checkpoint names (``...experts.{e}...``) and
    states its total and per-token active parameter counts (:func:`active_parameters`); its routers and experts
    are no linear modules, so no ``target_modules`` selects them.

    Args:
        model_dir: a Hugging Face model dir (``config.json``; weights need not be there).
        target_modules: ``lora.target_modules`` in any of its forms (``"all-linear"``, ``"q_proj,v_proj"``, a regex).

    Returns:
        The report text (several lines).

    Raises:
        FileNotFoundError: ``model_dir`` is an easytune run dir, or holds no ``config.json``.
        ValueError: an unsupported ``model_type`` (from :func:`easytune.models.hf_config.read_config`).
    """
    src = pathlib.Path(model_dir)
    if (src / "checkpoints").is_dir():
        raise FileNotFoundError(f"{src} is an easytune run dir; `easytune modules` reads a Hugging Face model dir "
                                f"(the run's model.path)")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model dir (no config.json)")
    config = hf_config.read_config(src)  # names and shapes only: no weights are read
    shapes = hf_weights.parameter_shapes(config)
    tree = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))  # shapes only
    chosen = set(lora_lib.select_targets(tree, lora_lib.parse_target_modules(target_modules)))
    width = max(len(n) for n in shapes)
    total, active = active_parameters(config, shapes)
    moe = (f", {active:,} active per token ({config.num_experts_per_tok} of {config.num_experts} experts in "
           f"{sum(map(config.layer_is_moe, range(config.num_hidden_layers)))} sparse layers)"
           if active != total else "")
    lines = [f"{config.model_type} model, {total:,} parameters{moe} "
             f"(HF names, torch shapes [out, in]); --target-modules {target_modules}"]
    for name, (path, shape) in shapes.items():
        mark = "  <- LoRA target" if path[-1] == "kernel" and path[:-1] in chosen else ""
        lines.append(f"{name:{width}s}  {list(shape)}{mark}")
    lines.append(f"{len(chosen)} of {len(lora_lib.linear_modules(tree))} linear modules selected"
                 + ("; routers (mlp.gate) and experts (mlp.experts) are not linear modules: target_modules never "
                    "selects them (lora.target_parameters adapts the experts)" if moe else ""))
    return "\n".join(lines)
