"""Export a run: a merged Hugging Face checkpoint, or a PEFT LoRA adapter (``easytune export``: :func:`export_dir`).

Merged (``export_merged``): LoRA is folded into the base kernels (``W' = W + scale * A @ B`` in fp32, see
:func:`easytune.lora.merge`) and the ``modules_to_save`` params are taken from the run; a full fine-tuning
run writes its trained params. The folder holds ``config.json``, ``generation_config.json``, safetensors
and the run's tokenizer files, and ``transformers.AutoModelForCausalLM.from_pretrained`` loads it.

Adapter (``export_adapter``, LoRA runs only): PEFT's layout, which ``peft.PeftModel.from_pretrained(base,
OUT)`` loads on top of the run's ``model.path``::

    adapter_config.json         peft_type LORA, r, lora_alpha, lora_dropout, target_modules, target_parameters,
                                use_rslora, modules_to_save, base_model_name_or_path, task_type CAUSAL_LM,
                                bias "none"
    adapter_model.safetensors   base_model.model.<hf module>.lora_A.weight   [r, in]   (our lora_A.T)
                                base_model.model.<hf module>.lora_B.weight   [out, r]  (our lora_B.T)
                                base_model.model.<hf module>.weight          modules_to_save, full tensors

Expert LoRA (``lora.target_parameters``) is written as peft's ``ParamWrapper`` saves it for ``target_parameters``
``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``: wrappers on one module are nested in the order the module
registers its parameters (``gate_up_proj`` first, so innermost; not the order of the list, which peft sorts), and
the inner wrapper's tensors carry one ``base_layer.`` per wrapper around it::

    base_model.model.<layer>.mlp.experts.base_layer.lora_A.weight  [r*X, D]   gate_up_proj (when down_proj too)
    base_model.model.<layer>.mlp.experts.base_layer.lora_B.weight  [2F, r*X]
    base_model.model.<layer>.mlp.experts.lora_A.weight             [r*X, F]   down_proj (or the only one targeted)
    base_model.model.<layer>.mlp.experts.lora_B.weight             [D, r*X]

(``lora_A`` rows expert-major, ``lora_B`` columns expert-minor: :func:`easytune.lora.expert_lora_to_peft`;
the names: :func:`easytune.lora.expert_peft_names`), with
``target_parameters`` ``["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]`` (full names when only some layers
are adapted) and ``lora_dropout`` 0.

Names are those of the transformers v5 module tree, which peft sees: for a mixture-of-experts layer in
``modules_to_save``, the router ``<layer>.mlp.gate.weight [X, D]`` (Mixtral too, whose checkpoint says
``block_sparse_moe``) and the fused experts ``<layer>.mlp.experts.gate_up_proj [X, 2F, D]`` (each expert's gate rows,
then its up rows) and ``<layer>.mlp.experts.down_proj [X, D, F]``, as peft's own ``save_pretrained`` writes them.
Routers are never LoRA targets; experts only through ``lora.target_parameters``.

With transformers v5, peft reads a Mixtral or Qwen3-MoE adapter's ``target_modules`` as transformers v4 names of the
experts: an entry ending in ``gate_proj``/``up_proj``/``down_proj`` (Mixtral ``w1``/``w2``/``w3``) or ``gate`` is
moved to ``target_parameters`` of the fused experts, so a dense layer's MLP listed there would not be adapted. The
LoRA of such modules (a Qwen3-MoE's ``mlp_only_layers``) is therefore written as ``target_parameters``
(``model.layers.1.mlp.gate_proj.weight``): peft's ``ParamWrapper`` adds the same ``scale * B @ A`` to that weight,
under the same tensor names; it refuses ``lora_dropout`` (training only), so such an adapter records 0.

References:
    peft 0.21 ``PeftModel.save_pretrained`` / ``get_peft_model_state_dict`` (``utils/save_and_load.py``):
    the adapter name is stripped from the keys, so ``lora_A.default.weight`` is saved as ``lora_A.weight``
    and ``lm_head.modules_to_save.default.weight`` as ``lm_head.weight``; ``check_target_module_exists``
    (``tuners/tuners_utils.py``): a list entry matches a module named exactly so or ending in ``.entry``, a
    string is a regex that must match the whole module name; ``ParamWrapper`` (``tuners/lora/layer.py``) for
    ``target_parameters``; ``utils/transformers_weight_conversion.py`` ``_convert_peft_config_moe`` /
    ``_MOE_TARGET_MODULE_MAPPING`` (the v4 -> v5 renaming of MoE targets). transformers v5
    ``models/mixtral/modeling_mixtral.py`` ``MixtralExperts`` / ``MixtralTopKRouter`` (the fused expert layout).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re

import jax
import numpy as np
from flax import traverse_util

from easytune import lora as lora_lib
from easytune.models import hf_weights
from easytune.tokenizer import load_tokenizer
from easytune.train import setup as setup_lib

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# what vLLM's LoRA serving does not take: whole saved modules, and LoRA on the embeddings or the output layer
_VLLM_UNSERVED = ("embed_tokens", "lm_head")
# model_type -> the target_modules names peft (with transformers v5) takes for v4 names of a MoE layer's experts and
# router and moves to target_parameters (peft utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING,
# "mixtral" and "qwen2_moe", which "qwen3_moe" uses)
_PEFT_MOE_RENAMED = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen3_moe": ("gate", "gate_proj", "up_proj", "down_proj")}


def _variables(setup, trainable) -> dict:
    """The run's variables (``params`` and, for LoRA, ``lora``) as host numpy arrays."""
    from easytune import quant  # QLoRA: the NF4 base dequantized (fp32), so merged = dequant(quant(W)) + s*A@B
    return jax.device_get(lora_lib.combine(trainable, quant.dequantize_tree(setup.frozen)))


def merged_params(setup, trainable) -> dict:
    """The run's params with LoRA folded in (fp32 math, stored in the params' dtype); a full run's params as
    they are."""
    variables = _variables(setup, trainable)
    params = variables["params"]
    if variables.get("lora"):
        params = lora_lib.merge(params, variables["lora"], setup.lora_scale)
    return jax.device_get(params)


def _save_tokenizer(setup, out_dir: pathlib.Path) -> None:
    if setup.tokenizer is not None:
        setup.tokenizer.save_pretrained(str(out_dir))


def export_merged(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                  run=None) -> pathlib.Path:
    """Writes the run as a plain Hugging Face checkpoint of its family (any of
    ``model_config.MODEL_TYPES``; LoRA merged in, a QLoRA run's NF4 base dequantized first).

    Args:
        run_dir: an easytune run directory (``config.json`` + ``checkpoints/``).
        out_dir: output folder (created; existing weight files in it are replaced).
        step: checkpoint step (default: the latest).
        run: an already loaded ``(setup, trainable)`` from :func:`easytune.train.setup.load_run` (skips loading).

    Returns:
        ``out_dir`` as a path.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory or holds no checkpoint.
    """
    setup, trainable = run if run is not None else setup_lib.load_run(run_dir, step)
    _refuse_overwrite(out_dir, base_dir=setup.config.model.path or None, run_dir=run_dir)
    out_dir = pathlib.Path(out_dir)
    hf_weights.save_hf_model(merged_params(setup, trainable), setup.model_cfg, out_dir)
    _save_tokenizer(setup, out_dir)
    return out_dir


def _refuse_overwrite(out_dir, **inputs) -> None:
    """ValueError when ``out_dir`` is one of the inputs (the base model, the adapter or the run): writing there
    would replace the files the export is made from."""
    out = pathlib.Path(out_dir).resolve()
    for what, path in inputs.items():
        if path and pathlib.Path(path).resolve() == out:
            raise ValueError(f"the output dir {out_dir} is the {what.replace('_dir', '')} itself; writing there would "
                             f"replace its files: choose another output dir")


def _target_modules(adapted: list[str], linear: list[str], regex: bool = True) -> list[str] | str:
    """PEFT ``target_modules`` that selects exactly the ``adapted`` HF module names among ``linear``.

    The sorted list of their last name parts when that selects no other module (the usual case); otherwise
    (a regex that picked some layers only) a regex matching exactly the adapted names, or with ``regex=False``
    the sorted list of the full names (for the families whose regex peft reduces to last name parts).
    """
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n in linear if n.rsplit(".", 1)[-1] in suffixes}
    if selected == set(adapted):
        return suffixes
    if not regex:
        return sorted(adapted)
    return "^(" + "|".join(re.escape(n) for n in sorted(adapted)) + ")$"


def _peft_targets(model_cfg, adapted: list[str], linear: list[str]) -> tuple[list[str] | str, list[str]]:
    """``(target_modules, target_parameters)`` for the ``adapted`` linear modules: the modules whose names peft would
    take for MoE experts (:data:`_PEFT_MOE_RENAMED`, MoE models only) as ``target_parameters`` (their full
    ``<module>.weight`` names), the others as :func:`_target_modules`."""
    renamed = _PEFT_MOE_RENAMED.get(model_cfg.model_type, ()) if model_cfg.is_moe else ()
    moved = lambda n: n.rsplit(".", 1)[-1] in renamed
    params = sorted(f"{n}.weight" for n in adapted if moved(n))
    modules = _target_modules([n for n in adapted if not moved(n)], [n for n in linear if not moved(n)],
                              regex=not renamed)
    return modules, params


def adapter_state_dict(setup, variables) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """PEFT adapter tensors of a LoRA run.

    Args:
        setup: the run's :class:`~easytune.train.setup.Setup`.
        variables: its combined variables (``params`` and ``lora``), host arrays.

    Returns:
        ``(state_dict, adapted, saved)``: ``{peft key: numpy array}``, the HF names of the LoRA-adapted
        modules (linear modules, and fused expert parameters as ``<layer>.mlp.experts.gate_up_proj``), and the HF
        names of the ``modules_to_save`` modules (their tensors named as in transformers v5's module tree:
        :func:`_module_tensors`).
    """
    lflat = traverse_util.flatten_dict(variables["lora"])
    sd: dict[str, np.ndarray] = {}
    adapted = []
    mods = [k[:-1] for k in lflat if k[-1] == "lora_A"]
    expert_keys = {m: _PREFIX + n for m, n in lora_lib.expert_peft_names(
        [m for m in mods if lora_lib.is_expert_lora(m)]).items()}
    for mod in mods:
        name = lora_lib.hf_module_name(mod)
        adapted.append(name)
        a, b = lflat[mod + ("lora_A",)], lflat[mod + ("lora_B",)]
        if mod in expert_keys:
            sd[f"{expert_keys[mod]}.lora_A.weight"], sd[f"{expert_keys[mod]}.lora_B.weight"] = (
                lora_lib.expert_lora_to_peft(a, b))
            continue
        sd[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a).T)
        sd[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(b).T)
    modules_to_save = lora_lib.saved_module_paths(variables["params"], setup.lora_cfg.modules_to_save)
    saved = [lora_lib.hf_module_name(p) for p in modules_to_save]
    if saved:
        sd.update({_PREFIX + k: v for k, v in _module_tensors(variables["params"], setup.model_cfg,
                                                              modules_to_save).items()})
    sd.update(_embedding_tensors(setup, variables["params"], saved, sd))
    return sd, adapted, saved


def _embedding_tensors(setup, params, saved: list[str], sd: dict) -> dict[str, np.ndarray]:
    """The embedding-layer tensors peft adds to an adapter (``sd``, with ``saved`` the ``modules_to_save`` names).

    A tied base with ``embed_tokens`` in ``modules_to_save``: ``lm_head.weight`` = the trained embedding (peft with
    ``ensure_weight_tying=True``, which easytune's tied model computes). A run whose vocabulary was resized
    (``setup.base_vocab_size``; peft's ``save_embedding_layers="auto"`` compares the base's config.json
    ``vocab_size``): each embedding layer in full, a trained one as ``<m>.weight``, ``<m>.modules_to_save.weight``
    (the trained copy twice) and ``<m>.original_module.weight`` (the resized base, ``setup.base_rows``), an untrained
    one as ``<m>.weight`` (the resized base rows); ``<m>`` is ``model.embed_tokens`` and ``lm_head`` (a tied head
    too). Checked against peft 0.21 ``get_peft_model_state_dict`` after ``resize_token_embeddings``."""
    out = {}
    tied = setup.model_cfg.tie_word_embeddings
    trained = set(saved) | ({"lm_head"} if tied and "model.embed_tokens" in saved else set())
    if tied and "lm_head" in trained:
        out[f"{_PREFIX}lm_head.weight"] = sd[f"{_PREFIX}model.embed_tokens.weight"]
    if setup.base_vocab_size is None:
        return out
    from easytune import vocab as vocab_lib
    rows = vocab_lib.hf_rows(params, setup.model_cfg)
    for name in ("model.embed_tokens", "lm_head"):
        if name in trained:
            out[f"{_PREFIX}{name}.modules_to_save.weight"] = sd.get(f"{_PREFIX}{name}.weight",
                                                                   out.get(f"{_PREFIX}{name}.weight"))
            out[f"{_PREFIX}{name}.original_module.weight"] = np.asarray((setup.base_rows or {})[name])
        else:
            out[f"{_PREFIX}{name}.weight"] = rows[name]
    return out


def _expert_target_parameters(adapted: list[str], params) -> list[str]:
    """peft ``target_parameters`` selecting exactly the adapted fused expert parameters ``adapted``
    (``model.layers.0.mlp.experts.gate_up_proj``): ``mlp.experts.<param>`` when every layer's is adapted, else the
    full names."""
    if not adapted:
        return []
    every = [f"{m}.{p}" for m in lora_lib.expert_modules(params) for p in lora_lib.EXPERT_PARAMS]
    short = sorted({"mlp.experts." + n.rsplit(".", 1)[-1] for n in adapted})
    if {n for n in every if any(n.endswith("." + t) for t in short)} == set(adapted):
        return short
    return sorted(adapted)


def _module_tensors(params, model_cfg, modules: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
    """The tensors of the modules at the flax paths ``modules`` as named in the transformers v5 module tree (what
    ``model.named_parameters()`` and peft call them), torch layout: a linear ``<module>.weight [out, in]``; a router
    ``<layer>.mlp.gate.weight [X, D]`` (also for Mixtral); stacked experts fused as ``<layer>.mlp.experts.gate_up_proj
    [X, 2F, D]`` (gate rows, then up rows: ``MixtralExperts``) and ``<layer>.mlp.experts.down_proj [X, D, F]``."""
    inside = lambda path: any(path[:len(m)] == m for m in modules)
    expected = hf_weights.expected_params(model_cfg)
    out, experts = {}, {}
    for tensor, array in hf_weights.params_to_state_dict(params, model_cfg).items():
        entry = expected[tensor]
        if not inside(entry.param_path):
            continue
        if entry.expert is None:
            out[f"{lora_lib.hf_module_name(entry.path[:-1])}.{tensor.rsplit('.', 1)[-1]}"] = array
        else:
            experts.setdefault(entry.param_path, {})[entry.expert] = array
    stacked = {path: np.stack([per[e] for e in sorted(per)]) for path, per in experts.items()}  # [X, out, in]
    for path in sorted({p[:-1] for p in stacked}):
        name = lora_lib.hf_module_name(path)
        out[f"{name}.gate_up_proj"] = np.concatenate([stacked[path + ("gate_proj",)], stacked[path + ("up_proj",)]], 1)
        out[f"{name}.down_proj"] = stacked[path + ("down_proj",)]
    return out


def adapter_config(setup, variables, adapted: list[str]) -> dict:
    """The ``adapter_config.json`` dict (PEFT ``LoraConfig`` fields) for a LoRA run."""
    lcfg = setup.lora_cfg
    linear = list(lora_lib.linear_modules(variables["params"]))
    alpha = lcfg.lora_alpha
    experts = [n for n in adapted if n.rsplit(".", 2)[-2:-1] == ["experts"]]
    target_modules, target_parameters = _peft_targets(setup.model_cfg, [n for n in adapted if n not in experts],
                                                      linear)
    target_parameters = target_parameters + _expert_target_parameters(experts, variables["params"])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": setup.config.model.path or None,
        "r": lcfg.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0 if target_parameters else lcfg.lora_dropout,  # peft's ParamWrapper refuses dropout
        "target_modules": target_modules,
        "target_parameters": target_parameters or None,
        "use_rslora": lcfg.use_rslora,
        "modules_to_save": list(lcfg.modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        # a tied base whose embed_tokens is trained: peft ties lm_head to the trained copy, as easytune computes
        "ensure_weight_tying": bool(setup.model_cfg.tie_word_embeddings and any(
            lora_lib.hf_module_name(p) == "model.embed_tokens"
            for p in lora_lib.saved_module_paths(variables["params"], lcfg.modules_to_save))),
    }


def export_adapter(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                   run=None) -> pathlib.Path:
    """Writes a LoRA run as a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) plus the
    run's tokenizer files.

    Logs a warning when the adapter holds what vLLM's LoRA serving cannot load: ``modules_to_save``
    (whole modules) or LoRA on ``embed_tokens`` / ``lm_head``.

    Args:
        run_dir: an easytune run directory.
        out_dir: output folder (created).
        step: checkpoint step (default: the latest).
        run: an already loaded ``(setup, trainable)`` (skips loading).

    Returns:
        ``out_dir`` as a path.

    Raises:
        ValueError: the run is not a LoRA run (``method`` is not "lora").
        FileNotFoundError: ``run_dir`` is not a run directory or holds no checkpoint.
    """
    setup, trainable = run if run is not None else setup_lib.load_run(run_dir, step)
    if setup.config.method not in ("lora", "qlora"):
        raise ValueError(f"{run_dir}: method={setup.config.method!r}; a PEFT adapter exists only for "
                         f"method='lora'/'qlora' runs (export this one with --merged)")
    variables = _variables(setup, trainable)
    sd, adapted, saved = adapter_state_dict(setup, variables)
    cfg = adapter_config(setup, variables, adapted)
    unserved = [n for n in adapted if n.rsplit(".", 1)[-1] in _VLLM_UNSERVED]
    if saved or unserved:
        what = ([f"modules_to_save {saved}"] if saved else []) + (
            [f"LoRA on {unserved}"] if unserved else [])
        log.warning("the adapter in %s holds %s, which vLLM cannot serve as a LoRA adapter; "
                    "export with --merged for vLLM", out_dir, " and ".join(what))
    _refuse_overwrite(out_dir, base_dir=setup.config.model.path or None, run_dir=run_dir)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    hf_weights.write_safetensors(sd, out_dir / ADAPTER_WEIGHTS)
    _save_tokenizer(setup, out_dir)
    return out_dir


def export_merged_adapter(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike,
                          out_dir: str | os.PathLike, dtype: str | None = None) -> pathlib.Path:
    """Merges a PEFT LoRA adapter (trained anywhere) into its base model and writes a plain HF checkpoint,
    as ``peft``'s ``merge_and_unload()`` + ``save_pretrained`` would.

    ``W' = W + scale * A @ B`` in fp32 (:func:`easytune.lora.merge`); ``modules_to_save`` tensors replace the
    base's. An adapter trained on a resized vocabulary grows the base to it first
    (:func:`easytune.adapter.resize_for_adapter`), and the merged ``config.json`` says the new ``vocab_size``. The
    tokenizer files come from ``adapter_dir`` when it has them, else from ``base_dir``.

    Args:
        base_dir: the base model (HF dir).
        adapter_dir: the PEFT adapter dir (``adapter_config.json`` + ``adapter_model.safetensors``).
        out_dir: output folder (created).
        dtype: storage dtype of the merged weights (default: the base checkpoint's).

    Returns:
        ``out_dir`` as a path.

    Raises:
        ValueError, FileNotFoundError: as :func:`easytune.adapter.load_peft_adapter` and
            :func:`easytune.models.hf_weights.load_hf_model`.
    """
    from easytune import adapter as adapter_lib
    _refuse_overwrite(out_dir, base_dir=base_dir, adapter_dir=adapter_dir)
    model_cfg, params = hf_weights.load_hf_model(base_dir, dtype=dtype)
    model_cfg, params = adapter_lib.resize_for_adapter(adapter_dir, params, model_cfg)  # a resized vocabulary
    lcfg, lora, saved = adapter_lib.load_peft_adapter(adapter_dir, params, model_cfg)
    merged = lora_lib.merge(adapter_lib.with_saved(params, saved), lora, lcfg.scale)
    out_dir = pathlib.Path(out_dir)
    hf_weights.save_hf_model(jax.device_get(merged), model_cfg, out_dir)
    for src in (adapter_dir, base_dir):
        try:
            load_tokenizer(src).save_pretrained(str(out_dir))
            break
        except ValueError:
            continue
    return out_dir


def export_dir(src: str | os.PathLike, *, merged: str | os.PathLike | None = None,
               adapter: str | os.PathLike | None = None, step: int | None = None,
               base: str | os.PathLike | None = None, log=print) -> list[pathlib.Path]:
    """``easytune export``: a run dir to a merged HF model dir and/or a PEFT adapter, or a PEFT adapter dir
    merged onto ``base``.

    A run is loaded once (:func:`easytune.train.setup.load_run`, checkpoint ``step`` or the latest); the adapter
    is written first, so a full fine-tuning run fails before anything is written. Each written dir is logged.

    Returns:
        The written dirs, in the order written.

    Raises:
        ValueError: neither ``merged`` nor ``adapter``; an adapter dir without ``base`` and ``merged`` (or with
            ``adapter``); ``base`` with a run dir; as :func:`export_adapter` and :func:`export_merged`.
        FileNotFoundError: as :func:`easytune.train.setup.load_run`.
    """
    from easytune import adapter as adapter_lib
    if not merged and not adapter:
        raise ValueError("give --merged OUT_DIR and/or --adapter OUT_DIR")
    if adapter_lib.is_adapter_dir(src):  # a PEFT adapter trained elsewhere: merge onto --base
        if not base or not merged or adapter:
            raise ValueError(f"{src} is a PEFT adapter: merge it with --base MODEL_DIR --merged OUT_DIR")
        out = export_merged_adapter(base, src, merged)
        log(f"wrote merged Hugging Face model dir {out}")
        return [out]
    if base:
        raise ValueError("--base is for merging a PEFT adapter dir; a run dir knows its base (model.path)")
    run = setup_lib.load_run(src, step)
    written = []
    if adapter:  # first: a full run fails here before anything is written
        written.append(export_adapter(src, adapter, run=run))
        log(f"wrote PEFT adapter {written[-1]}")
    if merged:
        written.append(export_merged(src, merged, run=run))
        log(f"wrote merged Hugging Face model dir {written[-1]}")
    return written
