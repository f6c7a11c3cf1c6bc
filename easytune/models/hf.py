"""Hugging Face checkpoints <-> easytune: ``config.json`` <-> ``ModelConfig``, weights <-> params.

Families: ``llama`` (Llama 2, 3, 3.1), ``mistral``, ``qwen2`` (Qwen2 / 2.5); anything else, and any
config field that would change the math in a way not implemented here, is refused with its name.

Parameter paths map one-to-one onto HF tensor names; only two renames and one transpose are involved:

    ``model/layers_3/self_attn/q_proj/kernel [D, H*E]`` <-> ``model.layers.3.self_attn.q_proj.weight [H*E, D]``
    ``model/embed_tokens/embedding [V, D]``             <-> ``model.embed_tokens.weight [V, D]``
    ``.../weight`` (RMSNorm) and ``.../bias``           <-> same name, same layout

Checkpoints are read shard by shard with ``safetensors.safe_open(framework="np")`` (PyTorch ``.bin``
files only with ``torch.load(weights_only=True)``) and written with ``safetensors.numpy.save_file``.
bfloat16 travels as ``ml_dtypes.bfloat16`` numpy arrays, which safetensors 0.8 reads and writes
natively (tested here); no torch is needed except for ``.bin``. Older safetensors could not
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

from easytune.models.llama import ROPE_TYPES, ModelConfig, init_params

PyTree = Any
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SINGLE = "pytorch_model.bin"
# transformers config-class defaults that differ between the families
_DEFAULTS = {
    "llama": dict(vocab_size=32000, intermediate_size=11008, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6),
    "mistral": dict(vocab_size=32000, intermediate_size=14336, max_position_embeddings=4096 * 32,
                    bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6, num_key_value_heads=8,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768,
                  bos_token_id=None, eos_token_id=None, rms_norm_eps=1e-6, sliding_window=4096,
                  max_window_layers=28),
}


def _first(token_id):
    """First id of a list-valued special token (Llama 3 ``eos_token_id: [...]``), else the id."""
    if isinstance(token_id, (list, tuple)):
        return token_id[0] if token_id else None
    return token_id


def _rope_fields(hf: dict) -> dict:
    """``ModelConfig`` RoPE fields from v5 ``rope_parameters`` or v4 ``rope_scaling`` + ``rope_theta``."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_parameters.rope_type {rope_type!r} "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {partial!r} (only 1.0)")
    out = dict(rope_type=rope_type,
               rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    if rope_type == "default":
        return out
    if "factor" not in rope:
        raise ValueError(f"rope_parameters of rope_type {rope_type!r} has no \"factor\"")
    out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in rope:
                raise ValueError(f"rope_parameters of rope_type 'llama3' has no {key!r}")
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"))
    return out


def _attention_fields(hf: dict, model_type: str, layers: int) -> dict:
    """Biases and sliding window per family, as the transformers modeling code hard-wires them."""
    d = _DEFAULTS[model_type]
    if model_type == "llama":
        if hf.get("sliding_window") is not None or hf.get("use_sliding_window"):
            raise ValueError(f"unsupported sliding_window {hf.get('sliding_window')!r} for model_type "
                             f"'llama' (LlamaForCausalLM has no sliding window; use model_type "
                             f"'mistral')")
        return dict(attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False))
    if model_type == "mistral":  # MistralAttention / MistralMLP: no biases; every layer slides
        window = hf.get("sliding_window", d["sliding_window"])
        return dict(attention_bias=False, mlp_bias=False, sliding_window=window, layer_types=None)
    # qwen2: q/k/v biased, o_proj and MLP not; sliding only with use_sliding_window, from
    # max_window_layers on (Qwen2Config.__post_init__) unless layer_types says otherwise
    window = hf.get("sliding_window", d["sliding_window"]) if hf.get("use_sliding_window") else None
    layer_types = hf.get("layer_types")
    if layer_types is None:
        first = hf.get("max_window_layers", d["max_window_layers"])
        layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                       for i in range(layers)]
    layer_types = tuple(layer_types)
    if "sliding_attention" in layer_types and window is None:
        raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is None "
                         "(or use_sliding_window is false)")
    if window is None:
        layer_types = None
    return dict(attention_bias=True, o_proj_bias=False, mlp_bias=False, sliding_window=window,
                layer_types=layer_types)


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


def config_from_hf(hf: dict) -> ModelConfig:
    """Builds a ``ModelConfig`` from a HF ``config.json`` dict (transformers v4 or v5 layout).

    Supported families: ``llama`` (Llama 2, Llama 3 / 3.1), ``mistral`` (sliding window on every layer;
    MistralConfig's default window is 4096) and ``qwen2`` (Qwen2 / 2.5: q/k/v biases, no o_proj bias;
    sliding window only when ``use_sliding_window``, on the layers ``layer_types`` or
    ``max_window_layers`` choose). RoPE comes from v5 ``rope_parameters`` or v4 ``rope_scaling`` +
    ``rope_theta``: rope_type "default", "linear", "dynamic" or "llama3". Missing keys take the defaults
    of the matching transformers config class. ``dtype`` is the checkpoint's ``dtype``/``torch_dtype``
    when that is float32, bfloat16 or float16, else float32. A list-valued ``bos_token_id``/
    ``eos_token_id`` (Llama 3) keeps its first id.

    Args:
        hf: the parsed ``config.json``.

    Returns:
        The model config.

    Raises:
        ValueError: naming the field: ``model_type`` not in ``SUPPORTED_MODEL_TYPES``; ``hidden_act``
            other than silu; a rope_type other than the four above (yarn, longrope, ...) or a
            ``partial_rotary_factor`` other than 1; missing scaling keys (``factor``, llama3's
            ``low_freq_factor`` / ``high_freq_factor``); ``sliding_window`` on a ``llama`` config;
            ``layer_types`` values other than full_attention / sliding_attention.
    """
    model_type = hf.get("model_type")
    for field in _INT_FIELDS:  # a hand-edited config.json with "hidden_size": "64" must not reach the model
        v = hf.get(field)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"field {field!r} must be a positive integer, got {v!r}")
    for field in ("rms_norm_eps", "rope_theta", "initializer_range"):
        v = hf.get(field)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"field {field!r} must be a positive number, got {v!r}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    d = _DEFAULTS[model_type]
    heads = hf.get("num_attention_heads", 32)
    layers = hf.get("num_hidden_layers", 32)
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    return ModelConfig(
        vocab_size=hf.get("vocab_size", d["vocab_size"]),
        hidden_size=hf.get("hidden_size", 4096),
        intermediate_size=hf.get("intermediate_size", d["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or d.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim"),  # absent: hidden_size // num_attention_heads (all three)
        rms_norm_eps=hf.get("rms_norm_eps", d["rms_norm_eps"]),
        max_position_embeddings=hf.get("max_position_embeddings", d["max_position_embeddings"]),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=_first(hf.get("bos_token_id", d["bos_token_id"])),
        eos_token_id=_first(hf.get("eos_token_id", d["eos_token_id"])),
        pad_token_id=_first(hf.get("pad_token_id")),
        model_type=model_type,
        initializer_range=hf.get("initializer_range", 0.02),
        dtype=dtype if dtype in _DTYPES else "float32",
        **_rope_fields(hf),
        **_attention_fields(hf, model_type, layers),
    )


def _family(config: ModelConfig) -> str:
    """The HF family that expresses ``config`` exactly; ValueError naming the field when none does."""
    o_bias = config.attention_bias if config.o_proj_bias is None else config.o_proj_bias
    if config.model_type == "qwen2":
        if not (config.attention_bias and not o_bias and not config.mlp_bias):
            raise ValueError("a qwen2 config needs attention_bias=True, o_proj_bias=False, "
                             "mlp_bias=False (Qwen2Attention / Qwen2MLP hard-wire them)")
        return "qwen2"
    if config.sliding_window is not None or config.model_type == "mistral":
        if config.attention_bias or o_bias or config.mlp_bias:
            raise ValueError("a mistral config (sliding_window) cannot carry attention_bias, "
                             "o_proj_bias or mlp_bias (MistralAttention has none)")
        if config.layer_types is not None and "full_attention" in config.layer_types:
            raise ValueError("layer_types mixing full and sliding attention needs model_type 'qwen2'")
        return "mistral"
    if o_bias != config.attention_bias:
        raise ValueError(f"o_proj_bias={config.o_proj_bias} differs from attention_bias="
                         f"{config.attention_bias}: only model_type 'qwen2' expresses that")
    return "llama"


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` dict of the transformers class that computes exactly what ``config`` does.

    ``model_type`` is ``llama`` (``LlamaForCausalLM``) unless the config needs ``mistral`` (a sliding
    window) or is ``qwen2``. RoPE is written both as v5 ``rope_parameters`` and as v4 ``rope_theta`` /
    ``rope_scaling``; the dtype both as v5 ``dtype`` and v4 ``torch_dtype``.

    Args:
        config: model config.

    Returns:
        JSON-serializable dict; ``config_from_hf(config_to_hf(c)) == c``.

    Raises:
        ValueError: no transformers family expresses the combination (e.g. a sliding window with
            biases), naming the fields.
    """
    c = config
    family = _family(c)
    rope = {"rope_type": c.rope_type, "rope_theta": c.rope_theta}
    if c.rope_type != "default":
        rope["factor"] = c.rope_factor
    if c.rope_type == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=(c.rope_original_max_position_embeddings
                                                      or c.max_position_embeddings))
    out = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
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
        "rope_parameters": rope,
        "rope_scaling": None if c.rope_type == "default" else dict(rope),
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "use_cache": True,
        "dtype": c.dtype,
        "torch_dtype": c.dtype,
    }
    if family == "llama":
        out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, pretraining_tp=1)
    elif family == "mistral":
        out["sliding_window"] = c.sliding_window
    else:
        layer_types = c.layer_types or tuple(
            "sliding_attention" if c.sliding_window is not None else "full_attention"
            for _ in range(c.num_hidden_layers))
        out.update(use_sliding_window=c.sliding_window is not None,
                   sliding_window=c.sliding_window, max_window_layers=c.num_hidden_layers,
                   layer_types=list(layer_types))
    return out


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


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """Every parameter of ``config`` as transformers names it, without allocating any weights.

    Args:
        config: model config.

    Returns:
        ``{hf_name: (flax_path, hf_shape)}`` in HF module order (embed_tokens, layers by index, norm,
        lm_head), ``hf_shape`` in torch layout (``[out, in]`` for linear weights), e.g.
        ``"model.layers.0.self_attn.q_proj.weight": (("model", "layers_0", "self_attn", "q_proj",
        "kernel"), (H*E, D))``. Equals ``dict(model.named_parameters())``'s names and shapes.
    """
    items = sorted(_expected(config).items(), key=lambda kv: _module_order(kv[0]))
    return {name: (path, shape) for name, (path, shape, _) in items}


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
        missing = [f"{n} {list(shape)}" for n, (p, shape, _) in self.expected.items()
                   if p not in self.flat]
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


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """``config_from_hf`` of ``model_dir/config.json``, reading no weights.

    Raises:
        FileNotFoundError: no ``config.json``.
        ValueError: invalid JSON, or as ``config_from_hf``; the message starts with the file's path.
    """
    path = pathlib.Path(model_dir) / "config.json"
    hf = _read_json(path)
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _weight_files(model_dir: pathlib.Path) -> tuple[list[pathlib.Path], str]:
    """The weight files of a HF dir in load order and their format ("safetensors" or "bin").

    Preference as ``from_pretrained``: safetensors index, single safetensors, ``.bin`` index, single
    ``.bin``.
    """
    for index_name, single, fmt in ((_INDEX, _SINGLE, "safetensors"),
                                    (_BIN_INDEX, _BIN_SINGLE, "bin")):
        if (model_dir / index_name).is_file():
            index = _read_json(model_dir / index_name)
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


def _load_bin_shard(path: pathlib.Path, builder: "_ParamBuilder") -> None:
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
    """Loads a HF Llama / Mistral / Qwen2 checkpoint directory, one weight file at a time.

    Formats, in ``from_pretrained``'s order of preference: ``model.safetensors.index.json`` + shards,
    ``model.safetensors``, ``pytorch_model.bin.index.json`` + shards, ``pytorch_model.bin``. Each
    tensor is transposed where needed and cast to the params dtype as soon as it is read, and a
    shard is closed before the next opens, so peak host memory is about the converted params plus one
    shard (``bench/load_memory.py`` measures it). ``.bin`` files are read only with
    ``torch.load(weights_only=True)``; no code from the checkpoint (``trust_remote_code``) ever runs.

    Args:
        model_dir: folder with ``config.json`` and weights as above.
        dtype: parameter dtype (name or dtype, e.g. the config's ``model.dtype``); None keeps the
            checkpoint's (``config_from_hf``). Every tensor is cast to it.
        make_builder: ``config -> builder`` with ``shape_ok(name, shape)``, ``add(name, array)`` and
            ``build()`` that receives each tensor as it is read (default: plain float params); QLoRA's
            quantizes kernels on arrival (:func:`easytune.quant.load_hf_quantized`).

    Returns:
        ``(config, params)``; params are numpy arrays in ``config.dtype`` on host.

    Raises:
        FileNotFoundError: no ``config.json``, no weights, or a shard named by an index is absent.
        ValueError: ``config.json`` or an index is not valid JSON (naming the file and the JSON
            error); a safetensors file is truncated or corrupt, or a ``.bin`` holds anything but
            tensors (naming the file); as ``config_from_hf`` (unsupported model_type or field, named);
            an unexpected, missing or wrongly shaped tensor (naming it and both shapes).
    """
    model_dir = pathlib.Path(model_dir)
    config = read_config(model_dir)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=jnp.dtype(dtype).name)
    files, fmt = _weight_files(model_dir)
    builder = (make_builder or _ParamBuilder)(config)
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
