"""LoRA as pure functions of pytrees: choose targets, init, split trainable from frozen, merge.

The model's variables are plain nested dicts. LoRA weights live in their own ``'lora'`` collection with the
same path as the kernel they adapt (``lora/model/layers_0/self_attn/q_proj/{lora_A, lora_B}``); the model's
``Linear`` adds ``scale * (dropout(x) @ lora_A) @ lora_B`` wherever they exist:

        y = x @ W + scale * (dropout(x) @ A) @ B,   A: [in, r],  B: [r, out],  scale = lora_alpha / r
                                                                                  (lora_alpha / sqrt(r) with rsLoRA)

Mixture-of-experts layers can also be adapted, as peft's ``target_parameters`` (``ParamWrapper``) does for the
fused 3-D expert parameters of transformers v5 (``mlp.experts.gate_up_proj [X, 2F, D]``, ``mlp.experts.down_proj
[X, D, F]``): one low-rank update per expert of the fused matrix, stored under the fused parameter's name::

        lora/model/layers_i/mlp/experts/gate_up_proj/{lora_A [X, D, r], lora_B [X, r, 2F]}  (B: gate, then up)
        lora/model/layers_i/mlp/experts/down_proj/{lora_A [X, F, r], lora_B [X, r, D]}

so expert ``e``'s ``[gate | up]`` kernel ``[D, 2F]`` gets ``scale * lora_A[e] @ lora_B[e]`` (the gate and up halves
share ``lora_A``) and its down kernel ``[F, D]`` likewise (:class:`easytune.models.moe.Experts`). ``all-linear``
never selects experts (nor the router); peft 0.21's ``all-linear`` on a transformers v5 MoE model adds
``target_parameters`` for the experts and the router, easytune's does not: list the experts in
``lora.target_parameters`` (the router is never adapted).

A train state holds ``trainable`` and ``frozen`` variable dicts (each ``{'params': ..., 'lora': ...}``,
possibly partial); ``jax.value_and_grad`` differentiates only ``trainable``, and the optimizer state exists
only for it. Full fine-tuning is the same code with every parameter trainable.

References:
    Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and section 4.1.
    Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA).
    PEFT ``LoraLayer.reset_lora_parameters`` (A Kaiming-uniform with a=sqrt(5), B zeros) and
    ``check_target_module_exists`` (suffix / regex / "all-linear" matching on HF module names); peft 0.21
    ``tuners/lora/layer.py`` ``ParamWrapper`` (experts: ``lora_A`` ``Linear(in, r*X)`` read as ``(X, r, in)``,
    ``lora_B`` ``Linear(r*X, out)`` read as ``(out, r, X)``; in/out swapped for a parameter that is not
    ``is_transposed``) and ``tuners/tuners_utils.py`` ``BaseTuner._inject_parameters`` (the matching rule).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
    target_parameters: tuple[str, ...] = ()  # fused expert params, e.g. ("gate_up_proj", "down_proj")

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


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # the fused expert parameters of transformers v5, in registration order


def expert_modules(params: Params) -> dict[str, tuple[str, ...]]:
    """The stacked experts of a params tree: HF module name (``model.layers.0.mlp.experts``) -> Flax path (modules
    holding ``gate_proj``, ``up_proj`` and ``down_proj`` as plain arrays or NF4 QTensors, not as submodules)."""
    flat = traverse_util.flatten_dict(params)
    return {hf_module_name(k[:-1]): k[:-1] for k in flat
            if k[-1] == "down_proj" and k[-2] == "experts" and k[:-1] + ("gate_proj",) in flat}


def parse_target_parameters(value) -> tuple[str, ...]:
    """Config value (a list, or ``"a,b"``) -> a tuple of peft ``target_parameters`` names, stripped; empty for none."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(v).strip() for v in value or () if str(v).strip())


def select_expert_targets(params: Params, target_parameters) -> list[tuple[str, ...]]:
    """Lora paths (``experts path + ("gate_up_proj",)`` or ``+ ("down_proj",)``) of the fused expert parameters that
    ``target_parameters`` selects, in tree order.

    peft's rule (``BaseTuner._inject_parameters``): the parameter's full name ``<module>.<param>``
    (``model.layers.0.mlp.experts.gate_up_proj``) equals an entry or ends with ``"." + entry``; no regex.

    Raises:
        ValueError: an entry that matches no expert parameter (named, with the available names; a router
            ``mlp.gate.weight`` or a linear module's weight are refused as such), or a model without experts.
    """
    targets = parse_target_parameters(target_parameters)
    mods = expert_modules(params)
    names = {f"{name}.{p}": path + (p,) for name, path in mods.items() for p in EXPERT_PARAMS}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if any(hit(n, t) for n in names):
            continue
        if not mods:
            raise ValueError(f"lora.target_parameters={list(targets)!r}: the model has no mixture-of-experts layers; "
                             f"target_parameters adapts stacked experts (Mixtral, Qwen3-MoE) only")
        why = ""
        if t.endswith("gate.weight") or t in ("gate", "weight", "mlp.gate"):
            why = " (the router mlp.gate is never a LoRA target in easytune)"
        elif t.endswith(".weight") or t in ("gate_proj", "up_proj"):
            why = (" (linear modules are chosen with lora.target_modules; the experts' gate and up projections are one "
                   "fused parameter, gate_up_proj)")
        raise ValueError(f"lora.target_parameters entry {t!r} matches no expert parameter{why}; available: "
                         f"{list(EXPERT_PARAMS)} (full names like {sorted(names)[:2]})")
    return [path for name, path in names.items() if any(hit(name, t) for t in targets)]


def expert_shapes(params: Params, path: tuple[str, ...]) -> tuple[int, int, int]:
    """``(X, in, out)`` of the fused expert parameter at lora path ``path`` in easytune's layout: gate_up_proj
    ``(X, D, 2F)``, down_proj ``(X, F, D)``."""
    flat = traverse_util.flatten_dict(params)
    mod = path[:-1]
    if path[-1] == "gate_up_proj":
        x, d, f = flat[mod + ("gate_proj",)].shape
        return x, d, 2 * f
    return tuple(flat[mod + ("down_proj",)].shape)


def is_expert_lora(path: tuple[str, ...]) -> bool:
    """Whether a lora module path (without the ``lora_A``/``lora_B`` leaf name) is a fused expert parameter."""
    return len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_PARAMS


def expert_lora_to_peft(lora_a, lora_b) -> tuple[np.ndarray, np.ndarray]:
    """easytune's expert LoRA (``lora_A [X, in, r]``, ``lora_B [X, r, out]``) -> peft ``ParamWrapper`` weights
    ``lora_A.weight [r*X, in]`` (expert-major rows) and ``lora_B.weight [out, r*X]`` (expert-minor columns), as
    ``ParamWrapper.get_delta_weight`` reads them back: ``A.reshape(X, r, in)``, ``B.reshape(out, r, X)``."""
    a, b = np.asarray(lora_a), np.asarray(lora_b)
    x, n_in, r = a.shape
    out = b.shape[-1]
    return (np.ascontiguousarray(a.transpose(0, 2, 1).reshape(x * r, n_in)),
            np.ascontiguousarray(b.transpose(2, 1, 0).reshape(out, r * x)))


def expert_lora_from_peft(weight_a, weight_b, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`expert_lora_to_peft`: peft ``lora_A.weight [r*X, in]``, ``lora_B.weight [out, r*X]`` ->
    ``(lora_A [X, in, r], lora_B [X, r, out])``."""
    a, b = np.asarray(weight_a), np.asarray(weight_b)
    r = a.shape[0] // num_experts
    return (np.ascontiguousarray(a.reshape(num_experts, r, a.shape[1]).transpose(0, 2, 1)),
            np.ascontiguousarray(b.reshape(b.shape[0], r, num_experts).transpose(2, 1, 0)))


def expert_peft_names(lora_paths) -> dict[tuple[str, ...], str]:
    """The module name peft gives the LoRA tensors of each expert LoRA path (``.../experts/gate_up_proj`` or
    ``.../experts/down_proj``): ``model.layers.0.mlp.experts`` or ``model.layers.0.mlp.experts.base_layer``, before
    ``.lora_A.weight`` (and after ``base_model.model.`` in a saved adapter).

    peft nests one ``ParamWrapper`` per targeted parameter of a module, wrapping in the order the module registers
    its parameters (``MixtralExperts`` / ``Qwen3MoeExperts``: ``gate_up_proj``, then ``down_proj``; not the order of
    ``target_parameters``, which peft sorts), so the first is innermost and its tensors sit under one ``base_layer``
    per wrapper around it (checked against peft 0.21's ``save_pretrained``)."""
    by_module: dict[tuple[str, ...], list[str]] = {}
    for path in lora_paths:
        by_module.setdefault(tuple(path[:-1]), []).append(path[-1])
    out = {}
    for mod, names in by_module.items():
        order = [p for p in EXPERT_PARAMS if p in names]
        for i, p in enumerate(order):
            out[mod + (p,)] = hf_module_name(mod) + ".base_layer" * (len(order) - 1 - i)
    return out


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
    """LoRA weights for every target: ``lora_A`` [in, r] Kaiming-uniform as PEFT, ``lora_B`` [r, out] zeros; for
    each fused expert parameter of ``cfg.target_parameters`` ``lora_A [X, in, r]``, ``lora_B [X, r, out]`` zeros.

    PEFT initialises ``lora_A.weight`` ([r, in]; ``[r*X, in]`` for experts) with ``kaiming_uniform_(a=sqrt(5))``,
    i.e. U(-1/sqrt(in), 1/sqrt(in)); ours is its transpose, so the bound is the same (in = D for gate_up_proj, F
    for down_proj).

    Returns:
        the ``'lora'`` collection: nested dict mirroring the target kernels' paths, arrays in ``dtype``.

    Raises:
        ValueError: as :func:`select_targets` and :func:`select_expert_targets`.
    """
    flat = traverse_util.flatten_dict(params)
    out = {}
    # target_modules may be empty when only experts are adapted (peft: target_modules=None with target_parameters)
    targets = select_targets(params, cfg.target_modules) if cfg.target_modules or not cfg.target_parameters else []
    for i, path in enumerate(targets):
        fan_in, fan_out = flat[path + ("kernel",)].shape
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        out[path + ("lora_A",)] = jax.random.uniform(key, (fan_in, cfg.r), dtype, -bound, bound)
        out[path + ("lora_B",)] = jnp.zeros((cfg.r, fan_out), dtype)
    for i, path in enumerate(select_expert_targets(params, cfg.target_parameters) if cfg.target_parameters else ()):
        x, fan_in, fan_out = expert_shapes(params, path)
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, len(targets) + i)
        out[path + ("lora_A",)] = jax.random.uniform(key, (x, fan_in, cfg.r), dtype, -bound, bound)
        out[path + ("lora_B",)] = jnp.zeros((x, cfg.r, fan_out), dtype)
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
            tied = t == "lm_head" and any(n.endswith("embed_tokens") for n in mods)
            raise ValueError(f"lora.modules_to_save entry {t!r} matches no module"
                             + ("; this model ties lm_head to embed_tokens (tie_word_embeddings), so training "
                                "embed_tokens trains both: list embed_tokens only" if tied else "")
                             + f"; available: {sorted(mods)}")
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
    """Folds LoRA into the base kernels: ``W' = W + scale * A @ B`` (fp32 math, result in W's dtype); for experts
    ``W'_e = W_e + scale * A_e @ B_e`` per expert, the fused gate_up_proj delta ``[X, D, 2F]`` split into the
    ``gate_proj`` (first F columns) and ``up_proj`` halves (as peft's ``ParamWrapper.merge``).

    Returns:
        a params tree of the same structure as ``params`` (for export or plain inference).
    """
    flat = traverse_util.flatten_dict(params)
    lflat = traverse_util.flatten_dict(lora)

    def add(name, delta):
        w = flat[name]
        flat[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)

    for key in [k for k in lflat if k[-1] == "lora_A"]:
        mod = key[:-1]
        a, b = lflat[key].astype(jnp.float32), lflat[mod + ("lora_B",)].astype(jnp.float32)
        if mod + ("kernel",) in flat:
            add(mod + ("kernel",), scale * (a @ b))
        elif mod[-1] == "gate_up_proj":
            delta = scale * jnp.einsum("xir,xro->xio", a, b)  # [X, D, 2F]
            f = delta.shape[-1] // 2
            add(mod[:-1] + ("gate_proj",), delta[..., :f])
            add(mod[:-1] + ("up_proj",), delta[..., f:])
        else:
            add(mod[:-1] + ("down_proj",), scale * jnp.einsum("xir,xro->xio", a, b))
    return traverse_util.unflatten_dict(flat)


def count_params(tree: Params) -> int:
    """Number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
