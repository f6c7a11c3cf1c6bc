"""Every config key with its default and unit, command-line overrides, and the one place that rejects bad configs.

A recipe in ``configs/*.py`` has ``get_config() -> ConfigDict``; it starts from :func:`defaults` and only
chooses values. ``easytune train CONFIG --config.KEY=VALUE`` overrides keys; unknown keys and invalid values
are rejected by :func:`easytune.config_check.validate` before anything is compiled, with a message that names the key.

Keys that hold several values take Python lists (``c.data.train_files = ["a.jsonl", "b.jsonl"]``, see
:data:`LIST_KEYS`); the command line may give them comma-separated (``--config.data.train_files=a.jsonl,b.jsonl``),
as run configs written by older versions did; :func:`with_defaults` and :func:`canonical_flat` read that form.
Mappings (``data.columns``, ``data.role_map``, ``model.config_overrides``) are ``"name=value,..."`` strings.
``data.datasets`` (a mixture of sources, as axolotl's ``datasets:``) is a list of dicts, JSON on the command line;
:func:`easytune.mixture.dataset_sources` resolves it.

Global batch (sequences per optimizer step) = ``train.micro_batch_size`` x data-parallel devices
(``mesh.data * mesh.fsdp * mesh.expert``) x ``train.gradient_accumulation_steps``  (axolotl's definition).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from easytune.presets import MODEL_DIMS

METHODS = ("lora", "qlora", "full", "pretrain")
FORMATS = ("alpaca", "chat", "completion", "text", "pretokenized")
EXCESS_LENGTH_STRATEGIES = ("truncate", "drop", "raise")
SCHEDULERS = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# ``model.remat`` names; easytune.models.llama.REMAT_POLICIES maps each to a ``jax.checkpoint`` policy.
REMAT_POLICY_NAMES = ("none", "full", "dots_saveable", "checkpoint_dots", "dots_with_no_batch_dims_saveable")


def remat_policy_name(value) -> str:
    """Canonical ``model.remat`` name: a name of :data:`REMAT_POLICY_NAMES`, or an old boolean.

    ``True`` (or the strings "true"/"yes") means "full" and ``False``/``None`` (or "false"/"no"/"") "none",
    so run configs written before remat took a policy name (``"remat": false``) still load.

    Raises:
        ValueError: an unknown name (lists the allowed ones).
    """
    if value is None or isinstance(value, bool):
        return "full" if value else "none"
    name = str(value).strip()
    old = {"true": "full", "yes": "full", "false": "none", "no": "none", "": "none"}
    name = old.get(name.lower(), name)
    if name not in REMAT_POLICY_NAMES:
        raise ValueError(f"unknown remat policy {value!r}; allowed: {', '.join(REMAT_POLICY_NAMES)} "
                         f"(or True = 'full', False = 'none')")
    return name


# ``model.attention`` names (easytune.models.attention.attend dispatches on them).
ATTENTION_NAMES = ("auto", "blockwise", "xla", "cudnn", "splash")

# Keys holding a list of strings. ``lora.target_modules`` is a list too unless it is "all-linear" or a regex
# (:func:`target_modules_value`).
LIST_KEYS = ("tokenizer.added_tokens", "tokenizer.added_special_tokens", "lora.modules_to_save",
             "lora.target_parameters", "qlora.llm_int8_skip_modules", "data.train_files", "data.roles_to_train",
             "data.clean.phrase_files", "data.clean.fields")


def defaults() -> ml_collections.ConfigDict:
    """All keys easytune reads, with defaults. Units are given in the comments."""
    c = ml_collections.ConfigDict()
    c.method = "lora"                      # "lora" | "qlora" (LoRA on an NF4 base) | "full" | "pretrain"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""                      # local Hugging Face model dir (config.json + safetensors)
    c.model.preset = ""                    # or a size from PRESETS, initialised from scratch (seed train.seed)
    c.model.config_overrides = ""          # with a preset: "hidden_size=256,num_hidden_layers=6" (HF config names)
    c.model.dtype = "float32"              # parameter storage dtype
    c.model.compute_dtype = "float32"      # activation dtype (bfloat16 on TPU); logits/loss are always fp32
    # rematerialisation policy of each decoder layer: "none" | "full" (recompute the layer in the backward pass)
    # | "dots_saveable" (= "checkpoint_dots": keep matmul outputs) | "dots_with_no_batch_dims_saveable";
    # True/False (older configs) mean "full"/"none", hence the untyped field
    c.model.remat = ml_collections.FieldReference("none", field_type=object)
    c.model.scan_layers = False            # run the decoder stack as one nn.scan (fast compiles of deep models)
    # attention implementation: "auto" | "blockwise" (FlashAttention-style, memory linear in length) | "xla"
    # (one [T, S] softmax per layer) | "cudnn" (jax.nn.dot_product_attention, GPU) | "splash" (Pallas, TPU)
    c.model.attention = "auto"
    c.model.attention_block = 512          # blockwise: query and key block length in tokens
    # mixtures of experts: weight of the router load-balancing loss added to the training loss; -1 = the
    # checkpoint's router_aux_loss_coef when its config.json sets output_router_logits (as transformers trains),
    # else 0. Mixtral ships 0.02 with output_router_logits false: set 0.02 here to train with it
    c.model.router_aux_loss_coef = -1.0
    # tokens the data uses whose embed_tokens / lm_head row is all zero (max |w| <= 1e-16) are always reported;
    # True sets those rows to the mean of the trained rows (as unsloth / axolotl); LoRA: the module must be in
    # lora.modules_to_save
    c.model.fix_untrained_tokens = False

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""                  # local HF tokenizer dir; "" = model.path
    # tokens added to the tokenizer (normal, never split, kept by decode; axolotl's tokens), e.g.
    # ["<tool_call>", "</tool_call>"]; a tokenizer longer than the model's vocab_size resizes embed_tokens / lm_head
    # (new rows = mean of the old). LoRA: embed_tokens (and an untied lm_head) must be in lora.modules_to_save
    c.tokenizer.added_tokens = []
    # special tokens added after added_tokens (transformers' add_special_tokens, extra_special_tokens), for chat
    # markers such as ["<|im_start|>", "<|im_end|>"]: never split, dropped by decode(skip_special_tokens=True), and
    # chat masking ends a turn at them (the newline after one is not trained); resize / LoRA as added_tokens
    c.tokenizer.added_special_tokens = []
    c.tokenizer.pad_to_multiple_of = 0     # a resized vocab is rounded up to a multiple of this, rows; 0 = exact

    c.lora = ml_collections.ConfigDict()
    c.lora.r = 8                           # rank
    c.lora.lora_alpha = 16                 # scale = lora_alpha / r  (or / sqrt(r) with use_rslora)
    c.lora.lora_dropout = 0.0              # dropout on the LoRA branch input, probability
    # "all-linear" | ["q_proj", "v_proj"] (HF module-name suffixes) | a regex string (matches whole names);
    # a list or a string, hence the untyped field (the command line's "q_proj,v_proj" becomes a list)
    c.lora.target_modules = ml_collections.FieldReference("all-linear", field_type=object)
    c.lora.modules_to_save = []            # modules trained in full, e.g. ["lm_head"]
    c.lora.use_rslora = False
    # peft target_parameters: fused mixture-of-experts params to adapt (Mixtral, Qwen3-MoE), e.g.
    # ["gate_up_proj", "down_proj"] or ["mlp.experts.gate_up_proj"] (a name or its ending); [] = none.
    # all-linear never includes them (nor the router); needs lora_dropout 0, as peft
    c.lora.target_parameters = []

    # method="qlora": frozen kernels in NF4 (transformers BitsAndBytesConfig names)
    c.qlora = ml_collections.ConfigDict()
    c.qlora.bnb_4bit_quant_type = "nf4"    # 4-bit data type; only "nf4"
    c.qlora.bnb_4bit_use_double_quant = True  # quantize the per-64 absmax constants again (8 bit, blocks of 256)
    c.qlora.llm_int8_skip_modules = ["lm_head"]  # modules kept in model.dtype
    c.lora.init_from = ""                  # a PEFT adapter dir to continue training (same r/alpha/targets)

    c.data = ml_collections.ConfigDict()
    c.data.builtin = ""                    # "quickstart": our generated task + tokenizer (no files needed)
    c.data.train_files = []                # paths, globs or directories, e.g. ["a.jsonl", "more/*.jsonl"]
    c.data.format = "alpaca"               # "alpaca" | "chat" | "completion" | "text" | "pretokenized"
    c.data.val_set_size = 0.05             # fraction in (0, 1) or a count of examples (>= 1)
    c.data.sequence_len = 256              # tokens per training sequence
    c.data.packing = False                 # pack several examples into one sequence (segment masks)
    c.data.train_on_inputs = False         # also train on prompt tokens
    c.data.seed = 0
    c.data.excess_length_strategy = "truncate"  # examples > sequence_len + 1 tokens: "truncate" | "drop" | "raise"
    c.data.text_field = "text"             # completion / text: the field holding the text
    c.data.text_template = ""              # completion: build the text from fields, e.g. "{Name} by {Composer}"
    c.data.columns = ""                    # "field=Column,..." renames CSV/SQL/Parquet/JSON columns ("" = all)
    c.data.html_selector = ""              # CSS selector of an HTML page's content ("" = main/article/body)
    c.data.csv_encoding = "utf-8"          # CSV/TSV encoding (a UTF-8 byte order mark is dropped)
    c.data.csv_delimiter = ""              # "" = "," for .csv, tab for .tsv
    c.data.sql_table = ""                  # SQL dump: table whose INSERT rows are read ("" = the only one)
    c.data.roles_to_train = ["assistant"]  # chat: roles whose turns carry the loss
    c.data.role_map = ""                   # chat: extra role names, e.g. "human=user,gpt=assistant"
    c.data.chat_template = ""              # chat: built-in name (chatml, llama3, qwen, ...) or .jinja / .json file
    # cache dir for prepared data ("" = train: a temporary folder, no cache; prepare: <output_dir>/prepared_data)
    c.data.dataset_prepared_path = ""
    c.data.num_proc = 0                    # processes that tokenize in parallel (0 = all cores of this process)
    # a record that cannot be read (a bad JSON line) or formatted: "error" (stop, naming file:line and field) |
    # "skip" (count it, name the first few in the report)
    c.data.bad_records = "error"
    c.data.max_bad_fraction = 0.01         # bad_records="skip": a larger fraction of skipped records is an error
    c.data.batch_records = 2000            # records per streamed batch (bounds the memory of the prepare)
    # a mixture (axolotl's `datasets:`): a list of dicts, one per source, each with its own train_files (or
    # axolotl's `path`, required), format (or axolotl's `type`), columns, role_map, text_field, text_template,
    # chat_template, roles_to_train, train_on_inputs, html_selector, csv_encoding, csv_delimiter, sql_table
    # (absent: the data.* value), an optional name (default: the first file's stem) and weight (share of the
    # source's examples taken, default 1.0; 0.5 = a deterministic half, 2.0 = each twice) or num_samples
    # (exactly this many examples); e.g. [dict(train_files=["a.jsonl"], format="alpaca", weight=0.5)], JSON on
    # the command line
    c.data.datasets = []                   # [] = the single source the data.* keys describe
    c.data.clean = ml_collections.ConfigDict()
    c.data.clean.fix_mojibake = False      # ftfy.fix_encoding
    c.data.clean.unicode_normalization = ""  # "NFC" | "NFKC" | "NFD" | "NFKD" | "" (off)
    c.data.clean.remove_control_chars = False
    c.data.clean.normalize_whitespace = False
    c.data.clean.remove_furniture = False  # drop page headers/footers: lines recurring on most pages of a document
    c.data.clean.furniture_min_fraction = 0.5  # a line on more than this fraction of the pages is furniture
    c.data.clean.furniture_edge_lines = 3  # looked for among the first/last N non-blank lines of a page (0 = all)
    c.data.clean.furniture_group = ""      # a document: "" one text | "source_file" | "source_dir" | "field:NAME"
    c.data.clean.phrases = ""              # "default": our English + Chinese boilerplate/refusal/slop list
    c.data.clean.phrase_files = []         # user phrase lists (.txt / .json / .yaml files)
    c.data.clean.phrase_action = "drop"    # "drop" the record | "cut_sentence"
    c.data.clean.fields = []               # top-level fields the steps look at ([] = all text)
    c.data.clean.min_length = 0            # characters per record; 0 = no bound
    c.data.clean.max_length = 0            # characters per record; 0 = no bound
    c.data.clean.dedup_exact = False       # drop exact duplicates (normalized text)
    c.data.clean.dedup_near = False        # drop near duplicates (MinHash LSH)
    c.data.clean.near_dup_threshold = 0.8  # estimated Jaccard similarity of the shingle sets
    c.data.clean.minhash_num_perm = 128    # MinHash permutations

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 2e-4           # peak learning rate
    c.optim.lr_scheduler = "cosine"        # "cosine" | "linear" | "constant"
    c.optim.warmup_steps = 0               # optimizer steps; 0 = use warmup_ratio
    c.optim.warmup_ratio = 0.0             # fraction of total optimizer steps
    c.optim.cosine_min_lr_ratio = 0.0      # final lr / peak lr for cosine
    c.optim.weight_decay = 0.0             # AdamW decoupled weight decay
    c.optim.max_grad_norm = 1.0            # global-norm clipping; 0 = off
    c.optim.adam_beta1 = 0.9
    c.optim.adam_beta2 = 0.999
    c.optim.adam_epsilon = 1e-8
    # `easytune lr`: lr = pretrain_learning_rate * sqrt(supervised tokens per step / pretrain_batch_tokens);
    # 0 = the model family's figures (train/optim.py PRETRAIN_HPARAMS: Llama 2 3e-4 / 4M, Mistral 5e-5 / 4M)
    c.optim.pretrain_learning_rate = 0.0   # the base model's peak pretraining learning rate
    c.optim.pretrain_batch_tokens = 0      # tokens per optimizer step in pretraining

    c.train = ml_collections.ConfigDict()
    c.train.micro_batch_size = 4           # sequences per data-parallel device per micro-step
    c.train.gradient_accumulation_steps = 1
    c.train.num_epochs = 1.0               # passes over the training sequences
    c.train.max_steps = 0                  # optimizer steps; > 0 overrides num_epochs
    c.train.drop_last = True               # drop the last incomplete global batch of an epoch
    c.train.eval_steps = 0                 # evaluate every N optimizer steps; 0 = only at the start and end
    c.train.evals_per_epoch = 0            # or: evaluations per epoch (exclusive with eval_steps)
    c.train.early_stopping_patience = 0    # stop after N evaluations without improvement; 0 = off
    c.train.early_stopping_min_delta = 0.0 # eval loss decrease (nats/token) that counts as an improvement
    c.train.max_consecutive_nonfinite = 3  # skipped updates (NaN/Inf loss or grads) in a row that stop the run
    c.train.loss_chunk_tokens = 1024       # cross-entropy this many tokens at a time (no [B,T,V] logits); 0 = off
    c.train.peak_tflops = 0.0              # device peak for MFU, TFLOP/s per device; 0 = known table / CPU measured
    c.train.save_steps = 0                 # checkpoint every N optimizer steps; 0 = only at the end
    c.train.save_total_limit = 2           # checkpoints kept
    c.train.log_steps = 1                  # metrics.jsonl / TensorBoard every N optimizer steps
    c.train.seed = 0
    c.train.output_dir = "runs/run"        # the run directory
    c.train.sample_max_new_tokens = 32     # tokens generated for the end-of-run sample (0 = none)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1                        # data-parallel axis; -1 = all remaining devices
    c.mesh.fsdp = -1                       # fully-sharded data-parallel axis
    c.mesh.tensor = 1                      # tensor-parallel axis
    # Mixture-of-experts models: each device holds num_experts / mesh.expert experts of every sparse layer
    # and, as with data and fsdp, its share of the batch; must divide the model's num_experts
    c.mesh.expert = 1                      # expert-parallel axis
    c.mesh.replicated_warn_bytes = 1 << 20 # name every parameter at least this big (bytes) left unsharded

    # Multi-host (several processes, each driving its local devices; JAX's own distributed runtime).
    # On a TPU VM nothing needs setting: JAX detects the pod. Elsewhere set the three keys (or the env
    # EASYTUNE_COORDINATOR_ADDRESS / EASYTUNE_NUM_PROCESSES / EASYTUNE_PROCESS_ID) on every process.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = "" # HOST:PORT of process 0, e.g. "10.0.0.2:8476"
    c.distributed.num_processes = 0        # processes in the run (0 = from the env / single process)
    c.distributed.process_id = -1          # this process, 0 .. num_processes-1 (-1 = from the env)
    c.distributed.initialization_timeout = 300  # seconds to wait for the coordinator before failing
    c.distributed.auto = True              # on a TPU VM, call jax.distributed.initialize() with no arguments
    return c


class ConfigError(ValueError):
    """A config key has an unknown name or an invalid value; the message names the key."""


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Imports ``path`` (a ``configs/*.py`` recipe) and returns its ``get_config()``.

    Raises:
        ConfigError: the file is missing or has no ``get_config``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix != ".py":
        raise ConfigError(f"{path}: a config is a Python recipe with get_config() (configs/*.py); a run dir's "
                          f"config.json is read by generate/export, and a run resumes with `easytune train RECIPE.py` "
                          f"and the same train.output_dir")
    spec = importlib.util.spec_from_file_location(f"easytune_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    try:
        config = module.get_config()
    except TypeError as e:  # ml_collections refuses e.g. a string for a list key
        if "Could not override field" not in str(e):
            raise
        hint = (f"; the keys {', '.join(LIST_KEYS)} take Python lists, e.g. c.data.train_files = ['a.jsonl', "
                f"'b.jsonl'] (and data.datasets a list of dicts)" if "list" in str(e) else "")
        raise ConfigError(f"{path}: a value in get_config() has the wrong type ({e}){hint}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict (start from "
                          f"easytune.config.defaults()), got {type(config).__name__}")
    check_keys(config, defaults(), "")
    config.lora.target_modules = target_modules_value(config.lora.target_modules)
    config.data.datasets = datasets_value(config.data.datasets)
    return config


def check_keys(config, reference, prefix: str = "") -> None:
    """Raises :class:`ConfigError` for a key of ``config`` absent from ``reference`` (named, with close matches)."""
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(_unknown(name, [f"{prefix}{k}" for k in reference.keys()]))
        if isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(config[key], reference[key], name + ".")


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown config key '{name}'{hint}"


def _all_keys(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.KEY=VALUE`` (or ``KEY=VALUE``) strings to ``config`` in place.

    VALUE is parsed as a Python literal when it is one (``3``, ``1e-4``, ``True``), else kept as a string,
    then converted to the type of the existing key.

    Raises:
        ConfigError: naming the key, when it does not exist or VALUE does not fit its type.
    """
    known = list(_all_keys(config))
    for item in overrides:
        text = item[len("--config."):] if item.startswith("--config.") else item
        if "=" not in text:
            raise ConfigError(f"override '{item}' is not of the form --config.KEY=VALUE")
        key, raw = text.split("=", 1)
        if key not in known:
            raise ConfigError(_unknown(key, known))
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = _coerce(key, raw, node[leaf])
    return config


def _coerce(key: str, raw: str, current: Any) -> Any:
    if key == "data.datasets":
        return _current_form(key, _datasets_literal(raw))
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if key in ("tokenizer.added_tokens", "tokenizer.added_special_tokens") and not isinstance(value, (list, tuple)):
        # tokens are taken exactly: no stripping, and a blank entry ("a,,b", "a, ") is an error, not dropped
        tokens = raw.split(",") if raw else []
        bad = [t for t in tokens if not t.strip() or t != t.strip()]
        if bad:
            raise ConfigError(f"config key {key!r}: entry {bad[0]!r} of {raw!r} is blank or has "
                              f"spaces around it; give the tokens comma-separated with nothing else, or as a Python "
                              f"list (\"['<t>', ' x']\") for a token that needs spaces or commas")
        return tokens
    if key in LIST_KEYS:  # a Python list literal, or the comma-separated form "a.jsonl,b.jsonl"
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else split_list(raw)
    if key == "lora.target_modules":
        return target_modules_value(value if isinstance(value, (list, tuple)) else raw)
    if key == "model.remat":  # a policy name or an old boolean, whatever the recipe set (validate checks it)
        return value if isinstance(value, bool) else raw
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if raw.lower() in ("true", "false", "yes", "no"):
            return raw.lower() in ("true", "yes")
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        return raw
    else:
        return value
    raise ConfigError(f"config key '{key}': cannot use {raw!r} for a value of type {type(current).__name__}")


def _datasets_literal(raw: str) -> list:
    """``--config.data.datasets=VALUE``: a JSON (or Python literal) list of dicts; one dict is a one-entry list,
    ``""`` the empty list."""
    if not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except ValueError as json_error:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ConfigError(f"config key 'data.datasets': {raw!r} is not JSON ({json_error}); give a list of "
                              """dicts, e.g. --config.data.datasets='[{"train_files": ["a.jsonl"], "weight": 0.5}]'"""
                              ) from None
    value = [value] if isinstance(value, Mapping) else value
    if not isinstance(value, list) or not all(isinstance(e, Mapping) for e in value):
        raise ConfigError(f"config key 'data.datasets': must be a list of dicts (one per source), got {raw!r:.80}")
    return value


def parse_config_overrides(value: str) -> dict[str, Any]:
    """``model.config_overrides`` -> dict, in the manner of transformers' ``run_clm.py --config_overrides``:
    ``"hidden_size=256,num_hidden_layers=6"`` -> ``{"hidden_size": 256, "num_hidden_layers": 6}``.

    Raises:
        ValueError: an item that is not ``name=value``, a name outside :data:`MODEL_DIMS`, or a value that
            is not a number / True / False.
    """
    out: dict[str, Any] = {}
    for item in split_list(value):
        if "=" not in item:
            raise ValueError(f"{item!r} is not of the form name=value")
        name, raw = (x.strip() for x in item.split("=", 1))
        if name not in MODEL_DIMS:
            raise ValueError(_unknown(name, list(MODEL_DIMS)).replace("config key", "model dimension"))
        try:
            v = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            v = None
        if not isinstance(v, (int, float)) or (isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0):
            raise ValueError(f"{name}={raw!r}: expected a positive number or True/False")
        out[name] = v
    return out


def split_list(value: str | list | tuple) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (empty entries of a string dropped)."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def target_modules_value(value: str | list | tuple) -> str | list[str]:
    """``lora.target_modules`` in its config form: ``"all-linear"``, a list of HF module-name suffixes, or a regex.

    A list / tuple, or a string made only of names and commas (``"q_proj,v_proj"``, the command line's and
    older configs' form), is a list of names; any other string is a regex that must match a whole module name
    (PEFT's rule for a string; :func:`easytune.lora.parse_target_modules` reads the same three forms).
    """
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text == "all-linear" or not re.fullmatch(r"[\w\s,]+", text):
        return text
    return split_list(text)


def _current_form(key: str, value: Any) -> Any:
    """``value`` of the dotted ``key`` in today's form: a list for :data:`LIST_KEYS` (``"a,b"`` -> ``["a", "b"]``),
    :func:`target_modules_value` for ``lora.target_modules``, ``data.datasets`` a list of plain dicts (their
    list keys as lists), anything else as it is."""
    if key in LIST_KEYS:
        return split_list(value)
    if key == "lora.target_modules":
        return target_modules_value(value)
    if key == "data.datasets":
        return datasets_value(value)
    return value


def datasets_value(value: Any) -> Any:
    """``data.datasets`` in its config form: a list (or tuple) of entries becomes a list of plain dicts (a
    ConfigDict entry as a dict), each entry's ``train_files`` / ``path`` / ``roles_to_train`` given as ``"a,b"``
    made a list; an entry that is not a mapping, or a value that is not a list, is returned as it is (for
    :func:`easytune.mixture.dataset_sources` to refuse, naming the key). Keys and other values are not checked.
    """
    if not isinstance(value, (list, tuple)):
        return value
    return [_entry_form(e) for e in value]


def _entry_form(entry: Any) -> Any:
    """A ``data.datasets`` entry as a plain dict, its ``train_files`` / ``path`` / ``roles_to_train`` given as
    ``"a,b"`` made lists; anything else (a value validation refuses) as it is."""
    if isinstance(entry, ml_collections.ConfigDict):
        entry = entry.to_dict()
    if not isinstance(entry, Mapping):
        return entry
    def form(key, value):
        if key not in ("train_files", "path", "roles_to_train"):
            return value
        return split_list(value) if isinstance(value, str) else list(value) if isinstance(value, tuple) else value
    return {str(k): form(k, v) for k, v in entry.items()}


def canonical_flat(flat: dict[str, Any]) -> dict[str, Any]:
    """A flattened config (``{"data.train_files": ..., ...}``) with every value in its current form, so that a
    config saved by an older version compares equal to the same config now: list keys (:data:`LIST_KEYS`,
    ``lora.target_modules``) given comma-separated become lists, and ``model.remat`` becomes a policy name
    (:func:`remat_policy_name`). Keys absent stay absent.

    Raises:
        ValueError: an unknown ``model.remat`` name.
    """
    out = {key: _current_form(key, value) for key, value in flat.items()}
    if "model.remat" in out:
        out["model.remat"] = remat_policy_name(out["model.remat"])
    return out


def with_defaults(values: Any = None, section: str = "") -> ml_collections.ConfigDict:
    """:func:`defaults` (or its subtree ``section``, e.g. ``"data"`` or ``"data.clean"``) updated with ``values``.

    ``values`` is a ConfigDict or a nested mapping that may lack keys: a run's ``config.json`` or a checkpoint's
    config written by an older easytune (keys added since take their defaults), or part of ``config.data``.
    List keys given in the old comma-separated form (``"a.jsonl,b.jsonl"``) become lists
    (:func:`target_modules_value` for ``lora.target_modules``).

    Returns:
        A new ConfigDict (the section's when ``section`` is given).

    Raises:
        ConfigError: an unknown key (named, with close matches), or a value that does not fit its key's type.
    """
    node = defaults()
    prefix = ""
    for part in section.split(".") if section else ():
        node = node[part]
        prefix += part + "."
    _update(node, values if values is not None else {}, prefix)
    return node


def read_run_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """A run directory's ``config.json`` (the resolved config a run wrote) as a full ConfigDict.

    Read through :func:`with_defaults`, so a file written by an older easytune (keys added since, lists as
    ``"a,b"`` strings) loads; ``path`` may be an ``epath``/``gs://`` path.

    Raises:
        ConfigError: the file is not JSON, not an object, has an unknown key or a value of the wrong type; the
            message names the file.
    """
    path = path if hasattr(path, "read_text") else pathlib.Path(path)
    try:
        return with_defaults(json.loads(path.read_text()))
    except (ValueError, ConfigError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: {e}") from None


def _update(node: ml_collections.ConfigDict, values, prefix: str) -> None:
    if not isinstance(values, (Mapping, ml_collections.ConfigDict)):
        where = f"config key '{prefix[:-1]}'" if prefix else "the config"
        raise ConfigError(f"{where}: must be a mapping of keys to values, got {type(values).__name__} {values!r:.60}")
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in node:
            raise ConfigError(_unknown(name, [f"{prefix}{k}" for k in node.keys()]))
        if isinstance(node[key], ml_collections.ConfigDict):
            _update(node[key], value, name + ".")
            continue
        value = _current_form(name, value)
        try:
            node[key] = value
        except TypeError as e:
            raise ConfigError(f"config key '{name}': cannot use {value!r} for a value of type "
                              f"{type(node[key]).__name__}") from e
