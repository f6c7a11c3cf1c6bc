"""LoRA as pure functions of pytrees: choose targets, init, split trainable from frozen, merge.

The model's variables are plain nested dicts. LoRA weights live in their own ``'lora'`` collection with the
same path as the kernel they adapt (``lora/model/layers_0/self_attn/q_proj/{lora_A, lora_B}``); the model's
``Linear`` adds ``scale * (dropout(x) @ lora_A) @ lora_B`` wherever they exist:

        y = x @ W + scale * (dropout(x) @ A) @ B,   A: [in, r],  B: [r, out],  scale = lora_alpha / r
                                                                                  (lora_alpha / sqrt(r) with rsLoRA)

A train state holds ``trainable`` and ``frozen`` variable dicts (each ``{'params': ..., 'lora': ...}``,
possibly partial); ``jax.value_and_grad`` differentiates only ``trainable``, and the optimizer state exists
only for it. Full fine-tuning is the same code with every parameter trainable.

References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and section 4.1.
    Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA).
    PEFT ``LoraLayer.reset_lora_parameters`` (A Kaiming-uniform with a=sqrt(5), B zeros) and
    ``check_target_module_exists`` (suffix / regex / "all-linear" matching on HF module names).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from easytune import config as config_lib

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """PEFT-named LoRA settings (see ``peft.LoraConfig``)."""
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def hf_module_name(path: tuple[str, ...]) -> str:
    """Flax module path -> Hugging Face module name.

    ``('model', 'layers_0', 'mlp', 'up_proj')`` -> ``'model.layers.0.mlp.up_proj'``.
    """
    parts = []
    for p in path:
        m = re.fullmatch(r"layers_(\d+)", p)
        parts.extend(["layers", m.group(1)] if m else [p])
    return ".".join(parts)


def linear_modules(params: Params) -> dict[str, tuple[str, ...]]:
    """All linear layers of a params tree: HF module name -> Flax module path (modules holding a ``kernel``)."""
    flat = traverse_util.flatten_dict(params)
    return {hf_module_name(k[:-1]): k[:-1] for k in flat if k[-1] == "kernel"}


def all_modules(params: Params) -> dict[str, tuple[str, ...]]:
    """Every module that holds parameters: HF module name -> Flax module path."""
    flat = traverse_util.flatten_dict(params)
    return {hf_module_name(k[:-1]): k[:-1] for k in flat}


def matches_target(name: str, target_modules) -> bool:
    """Whether the HF module ``name`` (e.g. ``model.layers.0.self_attn.q_proj``) is a LoRA target.

    PEFT's rule (``peft.tuners.tuners_utils.check_target_module_exists``): ``"all-linear"`` is every linear layer
    but the output head; another string is a regex matched against the whole name; a sequence of names matches
    a module whose name equals one or ends with ``"." + name``.
    """
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return name != "lm_head"
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def parse_target_modules(value: str | list | tuple) -> str | tuple[str, ...]:
    """Config value -> PEFT form: ``"all-linear"``, a tuple of name suffixes (``"q_proj,v_proj"``), or a regex.

    A string made only of names and commas is a list of suffixes; any other string is a regex that must
    match a whole HF module name (PEFT's rule for a string). The rule is :func:`easytune.config.target_modules_value`'s.

    Raises:
        ValueError: a regex that does not compile (named, with the ``re`` error).
    """
    value = config_lib.target_modules_value(value)
    if isinstance(value, list):
        return tuple(value)
    if value != "all-linear":
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"target_modules {value!r} is not a valid regex ({e}); use 'all-linear', a list of "
                             f"names like ['q_proj', 'v_proj'], or a regex") from None
    return value


def select_targets(params: Params, target_modules) -> list[tuple[str, ...]]:
    """Flax paths of the linear modules that ``target_modules`` selects, in tree order.

    Raises:
        ValueError: nothing matches; the message lists the available linear module names.
    """
    mods = linear_modules(params)
    chosen = [path for name, path in mods.items() if matches_target(name, target_modules)]
    if not chosen:
        names = sorted({n.split(".")[-1] for n in mods})
        raise ValueError(
                f"lora.target_modules={target_modules!r} matches no linear module; available module names: "
                f"{names} (e.g. {sorted(mods)[:3]})")
    return chosen


def init_lora(params: Params, cfg: LoraConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """LoRA weights for every target: ``lora_A`` [in, r] Kaiming-uniform as PEFT, ``lora_B`` [r, out] zeros.

    PEFT initialises ``lora_A.weight`` ([r, in]) with ``kaiming_uniform_(a=sqrt(5))``, i.e.
    U(-1/sqrt(in), 1/sqrt(in)); ours is its transpose, so the bound is the same.

    Returns:
        the ``'lora'`` collection: nested dict mirroring the target kernels' paths, arrays in ``dtype``.
    """
    flat = traverse_util.flatten_dict(params)
    out = {}
    for i, path in enumerate(select_targets(params, cfg.target_modules)):
        fan_in, fan_out = flat[path + ("kernel",)].shape
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        out[path + ("lora_A",)] = jax.random.uniform(key, (fan_in, cfg.r), dtype, -bound, bound)
        out[path + ("lora_B",)] = jnp.zeros((cfg.r, fan_out), dtype)
    return traverse_util.unflatten_dict(out)


def saved_module_paths(params: Params, modules_to_save) -> list[tuple[str, ...]]:
    """Flax paths of the modules trained in full (``modules_to_save``, PEFT suffix rule).

    Raises:
        ValueError: an entry matches no module; the message lists the module names.
    """
    mods = all_modules(params)
    paths = []
    for t in modules_to_save:
        hit = [p for n, p in mods.items() if n == t or n.endswith("." + t)]
        if not hit:
            raise ValueError(f"lora.modules_to_save entry {t!r} matches no module; available: {sorted(mods)}")
        paths.extend(hit)
    return paths


def split(params: Params, lora: Params | None, modules_to_save=()) -> tuple[Params, Params]:
    """Splits variables into ``(trainable, frozen)`` variable dicts.

    Full fine-tuning: ``lora=None`` -> ``({'params': params}, {})``. LoRA: the ``'lora'`` collection and the
    ``modules_to_save`` params are trainable, every other param is frozen.
    """
    if lora is None:
        return {"params": params}, {}
    flat = traverse_util.flatten_dict(params)
    saved = saved_module_paths(params, modules_to_save)
    is_saved = lambda k: any(k[:len(p)] == p for p in saved)
    train_p = {k: v for k, v in flat.items() if is_saved(k)}
    frozen_p = {k: v for k, v in flat.items() if not is_saved(k)}
    trainable = {"lora": lora}
    if train_p:
        trainable["params"] = traverse_util.unflatten_dict(train_p)
    return trainable, {"params": traverse_util.unflatten_dict(frozen_p)}


def combine(trainable: Params, frozen: Params) -> Params:
    """Inverse of :func:`split`: one variables dict for ``model.apply`` (a deep union of both trees)."""
    out = {}
    for tree in (frozen, trainable):
        for col, sub in tree.items():
            flat = traverse_util.flatten_dict(out.get(col, {}))
            flat.update(traverse_util.flatten_dict(sub))
            out[col] = traverse_util.unflatten_dict(flat)
    return out


def merge(params: Params, lora: Params, scale: float) -> Params:
    """Folds LoRA into the base kernels: ``W' = W + scale * A @ B`` (fp32 math, result in W's dtype).

    Returns:
        a params tree of the same structure as ``params`` (for export or plain inference).
    """
    flat = traverse_util.flatten_dict(params)
    lflat = traverse_util.flatten_dict(lora)
    for key in [k for k in lflat if k[-1] == "lora_A"]:
        mod = key[:-1]
        w = flat[mod + ("kernel",)]
        delta = scale * (lflat[key].astype(jnp.float32) @ lflat[mod + ("lora_B",)].astype(jnp.float32))
        flat[mod + ("kernel",)] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def count_params(tree: Params) -> int:
    """Number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
