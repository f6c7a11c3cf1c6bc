"""Read a PEFT LoRA adapter trained elsewhere (``adapter_config.json`` + ``adapter_model.safetensors``), to
continue training it (``lora.init_from``), merge it (``easytune export ADAPTER --base MODEL --merged OUT``) or
generate with it (``easytune generate MODEL --adapter ADAPTER``).

The inverse of :func:`easytune.export.export_adapter`: PEFT stores ``base_model.model.<module>.lora_A.weight``
``[r, in]`` and ``lora_B.weight`` ``[out, r]``; easytune holds ``lora_A [in, r]`` and ``lora_B [r, out]`` under the
module's Flax path. ``modules_to_save`` tensors are full HF tensors (``base_model.model.lm_head.weight``), named
as in the checkpoint or, for a mixture of experts, as in transformers v5's module tree, which peft writes: the router
``mlp.gate.weight`` and the fused ``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``.
``target_parameters`` naming a linear module's weight (``model.layers.1.mlp.gate_proj.weight``, what
:func:`easytune.export.export_adapter` writes for a MoE model's dense MLPs) is the same LoRA as targeting the module;
naming the fused experts (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``) it is expert LoRA
(:class:`easytune.lora.LoraConfig` ``target_parameters``), read from peft's nested ``ParamWrapper`` keys
(``<layer>.mlp.experts[.base_layer].lora_A.weight [r*X, in]``, see :func:`easytune.lora.expert_peft_names`); on
the router (``mlp.gate.weight``) it is refused.

An adapter trained on a resized vocabulary (transformers' ``resize_token_embeddings`` before ``get_peft_model``) holds
``embed_tokens`` / ``lm_head`` with more rows than the base: :func:`resize_for_adapter` grows the base to them first
(:func:`easytune.vocab.resize_params`). peft's ``save_embedding_layers`` writes such layers in full: a
``modules_to_save`` one as ``<module>.weight`` and ``<module>.modules_to_save.weight`` (the trained copy, twice) and
``<module>.original_module.weight`` (the resized base, not needed: the trained copy replaces it), one outside
``modules_to_save`` as ``<module>.weight`` (the resized base rows, which replace the base's). A tied base takes a
``lm_head.weight`` equal to the embedding (peft's ``ensure_weight_tying``); a different one is refused.

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
from easytune import vocab as vocab_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# an embedding layer's tensor as peft writes it: <module>[.modules_to_save|.original_module].weight
_EMBEDDING_KEY = re.compile(r"(?:.*\.)?(?:embed_tokens|lm_head)(?:\.modules_to_save(?:\.default)?|\.original_module)?"
                            r"\.weight")
_WRAPPED = re.compile(r"(.+)\.(modules_to_save|original_module)(?:\.default)?\.weight")
# fields whose non-default value changes the math: (field, allowed values)
_UNSUPPORTED = (
    ("use_dora", (False, None)),
    ("bias", ("none", None)),
    ("fan_in_fan_out", (False, None)),
    ("rank_pattern", ({}, None)),
    ("alpha_pattern", ({}, None)),
    ("layers_to_transform", (None, [])),
    ("layers_pattern", (None, [], "")),
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
    for entry in cfg.get("target_parameters") or ():
        if not isinstance(entry, str) or not (entry.endswith(".weight") or _is_expert_entry(entry)):
            raise ValueError(f"{path}: target_parameters entry {entry!r} is not supported: easytune reads LoRA on the "
                             f"weight of a linear module ('<module>.weight') and on the fused experts "
                             f"({', '.join('mlp.experts.' + p for p in lora_lib.EXPERT_PARAMS)})")
    if _expert_entries(cfg) and cfg.get("lora_dropout"):
        raise ValueError(f"{path}: lora_dropout={cfg['lora_dropout']!r} with target_parameters on experts; peft "
                         f"refuses dropout there (ParamWrapper)")
    return cfg


def _is_expert_entry(entry: str) -> bool:
    """Whether a ``target_parameters`` entry names fused expert parameters (``gate_up_proj`` / ``down_proj``, bare or
    as the end of a longer name)."""
    return entry.rsplit(".", 1)[-1] in lora_lib.EXPERT_PARAMS


def _expert_entries(cfg: dict) -> tuple[str, ...]:
    """The ``target_parameters`` entries that name fused expert parameters."""
    return tuple(t for t in cfg.get("target_parameters") or () if isinstance(t, str) and _is_expert_entry(t))


def _parameter_modules(cfg: dict) -> tuple[str, ...]:
    """The module names (or suffixes) of ``target_parameters`` (``model.layers.1.mlp.gate_proj.weight`` ->
    ``model.layers.1.mlp.gate_proj``): peft's ``ParamWrapper`` on a linear module's weight is the same LoRA
    (``W + scale * B @ A``, tensors named as for the module) as targeting the module."""
    return tuple(t[:-len(".weight")] for t in cfg.get("target_parameters") or () if t.endswith(".weight"))


def lora_config_of(cfg: dict) -> lora_lib.LoraConfig:
    """PEFT ``adapter_config.json`` dict -> :class:`easytune.lora.LoraConfig`; ``target_modules`` covers the linear
    modules named by ``target_parameters`` too (peft's rule: an entry is a whole name or its ending)."""
    extra = _parameter_modules(cfg)
    targets = cfg.get("target_modules") or ("all-linear" if not extra and not _expert_entries(cfg) else ())
    if isinstance(targets, list):
        targets = tuple(targets)
    if extra and isinstance(targets, tuple):
        targets = targets + extra
    elif extra and not (targets == "all-linear" and "lm_head" not in extra):  # all-linear covers the others
        # a regex, or all-linear (any linear module but lm_head), or-ed with the parameters' modules
        rx = "(?!lm_head$).*" if targets == "all-linear" else targets
        targets = f"(?:{rx})|(?:.*\\.)?(?:{'|'.join(re.escape(t) for t in extra)})"
    return lora_lib.LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                               lora_dropout=float(cfg.get("lora_dropout") or 0.0),
                               target_modules=lora_lib.parse_target_modules(targets),
                               modules_to_save=tuple(dict.fromkeys(cfg.get("modules_to_save") or ())),
                               use_rslora=bool(cfg.get("use_rslora", False)),
                               target_parameters=_expert_entries(cfg))


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


def has_tokenizer(adapter_dir: str | os.PathLike) -> bool:
    """Whether the adapter dir holds tokenizer files (peft's ``save_pretrained`` users and ``easytune export
    --adapter`` save the tokenizer, with its added tokens, next to the adapter)."""
    from easytune.config import TOKENIZER_FILES
    return any((pathlib.Path(adapter_dir) / f).is_file() for f in TOKENIZER_FILES)


def adapter_vocab_size(adapter_dir: str | os.PathLike) -> int | None:
    """Rows of the ``embed_tokens`` / ``lm_head`` tensors an adapter holds (the largest), or None when it holds none;
    read from the safetensors header only.

    Raises:
        FileNotFoundError, ValueError: no weights, or unreadable ones (as :func:`load_peft_adapter`).
    """
    adapter_dir = pathlib.Path(adapter_dir)
    st = adapter_dir / ADAPTER_WEIGHTS[0]
    if st.is_file():
        import safetensors
        try:
            with safetensors.safe_open(str(st), framework="np") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        shapes = {k: v.shape for k, v in _read_tensors(adapter_dir).items()}
    rows = [shape[0] for key, shape in shapes.items() if _EMBEDDING_KEY.fullmatch(key) and len(shape) == 2]
    return max(rows) if rows else None


def check_adapter_tokens(adapter_dir: str | os.PathLike, tokenizer, base_vocab: int) -> None:
    """Refuses to continue (``lora.init_from``) an adapter whose tokens beyond the base's vocabulary are not the run
    tokenizer's, id for id: the adapter's trained rows of those ids would silently belong to other tokens.

    Args:
        adapter_dir: the PEFT adapter dir; compared with the tokenizer saved in it (``easytune export --adapter``
            and peft users save one); an adapter without tokenizer files is compared by size only.
        tokenizer: the run's tokenizer (with ``tokenizer.added_tokens``).
        base_vocab: the base checkpoint's ``vocab_size``.

    Raises:
        easytune.config.ConfigError: different tokens at ids ``>= base_vocab`` (both lists named), or a run
            tokenizer with more tokens than the adapter has rows; each says which setting to use.
    """
    from easytune.config import ConfigError
    rows = adapter_vocab_size(adapter_dir)
    fix = (f"use the adapter's tokenizer (--config.tokenizer.path={adapter_dir}, no tokenizer.added_tokens / "
           f"added_special_tokens) or the tokens it was trained with, in the same order")
    if has_tokenizer(adapter_dir):
        from easytune.tokenizer import load_tokenizer
        extra = lambda tok: {i: t for t, i in tok.get_vocab().items() if i >= base_vocab}  # noqa: E731
        theirs, ours = extra(load_tokenizer(adapter_dir)), extra(tokenizer)
        if any(ours.get(i) != t for i, t in theirs.items()):  # more tokens than the adapter's: the size check
            show = lambda d: [d[i] for i in sorted(d)][:8] + (["..."] if len(d) > 8 else [])  # noqa: E731
            raise ConfigError(f"lora.init_from: the adapter {adapter_dir} was trained with the tokens {show(theirs)} "
                              f"at ids {base_vocab}+, this run's tokenizer has {show(ours)} there; the adapter's "
                              f"rows of those ids would belong to other tokens: {fix}")
    if rows is not None and len(tokenizer) > rows:
        raise ConfigError(f"lora.init_from: this run's tokenizer has {len(tokenizer)} tokens but the adapter "
                          f"{adapter_dir} has {rows} embedding rows; continuing an adapter with new tokens is not "
                          f"supported: {fix}, or start a new adapter")


def resize_for_adapter(adapter_dir: str | os.PathLike, params, model_config):
    """The base grown to the vocabulary of an adapter trained after ``resize_token_embeddings``: ``(model_config,
    params)`` with ``embed_tokens`` / ``lm_head`` at the adapter's rows (new rows the mean of the old,
    :func:`easytune.vocab.resize_params`; the adapter's full embedding tensors then replace them), unchanged when the
    adapter holds no embedding layer or one of the base's size.

    Raises:
        ValueError: the adapter's embedding layers have fewer rows than the base's (trained on another base).
    """
    rows = adapter_vocab_size(adapter_dir)
    if rows is None or rows == model_config.vocab_size:
        return model_config, params
    if rows < model_config.vocab_size:
        raise ValueError(f"{adapter_dir}: the adapter's embed_tokens / lm_head have {rows} rows but the base model has "
                         f"vocab_size {model_config.vocab_size}; it was trained on another base")
    return vocab_lib.resize_params(params, model_config, rows, str(adapter_dir))


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

    An adapter trained on a resized vocabulary needs the base grown first (:func:`resize_for_adapter`).

    Raises:
        ValueError: an unsupported config field; an embedding tensor of another vocabulary size than the base
            (resize it first); a tied base's ``lm_head.weight`` that differs from the embedding; a ``target_parameters``
            entry that is not a linear module's weight; a tensor name that is neither LoRA A/B of a linear module nor a
            saved module's weight (LoRA on routers or experts included); a module ``target_modules`` selects with no
            tensors, or tensors for a module it does not select; a shape that does not match the base (naming tensor and
            shapes); a stacked expert param of ``modules_to_save`` given for some experts only.
        FileNotFoundError: no config or weights.
    """
    from easytune.models.hf_weights import ParamBuilder
    adapter_dir = pathlib.Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    lcfg = lora_config_of(cfg)
    tensors = _read_tensors(adapter_dir)
    where = next((adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()), adapter_dir)
    linear = lora_lib.linear_modules(params)
    for t in _parameter_modules(cfg):
        if not any(n == t or n.endswith("." + t) for n in linear):
            raise ValueError(f"{where}: target_parameters entry {t + '.weight'!r} is not the weight of a linear module "
                             f"of the base model")
    pflat = traverse_util.flatten_dict(params)
    expert_paths = lora_lib.select_expert_targets(params, lcfg.target_parameters) if lcfg.target_parameters else []
    expert_keys = {name: path for path, name in lora_lib.expert_peft_names(expert_paths).items()}
    expert_lora = {}
    # modules_to_save tensors: checkpoint names (per expert, Mixtral block_sparse_moe) or module-tree names (a router
    # mlp.gate.weight, fused mlp.experts.gate_up_proj / down_proj, as peft writes them), collected in model layout
    builder = ParamBuilder(model_config)
    lora = {}
    copies: dict[str, tuple[str, np.ndarray]] = {}  # full tensors by normalized name (peft writes some twice)
    for key, array in tensors.items():
        if not np.all(np.isfinite(np.asarray(array, np.float32))):
            raise ValueError(f"{where}: tensor {key!r} holds NaN or infinite values; the adapter is broken")
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1.weight", name)
        wrapped = _WRAPPED.fullmatch(name)
        if wrapped and wrapped.group(2) == "original_module":
            continue  # peft's copy of the base module (save_embedding_layers); the trained copy replaces it
        if wrapped:  # <module>.modules_to_save.weight: the same trained copy as <module>.weight
            name = wrapped.group(1) + ".weight"
        if not name.endswith((".lora_A.weight", ".lora_B.weight")):
            if name in copies:
                if not np.array_equal(np.asarray(copies[name][1]), np.asarray(array)):
                    raise ValueError(f"{where}: tensors {copies[name][0]!r} and {key!r} should hold the same trained "
                                     f"module (peft writes it twice) but differ; the adapter is broken")
                continue
            copies[name] = (key, array)
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue  # a tied base: checked against the embedding below
        m = re.fullmatch(r"(.+)\.(lora_[AB])\.weight", name)
        if m and m.group(1) in expert_keys:
            module, which = m.groups()
            path = expert_keys[module]
            x, fan_in, fan_out = lora_lib.expert_shapes(params, path)
            want = (lcfg.r * x, fan_in) if which == "lora_A" else (fan_out, lcfg.r * x)
            if tuple(array.shape) != want:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(array.shape)}, expected {want} "
                                 f"(r={lcfg.r}, {x} experts, {lora_lib.hf_module_name(path)} is [{x}, {fan_out}, "
                                 f"{fan_in}] as peft sees it)")
            expert_lora[path + (which,)] = np.asarray(array, np.float32)
            continue
        if m:
            module, which = m.groups()
            if module not in linear:
                moe = (" (routers of a mixture of experts are not LoRA targets in easytune; experts are adapted only "
                       "through target_parameters, with peft's key names)") if (
                    ".experts" in module or module.endswith(".gate")) else ""
                raise ValueError(f"{where}: tensor {key!r}: {module!r} is not a linear module of the base model{moe}")
            fan_in, fan_out = pflat[linear[module] + ("kernel",)].shape
            want = (lcfg.r, fan_in) if which == "lora_A" else (fan_out, lcfg.r)
            if tuple(array.shape) != want:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(array.shape)}, expected {want} "
                                 f"(r={lcfg.r}, module {module} is [{fan_out}, {fan_in}])")
            lora[linear[module] + (which,)] = np.ascontiguousarray(np.asarray(array, np.float32).T)
            continue
        module = _saved_module(builder, name)
        embedding = module is not None and module.rsplit(".", 1)[-1] in vocab_lib.EMBEDDING_MODULES
        if module is not None and (embedding or any(module == s or module.endswith("." + s)
                                                    for s in lcfg.modules_to_save)):
            # modules_to_save; or an embedding layer peft saved whole (save_embedding_layers: a resized vocabulary)
            try:
                builder.add(name, np.asarray(array))
            except ValueError as e:
                hint = ""
                if embedding and np.ndim(array) == 2 and array.shape[0] != model_config.vocab_size:
                    hint = (f" (the adapter was trained on a vocabulary of {array.shape[0]} tokens, the base has "
                            f"{model_config.vocab_size}: grow the base first, easytune.adapter.resize_for_adapter)")
                raise ValueError(f"{where}: tensor {key!r}: {e}{hint}") from None
            continue
        raise ValueError(f"{where}: tensor {key!r} is not supported (easytune reads lora_A/lora_B of linear "
                         f"modules and modules_to_save weights {list(lcfg.modules_to_save)})")
    if "lm_head.weight" in copies and model_config.tie_word_embeddings:
        key, head = copies["lm_head.weight"]
        emb = copies.get("model.embed_tokens.weight")
        if emb is None or not np.array_equal(np.asarray(head), np.asarray(emb[1])):
            raise ValueError(f"{where}: tensor {key!r}: the adapter gives lm_head other weights than embed_tokens, but "
                             f"the base model ties lm_head to embed_tokens (tie_word_embeddings), so there is no "
                             f"separate lm_head to replace (peft without ensure_weight_tying=True keeps the base's "
                             f"output layer); merge with peft, or use a base with untied embeddings")
    chosen = {lora_lib.hf_module_name(p) for p in lora_lib.select_targets(params, lcfg.target_modules)}
    got = {lora_lib.hf_module_name(k[:-1]) for k in lora if not lora_lib.is_expert_lora(k[:-1])}
    for name in sorted(chosen | got):
        has_a = linear[name] + ("lora_A",) in lora
        has_b = linear[name] + ("lora_B",) in lora
        if name not in chosen:
            raise ValueError(f"{where}: holds LoRA weights for {name!r}, which target_modules="
                             f"{cfg.get('target_modules')!r} does not select")
        if not (has_a and has_b):
            raise ValueError(f"{where}: target_modules={cfg.get('target_modules')!r} selects {name!r} but the "
                             f"file has no {'lora_A' if not has_a else 'lora_B'} for it")
    for path in expert_paths:
        missing = [w for w in ("lora_A", "lora_B") if path + (w,) not in expert_lora]
        if missing:
            raise ValueError(f"{where}: target_parameters={cfg.get('target_parameters')!r} selects "
                             f"{lora_lib.hf_module_name(path)!r} but the file has no {missing[0]} for it (expected "
                             f"under {_PREFIX}{[k for k, p in expert_keys.items() if p == path][0]})")
        a, b = lora_lib.expert_lora_from_peft(expert_lora[path + ("lora_A",)], expert_lora[path + ("lora_B",)],
                                              lora_lib.expert_shapes(params, path)[0])
        lora[path + ("lora_A",)], lora[path + ("lora_B",)] = a, b
    saved = {}
    for path, array in builder.flat.items():
        missing = [n for n, e in builder.expected.items() if e.param_path == path and n not in builder.received]
        if missing:  # a stacked expert param with some experts only
            raise ValueError(f"{where}: modules_to_save {lora_lib.hf_module_name(path[:-1])!r}: the file holds some "
                             f"experts' {path[-1]} only; missing {missing}")
        saved[path] = array.astype(pflat[path].dtype)
    return lcfg, traverse_util.unflatten_dict(lora), traverse_util.unflatten_dict(saved) if saved else {}


def _saved_module(builder, name: str) -> str | None:
    """The HF module name (module tree, e.g. ``model.layers.0.mlp.experts``) whose param the HF tensor ``name``
    is, for a tensor of the model (checkpoint name, alias or fused expert tensor as ``builder`` knows them); None
    for any other name."""
    name = builder.aliases.get(name, name)
    if name in builder.expected:
        path = builder.expected[name].param_path
    elif name in builder.fused:
        path = builder.fused[name].parts[0][0]
    else:
        return None
    return lora_lib.hf_module_name(path[:-1])


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
    ours |= {lora_lib.hf_module_name(p) for p in (lora_lib.select_expert_targets(params, lora_cfg.target_parameters)
                                                  if lora_cfg.target_parameters else ())}
    flat = traverse_util.flatten_dict(lora)
    theirs = {lora_lib.hf_module_name(k[:-1]) for k in flat}
    is_expert = lambda n: n.rsplit(".", 2)[-2:-1] == ["experts"]
    if {n for n in ours if not is_expert(n)} != {n for n in theirs if not is_expert(n)}:
        t = acfg.target_modules
        diffs.append(f"lora.target_modules={','.join(t) if isinstance(t, tuple) else t!r}")
    if {n for n in ours if is_expert(n)} != {n for n in theirs if is_expert(n)}:
        diffs.append(f"lora.target_parameters={','.join(acfg.target_parameters)!r}")
    if (set(lora_lib.saved_module_paths(params, acfg.modules_to_save))
            != set(lora_lib.saved_module_paths(params, lora_cfg.modules_to_save))):
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
