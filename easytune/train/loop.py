"""The Trainer: the lifecycle of a run, in named functions.

``train(config)``: set up the run directory -> tokenizer and model -> data -> plan (steps, batches) ->
mesh and shardings -> train state (fresh or resumed) -> optimizer steps with periodic eval, logs and
checkpoints -> final eval, checkpoint, ``summary.json`` and one generated sample.

Data order is a pure function of (seed, optimizer step): epoch ``e`` visits the training sequences in the
permutation ``default_rng(seed + e)``, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from easytune import config as config_lib
from easytune import lora as lora_lib
from easytune import sharding as sharding_lib
from easytune.train import checkpoint as ckpt_lib
from easytune.train import curves
from easytune.train import metrics as metrics_lib
from easytune.train import optim as optim_lib
from easytune.train import step as step_lib
from easytune.train.metrics import MetricsWriter

SEQ_KEYS = ("input_ids", "target_ids", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many sequences go where: the numbers the guide's worked example uses.

    Attributes (units): sequences per micro-batch on each data-parallel device (``micro_batch_size``),
    ``dp`` data-parallel devices, ``accum`` micro-steps per optimizer step, ``global_batch`` sequences per
    optimizer step, ``steps_per_epoch`` and ``total_steps`` optimizer steps.
    """
    num_sequences: int
    micro_batch_size: int
    dp: int
    accum: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    drop_last: bool

    @property
    def micro_rows(self) -> int:
        """Sequences in one (global) micro-batch: ``micro_batch_size * dp``."""
        return self.micro_batch_size * self.dp


def make_plan(num_sequences: int, train_cfg, dp: int) -> Plan:
    """Steps per epoch and total optimizer steps.

    ``global_batch = micro_batch_size * dp * gradient_accumulation_steps``; ``steps_per_epoch`` is
    ``num_sequences // global_batch`` with ``drop_last`` else the ceiling; ``total_steps`` is ``max_steps``
    when > 0, else ``ceil(num_epochs * steps_per_epoch)``. (Guide: 200 samples, batch 5, 1000 epochs ->
    40 batches per epoch, 40,000 updates.)

    Raises:
        ValueError: an epoch holds no full global batch (names the keys to change).
    """
    gb = train_cfg.micro_batch_size * dp * train_cfg.gradient_accumulation_steps
    spe = num_sequences // gb if train_cfg.drop_last else math.ceil(num_sequences / gb)
    if spe == 0:
        raise ValueError(
                f"train.micro_batch_size={train_cfg.micro_batch_size} x {dp} data-parallel devices x "
                f"train.gradient_accumulation_steps={train_cfg.gradient_accumulation_steps} = global batch {gb} "
                f"sequences, but the training split has only {num_sequences}; lower them or set train.drop_last=False")
    total = train_cfg.max_steps if train_cfg.max_steps > 0 else math.ceil(train_cfg.num_epochs * spe)
    return Plan(num_sequences, train_cfg.micro_batch_size, dp, train_cfg.gradient_accumulation_steps, gb, spe,
                int(total), bool(train_cfg.drop_last))


def window_batches(seqs: dict[str, np.ndarray], plan: Plan, step: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The ``accum`` micro-batches (each ``[micro_rows, T]``) of optimizer step ``step`` (0-based).

    Rows past the end of a partial last window (``drop_last=False``) are empty: segment 0, loss_mask 0.
    """
    epoch, idx = divmod(step, plan.steps_per_epoch)
    perm = np.random.default_rng(seed + epoch).permutation(plan.num_sequences)
    rows = perm[idx * plan.global_batch:(idx + 1) * plan.global_batch]
    window = {k: v[rows] for k, v in seqs.items()}
    missing = plan.global_batch - len(rows)
    if missing:
        window = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in window.items()}
    r = plan.micro_rows
    return [{k: v[i * r:(i + 1) * r] for k, v in window.items()} for i in range(plan.accum)]


def eval_batches(seqs: dict[str, np.ndarray], rows: int):
    """Validation split in batches of ``rows`` sequences, the last one padded with empty rows."""
    n = len(seqs["input_ids"])
    for start in range(0, n, rows):
        b = {k: v[start:start + rows] for k, v in seqs.items()}
        pad = rows - len(b["input_ids"])
        if pad:
            b = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        yield b


# ----------------------------------------------------------------------------------------------- setup

def load_tokenizer(path: str | pathlib.Path):
    """``transformers.AutoTokenizer`` from a local dir (never the hub)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/JSON errors with no path in them
        raise ValueError(f"tokenizer.path {path}: cannot load a Hugging Face tokenizer from it "
                         f"({type(e).__name__}: {e})") from e


def load_model(config, tokenizer):
    """``(ModelConfig, params)``: from ``model.path`` (HF dir) or initialised from ``model.preset``."""
    from easytune.models import hf, llama
    m = config.model
    if m.path:
        model_cfg, params = hf.load_hf_model(m.path, dtype=m.dtype)
    else:
        preset = {**config_lib.PRESETS[m.preset], **config_lib.parse_config_overrides(m.get("config_overrides", ""))}
        model_cfg = llama.ModelConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                      dtype=m.dtype, **preset)
        params = llama.init_params(model_cfg, jax.random.PRNGKey(config.train.seed))
    model_cfg = dataclasses.replace(model_cfg, dtype=m.dtype, compute_dtype=m.compute_dtype, remat=m.remat)
    return model_cfg, params


def lora_config(config) -> lora_lib.LoraConfig:
    """The ``lora`` ConfigDict as a frozen :class:`~easytune.lora.LoraConfig`."""
    c = config.lora
    return lora_lib.LoraConfig(r=int(c.r), lora_alpha=float(c.lora_alpha), lora_dropout=float(c.lora_dropout),
                               target_modules=lora_lib.parse_target_modules(c.target_modules),
                               modules_to_save=tuple(config_lib.split_list(c.modules_to_save)),
                               use_rslora=bool(c.use_rslora))


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

    @property
    def lora_scale(self) -> float:
        """LoRA's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); 1.0 without LoRA."""
        return self.model.lora_scale


def build(config, tokenizer, mesh=None) -> Setup:
    """Model, mesh, trainable/frozen split and their logical axes; params placed with their shardings.

    Args:
      mesh: the device mesh (default: from ``config.mesh`` over all devices).
    """
    from easytune.models import llama
    mesh = sharding_lib.make_mesh(config.mesh) if mesh is None else mesh
    if config.method == "qlora":  # NF4 kernels, quantized tensor by tensor while loading
        from easytune import quant
        model_cfg, params = quant.load_quantized(config, tokenizer)
    else:
        model_cfg, params = load_model(config, tokenizer)
    if len(tokenizer) > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"tokenizer.path: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; ids >= {model_cfg.vocab_size} have no embedding (wrong tokenizer?)")
    param_axes = llama.param_logical_axes(model_cfg)
    if config.method in ("lora", "qlora"):
        lcfg = lora_config(config)
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(config.train.seed + 1))
        if config.lora.get("init_from"):  # continue a PEFT adapter trained elsewhere
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
    notes: list[str] = []
    t_sh = sharding_lib.tree_shardings(trainable, t_axes, mesh, notes)
    f_sh = sharding_lib.tree_shardings(frozen, f_axes, mesh, notes)
    trainable = jax.device_put(trainable, t_sh)
    frozen = jax.device_put(frozen, f_sh)
    model = llama.LlamaForCausalLM(model_cfg, lora_scale=lcfg.scale if lcfg else 1.0,
                                   lora_dropout=lcfg.lora_dropout if lcfg else 0.0)
    return Setup(config, tokenizer, model_cfg, model, mesh, trainable, frozen, t_axes, f_axes, lcfg, notes)


def init_state(setup: Setup, tx, seed: int) -> step_lib.TrainState:
    """A fresh :class:`TrainState` (optimizer state created under jit, sharded like ``trainable``)."""
    def make(trainable):
        return step_lib.TrainState(trainable=trainable, opt_state=tx.init(trainable),
                                   rng=jax.random.PRNGKey(seed + 2), micro_step=jnp.zeros([], jnp.int32))
    return jax.jit(make)(setup.trainable)


def resolve_builtin(config, run_dir: pathlib.Path) -> None:
    """``data.builtin='quickstart'``: build our generated dataset and tokenizer into ``RUN_DIR/data`` and point
    ``data.train_files`` / ``tokenizer.path`` at them (so a resumed run or ``generate`` needs nothing else)."""
    if config.data.builtin != "quickstart":
        return
    from easytune.data import quickstart
    assets = quickstart.build_quickstart(run_dir / "data", seed=config.data.seed)
    config.data.train_files = str(assets["train_file"])
    config.tokenizer.path = str(assets["tokenizer_dir"])
    config.data.format = "alpaca"


# ------------------------------------------------------------------------------------------ the run

def evaluate(eval_fn, setup: Setup, trainable, val_seqs, rows: int, val_bytes: int | None = None) -> dict[str, float]:
    """Token-weighted validation loss (nats/token) and perplexity over the whole validation split; with
    ``val_bytes`` (UTF-8 bytes of the supervised validation targets) also bits per byte,
    ``sum(nll) / ln 2 / val_bytes``, which compares across tokenizers (Gao et al. 2020, The Pile, section 4)."""
    if val_seqs is None or len(val_seqs["input_ids"]) == 0:
        return {}
    total, tokens = 0.0, 0.0
    for b in eval_batches(val_seqs, rows):
        out = eval_fn(trainable, setup.frozen, sharding_lib.put_batch(b, setup.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    out = {"eval/loss": loss, "eval/perplexity": float(math.exp(min(loss, 50.0)))}
    if val_bytes:
        out["eval/bits_per_byte"] = total / math.log(2.0) / val_bytes
    return out


def sample(setup: Setup, trainable, val_seqs, max_new_tokens: int) -> dict | None:
    """Greedy answer to the first validation prompt, with its reference answer (decoded text)."""
    if max_new_tokens <= 0 or val_seqs is None or len(val_seqs["input_ids"]) == 0:
        return None
    from easytune.generate import greedy_generate
    seg = val_seqs["segment_ids"][0]
    n = int(np.sum(seg == 1))
    ids, mask, tgt = val_seqs["input_ids"][0][:n], val_seqs["loss_mask"][0][:n], val_seqs["target_ids"][0][:n]
    sup = np.nonzero(mask > 0)[0]
    if len(sup) == 0:
        return None
    t0 = int(sup[0]) if sup[0] > 0 else max(1, min(16, n // 2))
    prompt = [int(x) for x in ids[:t0 + 1]]
    reference = [int(x) for x in tgt[t0:][mask[t0:] > 0]][:max_new_tokens]
    from easytune import quant
    variables = jax.device_get(lora_lib.combine(trainable, quant.dequantize_tree(setup.frozen)))
    eos = setup.model_cfg.eos_token_id
    out = greedy_generate(setup.model_cfg, variables["params"], prompt, max_new_tokens, eos_token_id=eos,
                          lora=variables.get("lora"), lora_scale=setup.lora_scale)
    dec = lambda x: setup.tokenizer.decode(x, skip_special_tokens=True)
    return {"prompt": dec(prompt), "generated": dec(out), "reference": dec(reference)}


# Keys that may differ between a checkpoint's config and a resumed run: logging, intervals, where to save,
# the mesh (orbax reshards on restore) and the run length (the LR schedule then stretches, noted in the log).
# With data.builtin, the data and tokenizer paths are derived from the run dir (which may have moved).
RESUMABLE_CHANGES = ("train.max_steps", "train.num_epochs", "train.eval_steps", "train.save_steps",
                     "train.log_steps", "train.save_total_limit", "train.sample_max_new_tokens",
                     "train.output_dir", "train.evals_per_epoch", "train.early_stopping_patience",
                     "train.early_stopping_min_delta", "train.max_consecutive_nonfinite", "train.peak_tflops",
                     "optim.pretrain_learning_rate", "optim.pretrain_batch_tokens",
                     "mesh.data", "mesh.fsdp", "mesh.tensor")


def resume_point(ckpt: ckpt_lib.Checkpointer, config, resume: bool, log) -> int:
    """Newest checkpoint step to continue from (0: a fresh run).

    A run directory that holds checkpoints is resumed automatically (``--resume`` only makes it explicit);
    checkpoints whose metadata cannot be read are moved aside with a warning and the previous one is used.

    Raises:
      config.ConfigError: the config differs from the checkpoint's in a key outside
        :data:`RESUMABLE_CHANGES` (names each key with both values; another run lives in that directory).
    """
    found = ckpt.latest_meta(log)
    if found is None:
        if resume:
            log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
        return 0
    latest, meta = found
    saved = traverse_util.flatten_dict(meta["config"], sep=".")
    now = traverse_util.flatten_dict(config.to_dict(), sep=".")
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    derived = ("data.train_files", "tokenizer.path", "data.format") if now.get("data.builtin") else ()
    refused = [k for k in diff if k not in RESUMABLE_CHANGES and k not in derived]
    if refused:
        raise config_lib.ConfigError(
            f"cannot resume the run in {ckpt.directory.parent} (checkpoint at step {latest}): the config differs "
            "from the checkpoint's in " + "; ".join(
                f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in refused) +
            "; choose another train.output_dir for a new run, or delete the directory")
    if not resume:
        log(f"{ckpt.directory} holds checkpoints (latest: step {latest}): resuming that run")
    if {"train.max_steps", "train.num_epochs"} & set(diff):
        log("note: the run length changed since the checkpoint, so the learning-rate schedule changes too")
    return latest


class NonFiniteError(ValueError):
    """Training stopped: ``train.max_consecutive_nonfinite`` updates in a row had a NaN/Inf loss or gradient."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished optimizer step was saved first."""

    def __init__(self, signum: int, step: int, path: pathlib.Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} after optimizer step {step}; checkpoint "
                         f"saved in {path}; continue with `easytune train CONFIG --resume`")


def _check_finite(loss: float, step: int, what: str, run_dir) -> None:
    if not math.isfinite(loss):
        raise ValueError(f"{what} loss is {loss} at optimizer step {step}; stopping. The checkpoints in "
                         f"{run_dir / 'checkpoints'} are kept (lower optim.learning_rate, check the data)")


def eval_interval(train_cfg, plan: Plan) -> int:
    """Optimizer steps between evaluations: ``eval_steps``, or ``steps_per_epoch / evals_per_epoch``
    (rounded, at least 1); 0 = only at the start and the end."""
    if train_cfg.eval_steps:
        return int(train_cfg.eval_steps)
    if train_cfg.evals_per_epoch:
        return max(1, round(plan.steps_per_epoch / train_cfg.evals_per_epoch))
    return 0


def _print_plan(plan: Plan, report: dict, setup: Setup, trainable_params: int, total_params: int, log):
    sup = report.get("train_supervised_tokens", 0)
    log(f"data: {report['records']} records ({report['format']}) -> {report['train_examples']} train / "
        f"{report['val_examples']} validation examples -> {plan.num_sequences} / {report['val_sequences']} "
        f"sequences of {report['sequence_len']} tokens (packing {report['packing']}, "
        f"{report['train_truncated']} truncated); {sup} supervised train tokens")
    dropped = plan.num_sequences - plan.steps_per_epoch * plan.global_batch
    log(f"batch: micro_batch_size {plan.micro_batch_size} x {plan.dp} data-parallel devices x accumulation "
        f"{plan.accum} = global batch {plan.global_batch} sequences; {plan.num_sequences} sequences / "
        f"{plan.global_batch} = {plan.steps_per_epoch} steps/epoch (drop_last {plan.drop_last}"
        + (f": {dropped} sequences unused per epoch" if plan.drop_last and dropped else "") +
        f"), {plan.total_steps} optimizer steps ({plan.total_steps / plan.steps_per_epoch:g} epochs); "
        f"~{sup / max(plan.num_sequences, 1) * plan.global_batch:.0f} supervised tokens/step")
    log(f"mesh: {dict(setup.mesh.shape)} over {setup.mesh.size} {jax.devices()[0].platform} devices; "
        f"trainable params {trainable_params:,} of {total_params:,} ({100 * trainable_params / total_params:.2f}%)")
    for note in setup.sharding_notes[:10]:
        log(f"  not sharded: {note}")


def _data_position(plan: Plan, step: int, seed: int) -> dict:
    epoch, index = divmod(step, plan.steps_per_epoch)
    return {"epoch": epoch, "batch_in_epoch": index, "sequences_seen": step * plan.global_batch,
            "num_sequences": plan.num_sequences, "global_batch": plan.global_batch, "seed": seed}


def _check_data_position(meta: dict, plan: Plan, step: int, seed: int) -> None:
    saved, now = meta.get("data_position"), _data_position(plan, step, seed)
    if saved and saved != now:
        raise config_lib.ConfigError(
            f"cannot resume at optimizer step {step}: the checkpoint's data position {saved} does not match "
            f"the data now {now} (the training files or their preparation changed)")


class _SignalGuard:
    """Records SIGINT/SIGTERM instead of dying, so the loop can save a checkpoint first (main thread only)."""

    def __init__(self):
        self.received: list[int] = []
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def train(config: ml_collections.ConfigDict, resume: bool = False, log=print, devices=None) -> dict:
    """Runs one training job described by ``config``; returns the summary (also in ``summary.json``).

    A run directory that already holds checkpoints is resumed (bit-identical per-step losses to an
    uninterrupted run); SIGINT/SIGTERM save a checkpoint and raise :class:`Interrupted`.

    Args:
      config: a validated-on-entry ConfigDict (:func:`easytune.config.defaults` vocabulary).
      resume: say that the run should continue from its latest checkpoint (it does so anyway when there is one).
      log: where progress lines go.
      devices: devices for the mesh (default all).

    Raises:
        config.ConfigError / ValueError: invalid config or data, before any compilation.
        NonFiniteError: ``train.max_consecutive_nonfinite`` skipped updates in a row (names the step).
        Interrupted: SIGINT or SIGTERM (after saving a checkpoint).
    """
    t_start = time.time()
    config_lib.validate(config)
    run_dir = pathlib.Path(config.train.output_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh, devices)  # a mesh/device mismatch fails before any work
    resolve_builtin(config, run_dir)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", config.train.save_total_limit)
    candidate = resume_point(ckpt, config, resume, log)
    tokenizer = load_tokenizer(config.tokenizer.path or config.model.path)
    from easytune.data import pipeline
    train_seqs, val_seqs, report = pipeline.prepare_dataset(config.data, tokenizer)
    setup = build(config, tokenizer, mesh)
    plan = make_plan(len(train_seqs["input_ids"]), config.train, sharding_lib.data_parallel_size(setup.mesh))
    n_train = lora_lib.count_params(setup.trainable)
    from easytune.quant import count_params as quant_count  # an NF4 kernel counts as in * out params
    if config.data.sequence_len > setup.model_cfg.max_position_embeddings:
        log(f"warning: data.sequence_len={config.data.sequence_len} exceeds the model's max_position_embeddings="
            f"{setup.model_cfg.max_position_embeddings}; positions beyond it were never trained")
    _print_plan(plan, report, setup, n_train, n_train + quant_count(setup.frozen), log)
    every = eval_interval(config.train, plan)
    if every:
        log(f"evaluation every {every} optimizer steps on {report['val_sequences']} validation sequences"
            + (f"; early stopping after {config.train.early_stopping_patience} evaluations without a decrease "
               f"> {config.train.early_stopping_min_delta}" if config.train.early_stopping_patience else ""))

    tx, schedule = optim_lib.make_optimizer(config.optim, plan.total_steps, plan.accum)
    state = init_state(setup, tx, config.train.seed)
    progress = {"best_eval_loss": None, "best_step": None, "evals_since_best": 0, "skipped_updates": 0,
                "nonfinite_in_a_row": 0, "stopped_early": None, "first_eval": None}
    start = 0
    if candidate:
        got = ckpt.restore_latest(state, log, max_step=candidate)
        if got is None:
            log(f"warning: no checkpoint in {ckpt.directory} could be restored; starting from step 0")
        else:
            start, state, meta = got
            _check_data_position(meta, plan, start, config.data.seed)
            progress.update(meta.get("progress", {}))
            log(f"resumed from {run_dir / 'checkpoints' / str(start)} (optimizer step {start}, epoch "
                f"{start / plan.steps_per_epoch:.2f})")
    summary_file = run_dir / "summary.json"
    if start >= plan.total_steps or (start and progress["stopped_early"]):
        log(f"{run_dir} is already complete at optimizer step {start} (of {plan.total_steps}); nothing to do")
        ckpt.close()
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {"run_dir": str(run_dir)}
    best_ckpt = ckpt_lib.Checkpointer(run_dir / "best", max_to_keep=1)
    for s in best_ckpt.all_steps():  # a best checkpoint past the resumed step belongs to the lost future
        if s > start:
            best_ckpt.manager.delete(s)
    if not best_ckpt.all_steps() and progress["best_step"]:
        progress["best_step"] = progress["best_eval_loss"] = None

    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    t_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.trainable)
    f_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.frozen)
    b_sh = {k: sharding_lib.batch_sharding(setup.mesh) for k in SEQ_KEYS}
    rep = sharding_lib.replicated(setup.mesh)
    use_dropout = config.method in ("lora", "qlora") and config.lora.lora_dropout > 0
    train_jit = jax.jit(step_lib.make_train_step(setup.model, tx, use_dropout),
                        in_shardings=(state_sh, f_sh, b_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)
    eval_fn = jax.jit(step_lib.make_eval_step(setup.model), in_shardings=(t_sh, f_sh, b_sh), out_shardings=rep)
    first = sharding_lib.put_batch(window_batches(train_seqs, plan, start, config.data.seed)[0], setup.mesh)
    train_fn = train_jit.lower(state, setup.frozen, first, jnp.float32(1.0)).compile()  # once; FLOPs for MFU
    step_flops = metrics_lib.compiled_flops(train_fn, setup.mesh.size) * plan.accum
    peak, peak_src = metrics_lib.peak_flops(setup.mesh.devices.flat, config.train.peak_tflops)
    log(f"throughput: {step_flops:.4g} FLOPs per optimizer step (XLA cost analysis); peak {peak:.4g} FLOP/s "
        f"({peak_src})")

    if is_main:  # only now: a refused or failed resume leaves the run's config.json as it was
        (run_dir / "config.json").write_text(config.to_json(indent=2))
    writer = MetricsWriter(run_dir, enabled=is_main, keep_up_to_step=start)
    eval_rows = plan.micro_rows
    min_delta, patience = config.train.early_stopping_min_delta, config.train.early_stopping_patience

    def save(step):
        ckpt.save(step, state, {"step": int(step), "epoch": step / plan.steps_per_epoch, "progress": progress,
                                "data_position": _data_position(plan, step, config.data.seed),
                                "config": config.to_dict()})

    def on_eval(step, ev) -> bool:
        """Logs an evaluation, keeps the best checkpoint; True when early stopping says stop."""
        writer.write(step, ev)
        # As transformers' Trainer + EarlyStoppingCallback: the best checkpoint follows every new minimum; the
        # patience count restarts only on a decrease by more than min_delta.
        loss, best = ev["eval/loss"], progress["best_eval_loss"]
        significant = best is None or loss < best - min_delta
        if best is None or loss < best:
            progress.update(best_eval_loss=loss, best_step=step)
            if step > 0:
                for s in best_ckpt.all_steps():
                    best_ckpt.manager.delete(s)
                best_ckpt.save(step, state, {"step": int(step), "eval_loss": loss, "config": config.to_dict()})
        progress["evals_since_best"] = 0 if significant else progress["evals_since_best"] + 1
        return bool(patience) and progress["evals_since_best"] >= patience

    ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows, report.get("val_bytes"))
    if ev:
        _check_finite(ev["eval/loss"], start, "validation", run_dir)
        log(f"step {start}: eval loss {ev['eval/loss']:.4f} (perplexity {ev['eval/perplexity']:.2f}"
            + (f", {ev['eval/bits_per_byte']:.3f} bits/byte)" if "eval/bits_per_byte" in ev else ")"))
        if start == 0:
            progress["first_eval"] = ev["eval/loss"]
            on_eval(0, ev)

    bar = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps, desc="train",
               disable=not is_main, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t_last, tok_since, steps_since = time.time(), 0.0, 0
    done, loss, last_eval_step = start, None, start if ev else -1
    try:
        with _SignalGuard() as signals:
            for step in bar:
                micro = window_batches(train_seqs, plan, step, config.data.seed)
                window_tokens = jnp.float32(max(sum(float(m["loss_mask"].sum()) for m in micro), 1.0))
                loss = 0.0
                for m in micro:
                    tok_since += float((m["segment_ids"] > 0).sum())
                    state, metrics = train_fn(state, setup.frozen, sharding_lib.put_batch(m, setup.mesh),
                                              window_tokens)
                    loss += float(metrics["loss"])
                done, steps_since = step + 1, steps_since + 1
                skipped = int(optim_lib.skipped_updates(state.opt_state))
                if skipped > progress["skipped_updates"] or not math.isfinite(loss):
                    progress["skipped_updates"] = skipped
                    progress["nonfinite_in_a_row"] += 1
                    n = progress["nonfinite_in_a_row"]
                    bar.write(f"step {done}: non-finite loss ({loss}) or gradient; update skipped "
                              f"({n} in a row, {skipped} in the run)")
                    stop_error = None
                    if n >= config.train.max_consecutive_nonfinite:
                        last = ckpt.latest_step()
                        stop_error = NonFiniteError(
                            f"training stopped at optimizer step {done}: {n} updates in a row had a non-finite "
                            f"loss or gradient (train.max_consecutive_nonfinite={n}); the last good checkpoint "
                            + (f"{ckpt.directory / str(last)} (step {last}) is kept" if last is not None else
                               "does not exist (none was saved yet)")
                            + "; lower optim.learning_rate or check the data")
                else:
                    progress["nonfinite_in_a_row"], stop_error = 0, None
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if done % config.train.log_steps == 0 or done == plan.total_steps or stop_error:
                    dt = max(time.time() - t_last, 1e-9)
                    writer.write(done, {"train/loss": loss, "learning_rate": float(schedule(step)),
                                        "grad_norm": float(metrics["grad_norm"]),
                                        "epoch": done / plan.steps_per_epoch, "tokens_per_second": tok_since / dt,
                                        "mfu": step_flops * steps_since / dt / peak,
                                        "skipped_updates": float(skipped)})
                    t_last, tok_since, steps_since = time.time(), 0.0, 0
                if stop_error:
                    raise stop_error
                if every and done % every == 0 and done != plan.total_steps:
                    ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows, report.get("val_bytes"))
                    if ev:
                        stop = on_eval(done, ev)
                        last_eval_step, t_last = done, time.time()  # evaluation is not training time
                        bar.write(f"step {done}: train loss {loss:.4f}, eval loss {ev['eval/loss']:.4f}")
                        if stop:
                            progress["stopped_early"] = done
                            bar.write(f"early stopping at step {done}: no eval loss decrease > {min_delta} for "
                                      f"{patience} evaluations; best {progress['best_eval_loss']:.4f} at step "
                                      f"{progress['best_step']}")
                            break
                if signals.received:
                    save(done)
                    raise Interrupted(signals.received[0], done, ckpt.directory / str(done))
                if (config.train.save_steps and done % config.train.save_steps == 0 and done != plan.total_steps
                        and not progress["nonfinite_in_a_row"]):  # no checkpoint inside a non-finite streak
                    save(done)
                    t_last = time.time()  # saving is not training time
        bar.close()
        if last_eval_step != done:
            ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows, report.get("val_bytes"))
            if ev:
                on_eval(done, ev)
        if done > start or ckpt.latest_step() is None:
            save(done)
    finally:
        bar.close()
        ckpt.close()
        best_ckpt.close()
        writer.close()
    smp = sample(setup, state.trainable, val_seqs, config.train.sample_max_new_tokens)
    old = json.loads(summary_file.read_text()) if (start and summary_file.is_file()) else {}
    summary = {
            "run_dir": str(run_dir), "method": config.method, "optimizer_steps": done,
            "planned_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "global_batch": plan.global_batch, "final_train_loss": loss,
            "initial_eval_loss": progress["first_eval"] if progress["first_eval"] is not None
            else old.get("initial_eval_loss"),
            "final_eval_loss": ev["eval/loss"] if ev else None,
            "final_eval_bits_per_byte": ev.get("eval/bits_per_byte") if ev else None,
            "best_eval_loss": progress["best_eval_loss"], "best_step": progress["best_step"],
            "best_checkpoint": str(run_dir / "best" / str(progress["best_step"]))
            if progress["best_step"] else None,
            "stopped_early_at": progress["stopped_early"], "skipped_updates": progress["skipped_updates"],
            "trainable_params": n_train, "wall_time_s": round(time.time() - t_start, 1), "data": report,
            "sample": smp,
    }
    if is_main:
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
        try:
            summary["diagnosis"] = curves.plot_run(run_dir)
        except Exception as e:  # a plot must never fail a finished run
            log(f"warning: could not plot the learning curves ({type(e).__name__}: {e})")
    _print_summary(summary, log)
    return summary


def _print_summary(s: dict, log) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    log(f"run directory: {s['run_dir']}")
    log(f"final train loss {fmt(s['final_train_loss'])}; validation loss {fmt(s['initial_eval_loss'])} -> "
        f"{fmt(s['final_eval_loss'])}; {s['optimizer_steps']} steps in {s['wall_time_s']} s")
    if s.get("final_eval_bits_per_byte") is not None:
        log(f"validation bits per byte {s['final_eval_bits_per_byte']:.3f}")
    if s.get("best_step") is not None:
        where = s["best_checkpoint"] or "before training: no checkpoint"
        log(f"best validation loss {fmt(s['best_eval_loss'])} at step {s['best_step']} ({where})")
    if s.get("stopped_early_at"):
        log(f"stopped early at step {s['stopped_early_at']} of {s['planned_steps']}")
    if s.get("skipped_updates"):
        log(f"{s['skipped_updates']} updates were skipped for a non-finite loss or gradient")
    if s.get("diagnosis"):
        log(curves.format_diagnosis(s["diagnosis"]))
        log(f"learning curves: {s['diagnosis']['curves_png']}")
    if s.get("sample"):
        log(f"prompt:    {s['sample']['prompt']!r}")
        log(f"generated: {s['sample']['generated']!r}")
        log(f"reference: {s['sample']['reference']!r}")


# ----------------------------------------------------------------------------------------- reloading

def load_run(run_dir: str | pathlib.Path, step: int | None = None):
    """Rebuilds a run's model from ``RUN_DIR/config.json`` and its latest (or given) checkpoint.

    ``step`` is looked up in ``RUN_DIR/checkpoints`` and then in ``RUN_DIR/best`` (the best validation
    checkpoint), so ``easytune export RUN_DIR --step BEST_STEP`` exports the best weights.

    Returns:
        ``(setup, trainable)``: :class:`Setup` (frozen base, tokenizer, model) and the restored trainable
        variables.

    Raises:
        FileNotFoundError: no ``config.json``, no checkpoint, or no checkpoint ``step`` (lists those there).
    """
    run_dir = pathlib.Path(run_dir).absolute()
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not an easytune run directory (no config.json)")
    config = config_lib.defaults()
    config.update_from_flattened_dict(traverse_util.flatten_dict(json.loads(cfg_file.read_text()), sep="."))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
    tokenizer = load_tokenizer(config.tokenizer.path or config.model.path)
    setup = build(config, tokenizer)
    tx, _ = optim_lib.make_optimizer(config.optim, 1, config.train.gradient_accumulation_steps)
    state = init_state(setup, tx, config.train.seed)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints")
    if step is None:  # the newest checkpoint that reads completely (a damaged one is skipped, not moved)
        found = ckpt.restore_latest(state, lambda m: print(m, file=sys.stderr), move_aside=False)
        ckpt.close()
        if found is None:
            raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no readable checkpoint")
        return setup, found[1].trainable
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
    return setup, state.trainable
