"""Read a PEFT LoRA adapter trained elsewhere (``adapter_config.json`` + ``adapter_model.safetensors``), to
continue training it (``lora.init_from``), merge it (``easytune export ADAPTER --base MODEL --merged OUT``) or
generate with it (``easytune generate MODEL --adapter ADAPTER``).

The inverse of :func:`easytune.export.export_adapter`: PEFT stores ``base_model.model.<module>.lora_A.weight``
``[r, in]`` and ``lora_B.weight`` ``[out, r]``; easytune holds ``lora_A [in, r]`` and ``lora_B [r, out]`` under the
module's Flax path. ``modules_to_save`` tensors are full HF tensors (``base_model.model.lm_head.weight``).

Only what easytune computes exactly as PEFT does is accepted; anything else is refused with the field named
(DoRA, bias training, ``fan_in_fan_out``, per-layer rank/alpha patterns, ``layers_to_transform``, LoRA on
embeddings), never silently dropped.

References:
    peft 0.21 ``LoraConfig`` fields and ``set_peft_model_state_dict`` (``utils/save_and_load.py``): the adapter
    name is inserted back into ``lora_A.weight`` -> ``lora_A.default.weight``; ``LoraLayer.update_layer``
    scale ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
"""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
from flax import traverse_util

from easytune import lora as lora_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# fields whose non-default value changes the math: (field, allowed values)
_UNSUPPORTED = (
    ("use_dora", (False, None)),
    ("bias", ("none", None)),
    ("fan_in_fan_out", (False, None)),
    ("rank_pattern", ({}, None)),
    ("alpha_pattern", ({}, None)),
    ("layers_to_transform", (None, [])),
    ("layers_pattern", (None, [], "")),
    ("target_parameters", (None, [])),
    ("lora_bias", (False, None)),
)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a PEFT ``adapter_config.json``."""
    return (pathlib.Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, checked.

    Raises:
        FileNotFoundError: no ``adapter_config.json``.
        ValueError: not valid JSON, ``peft_type`` other than LORA, or a field easytune does not implement
            (named, with its value).
    """
    path = pathlib.Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter dir (no {ADAPTER_CONFIG})")
    from easytune.models.hf_config import read_json
    cfg = read_json(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type={cfg.get('peft_type')!r}; easytune reads LORA adapters only")
    for field, allowed in _UNSUPPORTED:
        if field in cfg and cfg[field] not in allowed:
            raise ValueError(f"{path}: field {field!r} = {cfg[field]!r} is not supported by easytune "
                             f"(supported: {allowed[0]!r})")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise ValueError(f"{path}: field {field!r} must be a positive number, got {cfg.get(field)!r}")
    return cfg


def lora_config_of(cfg: dict) -> lora_lib.LoraConfig:
    """PEFT ``adapter_config.json`` dict -> :class:`easytune.lora.LoraConfig`."""
    targets = cfg.get("target_modules") or "all-linear"
    if isinstance(targets, list):
        targets = tuple(targets)
    return lora_lib.LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                               lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                               target_modules=lora_lib.parse_target_modules(targets),
                               modules_to_save=tuple(cfg.get("modules_to_save") or ()),
                               use_rslora=bool(cfg.get("use_rslora", False)))


def _read_tensors(adapter_dir: pathlib.Path) -> dict[str, np.ndarray]:
    st, binf = (adapter_dir / f for f in ADAPTER_WEIGHTS)
    if st.is_file():
        import safetensors.numpy
        try:
            return dict(safetensors.numpy.load_file(str(st)))
        except Exception as e:  # safetensors raises its own error types with no file name
            raise ValueError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if binf.is_file():
        import pickle

        import torch
        try:  # weights_only: tensors and plain containers only, never arbitrary objects
            sd = torch.load(str(binf), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{binf}: refused or unreadable with torch.load(weights_only=True): {first}") from e
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{binf}: expected a dict of tensor name -> tensor, got {type(sd).__name__}")
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"{adapter_dir} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")


def load_peft_adapter(adapter_dir: str | os.PathLike, params, model_config):
    """Reads a PEFT LoRA adapter for a base model's params.

    Args:
        adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``,
            read only with ``torch.load(weights_only=True)``).
        params: the base model's Flax params (for module names and shapes).
        model_config: its :class:`~easytune.models.model_config.ModelConfig`.

    Returns:
        ``(lora_cfg, lora, saved)``: the :class:`~easytune.lora.LoraConfig`; the ``'lora'`` collection
        (``{path: {lora_A: [in, r], lora_B: [r, out]}}``, float32 numpy); and the ``modules_to_save``
        params as a nested dict of numpy arrays in the params' layout (empty when none).

    Raises:
        ValueError: an unsupported config field; a tensor name that is neither LoRA A/B of a linear module
            nor a saved module's weight; a module ``target_modules`` selects with no tensors, or tensors for a
            module it does not select; a shape that does not match the base (naming tensor and shapes).
        FileNotFoundError: no config or weights.
    """
    from easytune.models.hf_weights import expected_params
    adapter_dir = pathlib.Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    lcfg = lora_config_of(cfg)
    tensors = _read_tensors(adapter_dir)
    where = next((adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()), adapter_dir)
    linear = lora_lib.linear_modules(params)
    pflat = traverse_util.flatten_dict(params)
    expected = expected_params(model_config)  # {hf tensor name: (flax path, hf shape, transposed)}
    lora, saved = {}, {}
    for key, array in tensors.items():
        if not np.all(np.isfinite(np.asarray(array, np.float32))):
            raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values; the adapter is broken")
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", name)
        m = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", name)
        if m:
            module, which = m.groups()
            if module not in linear:
                raise ValueError(f"{where}: tensor {key!r}: {module!r} is not a linear module of the base model")
            fan_in, fan_out = pflat[linear[module] + ("kernel",)].shape
            want = (lcfg.r, fan_in) if which == "lora_A" else (fan_out, lcfg.r)
            if tuple(array.shape) != want:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(array.shape)}, expected {want} "
                                 f"(r={lcfg.r}, module {module} is [{fan_out}, {fan_in}])")
            lora[linear[module] + (which,)] = np.ascontiguousarray(np.asarray(array, np.float32).T)
            continue
        module = name.rsplit(".", 1)[0]
        if name in expected and any(module == s or module.endswith("." + s) for s in lcfg.modules_to_save):
            path, hf_shape, transposed = expected[name]
            if tuple(array.shape) != hf_shape:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(array.shape)}, the base model "
                                 f"expects {hf_shape}")
            dtype = pflat[path].dtype
            saved[path] = np.ascontiguousarray(array.T if transposed else array).astype(dtype)
            continue
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            raise ValueError(f"{where}: tensor {key!r}: the adapter trains lm_head on its own, but the base model "
                             f"ties lm_head to embed_tokens (tie_word_embeddings), so there is no separate lm_head "
                             f"to replace; merge with peft, or use a base with untied embeddings")
        raise ValueError(f"{where}: tensor {key!r} is not supported (easytune reads lora_A/lora_B of linear "
                         f"modules and modules_to_save weights {list(lcfg.modules_to_save)})")
    chosen = {lora_lib.hf_module_name(p) for p in lora_lib.select_targets(params, lcfg.target_modules)}
    got = {lora_lib.hf_module_name(k[:-1]) for k in lora}
    for name in sorted(chosen | got):
        has_a = linear[name] + ("lora_A",) in lora
        has_b = linear[name] + ("lora_B",) in lora
        if name not in chosen:
            raise ValueError(f"{where}: holds LoRA weights for {name!r}, which target_modules="
                             f"{cfg.get('target_modules')!r} does not select")
        if not (has_a and has_b):
            raise ValueError(f"{where}: target_modules={cfg.get('target_modules')!r} selects {name!r} but the "
                             f"file has no {'lora_A' if not has_a else 'lora_B'} for it")
    return lcfg, traverse_util.unflatten_dict(lora), traverse_util.unflatten_dict(saved) if saved else {}


def init_from_adapter(adapter_dir: str | os.PathLike, params, model_config, lora_cfg: lora_lib.LoraConfig):
    """Starting point of a run that continues a PEFT adapter (``lora.init_from``).

    The adapter must have been trained with the run's LoRA settings: the same ``r``, ``lora_alpha``,
    ``use_rslora``, adapted modules and ``modules_to_save`` (so that the loaded weights mean the same
    function); ``lora_dropout`` may differ (it only affects training).

    Args:
        adapter_dir: the PEFT adapter dir.
        params: the base model's params (numpy or jax).
        model_config: its ModelConfig.
        lora_cfg: the run's LoRA settings.

    Returns:
        ``(lora, params)``: the ``'lora'`` collection with the adapter's weights, and ``params`` with the
        adapter's ``modules_to_save`` tensors in place of the base's.

    Raises:
        easytune.config.ConfigError: a setting differs; the message names the config keys and the values to set.
        ValueError, FileNotFoundError: as :func:`load_peft_adapter`.
    """
    from easytune.config import ConfigError
    acfg, lora, saved = load_peft_adapter(adapter_dir, params, model_config)
    diffs = [f"lora.{k}={getattr(acfg, k)!r}" for k in ("r", "lora_alpha", "use_rslora")
             if getattr(acfg, k) != getattr(lora_cfg, k)]
    ours = {lora_lib.hf_module_name(p) for p in lora_lib.select_targets(params, lora_cfg.target_modules)}
    theirs = {lora_lib.hf_module_name(k[:-1]) for k in traverse_util.flatten_dict(lora)}
    if ours != theirs:
        t = acfg.target_modules
        diffs.append(f"lora.target_modules={','.join(t) if isinstance(t, tuple) else t!r}")
    if set(acfg.modules_to_save) != set(lora_cfg.modules_to_save):
        diffs.append(f"lora.modules_to_save={','.join(acfg.modules_to_save)!r}")
    if diffs:
        raise ConfigError(f"lora.init_from={str(adapter_dir)!r}: the adapter was trained with other LoRA "
                          f"settings; set {' '.join(diffs)}")
    return lora, with_saved(params, saved)


def with_saved(params, saved):
    """``params`` with the adapter's ``modules_to_save`` tensors (``saved``, as from :func:`load_peft_adapter`) in
    place of the base's; the same tree when ``saved`` is empty."""
    if not saved:
        return params
    flat = traverse_util.flatten_dict(params)
    flat.update(traverse_util.flatten_dict(saved))
    return traverse_util.unflatten_dict(flat)
