"""Per-layer <-> stacked layouts of the decoder layers, for ``ModelConfig.scan_layers``.

The canonical layout everywhere outside the jitted training step is per layer, with Hugging Face names
(``model/layers_3/self_attn/q_proj/kernel [D, H*E]``): loading, LoRA target selection, export and
generation read it. A model with ``scan_layers=True`` runs its decoder stack as one ``nn.scan`` and wants
every layer's variable stacked into one array with a leading [L] axis under a single ``layers`` module
(``model/layers/self_attn/q_proj/kernel [L, D, H*E]``). :func:`stack_layers` and :func:`unstack_layers`
convert between the two, for any of the trees a run holds:

- parameter and LoRA trees (``{'params': ..., 'lora': ...}`` or a bare params dict), arrays stacked with
  ``np.stack`` (numpy inputs) or ``jnp.stack``;
- NF4 :class:`easytune.quant.QTensor` kernels (their ``codes``, ``absmax``, ``absmax_scale`` and ``offset``
  arrays each get the [L] axis; the static ``shape`` stays the per-layer ``(in, out)``);
- logical-axis trees (leaves are tuples of axis names, as ``llama.param_logical_axes``): ``"layers"`` is
  prepended (and removed), which :data:`easytune.sharding.RULES` maps to no mesh axis.

Both directions are exact (stacking copies values, it never casts). MaxText and Levanter keep the same
split: scanned weights inside training, per-layer weights on disk for interchange.

References:
    flax ``nn.scan`` (``variable_axes={'params': 0}``, ``metadata_params={nn.PARTITION_NAME: ...}``);
    MaxText ``layers/decoders.py`` (``scan_layers``), Levanter ``Stacked``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
LAYERS = "layers"  # the stacked module's name and the logical name of its leading axis
_LAYER_KEY = re.compile(r"layers_(\d+)")


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def _stack_leaves(values: list, where: str):
    """One stacked leaf from the per-layer values (arrays, QTensors, or logical-axes tuples)."""
    from easytune import quant
    first = values[0]
    if first is traverse_util.empty_node:
        return first
    if quant.is_qtensor(first):
        try:
            return jax.tree.map(lambda *xs: _stack_leaves(list(xs), where), *values, is_leaf=_is_axes)
        except ValueError as e:
            raise ValueError(f"{where}: the layers' NF4 kernels differ in layout ({e})") from e
    if _is_axes(first):
        if any(v != first for v in values):
            raise ValueError(f"{where}: the layers' logical axes differ ({sorted(set(values), key=str)})")
        return (LAYERS,) + first
    shapes = {(tuple(np.shape(v)), np.dtype(v.dtype)) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"{where}: the layers' arrays differ in shape or dtype ({sorted(shapes, key=str)})")
    if all(isinstance(v, np.ndarray) for v in values):
        return np.stack(values)
    return jnp.stack([jnp.asarray(v) for v in values])


def _jit_if_arrays(fn, tree, **kw):
    """``fn(tree, **kw)``, as one jitted program when ``tree`` holds ``jax.Array`` leaves (one compile instead
    of an eager op per leaf; the results stay on the devices); plain numpy (and axes trees) stay eager."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_axes)
    if any(isinstance(x, jax.Array) for x in leaves) and not any(_is_axes(x) for x in leaves):
        return jax.jit(functools.partial(fn, **kw))(tree)
    return fn(tree, **kw)


def stack_layers(tree: PyTree, num_layers: int) -> PyTree:
    """Per-layer layout -> stacked layout: every ``.../layers_{i}/REST`` leaf becomes ``.../layers/REST``
    with a leading [L] axis (index i = layer i).

    Args:
        tree: nested dict of variables (arrays, :class:`easytune.quant.QTensor`) or of logical-axes tuples;
            it may hold no layer at all (e.g. a trainable tree with only ``lm_head``), then it is returned as
            is.
        num_layers: L, the model's ``num_hidden_layers``.

    Returns:
        The same tree with the layers stacked: arrays ``[L, ...]`` (numpy when the inputs are numpy, else
        ``jax.Array``), axes tuples ``("layers", ...)``, QTensors whose arrays are stacked.

    Raises:
        ValueError: some layers lack a variable the others have (LoRA targets or ``modules_to_save`` chosen
            for a subset of layers, which a scan over identical layers cannot express), layers disagree in
            shape/dtype/axes, or an index is >= ``num_layers``. The message names the variable.
    """
    return _jit_if_arrays(_stack_tree, tree, num_layers=num_layers)


def _stack_tree(tree, num_layers):
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    out: dict = {}
    groups: dict = {}
    for key, value in flat.items():
        j = next((n for n, part in enumerate(key) if _LAYER_KEY.fullmatch(str(part))), None)
        if j is None:
            out[key] = value
            continue
        i = int(_LAYER_KEY.fullmatch(key[j]).group(1))
        groups.setdefault((key[:j], key[j + 1:]), {})[i] = value
    for (prefix, rest), by_layer in groups.items():
        where = "/".join(prefix + ("layers_*",) + rest)
        if sorted(by_layer) != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(by_layer))
            extra = sorted(set(by_layer) - set(range(num_layers)))
            raise ValueError(
                f"scan_layers: {where} exists for some decoder layers only (missing in {missing}"
                + (f", unexpected {extra}" if extra else "") + f", of {num_layers}); a scan needs every layer "
                "to hold the same variables: choose LoRA target_modules / modules_to_save that match every "
                "layer, or set model.scan_layers=False")
        out[prefix + (LAYERS,) + rest] = _stack_leaves([by_layer[i] for i in range(num_layers)], where)
    return traverse_util.unflatten_dict(out)


def _layer_count(value) -> int | None:
    from easytune import quant
    if value is traverse_util.empty_node:
        return None
    if quant.is_qtensor(value):
        return _layer_count(value.codes)
    if _is_axes(value):
        return None
    return int(np.shape(value)[0])


def _take(value, i: int, where: str):
    from easytune import quant
    if value is traverse_util.empty_node:
        return value
    if quant.is_qtensor(value):
        return jax.tree.map(lambda x: _take(x, i, where), value, is_leaf=_is_axes)
    if _is_axes(value):
        if not value or value[0] != LAYERS:
            raise ValueError(f"{where}: stacked logical axes {value} do not start with {LAYERS!r}")
        return value[1:]
    return value[i]


def unstack_layers(tree: PyTree, num_layers: int | None = None) -> PyTree:
    """Stacked layout -> per-layer layout: the inverse of :func:`stack_layers`.

    Every ``.../layers/REST`` leaf ``[L, ...]`` becomes ``.../layers_{i}/REST`` = ``leaf[i]``; axes tuples lose
    their leading ``"layers"``.

    Args:
        tree: nested dict in the stacked layout (trees without a ``layers`` entry are returned as is).
        num_layers: L; needed only for a tree of logical-axes tuples (no array tells L), else read from the
            arrays' leading dimension and checked against this when given.

    Returns:
        The per-layer tree; arrays are slices (numpy stays numpy, ``jax.Array`` stays ``jax.Array``).

    Raises:
        ValueError: the stacked leaves disagree on L, L cannot be told (an axes tree without
            ``num_layers``), or a stacked axes tuple does not start with ``"layers"``.
    """
    return _jit_if_arrays(_unstack_tree, tree, num_layers=num_layers)


def _unstack_tree(tree, num_layers):
    flat = traverse_util.flatten_dict(tree, keep_empty_nodes=True)
    stacked = {}
    out: dict = {}
    for key, value in flat.items():
        j = next((n for n, part in enumerate(key) if part == LAYERS), None)
        if j is None:
            out[key] = value
        else:
            stacked[key] = (j, value)
    counts = {n for _, v in stacked.values() if (n := _layer_count(v)) is not None}
    if num_layers is not None:
        counts.add(int(num_layers))
    if len(counts) > 1:
        raise ValueError(f"unstack_layers: stacked leaves disagree on the number of layers ({sorted(counts)})")
    if stacked and not counts:
        raise ValueError("unstack_layers: cannot tell the number of layers of a logical-axes tree; pass num_layers")
    n = counts.pop() if counts else 0
    for key, (j, value) in stacked.items():
        where = "/".join(map(str, key))
        for i in range(n):
            out[key[:j] + (f"layers_{i}",) + key[j + 1:]] = _take(value, i, where)
    return traverse_util.unflatten_dict(out)
