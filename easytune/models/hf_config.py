"""Hugging Face ``config.json`` <-> :class:`~easytune.models.model_config.ModelConfig`, for the families read
here: ``llama`` (Llama 2, 3, 3.1), ``mistral``, ``qwen2`` (Qwen2 / 2.5); anything else, and any config field
that would change the math in a way not implemented here, is refused with its name.

References:
    transformers ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` (v5): config keys and their defaults;
    ``modeling_rope_utils.py`` (``rope_parameters`` / ``rope_scaling``).
"""

from __future__ import annotations

import json
import os
import pathlib

from easytune.models.model_config import ROPE_TYPES, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}
_DTYPES = ("float32", "bfloat16", "float16")
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


def read_json(path: pathlib.Path) -> dict:
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
    hf = read_json(path)
    try:
        return config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e

