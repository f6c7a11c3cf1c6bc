"""Hugging Face checkpoint weights <-> easytune params: tensor names and shapes, reading a checkpoint directory
(safetensors or PyTorch ``.bin``, optionally NF4-quantizing kernels as they arrive) and writing one.

Parameter paths map one-to-one onto HF tensor names; only two renames and one transpose are involved:

    ``model/layers_3/self_attn/q_proj/kernel [D, H*E]`` <-> ``model.layers.3.self_attn.q_proj.weight [H*E, D]``
    ``model/embed_tokens/embedding [V, D]``             <-> ``model.embed_tokens.weight [V, D]``
    ``.../weight`` (RMSNorm) and ``.../bias``           <-> same name, same layout

That covers every family's dense parameters (Qwen3/Gemma 3 ``self_attn.q_norm``, Gemma's four layer norms, Phi-3's
fused ``qkv_proj`` / ``gate_up_proj`` are plain kernels and norms). A mixture-of-experts layer adds a router and X
experts, stacked into one array per projection here but one tensor per expert on disk (``save_pretrained`` of
transformers v5 writes them so: ``conversion_mapping.py`` reverses its ``MergeModulelist`` on save):

    ``model/layers_3/mlp/gate/weight [X, D]``            <-> ``model.layers.3.mlp.gate.weight [X, D]`` (router)
    ``model/layers_3/mlp/experts/gate_proj [X, D, F]``   <-> ``model.layers.3.mlp.experts.{e}.gate_proj.weight [F, D]``
    ``model/layers_3/mlp/experts/up_proj [X, D, F]``     <-> ``model.layers.3.mlp.experts.{e}.up_proj.weight [F, D]``
    ``model/layers_3/mlp/experts/down_proj [X, F, D]``   <-> ``model.layers.3.mlp.experts.{e}.down_proj.weight [D, F]``

(Qwen3-MoE; Mixtral names the block ``block_sparse_moe`` and the projections ``w1`` (gate), ``w3`` (up),
``w2`` (down).) Expert e of a stacked array is ``array[e]`` = the on-disk tensor transposed. Loading also accepts
the fused form of transformers v5's module tree, ``mlp.experts.gate_up_proj [X, 2F, D]`` (gate rows, then up rows)
and ``mlp.experts.down_proj [X, D, F]``, and Mixtral's router as ``mlp.gate.weight``. :func:`expected_params` is
the table of names; it depends on the config (model_type, which layers are sparse, tied embeddings).

(D embed, H query heads, E head dim, V vocab, X experts, F an expert's hidden width.) The ``config.json`` side is
:mod:`easytune.models.hf_config`.

Checkpoints are read shard by shard with ``safetensors.safe_open(framework="np")`` (PyTorch ``.bin``
files only with ``torch.load(weights_only=True)``) and written with ``safetensors.numpy.save_file``.
bfloat16 travels as ``ml_dtypes.bfloat16`` numpy arrays, which safetensors 0.8 reads and writes
natively (tested here); no torch is needed except for ``.bin``. Older safetensors could not
return bfloat16 as numpy (0.5.3: safetensors issue #598), so bf16 checkpoints need a recent release.

References:
    transformers ``PreTrainedModel.save_pretrained`` (v5): shard names and the
    ``model.safetensors.index.json`` layout; huggingface_hub ``split_state_dict_into_shards_factory``:
    the greedy sharding order reproduced by ``save_hf_state_dict``. transformers ``conversion_mapping.py``
    (v5, "mixtral" and "qwen2_moe" entries, which "qwen3_moe" uses): the per-expert on-disk names and the fused
    ``gate_up_proj`` (``Concatenate(dim=1)`` of gate and up) / ``down_proj`` layouts;
    ``models/mixtral/modeling_mixtral.py`` ``MixtralExperts``, ``models/qwen3_moe/modeling_qwen3_moe.py``.
    bitsandbytes ``Linear4bit`` (the NF4 layout of :func:`load_hf_quantized`, see :mod:`easytune.quant`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from easytune import quant
from easytune.models.hf_config import config_to_hf, read_config, read_json
from easytune.models.llama import init_params
from easytune.models.model_config import ModelConfig

PyTree = Any
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"


class HFParam(NamedTuple):
    """Where one tensor of a HF checkpoint lives in the flax params.

    Attributes:
        path: the flax param path (``("model", "layers_0", "self_attn", "q_proj", "kernel")``); for one expert's
            tensor, the stacked param's path followed by the expert index e (an int): the tensor is
            ``params[path[:-1]][e]``, transposed.
        shape: the tensor's shape on disk (torch layout, ``[out, in]`` for linear weights).
        transposed: whether the flax array (or expert slice) is the tensor transposed.
    """
    path: tuple
    shape: tuple[int, ...]
    transposed: bool

    @property
    def param_path(self) -> tuple[str, ...]:
        """The flax path of the param holding the tensor (the stacked array for an expert's tensor)."""
        return self.path[:-1] if self.expert is not None else self.path

    @property
    def expert(self) -> int | None:
        """The expert index e of an expert's tensor, else None."""
        return self.path[-1] if isinstance(self.path[-1], int) else None


# HF names of a sparse MLP: the block's module name on disk and each stacked projection's per-expert name
_MOE_NAMES = {"mixtral": ("block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})}
_MOE_DEFAULT = ("mlp", {p: p for p in quant.EXPERT_KERNELS})


def _hf_name(path: tuple[str, ...], config: ModelConfig) -> tuple[str, bool]:
    """HF tensor name of a flax param path (not an expert's), and whether the array is transposed between the
    two. A sparse MLP's ``mlp`` is renamed to the family's block name (Mixtral ``block_sparse_moe``)."""
    block = _MOE_NAMES.get(config.model_type, _MOE_DEFAULT)[0]
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
    if quant.is_router(path):
        parts[-2] = block
    leaf = path[-1]
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts), leaf == "kernel"


def _expert_name(path: tuple[str, ...], e: int, config: ModelConfig) -> str:
    """HF name of expert ``e``'s tensor of the stacked param ``.../mlp/experts/{proj}``."""
    block, projs = _MOE_NAMES.get(config.model_type, _MOE_DEFAULT)
    prefix = ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-3])
    return f"{prefix}.{block}.experts.{e}.{projs[path[-1]]}.weight"


def expected_params(config: ModelConfig) -> dict[str, HFParam]:
    """Every tensor a HF checkpoint of ``config`` holds, as ``save_pretrained`` names it.

    Args:
        config: model config (its ``model_type`` picks the names of the mixture-of-experts tensors).

    Returns:
        ``{hf_name: HFParam(path, hf_shape, transposed)}`` (a 3-tuple), in the tree order of ``init_params``;
        a stacked expert param ``[X, in, out]`` gives X entries, one per expert, each with its torch shape
        ``[out, in]`` and the path ``(*flax_path, e)``. No ``lm_head.weight`` when embeddings are tied.
    """
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in keypath)
        if quant.is_expert_kernel(path):
            num_experts, *per_expert = leaf.shape
            for e in range(num_experts):
                out[_expert_name(path, e, config)] = HFParam(path + (e,), tuple(reversed(per_expert)), True)
            continue
        name, transposed = _hf_name(path, config)
        out[name] = HFParam(path, tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape), transposed)
    return out


class _Fused(NamedTuple):
    """A fused expert tensor of transformers v5's module tree: its shape, and the row ranges (axis 1) that are
    each stacked param, with that param's per-expert HF names."""
    shape: tuple[int, ...]
    parts: tuple[tuple[tuple[str, ...], int, int, tuple[str, ...]], ...]


def _alternative_names(config: ModelConfig, expected: dict[str, HFParam]) -> tuple[dict[str, str], dict[str, _Fused]]:
    """Names a checkpoint may use instead of :func:`expected_params`' ones: ``({alias: name}, {fused name:
    _Fused})``. Mixtral's router as ``mlp.gate.weight``; per layer ``{block}.experts.gate_up_proj [X, 2F, D]``
    (gate rows then up rows: ``conversion_mapping.py``'s ``Concatenate(dim=1)``) and ``{block}.experts.down_proj
    [X, D, F]`` (its ``MergeModulelist(dim=0)``), for the block names ``mlp`` and the family's own."""
    aliases, fused = {}, {}
    block = _MOE_NAMES.get(config.model_type, _MOE_DEFAULT)[0]
    by_param: dict[tuple[str, ...], list[str]] = {}
    for name, entry in expected.items():
        if entry.expert is not None:
            by_param.setdefault(entry.param_path, []).append(name)
        elif quant.is_router(entry.path) and block != "mlp":
            aliases[name.replace(f".{block}.gate.", ".mlp.gate.")] = name
    layers = {path[:-3]: path[:-1] for path in by_param}  # layer path -> its experts' module path
    for layer, experts in layers.items():
        gate, up, down = (experts + (p,) for p in quant.EXPERT_KERNELS)
        if not all(p in by_param for p in (gate, up, down)):
            continue
        f_out, d_in = expected[by_param[gate][0]].shape
        d_out, f_in = expected[by_param[down][0]].shape
        x = len(by_param[gate])
        prefix = ".".join(re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in layer)
        for b in dict.fromkeys(("mlp", block)):
            fused[f"{prefix}.{b}.experts.gate_up_proj"] = _Fused(
                (x, 2 * f_out, d_in), ((gate, 0, f_out, tuple(by_param[gate])),
                                       (up, f_out, 2 * f_out, tuple(by_param[up]))))
            fused[f"{prefix}.{b}.experts.down_proj"] = _Fused(
                (x, d_out, f_in), ((down, 0, d_out, tuple(by_param[down])),))
    return aliases, fused


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every parameter of ``config`` as transformers names it, without allocating any weights.

    Args:
        config: model config.

    Returns:
        ``{hf_name: (flax_path, hf_shape)}`` in HF module order (embed_tokens, layers by index, norm,
        lm_head; by name within a layer, experts by index), ``hf_shape`` in torch layout (``[out, in]`` for
        linear weights), e.g. ``"model.layers.0.self_attn.q_proj.weight": (("model", "layers_0", "self_attn",
        "q_proj", "kernel"), (H*E, D))``; one entry per expert, ``flax_path`` then ending in the expert index
        (:class:`HFParam`). Equals the names and shapes of the tensors ``save_pretrained`` writes (for a dense
        model, ``dict(model.named_parameters())``'s).
    """
    items = sorted(expected_params(config).items(), key=lambda kv: _module_order(kv[0]))
    return {name: (path, shape) for name, (path, shape, _) in items}


def _ignored(name: str, config: ModelConfig) -> bool:
    """HF tensors that carry no parameter here: RoPE buffers, and lm_head when embeddings are tied."""
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")


class ParamBuilder:
    """Collects HF tensors one at a time into a flax param tree, checking names and shapes.

    The default builder of :func:`load_hf_model` (``make_builder``); :func:`load_hf_quantized`'s subclasses it.
    An expert's tensor is written into its stacked param, allocated ``[X, in, out]`` when the first of its
    experts arrives; a fused v5 expert tensor fills every expert of its params at once.

    Attributes:
        config: the model config the tensors must fit.
        expected: :func:`expected_params` of ``config``.
        dtype: numpy dtype every stored array is cast to (``config.dtype``).
        flat: ``{flax path: array}`` collected so far (model layout).
        received: the :func:`expected_params` names stored so far.
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.expected = expected_params(config)
        self.aliases, self.fused = _alternative_names(config, self.expected)
        self.dtype = np.dtype(jnp.dtype(config.dtype))
        self.flat: dict[tuple[str, ...], np.ndarray] = {}
        self.received: set[str] = set()

    def shape_ok(self, name: str, shape: tuple[int, ...]) -> bool:
        """False for ignored tensors; raises for unknown names or wrong shapes."""
        if _ignored(name, self.config):
            return False
        name = self.aliases.get(name, name)
        if name in self.expected:
            want = self.expected[name].shape
        elif name in self.fused:
            want = self.fused[name].shape
        else:
            raise ValueError(f"unexpected tensor {name!r} with shape {shape}: no such parameter in "
                             f"a {self.config.model_type} model with this config")
        if tuple(shape) != want:
            raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(shape)}, "
                             f"the config expects {want}")
        return True

    def add(self, name: str, array: np.ndarray) -> None:
        """Stores ``array`` (HF layout) under its flax path, transposed and cast to config.dtype (a fused expert
        tensor split into its experts' slices)."""
        if not self.shape_ok(name, tuple(array.shape)):
            return
        given, name = name, self.aliases.get(name, name)
        array = np.asarray(array)
        targets = [name] if name in self.expected else [n for *_, names in self.fused[name].parts for n in names]
        again = [n for n in targets if n in self.received]
        if again:  # e.g. a router under both its names, or fused experts next to per-expert ones
            raise ValueError(f"tensor {given!r} gives {again[0]!r} a second time (the checkpoint holds the same "
                             f"parameter twice, under two names or in two layouts); keep one")
        if name in self.expected:
            self.put(name, self.expected[name], array)
            return
        for _, lo, hi, names in self.fused[name].parts:
            for e, expert_name in enumerate(names):
                self.put(expert_name, self.expected[expert_name], array[e, lo:hi])

    def put(self, name: str, entry: HFParam, array: np.ndarray) -> None:
        """Stores the tensor ``name`` (HF layout, ``entry`` its :func:`expected_params` entry) in ``flat``."""
        array = array.T if entry.transposed else array
        if entry.expert is None:
            self.flat[entry.path] = np.ascontiguousarray(array, dtype=self.dtype)
        else:
            stacked = self.flat.get(entry.param_path)
            if stacked is None:
                stacked = self.flat[entry.param_path] = np.empty((self.config.num_experts, *array.shape), self.dtype)
            stacked[entry.expert] = array
        self.received.add(name)

    def build(self) -> PyTree:
        """The nested param dict; raises when any parameter (or any expert's tensor) was not provided."""
        missing = [f"{n} {list(entry.shape)}" for n, entry in self.expected.items() if n not in self.received]
        if missing:
            raise ValueError(f"missing tensors in checkpoint (name [expected shape]): "
                             f"{', '.join(missing)}")
        tree: dict = {}
        for path, array in self.flat.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = array
        return tree


def params_to_state_dict(params: PyTree, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (the names ``save_pretrained`` writes, torch layout ``[out, in]``; stacked
    experts split into one tensor per expert).

    Args:
        params: param tree as from ``init_params`` (jax or numpy arrays, fully addressable).
        config: model config (checked against the tree).

    Returns:
        ``{hf_name: contiguous numpy array}`` in the params' dtype, ordered as the HF module tree; no
        ``lm_head.weight`` when embeddings are tied (as ``save_pretrained``). Keys as :func:`expected_params`.

    Raises:
        ValueError: the tree does not match ``config`` (naming the tensor and both shapes).
    """
    expected = expected_params(config)
    flat = {tuple(k.key for k in kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    sd, used = {}, {}
    for name, entry in expected.items():
        path, hf_shape = entry.param_path, entry.shape
        if path not in flat and path not in used:
            raise ValueError(f"missing parameter {'/'.join(path)} (HF {name!r}, shape {hf_shape})")
        if path not in used:  # a stacked expert param is read (from the device) once, then sliced per expert
            used[path] = np.asarray(flat.pop(path))
            if entry.expert is not None and used[path].shape != (config.num_experts, *reversed(hf_shape)):
                raise ValueError(f"shape mismatch for {'/'.join(path)} (HF {name!r} and the other experts): "
                                 f"params have {used[path].shape}, the config expects "
                                 f"{(config.num_experts, *reversed(hf_shape))}")
        array = used[path] if entry.expert is None else used[path][entry.expert]
        array = array.T if entry.transposed else array
        if array.shape != hf_shape:
            raise ValueError(f"shape mismatch for tensor {name!r}: params have {array.shape}, "
                             f"the config expects {hf_shape}")
        sd[name] = np.ascontiguousarray(array)
        if entry.expert is None:
            del used[path]
    if flat:
        raise ValueError(f"unexpected parameters: {['/'.join(p) for p in flat]}")
    return dict(sorted(sd.items(), key=lambda kv: _module_order(kv[0])))


def _module_order(name: str) -> tuple:
    """Sort key following HF's module order: embed_tokens, layers by index, norm, lm_head; within a layer by
    name, numbers (expert indices) compared as numbers."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        rest = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name[m.end():]))
        return (1, int(m.group(1)), rest)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, (name,))


def state_dict_to_params(sd: dict[str, np.ndarray], config: ModelConfig) -> PyTree:
    """HF state dict -> flax params (inverse of ``params_to_state_dict``).

    ``*.rotary_emb.inv_freq`` is ignored, and so is ``lm_head.weight`` when embeddings are tied.

    Args:
        sd: ``{hf_name: array [out, in]}`` (numpy, any float dtype).
        config: model config.

    Returns:
        Nested dict of numpy arrays in ``config.dtype`` (host memory; place with ``jax.device_put``).

    Raises:
        ValueError: an unexpected or missing tensor, or a shape mismatch (naming the tensor and both
            shapes).
    """
    builder = ParamBuilder(config)
    for name, array in sd.items():
        builder.add(name, array)
    return builder.build()


def _weight_files(model_dir: pathlib.Path) -> tuple[list[pathlib.Path], str]:
    """The weight files of a HF dir in load order and their format ("safetensors" or "bin").

    Preference as ``from_pretrained``: safetensors index, single safetensors, ``.bin`` index, single
    ``.bin``.
    """
    for index_name, single, fmt in ((_INDEX, _SINGLE, "safetensors"),
                                    (_BIN_INDEX, _BIN_SINGLE, "bin")):
        if (model_dir / index_name).is_file():
            index = read_json(model_dir / index_name)
            if not isinstance(index.get("weight_map"), dict):
                raise ValueError(f"{model_dir / index_name}: no \"weight_map\" object")
            files = [model_dir / f for f in dict.fromkeys(index["weight_map"].values())]
            for path in files:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: listed in {model_dir / index_name} but not found")
            return files, fmt
        if (model_dir / single).is_file():
            return [model_dir / single], fmt
    raise FileNotFoundError(f"no {_SINGLE}, {_INDEX}, {_BIN_SINGLE} or {_BIN_INDEX} in {model_dir}")


def _torch_to_numpy(tensor) -> np.ndarray:
    """A torch CPU tensor as numpy, bit-exact (bfloat16 via an int16 view to ``ml_dtypes.bfloat16``)."""
    import ml_dtypes
    import torch
    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _load_bin_shard(path: pathlib.Path, builder: ParamBuilder) -> None:
    """Adds the tensors of one ``pytorch_model*.bin`` to ``builder``.

    Read with ``torch.load(weights_only=True, mmap=True)``: PyTorch's restricted unpickler admits only
    tensors, primitive containers and numbers, so a pickle naming any other class or function is
    refused instead of run.
    """
    try:
        import torch
    except ImportError as e:
        raise ValueError(f"{path}: reading PyTorch .bin weights needs torch (pip install torch); "
                         f"safetensors checkpoints do not") from e
    import pickle
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise ValueError(f"{path}: refused to unpickle: {what}; easytune reads .bin weights only with "
                         f"torch.load(weights_only=True), which admits tensors and plain containers "
                         f"(convert the checkpoint to safetensors where you trust it)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch state dict: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    for name in list(sd):
        tensor = sd.pop(name)
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if builder.shape_ok(name, tuple(tensor.shape)):
            builder.add(name, _torch_to_numpy(tensor))


def load_hf_model(model_dir: str | os.PathLike, dtype: Any = None,
                  make_builder=None) -> tuple[ModelConfig, PyTree]:
    """Loads a HF checkpoint directory of any family in ``model_config.MODEL_TYPES``, one weight file at a time.

    Formats, in ``from_pretrained``'s order of preference: ``model.safetensors.index.json`` + shards,
    ``model.safetensors``, ``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``. Each
    tensor is transposed where needed and cast to the params dtype as soon as it is read, and a
    shard is closed before the next opens, so peak host memory is about the converted params plus one
    shard (``bench/load_memory.py`` measures it); a mixture-of-experts param is allocated ``[X, in, out]`` once
    and each expert's tensor written into it as it is read. ``.bin`` files are read only with
    ``torch.load(weights_only=True)``; no code from the checkpoint (``trust_remote_code``) ever runs.

    Args:
        model_dir: folder with ``config.json`` and weights as above.
        dtype: parameter dtype (name or dtype, e.g. the config's ``model.dtype``); None keeps the
            checkpoint's (``config_from_hf``). Every tensor is cast to it.
        make_builder: ``config -> builder`` with ``shape_ok(name, shape)``, ``add(name, array)`` and
            ``build()`` that receives each tensor as it is read (default: plain float params); QLoRA's
            quantizes kernels on arrival (:func:`load_hf_quantized`).

    Returns:
        ``(config, params)``; params are numpy arrays in ``config.dtype`` on host.

    Raises:
        FileNotFoundError: no ``config.json``, no weights, or a shard named by an index is absent.
        ValueError: ``config.json`` or an index is not valid JSON (naming the file and the JSON
            error); a safetensors file is truncated or corrupt, or a ``.bin`` holds anything but
            tensors (naming the file); as ``config_from_hf`` (unsupported model_type or field, named);
            an unexpected, missing or wrongly shaped tensor (naming it and both shapes; every missing
            expert's tensor by name).
    """
    model_dir = pathlib.Path(model_dir)
    config = read_config(model_dir)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=jnp.dtype(dtype).name)
    files, fmt = _weight_files(model_dir)
    builder = (make_builder or ParamBuilder)(config)
    for path in files:
        if fmt == "bin":
            _load_bin_shard(path, builder)
            continue
        try:
            with safetensors.safe_open(path, framework="np") as f:
                for name in f.keys():
                    if builder.shape_ok(name, tuple(f.get_slice(name).get_shape())):
                        builder.add(name, f.get_tensor(name))
        except (safetensors.SafetensorError, OSError) as e:
            raise ValueError(f"{path}: safetensors file is truncated or corrupt: {e}") from e
    return config, builder.build()


class _QuantizingBuilder(ParamBuilder):
    """A :class:`ParamBuilder` storing the kernels :func:`easytune.quant.should_quantize` chooses as NF4; an
    expert's tensor is quantized on arrival and written into its param's stacked :class:`~easytune.quant.QTensor`
    (allocated with the first expert, :func:`easytune.quant.empty_experts`)."""

    def __init__(self, config, skip_modules, double_quant: bool):
        super().__init__(config)
        self.skip_modules = tuple(skip_modules)
        self.double_quant = double_quant

    def put(self, name: str, entry: HFParam, array: np.ndarray) -> None:
        if not quant.should_quantize(entry.param_path, self.skip_modules):
            super().put(name, entry, array)
            return
        q = quant.quantize(array, double_quant=self.double_quant)  # HF layout [out, in], as bitsandbytes stores it
        if entry.expert is None:
            self.flat[entry.path] = q
        else:
            stacked = self.flat.get(entry.param_path)
            if stacked is None:
                stacked = self.flat[entry.param_path] = quant.empty_experts(q, self.config.num_experts)
            quant.set_expert(stacked, entry.expert, q)
        self.received.add(name)


def load_hf_quantized(model_dir, dtype: Any = None, skip_modules=("lm_head",), double_quant: bool = True):
    """Loads a Hugging Face checkpoint with its kernels NF4-quantized tensor by tensor.

    Each tensor is read, quantized (kernels chosen by :func:`easytune.quant.should_quantize`, experts included,
    routers never) or cast to ``dtype`` (embeddings, norms, skipped modules), and dropped before the next is read:
    peak host memory is the quantized model plus one float tensor (plus, for ``.bin`` checkpoints, one
    memory-mapped shard). Expert e's tensor becomes expert e of its param's stacked QTensor (``shape (X, in,
    out)``, :func:`easytune.quant.dequantize` gives ``[X, in, out]``).

    Args:
        model_dir: Hugging Face model dir (``config.json`` + safetensors or ``.bin`` weights, single or
            sharded with an index), the formats :func:`load_hf_model` reads.
        dtype: dtype of the unquantized params (None: the checkpoint's).
        skip_modules: HF module names (or suffixes) kept in float.
        double_quant: quantize the absmax constants too.

    Returns:
        ``(ModelConfig, params)``: host numpy arrays and :class:`easytune.quant.QTensor` leaves.

    Raises:
        FileNotFoundError / ValueError: as :func:`load_hf_model` (missing, unexpected or misshapen tensors
            named; a corrupt weight file named).
    """
    return load_hf_model(model_dir, dtype,
                         make_builder=lambda config: _QuantizingBuilder(config, skip_modules, double_quant))


def _shard(sd: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Greedy in-order sharding of huggingface_hub (a tensor over the limit gets its own shard)."""
    shards, current, size = [], {}, 0
    for name, array in sd.items():
        nbytes = array.nbytes
        if nbytes > max_shard_bytes:
            shards.append({name: array})
            continue
        if size + nbytes > max_shard_bytes and current:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(tensors: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """``safetensors.numpy.save_file`` (``format: pt`` as transformers writes), then the usual file mode:
    safetensors creates files 0600, which would hide a shared model dir from other users."""
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_hf_state_dict(sd: dict[str, np.ndarray], hf_config: dict, out_dir: str | os.PathLike,
                       max_shard_bytes: int = 2 * 2**30) -> None:
    """Writes a HF checkpoint directory as ``save_pretrained`` does.

    Files: ``config.json``, ``generation_config.json`` (bos/eos/pad from ``hf_config``), and either
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (``{"metadata": {"total_size", "total_parameters"}, "weight_map": {name: file}}``).

    Args:
        sd: ``{hf_name: numpy array}`` (bfloat16 as ``ml_dtypes.bfloat16``).
        hf_config: the ``config.json`` dict.
        out_dir: output folder (created).
        max_shard_bytes: largest shard size in bytes before splitting (one tensor may exceed it).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            generation[key] = hf_config[key]
    (out_dir / "generation_config.json").write_text(
        json.dumps(generation, indent=2, sort_keys=True) + "\n")
    sd = {k: np.ascontiguousarray(v) for k, v in sd.items()}
    shards = _shard(sd, max_shard_bytes)
    stale = [out_dir / _INDEX, *out_dir.glob("model-*-of-*.safetensors"), out_dir / _SINGLE]
    for path in stale:  # a previous save with other sharding would otherwise confuse loaders
        path.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(shards[0], out_dir / _SINGLE)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, out_dir / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values()),
                          "total_parameters": sum(v.size for v in sd.values())},
             "weight_map": weight_map}
    (out_dir / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_hf_model(params: PyTree, config: ModelConfig, out_dir: str | os.PathLike,
                  max_shard_bytes: int = 2 * 2**30) -> None:
    """Saves params as a HF checkpoint (``config.json``'s architecture from ``config.model_type``) that
    ``AutoModelForCausalLM.from_pretrained`` loads; experts as one tensor per expert, as ``save_pretrained``.

    Arrays are written in their own dtype; ``config.json`` records ``config.dtype``.

    Args:
        params: param tree (fully addressable arrays).
        config: model config.
        out_dir: output folder (created).
        max_shard_bytes: shard size limit in bytes (see ``save_hf_state_dict``).

    Raises:
        ValueError: ``params`` do not match ``config``.
    """
    save_hf_state_dict(params_to_state_dict(params, config), config_to_hf(config), out_dir,
                       max_shard_bytes)
