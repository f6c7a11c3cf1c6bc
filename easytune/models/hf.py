"""Hugging Face checkpoints <-> easytune: ``config.json`` <-> ``ModelConfig``, safetensors <-> params.

Parameter paths map one-to-one onto HF tensor names; only two renames and one transpose are involved:

    ``model/layers_3/self_attn/q_proj/kernel [D, H*E]`` <-> ``model.layers.3.self_attn.q_proj.weight [H*E, D]``
    ``model/embed_tokens/embedding [V, D]``             <-> ``model.embed_tokens.weight [V, D]``
    ``.../weight`` (RMSNorm) and ``.../bias``           <-> same name, same layout

Checkpoints are read shard by shard with ``safetensors.safe_open(framework="np")`` and written with
``safetensors.numpy.save_file``. bfloat16 travels as ``ml_dtypes.bfloat16`` numpy arrays, which
safetensors 0.8 reads and writes natively (tested here); no torch is needed. Older safetensors could not
return bfloat16 as numpy (0.5.3: safetensors issue #598), so bf16 checkpoints need a recent release.

References:
    transformers ``LlamaConfig`` / ``PreTrainedModel.save_pretrained`` (v5): config keys, shard names and
    the ``model.safetensors.index.json`` layout; huggingface_hub ``split_state_dict_into_shards_factory``:
    the greedy sharding order reproduced by ``save_hf_state_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from easytune.models.llama import ModelConfig, init_params

PyTree = Any
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_DTYPES = ("float32", "bfloat16", "float16")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _first(token_id):
    """First id of a list-valued special token (Llama 3 ``eos_token_id: [...]``), else the id."""
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


def config_from_hf(hf: dict) -> ModelConfig:
    """Builds a ``ModelConfig`` from a HF ``config.json`` dict (transformers v4 or v5 layout).

    Missing keys take the defaults of the matching transformers config class. ``dtype`` is the
    checkpoint's ``dtype``/``torch_dtype`` when that is float32, bfloat16 or float16, else float32.
    A list-valued ``bos_token_id``/``eos_token_id`` (Llama 3) keeps its first id.

    Args:
        hf: the parsed ``config.json``.

    Returns:
        The model config.

    Raises:
        ValueError: ``model_type`` is not one of ``SUPPORTED_MODEL_TYPES`` (qwen2 is rejected: its q/k/v
            carry a bias but o_proj does not, which ``ModelConfig.attention_bias`` cannot express), or the
            config uses a feature this model does not implement: ``hidden_act`` other than silu,
            ``rope_scaling`` / a ``rope_parameters.rope_type`` other than "default", or ``sliding_window``.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    if hf.get("rope_scaling") is not None:
        raise ValueError(f"unsupported rope_scaling {hf['rope_scaling']!r} (only None)")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"unsupported rope_parameters.rope_type {rope_type!r} (only 'default')")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported rope_parameters.partial_rotary_factor "
                         f"{rope['partial_rotary_factor']!r}")
    is_mistral = model_type == "mistral"
    sliding_window = hf.get("sliding_window", 4096 if is_mistral else None)
    if sliding_window is not None or hf.get("use_sliding_window"):
        raise ValueError(f"unsupported sliding_window {sliding_window!r} (only None for now)")
    heads = hf.get("num_attention_heads", 32)
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    return ModelConfig(
        vocab_size=hf.get("vocab_size", 32000),
        hidden_size=hf.get("hidden_size", 4096),
        intermediate_size=hf.get("intermediate_size", 14336 if is_mistral else 11008),
        num_hidden_layers=hf.get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or (8 if is_mistral else heads),
        head_dim=hf.get("head_dim"),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 131072 if is_mistral else 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        bos_token_id=_first(hf.get("bos_token_id", 1)),
        eos_token_id=_first(hf.get("eos_token_id", 2)),
        pad_token_id=_first(hf.get("pad_token_id")),
        model_type=model_type,
        initializer_range=hf.get("initializer_range", 0.02),
        dtype=dtype if dtype in _DTYPES else "float32",
    )


def config_to_hf(config: ModelConfig) -> dict:
    """A ``LlamaConfig``-compatible ``config.json`` dict for ``config``.

    Always written as ``model_type: llama`` / ``LlamaForCausalLM`` (a Mistral without sliding window is
    a Llama). RoPE is written both as v5 ``rope_parameters`` and as the v4 top-level ``rope_theta``;
    the dtype both as v5 ``dtype`` and v4 ``torch_dtype``.

    Args:
        config: model config.

    Returns:
        JSON-serializable dict.
    """
    c = config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": c.mlp_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": c.dtype,
        "torch_dtype": c.dtype,
    }


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """HF tensor name of a flax param path, and whether the array is transposed between the two."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
    leaf = path[-1]
    parts.append("bias" if leaf == "bias" else "weight")
    return ".".join(parts), leaf == "kernel"


def _expected(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """``{hf_name: (flax_path, hf_shape, transposed)}`` for every parameter of ``config``."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = tuple(k.key for k in keypath)
        name, transposed = _hf_name(path)
        out[name] = (path, tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape), transposed)
    return out


def _ignored(name: str, config: ModelConfig) -> bool:
    """HF tensors that carry no parameter here: RoPE buffers, and lm_head when embeddings are tied."""
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")


class _ParamBuilder:
    """Collects HF tensors one at a time into a flax param tree, checking names and shapes."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.expected = _expected(config)
        self.dtype = np.dtype(jnp.dtype(config.dtype))
        self.flat: dict[tuple[str, ...], np.ndarray] = {}

    def shape_ok(self, name: str, shape: tuple[int, ...]) -> bool:
        """False for ignored tensors; raises for unknown names or wrong shapes."""
        if _ignored(name, self.config):
            return False
        if name not in self.expected:
            raise ValueError(f"unexpected tensor {name!r} with shape {shape}: no such parameter in "
                             f"a {self.config.model_type} model with this config")
        want = self.expected[name][1]
        if tuple(shape) != want:
            raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(shape)}, "
                             f"the config expects {want}")
        return True

    def add(self, name: str, array: np.ndarray) -> None:
        """Stores ``array`` (HF layout) under its flax path, transposed and cast to config.dtype."""
        if not self.shape_ok(name, tuple(array.shape)):
            return
        path, _, transposed = self.expected[name]
        array = np.asarray(array)
        self.flat[path] = np.ascontiguousarray(array.T if transposed else array, dtype=self.dtype)

    def build(self) -> PyTree:
        """The nested param dict; raises when any parameter was not provided."""
        missing = [n for n, (p, _, _) in self.expected.items() if p not in self.flat]
        if missing:
            raise ValueError(f"missing tensors in checkpoint: {missing}")
        tree: dict = {}
        for path, array in self.flat.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = array
        return tree


def params_to_state_dict(params: PyTree, config: ModelConfig) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (names of ``LlamaForCausalLM``, torch layout ``[out, in]``).

    Args:
        params: param tree as from ``init_params`` (jax or numpy arrays, fully addressable).
        config: model config (checked against the tree).

    Returns:
        ``{hf_name: contiguous numpy array}`` in the params' dtype, ordered as the HF module tree; no
        ``lm_head.weight`` when embeddings are tied (as ``save_pretrained``).

    Raises:
        ValueError: the tree does not match ``config`` (naming the tensor and both shapes).
    """
    expected = _expected(config)
    flat = {tuple(k.key for k in kp): leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    sd = {}
    for name, (path, hf_shape, transposed) in expected.items():
        if path not in flat:
            raise ValueError(f"missing parameter {'/'.join(path)} (HF {name!r}, shape {hf_shape})")
        array = np.asarray(flat.pop(path))
        array = array.T if transposed else array
        if array.shape != hf_shape:
            raise ValueError(f"shape mismatch for tensor {name!r}: params have {array.shape}, "
                             f"the config expects {hf_shape}")
        sd[name] = np.ascontiguousarray(array)
    if flat:
        raise ValueError(f"unexpected parameters: {['/'.join(p) for p in flat]}")
    return dict(sorted(sd.items(), key=lambda kv: _module_order(kv[0])))


def _module_order(name: str) -> tuple:
    """Sort key following HF's module order: embed_tokens, layers by index, norm, lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return ({"model.embed_tokens.weight": 0, "model.norm.weight": 2}.get(name, 3), 0, name)


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
    builder = _ParamBuilder(config)
    for name, array in sd.items():
        builder.add(name, array)
    return builder.build()


def _read_json(path: pathlib.Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or no object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_hf_model(model_dir: str | os.PathLike, dtype: Any = None) -> tuple[ModelConfig, PyTree]:
    """Loads a HF Llama-family checkpoint directory (single or sharded safetensors).

    Shards are read one at a time and each tensor is cast right away, so peak host memory is the
    converted params plus one tensor.

    Args:
        model_dir: folder with ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` + shards.
        dtype: parameter dtype (name or dtype); None keeps the checkpoint's (``config_from_hf``).

    Returns:
        ``(config, params)``; params are numpy arrays in ``config.dtype`` on host.

    Raises:
        FileNotFoundError: no ``config.json``, no safetensors weights, or a shard named by the index
            is absent.
        ValueError: ``config.json`` or the index is not valid JSON (naming the file and the JSON
            error), a safetensors file is truncated or corrupt (naming the file), or as
            ``config_from_hf`` and ``state_dict_to_params``.
    """
    model_dir = pathlib.Path(model_dir)
    config = config_from_hf(_read_json(model_dir / "config.json"))
    if dtype is not None:
        config = dataclasses.replace(config, dtype=jnp.dtype(dtype).name)
    if (model_dir / _INDEX).is_file():
        index = _read_json(model_dir / _INDEX)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{model_dir / _INDEX}: no \"weight_map\" object")
        files = list(dict.fromkeys(index["weight_map"].values()))
    elif (model_dir / _SINGLE).is_file():
        files = [_SINGLE]
    else:
        raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {model_dir}")
    builder = _ParamBuilder(config)
    for file in files:
        path = model_dir / file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {model_dir / _INDEX} but not found")
        try:
            with safetensors.safe_open(path, framework="np") as f:
                for name in f.keys():
                    if builder.shape_ok(name, tuple(f.get_slice(name).get_shape())):
                        builder.add(name, f.get_tensor(name))
        except (safetensors.SafetensorError, OSError) as e:
            raise ValueError(f"{path}: safetensors file is truncated or corrupt: {e}") from e
    return config, builder.build()


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
    """Saves params as a HF ``LlamaForCausalLM`` checkpoint that ``from_pretrained`` loads.

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
