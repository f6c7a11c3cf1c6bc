"""What a run is built from: tokenizer, model (per-layer or scanned), LoRA/QLoRA split, shardings, train
state and the jitted steps (``step_spec``, ``jit_steps``); and the reload of a finished run (``load_run``) for
export and for ``easytune generate`` (``generate_from_dir``)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easytune import config as config_lib
from easytune import lora as lora_lib
from easytune import paths
from easytune import sharding as sharding_lib
from easytune import vocab as vocab_lib
from easytune.data import packed
from easytune.models import loading
from easytune.tokenizer import load_tokenizer
from easytune.train import checkpoint as ckpt_lib
from easytune.train import optim as optim_lib
from easytune.train import step as step_lib
from easytune.train.batches import SEQ_KEYS


def lora_config(config) -> lora_lib.LoraConfig:
    """The ``lora`` ConfigDict as a frozen :class:`~easytune.lora.LoraConfig`."""
    c = config.lora
    return lora_lib.LoraConfig(r=int(c.r), lora_alpha=float(c.lora_alpha), lora_dropout=float(c.lora_dropout),
                               target_modules=lora_lib.parse_target_modules(c.target_modules),
                               modules_to_save=tuple(c.modules_to_save),
                               use_rslora=bool(c.use_rslora),
                               target_parameters=lora_lib.parse_target_parameters(c.get("target_parameters", [])))


@dataclasses.dataclass
class Setup:
    """What a run (or a reload of one) is built from."""
    config: Any
    tokenizer: Any
    model_cfg: Any
    model: Any
    mesh: Any
    trainable: Any
    frozen: Any
    trainable_axes: Any
    frozen_axes: Any
    lora_cfg: lora_lib.LoraConfig | None  # None for full fine-tuning
    sharding_notes: list
    # the checkpoint's vocab_size when build resized embed_tokens / lm_head to model_cfg.vocab_size, else None
    base_vocab_size: int | None = None
    # LoRA runs with a resized vocab: the resized base rows of the embedding layers in lora.modules_to_save, as peft
    # names them ({"model.embed_tokens": [V, D], "lm_head": [V, D]}), for the adapter's ``original_module`` tensors
    base_rows: dict | None = None

    @property
    def lora_scale(self) -> float:
        """LoRA's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); 1.0 without LoRA."""
        return self.model.lora_scale


def build(config, tokenizer, mesh=None) -> Setup:
    """Model, mesh, trainable/frozen split and their logical axes; params placed with their shardings.

    A tokenizer with more tokens than the checkpoint's ``vocab_size`` (``tokenizer.added_tokens``, or a tokenizer
    that has them already), or a ``lora.init_from`` adapter trained on a larger vocabulary, grows ``embed_tokens`` /
    ``lm_head`` to that size (rounded up to ``tokenizer.pad_to_multiple_of``), the new rows the mean of the old
    (:func:`easytune.vocab.resize_params`, transformers' ``resize_token_embeddings`` with ``mean_resizing``).

    Args:
      tokenizer: the run's tokenizer, from :func:`easytune.vocab.load_run_tokenizer` (with the added tokens).
      mesh: the device mesh (default: from ``config.mesh`` over all devices).

    Raises:
        easytune.config.ConfigError: LoRA/QLoRA with new tokens but ``embed_tokens`` (or an untied ``lm_head``)
            not in ``lora.modules_to_save`` (:func:`easytune.vocab.check_trainable`); ``model.scan_layers`` refused.
        ValueError: ``tokenizer`` lacks entries of ``tokenizer.added_tokens`` / ``tokenizer.added_special_tokens``
            (loaded without them).
    """
    from easytune.models import llama
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    missing = vocab_lib.missing_added_tokens(config, tokenizer)
    if missing:
        raise ValueError(f"{vocab_lib.new_tokens_key(config)}: the tokenizer given lacks {missing}; load the run's "
                         f"tokenizer with easytune.vocab.load_run_tokenizer(config), which adds them")
    new_tokens = f"{vocab_lib.new_tokens_key(config)} is set" if vocab_lib.new_tokens_key(config) else ""
    if config.model.path:  # what the model's config.json rules out fails before the weights are read
        from easytune.models import hf_config
        arch = hf_config.read_config(config.model.path)
        if config.method in ("lora", "qlora") and config.lora.init_from:
            from easytune import adapter as adapter_lib
            adapter_lib.check_adapter_tokens(config.lora.init_from, tokenizer, arch.vocab_size)
        want = _vocab_rows(config, tokenizer, arch.vocab_size)
        if want > arch.vocab_size:
            new_tokens = new_tokens or f"the vocabulary grows from {arch.vocab_size} to {want} rows"
        if new_tokens:
            vocab_lib.check_trainable(config.method, config.lora.modules_to_save, arch.tie_word_embeddings, new_tokens)
        sharding_lib.check_expert_axis(dict(mesh.shape).get("expert", 1), arch.num_experts)
        if config.model.scan_layers:
            try:
                dataclasses.replace(arch, scan_layers=True)
            except ValueError as e:  # e.g. Qwen3-MoE mlp_only_layers: dense and sparse layers cannot share a scan
                raise config_lib.ConfigError(f"model.scan_layers: {e}") from None
    if config.method == "qlora":  # NF4 kernels, quantized tensor by tensor while loading
        model_cfg, params = loading.load_quantized(config, tokenizer)
    else:
        model_cfg, params = loading.load_model(config, tokenizer)
    base_vocab, base_rows = model_cfg.vocab_size, None
    want = _vocab_rows(config, tokenizer, base_vocab)
    if want > base_vocab:  # new tokens: embed_tokens / lm_head grow, new rows = the mean of the old ones
        model_cfg, params = vocab_lib.resize_params(params, model_cfg, want,
                                                    vocab_lib.new_tokens_key(config) or "tokenizer.path")
        if config.method in ("lora", "qlora"):
            saved = {lora_lib.hf_module_name(p)
                     for p in lora_lib.saved_module_paths(params, config.lora.modules_to_save)}
            rows = vocab_lib.hf_rows(params, model_cfg)
            tied_saved = model_cfg.tie_word_embeddings and "model.embed_tokens" in saved
            base_rows = {k: np.array(v) for k, v in rows.items() if k in saved or (k == "lm_head" and tied_saved)}
    scan_layers = bool(config.model.scan_layers)
    model_cfg = dataclasses.replace(model_cfg, scan_layers=False)  # per-layer (HF) layout until stacked below
    param_axes = llama.param_logical_axes(model_cfg)
    if config.method in ("lora", "qlora"):
        lcfg = lora_config(config)
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(config.train.seed + 1))
        if config.lora.init_from:  # continue a PEFT adapter trained elsewhere
            from easytune import adapter as adapter_lib
            lora, params = adapter_lib.init_from_adapter(config.lora.init_from, params, model_cfg, lcfg)
        trainable, frozen = lora_lib.split(params, lora, lcfg.modules_to_save)
        lora_axes = sharding_lib.lora_logical_axes(lora, param_axes)
        t_axes, f_axes = lora_lib.split(param_axes, lora_axes, lcfg.modules_to_save)
    else:
        lcfg = None
        trainable, frozen = lora_lib.split(params, None)
        t_axes, f_axes = lora_lib.split(param_axes, None)
    from easytune import quant
    f_axes = quant.logical_axes(frozen, f_axes)  # NF4 codes get their own axes (no-op without QLoRA)
    if scan_layers:  # model.scan_layers: the decoder layers as one stacked module, leaves [L, ...]
        from easytune.models import scan as scan_lib
        try:
            trainable, frozen, t_axes, f_axes = (scan_lib.stack_layers(x, model_cfg.num_hidden_layers)
                                                 for x in (trainable, frozen, t_axes, f_axes))
        except ValueError as e:
            raise config_lib.ConfigError(f"config key 'model.scan_layers': {e}") from e
        model_cfg = dataclasses.replace(model_cfg, scan_layers=True)
    notes: list[str] = []
    warn = config.mesh.replicated_warn_bytes
    t_sh = sharding_lib.tree_shardings(trainable, t_axes, mesh, notes, warn)
    f_sh = sharding_lib.tree_shardings(frozen, f_axes, mesh, notes, warn)
    trainable = jax.device_put(trainable, t_sh)
    frozen = jax.device_put(frozen, f_sh)
    model = llama.LlamaForCausalLM(model_cfg, lora_scale=lcfg.scale if lcfg else 1.0,
                                   lora_dropout=lcfg.lora_dropout if lcfg else 0.0)
    return Setup(config, tokenizer, model_cfg, model, mesh, trainable, frozen, t_axes, f_axes, lcfg, notes,
                 base_vocab if model_cfg.vocab_size != base_vocab else None, base_rows)


def _vocab_rows(config, tokenizer, vocab_size: int) -> int:
    """Rows the run's ``embed_tokens`` / ``lm_head`` need: the tokenizer's length (and a ``lora.init_from`` adapter's
    vocabulary) when above ``vocab_size``, rounded up to ``tokenizer.pad_to_multiple_of``; else ``vocab_size``."""
    n = len(tokenizer)
    if config.method in ("lora", "qlora") and config.lora.init_from:
        from easytune import adapter as adapter_lib
        n = max(n, adapter_lib.adapter_vocab_size(config.lora.init_from) or 0)
    try:
        return vocab_lib.target_vocab_size(n, vocab_size, int(config.tokenizer.pad_to_multiple_of))
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def init_state(setup: Setup, tx, seed: int) -> step_lib.TrainState:
    """A fresh :class:`TrainState`: the optimizer state is created under jit with explicit out-shardings, each
    params-shaped leaf (Adam moments, accumulated gradients) sharded like its parameter
    (``optax.tree_map_params``), counters replicated -- so ZeRO/FSDP sharding covers the optimizer too."""
    def make(trainable):
        return step_lib.TrainState(trainable=trainable, opt_state=tx.init(trainable),
                                   rng=jax.random.PRNGKey(seed + 2), micro_step=jnp.zeros([], jnp.int32))
    rep = sharding_lib.replicated(setup.mesh)
    t_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.trainable)
    abstract = jax.eval_shape(make, setup.trainable)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract.opt_state, t_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    out_sh = step_lib.TrainState(trainable=t_sh, opt_state=opt_sh, rng=rep, micro_step=rep)
    return jax.jit(make, out_shardings=out_sh)(setup.trainable)


def step_spec(setup: Setup, tx) -> step_lib.StepSpec:
    """The static :class:`~easytune.train.step.StepSpec` of a run: its model and mesh, the optimizer ``tx``,
    LoRA dropout (``lora.lora_dropout > 0`` with LoRA/QLoRA) and ``train.loss_chunk_tokens`` (cross-entropy
    in chunks: no ``[B, T, V]`` logits)."""
    config = setup.config
    use_dropout = config.method in ("lora", "qlora") and config.lora.lora_dropout > 0
    return step_lib.StepSpec(model=setup.model, tx=tx, use_dropout=use_dropout,
                             loss_chunk_tokens=int(config.train.loss_chunk_tokens), mesh=setup.mesh)


def jit_steps(setup: Setup, state, spec: step_lib.StepSpec):
    """``(train_step, eval_step)`` of :mod:`easytune.train.step` with ``spec`` bound (``functools.partial``),
    jitted with explicit shardings: the train state keeps its sharding (and its buffers are donated: updated
    in place), the frozen base its own, batches split over (data, fsdp), metrics replicated. Call them as
    ``train_step(state, frozen, batch, window_tokens)`` and ``eval_step(trainable, frozen, batch)``."""
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    t_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.trainable)
    f_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.frozen)
    b_sh = {k: sharding_lib.batch_sharding(setup.mesh) for k in SEQ_KEYS}
    rep = sharding_lib.replicated(setup.mesh)
    train_jit = jax.jit(functools.partial(step_lib.train_step, spec=spec), in_shardings=(state_sh, f_sh, b_sh, rep),
                        out_shardings=(state_sh, rep), donate_argnums=0)
    eval_jit = jax.jit(functools.partial(step_lib.eval_step, spec=spec), in_shardings=(t_sh, f_sh, b_sh),
                       out_shardings=rep)
    return train_jit, eval_jit


def decode_variables(setup: Setup, trainable) -> tuple[Any, dict]:
    """``(model_cfg, variables)`` that generation runs with, on the run's mesh: ``variables`` is
    ``{'params'[, 'lora']}`` = ``trainable`` combined with ``setup.frozen`` as placed by :func:`build` (FSDP /
    tensor shardings kept; a QLoRA base stays NF4, each kernel dequantized in its layer). A ``model.scan_layers``
    run's stacked trees are unstacked (decoding runs the per-layer model, a KV cache per layer) and placed with
    the per-layer shardings of their logical axes; ``model_cfg`` is then the per-layer config."""
    frozen, model_cfg = setup.frozen, setup.model_cfg
    if model_cfg.scan_layers:
        from easytune.models import scan as scan_lib
        n = model_cfg.num_hidden_layers
        trainable = _placed(scan_lib.unstack_layers(trainable, n), scan_lib.unstack_layers(setup.trainable_axes, n),
                            setup.mesh)
        frozen = _placed(scan_lib.unstack_layers(frozen, n), scan_lib.unstack_layers(setup.frozen_axes, n),
                         setup.mesh)
        model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    return model_cfg, lora_lib.combine(trainable, frozen)


def _placed(tree, axes, mesh):
    """``tree`` put on ``mesh`` with the shardings of its logical ``axes`` (a no-op for leaves already there)."""
    return jax.device_put(tree, sharding_lib.tree_shardings(tree, axes, mesh))


def sample(setup: Setup, trainable, val_seqs, max_new_tokens: int) -> dict | None:
    """Greedy answer to the first validation prompt, with its reference answer (decoded text).

    Decodes on the run's mesh with its shardings and, for QLoRA, the NF4 base kept quantized
    (:func:`decode_variables`, ``easytune.generate.generate(..., mesh=setup.mesh)``): a run that needed the mesh
    to fit samples on it too."""
    val_seqs = packed.as_sequences(val_seqs)
    if max_new_tokens <= 0 or val_seqs is None or len(val_seqs) == 0:
        return None
    from easytune.generate import greedy_generate
    row = val_seqs.gather(np.zeros(1, np.int64))
    n = int(np.sum(row["segment_ids"][0] == 1))
    ids, mask, tgt = row["input_ids"][0][:n], row["loss_mask"][0][:n], row["target_ids"][0][:n]
    sup = np.nonzero(mask > 0)[0]
    if len(sup) == 0:
        return None
    t0 = int(sup[0]) if sup[0] > 0 else max(1, min(16, n // 2))
    prompt = [int(x) for x in ids[:t0 + 1]]
    reference = [int(x) for x in tgt[t0:][mask[t0:] > 0]][:max_new_tokens]
    from easytune.generate import stop_token_ids
    model_cfg, variables = decode_variables(setup, trainable)
    # the stop ids `easytune generate RUN_DIR` uses: the model's, its generation_config.json's and the tokenizer's
    eos = stop_token_ids(model_cfg, setup.tokenizer, setup.config.model.path or None)
    out = greedy_generate(model_cfg, variables["params"], prompt, max_new_tokens, eos_token_id=eos,
                          lora=variables.get("lora"), lora_scale=setup.lora_scale, mesh=setup.mesh)
    dec = lambda x: setup.tokenizer.decode(x, skip_special_tokens=True)
    return {"prompt": dec(prompt), "generated": dec(out), "reference": dec(reference)}


def load_run(run_dir: str | pathlib.Path, step: int | None = None):
    """Rebuilds a run's model from ``RUN_DIR/config.json`` and its latest (or given) checkpoint.

    ``step`` is looked up in ``RUN_DIR/checkpoints`` and then in ``RUN_DIR/best`` (the best validation
    checkpoint), so ``easytune export RUN_DIR --step BEST_STEP`` exports the best weights.

    Returns:
        ``(setup, trainable)``: :class:`Setup` (frozen base, tokenizer, model) and the restored trainable
        variables, always in the per-layer layout with a non-scanned model: a run trained with
        ``model.scan_layers`` checkpoints stacked layers, which are unstacked here, so export and generation
        see the same trees either way. Both are placed on ``setup.mesh`` (``mesh.fsdp`` = every device) with
        the run's shardings; a QLoRA base stays NF4.

    Raises:
        FileNotFoundError: no ``config.json``, no checkpoint, or no checkpoint ``step`` (lists those there).
    """
    def per_layer(setup, trainable):
        if not setup.model_cfg.scan_layers:
            return setup, trainable
        from easytune.models import llama
        from easytune.models import scan as scan_lib
        n = setup.model_cfg.num_hidden_layers
        model_cfg = dataclasses.replace(setup.model_cfg, scan_layers=False)
        model = llama.LlamaForCausalLM(model_cfg, lora_scale=setup.model.lora_scale,
                                       lora_dropout=setup.model.lora_dropout)
        t_axes, f_axes = (scan_lib.unstack_layers(a, n) for a in (setup.trainable_axes, setup.frozen_axes))
        setup = dataclasses.replace(  # per-layer trees placed with their per-layer shardings
                setup, model_cfg=model_cfg, model=model,
                frozen=_placed(scan_lib.unstack_layers(setup.frozen, n), f_axes, setup.mesh),
                trainable=_placed(scan_lib.unstack_layers(setup.trainable, n), t_axes, setup.mesh),
                trainable_axes=t_axes, frozen_axes=f_axes)
        return setup, _placed(scan_lib.unstack_layers(trainable, n), t_axes, setup.mesh)

    run_dir = paths.run_path(run_dir)
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not an easytune run directory (no config.json)")
    config = config_lib.read_run_config(cfg_file)  # older runs: added keys, "a,b" lists
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.expert = 1, -1, 1, 1
    tokenizer = vocab_lib.load_run_tokenizer(config)
    setup = build(config, tokenizer)
    tx, _ = optim_lib.make_optimizer(config.optim, 1, config.train.gradient_accumulation_steps)
    state = init_state(setup, tx, config.train.seed)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints")
    if step is None:  # the newest checkpoint that reads completely (a damaged one is skipped, not moved)
        found = ckpt.restore_latest(state, lambda m: print(m, file=sys.stderr), move_aside=False)
        ckpt.close()
        if found is None:
            raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no readable checkpoint")
        return per_layer(setup, found[1].trainable)
    if step not in ckpt.all_steps() and (run_dir / "best" / str(step)).is_dir():
        ckpt.close()
        ckpt = ckpt_lib.Checkpointer(run_dir / "best", max_to_keep=1)
    if step not in ckpt.all_steps():
        best = sorted(p.name for p in (run_dir / "best").glob("[0-9]*"))
        raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (checkpoints/: {ckpt.all_steps()}, "
                                f"best/: {best})")
    try:
        state, _ = ckpt.restore(step, state)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{run_dir}: checkpoint step {step} is unreadable ({type(e).__name__}: {first})") from e
    finally:
        ckpt.close()
    return per_layer(setup, state.trainable)


def generate_from_dir(model_or_run, prompts=None, *, instruction: str | None = None, input: str | None = None,
                      adapter=None, max_new_tokens: int = 64, chat: bool = False, system: str | None = None,
                      stop=(), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0) -> list[str]:
    """``easytune generate``: continues prompts with a run's model or a Hugging Face model's.

    A run dir (``checkpoints/`` or ``metrics.jsonl``) is reloaded with :func:`load_run` (its latest checkpoint,
    LoRA applied) and decoded on its mesh with its shardings, a QLoRA base kept NF4 (:func:`decode_variables`);
    a Hugging Face model dir is loaded as it is, with the PEFT LoRA
    ``adapter`` dir on top when given (a base grown first to an adapter trained on a resized vocabulary, and the
    adapter dir's tokenizer, with its added tokens, used when it has one). Decoding is
    :func:`easytune.generate.generate_text` (KV-cached; greedy at ``temperature=0``, else sampled with ``top_k`` /
    ``top_p`` from ``PRNGKey(seed)``).

    Args:
        model_or_run: a run dir or a Hugging Face model dir.
        prompts: texts to continue (with ``chat``: user messages rendered with the chat template).
        instruction, input: instead of ``prompts``, one prompt in the Alpaca template.
        stop: stop strings (``\\n`` and ``\\t`` escapes as :func:`easytune.generate.unescape_stop`); each text
            ends before the first.

    Returns:
        One text per prompt: the generated text alone with ``chat``, else prompt + generated text.

    Raises:
        FileNotFoundError: ``model_or_run`` is neither a run dir nor a model dir.
        ValueError: an ``adapter`` with a run dir; both or neither of ``prompts`` / ``instruction``; an empty
            stop string.
    """
    from easytune import generate
    if instruction is not None:
        if prompts:
            raise ValueError("give --prompt or --instruction, not both")
        from easytune.data.formats import alpaca_prompt
        prompts = [alpaca_prompt({"instruction": instruction, "input": input or "", "_source": "--instruction"})]
    elif not prompts:
        raise ValueError("give --prompt TEXT (repeatable; with --chat for the chat template), or "
                         "--instruction TEXT [--input TEXT] for the Alpaca template")
    stops = [generate.unescape_stop(x) for x in (stop or ())]
    if any(not x for x in stops):
        raise ValueError("--stop: an empty stop string would end every text at once; give some text")
    src = pathlib.Path(model_or_run)  # the arguments are checked first: a model loads only for a valid request
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory: give a Hugging Face model dir or an easytune run dir")
    is_run = (src / "checkpoints").is_dir() or (src / "metrics.jsonl").is_file()
    if not is_run and not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is neither an easytune run dir (with checkpoints/) nor a Hugging Face "
                                f"model dir (with config.json)")
    if is_run:
        if adapter:
            raise ValueError("--adapter applies to a Hugging Face model dir, not to a run dir (which has its own)")
        setup, trainable = load_run(src)
        model_cfg, variables = decode_variables(setup, trainable)  # on the run's mesh; NF4 kept quantized
        params, lora, scale, tok = variables["params"], variables.get("lora"), setup.lora_scale, setup.tokenizer
        model_dir, mesh = setup.config.model.path or None, setup.mesh
    else:
        from easytune.models import hf_weights
        model_cfg, params = hf_weights.load_hf_model(src)
        lora, scale, model_dir, mesh = None, 1.0, str(src), None
        from easytune import adapter as adapter_lib
        # the tokenizer saved with an adapter (its added tokens) when it has one, else the model's
        tok = load_tokenizer(adapter if adapter and adapter_lib.has_tokenizer(adapter) else src)
        if adapter:
            # an adapter trained on a resized vocabulary: the base grows to it first (peft: resize_token_embeddings)
            model_cfg, params = adapter_lib.resize_for_adapter(adapter, params, model_cfg)
            lcfg, lora, saved = adapter_lib.load_peft_adapter(adapter, params, model_cfg)
            params, scale = adapter_lib.with_saved(params, saved), lcfg.scale
    texts = generate.generate_text(model_cfg, params, tok, prompts, max_new_tokens, chat=chat, system=system,
                                   stop=stops, model_dir=model_dir, temperature=temperature, top_k=top_k,
                                   top_p=top_p, rng=jax.random.PRNGKey(seed), lora=lora, lora_scale=scale,
                                   mesh=mesh)
    return [text if chat else prompt + text for prompt, text in zip(prompts, texts)]
