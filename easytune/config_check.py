"""The one place that rejects a bad config: :func:`validate` checks every key's value before anything is read or
compiled, and names the key in its error.

Checks that need the model or the device count (target_modules matching nothing, a batch the mesh does not
divide) are made where that is known: :func:`easytune.lora.select_targets`, :func:`easytune.sharding.make_mesh`.
"""

from __future__ import annotations

import glob
import pathlib
import re

import ml_collections

from easytune.config import (
    ATTENTION_NAMES,
    DTYPES,
    EXCESS_LENGTH_STRATEGIES,
    FORMATS,
    LIST_KEYS,
    METHODS,
    REMAT_POLICY_NAMES,
    SCHEDULERS,
    TOKENIZER_FILES,
    ConfigError,
    check_keys,
    defaults,
    parse_config_overrides,
    remat_policy_name,
    split_list,
)
from easytune.mixture import dataset_sources
from easytune.presets import PRESETS
from easytune.tokenizer import CHAT_TEMPLATES


def validate(config: ml_collections.ConfigDict) -> None:
    """Rejects invalid values before any compilation, naming the key.

    Checks that need the model or the device count (target_modules matching nothing, a batch the mesh
    does not divide) are done where that is known: :func:`easytune.lora.select_targets`,
    :func:`easytune.sharding.make_mesh`.

    Raises:
        ConfigError: the first problem found.
    """
    check_keys(config, defaults(), "")
    _validate_lists(config)
    _validate_model(config)
    _validate_lora(config)
    _validate_data(config)
    _validate_optim(config)
    _validate_train(config)


def _need(cond, key: str, msg: str) -> None:
    """Raises :class:`ConfigError` naming ``key`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _validate_lists(config) -> None:
    """:func:`validate`'s checks of the list keys (:data:`LIST_KEYS`, a list ``lora.target_modules``): every entry
    a non-empty string."""
    keys = LIST_KEYS + (("lora.target_modules",) if isinstance(config.lora.target_modules, (list, tuple)) else ())
    for key in keys:
        section, name = key.rsplit(".", 1)
        value = config[section.split(".")[0]]
        for part in section.split(".")[1:]:
            value = value[part]
        for entry in value[name]:
            _need(isinstance(entry, str) and entry.strip(), key,
                  f"entries must be non-empty strings, got {entry!r} in {list(value[name])!r}")


def _validate_model(config) -> None:
    """:func:`validate`'s checks of ``method``, ``model.*``, ``tokenizer.path``."""
    _need(config.method in METHODS, "method", f"must be one of {METHODS}, got {config.method!r}")
    _need(bool(config.model.path) != bool(config.model.preset), "model.path",
         "set exactly one of model.path (a local HF dir) and model.preset (a size from scratch); to train a "
         "model dir with a recipe that sets a preset (configs/quickstart.py), also pass --config.model.preset=")
    if config.model.path:
        p = pathlib.Path(config.model.path)
        _need(p.is_dir() and (p / "config.json").is_file(), "model.path",
             f"{p} is not a Hugging Face model dir (no config.json); convert GGUF with `easytune convert`")
    else:
        _need(config.model.preset in PRESETS, "model.preset",
             f"unknown preset {config.model.preset!r}; available: {sorted(PRESETS)}")
    try:
        dims = parse_config_overrides(config.model.config_overrides)
    except ValueError as e:
        raise ConfigError(f"config key 'model.config_overrides': {e}") from e
    _need(not dims or bool(config.model.preset), "model.config_overrides",
         "applies to a model.preset (a model from scratch); a model.path brings its own config.json")
    _need(not config.lora.init_from or config.method in ("lora", "qlora"), "lora.init_from",
         f"continues a LoRA adapter, but method is {config.method!r}; use method 'lora' or 'qlora' (or merge the "
         f"adapter first: easytune export ADAPTER --base MODEL --merged OUT)")
    if config.method == "pretrain" and not config.data.datasets:  # a mixture: each source's format, below
        _need(config.data.format in ("text", "completion", "pretokenized"), "data.format",
             f"method 'pretrain' trains a causal LM on every token: use 'text' (or 'completion', 'pretokenized'), "
             f"got {config.data.format!r}")
    validate_compute(config)
    tok = config.tokenizer.path or config.model.path
    if not config.data.builtin:
        _need(bool(tok), "tokenizer.path", "no tokenizer: set tokenizer.path (or model.path)")
        _need(pathlib.Path(tok).is_dir(), "tokenizer.path", f"tokenizer dir not found: {tok}")
        _need(any((pathlib.Path(tok) / f).is_file() for f in TOKENIZER_FILES), "tokenizer.path",
             f"{tok} holds no tokenizer ({', '.join(TOKENIZER_FILES)})")


def validate_compute(config: ml_collections.ConfigDict) -> None:
    """The ``model.*`` keys that decide how the model is computed, not what it is: ``dtype``, ``remat``,
    ``scan_layers``, ``attention``, ``attention_block``, ``compute_dtype`` (part of :func:`validate`; also run by
    ``easytune estimate``, which reads no weights or data).

    Raises:
        ConfigError: naming the key, its allowed values and the value found.
    """
    _need(config.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}")
    try:
        remat_policy_name(config.model.remat)
    except ValueError:
        raise ConfigError(f"config key 'model.remat': must be one of {REMAT_POLICY_NAMES} (or True = 'full', "
                          f"False = 'none'), got {config.model.remat!r}") from None
    _need(isinstance(config.model.scan_layers, bool), "model.scan_layers",
         f"must be True or False, got {config.model.scan_layers!r}")
    _need(config.model.attention in ATTENTION_NAMES, "model.attention",
          f"must be one of {ATTENTION_NAMES}, got {config.model.attention!r}")
    _need(isinstance(config.model.attention_block, int) and config.model.attention_block >= 16,
          "model.attention_block", f"must be an integer >= 16 (tokens), got {config.model.attention_block!r}")
    _need(config.model.compute_dtype in DTYPES, "model.compute_dtype", f"must be one of {DTYPES}")
    coef = config.model.get("router_aux_loss_coef", -1.0)
    _need(isinstance(coef, (int, float)) and not isinstance(coef, bool) and (coef == -1 or coef >= 0),
          "model.router_aux_loss_coef", f"must be -1 (the checkpoint's) or a number >= 0, got {coef!r}")


def _validate_lora(config) -> None:
    """:func:`validate`'s checks of ``qlora.*`` and ``lora.*`` (for the LoRA methods)."""
    if config.method == "qlora":
        _need(config.qlora.bnb_4bit_quant_type == "nf4", "qlora.bnb_4bit_quant_type",
             f"only 'nf4' is implemented, got {config.qlora.bnb_4bit_quant_type!r}")
        _need(isinstance(config.qlora.bnb_4bit_use_double_quant, bool), "qlora.bnb_4bit_use_double_quant",
             f"must be True or False, got {config.qlora.bnb_4bit_use_double_quant!r}")
    if config.method in ("lora", "qlora"):
        _need(isinstance(config.lora.r, int) and config.lora.r > 0, "lora.r",
             f"must be a positive int, got {config.lora.r!r}")
        _need(config.lora.lora_alpha > 0, "lora.lora_alpha", f"must be > 0, got {config.lora.lora_alpha!r}")
        _need(0.0 <= config.lora.lora_dropout < 1.0, "lora.lora_dropout",
             f"must be in [0, 1), got {config.lora.lora_dropout!r}")
        targets = config.lora.target_modules
        expert_targets = list(config.lora.get("target_parameters", []))
        _need(bool(split_list(targets)) or bool(expert_targets), "lora.target_modules",
              "is empty (and so is lora.target_parameters)")
        if expert_targets:
            _validate_target_parameters(config, expert_targets)
        if config.lora.init_from:
            a = pathlib.Path(config.lora.init_from)
            _need((a / "adapter_config.json").is_file(), "lora.init_from",
                 f"{a} is not a PEFT adapter dir (no adapter_config.json)")
        try:
            if isinstance(targets, str):
                re.compile(targets)
        except re.error as e:
            raise ConfigError(f"config key 'lora.target_modules': {targets!r} is not a valid regex ({e}); use "
                              f"'all-linear', a list of names like ['q_proj', 'v_proj'], or a regex") from e


EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # easytune.lora.EXPERT_PARAMS (config_check does not import lora)
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")


def _validate_target_parameters(config, entries: list) -> None:
    """:func:`_validate_lora`'s checks of ``lora.target_parameters``: every entry names a fused expert parameter
    (``gate_up_proj`` / ``down_proj``, or a longer name ending so, as peft matches it), ``lora_dropout`` is 0 (peft's
    ``ParamWrapper`` refuses dropout), and the model (``model.path``'s config.json, when readable) is a mixture of
    experts. That an entry matches a parameter of the model is checked when the model is loaded
    (:func:`easytune.lora.select_expert_targets`)."""
    for entry in entries:
        last = str(entry).strip().rsplit(".", 1)[-1]
        hint = ""
        if last == "weight" or last == "gate":
            hint = " (the router mlp.gate is never a LoRA target; linear modules go in lora.target_modules)"
        elif last in ("gate_proj", "up_proj", "w1", "w3"):
            hint = " (the experts' gate and up projections are one fused parameter: gate_up_proj)"
        elif last == "w2":
            hint = " (Mixtral's w2 is down_proj in transformers v5)"
        _need(last in EXPERT_PARAMS, "lora.target_parameters",
              f"entry {entry!r} is not a mixture-of-experts parameter; use {list(EXPERT_PARAMS)} or longer names "
              f"ending so, e.g. 'mlp.experts.gate_up_proj'{hint}")
    _need(config.lora.lora_dropout == 0, "lora.lora_dropout",
          f"must be 0 with lora.target_parameters (peft's ParamWrapper refuses dropout on expert parameters: "
          f"x cannot be factored out of the fused update), got {config.lora.lora_dropout!r}")
    _need(not config.model.preset, "lora.target_parameters",
          f"model.preset {config.model.preset!r} is a dense model; target_parameters adapts mixture-of-experts "
          f"experts ({', '.join(MOE_MODEL_TYPES)})")
    cfg_file = pathlib.Path(config.model.path) / "config.json" if config.model.path else None
    if cfg_file is not None and cfg_file.is_file():
        import json
        try:
            model_type = json.loads(cfg_file.read_text()).get("model_type")
        except (ValueError, OSError):
            return  # the model loader reports an unreadable config.json
        _need(model_type in MOE_MODEL_TYPES, "lora.target_parameters",
              f"{cfg_file} is model_type {model_type!r}, which has no mixture-of-experts parameters; "
              f"target_parameters adapts the experts of {', '.join(MOE_MODEL_TYPES)}")


def _validate_data(config) -> None:
    """:func:`validate`'s checks of ``data.*`` and ``data.clean.*``."""
    d = config.data
    _need(d.builtin in ("", "quickstart"), "data.builtin", f"must be '' or 'quickstart', got {d.builtin!r}")
    if not d.builtin:
        _need(bool(d.train_files) or bool(d.datasets), "data.train_files",
              "no training files given (or data.datasets, a mixture)")
        for f in d.train_files:
            _need(bool(glob.glob(f)), "data.train_files", f"no file matches {f!r}")
    _need(not (d.builtin and d.datasets), "data.datasets", "data.builtin makes its own data: leave data.datasets empty")
    _need(d.format in FORMATS, "data.format", f"must be one of {FORMATS}, got {d.format!r}")
    _need(d.excess_length_strategy in EXCESS_LENGTH_STRATEGIES, "data.excess_length_strategy",
         f"must be one of {EXCESS_LENGTH_STRATEGIES}, got {d.excess_length_strategy!r}")
    _need(bool(d.roles_to_train) or d.train_on_inputs or d.format != "chat", "data.roles_to_train",
         "is empty: no turn would be trained")
    _need(not d.chat_template or "{" in d.chat_template or d.chat_template in CHAT_TEMPLATES
          or pathlib.Path(d.chat_template).is_file(), "data.chat_template",
          f"file not found: {d.chat_template} (built-in names: {', '.join(CHAT_TEMPLATES)})")
    cl = d.clean
    _need(cl.unicode_normalization.upper() in ("", "NFC", "NFD", "NFKC", "NFKD"), "data.clean.unicode_normalization",
         f"must be NFC, NFD, NFKC, NFKD or '', got {cl.unicode_normalization!r}")
    _need(cl.phrases in ("", "default"), "data.clean.phrases", f"must be 'default' or '', got {cl.phrases!r}")
    for f in cl.phrase_files:
        _need(pathlib.Path(f).is_file(), "data.clean.phrase_files", f"file not found: {f}")
    _need(0 < cl.furniture_min_fraction < 1, "data.clean.furniture_min_fraction",
          f"must be in (0, 1), got {cl.furniture_min_fraction}")
    _need(cl.furniture_edge_lines >= 0, "data.clean.furniture_edge_lines",
          f"must be >= 0 (0 = every line), got {cl.furniture_edge_lines}")
    _need(cl.furniture_group in ("", "source_file", "source_dir")
          or (cl.furniture_group.startswith("field:") and len(cl.furniture_group) > len("field:")),
          "data.clean.furniture_group", f"must be '', 'source_file', 'source_dir' or 'field:NAME', "
          f"got {cl.furniture_group!r}")
    _need(cl.phrase_action in ("drop", "cut_sentence"), "data.clean.phrase_action",
         f"must be 'drop' or 'cut_sentence', got {cl.phrase_action!r}")
    _need(cl.min_length >= 0 and cl.max_length >= 0, "data.clean.min_length", "lengths must be >= 0 (0 = no bound)")
    _need(not cl.max_length or cl.max_length >= cl.min_length, "data.clean.max_length",
         f"{cl.max_length} is below data.clean.min_length {cl.min_length}")
    _need(0.0 < cl.near_dup_threshold <= 1.0, "data.clean.near_dup_threshold", "must be in (0, 1]")
    _need(cl.minhash_num_perm >= 16, "data.clean.minhash_num_perm", "must be >= 16")
    _need(d.val_set_size >= 0, "data.val_set_size", "must be >= 0 (a fraction < 1 or a count)")
    _need(d.sequence_len >= 2, "data.sequence_len", f"must be >= 2 tokens, got {d.sequence_len}")
    _need(isinstance(d.num_proc, int) and not isinstance(d.num_proc, bool) and d.num_proc >= 0, "data.num_proc",
          f"must be an int >= 0 (0 = all cores), got {d.num_proc!r}")
    _need(d.bad_records in ("error", "skip"), "data.bad_records", f"must be 'error' or 'skip', got {d.bad_records!r}")
    _need(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction!r}")
    _need(isinstance(d.batch_records, int) and not isinstance(d.batch_records, bool) and d.batch_records >= 1,
          "data.batch_records", f"must be an int >= 1, got {d.batch_records!r}")
    _validate_sources(config)


def _validate_sources(config) -> None:
    """:func:`validate`'s checks of ``data.datasets``: :func:`easytune.mixture.dataset_sources` resolves it, then each
    source gets the checks of the ``data.*`` keys it sets (files exist, roles to train, chat template, format)."""
    sources = dataset_sources(config.data)
    if not config.data.datasets:
        return  # the single source: the data.* checks above
    for i, src in enumerate(sources):
        where = f"data.datasets[{i}]"
        for f in src["train_files"]:
            _need(bool(glob.glob(f)), f"{where}.train_files", f"no file matches {f!r}")
        _need(bool(src["roles_to_train"]) or src["train_on_inputs"] or src["format"] != "chat",
              f"{where}.roles_to_train", "is empty: no turn would be trained")
        template = src["chat_template"]
        _need(not template or "{" in template or template in CHAT_TEMPLATES or pathlib.Path(template).is_file(),
              f"{where}.chat_template", f"file not found: {template} (built-in names: {', '.join(CHAT_TEMPLATES)})")
        _need(config.method != "pretrain" or src["format"] in ("text", "completion", "pretokenized"),
              f"{where}.format", f"method 'pretrain' trains a causal LM on every token: use 'text' (or "
              f"'completion', 'pretokenized'), got {src['format']!r}")


def _validate_optim(config) -> None:
    """:func:`validate`'s checks of ``optim.*`` (the AdamW and schedule keys)."""
    o = config.optim
    _need(o.learning_rate > 0, "optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    _need(o.lr_scheduler in SCHEDULERS, "optim.lr_scheduler", f"must be one of {SCHEDULERS}")
    _need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _need(0.0 <= o.warmup_ratio < 1.0, "optim.warmup_ratio", "must be in [0, 1)")
    _need(0.0 <= o.cosine_min_lr_ratio <= 1.0, "optim.cosine_min_lr_ratio", "must be in [0, 1]")
    _need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _need(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 = no clipping)")
    for key in ("adam_beta1", "adam_beta2"):
        _need(0.0 <= o[key] < 1.0, f"optim.{key}", f"must be in [0, 1), got {o[key]}")
    _need(o.adam_epsilon > 0, "optim.adam_epsilon", "must be > 0")


def _validate_train(config) -> None:
    """:func:`validate`'s checks of ``train.*``, ``optim.pretrain_*``, ``mesh.*`` and ``distributed.*``."""
    o = config.optim
    t = config.train
    _need(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
    _need(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _need(t.max_steps > 0 or t.num_epochs > 0, "train.num_epochs", "set num_epochs > 0 or max_steps > 0")
    for key in ("eval_steps", "save_steps", "sample_max_new_tokens", "evals_per_epoch", "early_stopping_patience",
                "early_stopping_min_delta", "peak_tflops", "max_consecutive_nonfinite", "loss_chunk_tokens"):
        _need(t[key] >= 0, f"train.{key}", "must be >= 0")
    _need(t.log_steps >= 1, "train.log_steps", "must be >= 1")
    _need(not (t.eval_steps and t.evals_per_epoch), "train.evals_per_epoch",
         f"set train.eval_steps ({t.eval_steps}) or train.evals_per_epoch ({t.evals_per_epoch}), not both")
    _need(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
    _need(o.pretrain_learning_rate >= 0, "optim.pretrain_learning_rate", "must be >= 0 (0 = the model family's)")
    _need(o.pretrain_batch_tokens >= 0, "optim.pretrain_batch_tokens", "must be >= 0 (0 = the model family's)")
    _need(t.save_total_limit >= 1, "train.save_total_limit", "must be >= 1")
    _need(bool(t.output_dir), "train.output_dir", "is empty")
    for key in ("data", "fsdp", "tensor", "expert"):
        v = config.mesh[key]
        _need(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{key}", f"must be a positive int or -1, got {v!r}")
    _need([config.mesh[k] for k in ("data", "fsdp", "tensor", "expert")].count(-1) <= 1, "mesh",
         "at most one of mesh.data/fsdp/tensor/expert may be -1")
    _need(config.mesh.replicated_warn_bytes >= 0, "mesh.replicated_warn_bytes", "must be >= 0")
    d = config.distributed
    _need(isinstance(d.num_processes, int) and d.num_processes >= 0, "distributed.num_processes", "must be an int >= 0")
    _need(isinstance(d.process_id, int) and d.process_id >= -1, "distributed.process_id", "must be an int >= -1")
    _need(d.initialization_timeout >= 1, "distributed.initialization_timeout", "must be >= 1 second")
