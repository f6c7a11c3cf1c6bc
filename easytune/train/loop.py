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
import sys
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
        preset = dict(config_lib.PRESETS[m.preset])
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
    model_cfg, params = load_model(config, tokenizer)
    if len(tokenizer) > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"tokenizer.path: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model_cfg.vocab_size}; ids >= {model_cfg.vocab_size} have no embedding (wrong tokenizer?)")
    param_axes = llama.param_logical_axes(model_cfg)
    if config.method == "lora":
        lcfg = lora_config(config)
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(config.train.seed + 1))
        trainable, frozen = lora_lib.split(params, lora, lcfg.modules_to_save)
        lora_axes = sharding_lib.lora_logical_axes(lora, param_axes)
        t_axes, f_axes = lora_lib.split(param_axes, lora_axes, lcfg.modules_to_save)
    else:
        lcfg = None
        trainable, frozen = lora_lib.split(params, None)
        t_axes, f_axes = lora_lib.split(param_axes, None)
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

def evaluate(eval_fn, setup: Setup, trainable, val_seqs, rows: int) -> dict[str, float]:
    """Token-weighted validation loss and perplexity over the whole validation split."""
    if val_seqs is None or len(val_seqs["input_ids"]) == 0:
        return {}
    total, tokens = 0.0, 0.0
    for b in eval_batches(val_seqs, rows):
        out = eval_fn(trainable, setup.frozen, sharding_lib.put_batch(b, setup.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": float(math.exp(min(loss, 50.0)))}


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
    variables = jax.device_get(lora_lib.combine(trainable, setup.frozen))
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
                     "train.output_dir", "mesh.data", "mesh.fsdp", "mesh.tensor")


def resume_point(ckpt: ckpt_lib.Checkpointer, config, resume: bool, log) -> int:
    """Optimizer step to start from: 0 for a fresh run, the latest checkpoint's step for ``--resume``.

    Raises:
      config.ConfigError: a fresh run into a directory that already holds checkpoints (it would mix two
        runs), or a resume whose config differs from the checkpoint's in a key outside
        :data:`RESUMABLE_CHANGES` (names each key with both values).
    """
    latest = ckpt.latest_step()
    if latest is None:
        if resume:
            log(f"--resume: no checkpoint in {ckpt.directory}; starting from step 0")
        return 0
    if not resume:
        raise config_lib.ConfigError(
            f"train.output_dir {ckpt.directory.parent} already holds checkpoints (latest: step {latest}); "
            f"pass --resume to continue that run, choose another --config.train.output_dir, "
            f"or delete the directory")
    saved = traverse_util.flatten_dict(ckpt.read_meta(latest)["config"], sep=".")
    now = traverse_util.flatten_dict(config.to_dict(), sep=".")
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    derived = ("data.train_files", "tokenizer.path", "data.format") if now.get("data.builtin") else ()
    refused = [k for k in diff if k not in RESUMABLE_CHANGES and k not in derived]
    if refused:
        raise config_lib.ConfigError(
            "cannot resume: the config differs from the checkpoint's in " + "; ".join(
                f"{k} (checkpoint {saved.get(k)!r}, now {now.get(k)!r})" for k in refused))
    if {"train.max_steps", "train.num_epochs"} & set(diff):
        log("note: the run length changed since the checkpoint, so the learning-rate schedule changes too")
    return latest


def _check_finite(loss: float, step: int, what: str, run_dir) -> None:
    if not math.isfinite(loss):
        raise ValueError(f"{what} loss is {loss} at optimizer step {step}; stopping. The checkpoints in "
                         f"{run_dir / 'checkpoints'} are kept (lower optim.learning_rate, check the data)")


def _print_plan(plan: Plan, report: dict, setup: Setup, trainable_params: int, total_params: int, log):
    sup = report.get("train_supervised_tokens", 0)
    log(f"data: {report['records']} records ({report['format']}) -> {report['train_examples']} train / "
        f"{report['val_examples']} validation examples -> {plan.num_sequences} / {report['val_sequences']} "
        f"sequences of {report['sequence_len']} tokens (packing {report['packing']}, "
        f"{report['train_truncated']} truncated); {sup} supervised train tokens")
    log(f"batch: micro_batch_size {plan.micro_batch_size} x {plan.dp} data-parallel devices x accumulation "
        f"{plan.accum} = global batch {plan.global_batch} sequences; {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} optimizer steps; ~{sup / max(plan.steps_per_epoch, 1):.0f} supervised tokens/step")
    log(f"mesh: {dict(setup.mesh.shape)} over {setup.mesh.size} {jax.devices()[0].platform} devices; "
        f"trainable params {trainable_params:,} of {total_params:,} ({100 * trainable_params / total_params:.2f}%)")
    for note in setup.sharding_notes[:10]:
        log(f"  not sharded: {note}")


def train(config: ml_collections.ConfigDict, resume: bool = False, log=print, devices=None) -> dict:
    """Runs one training job described by ``config``; returns the summary (also in ``summary.json``).

    Args:
      config: a validated-on-entry ConfigDict (:func:`easytune.config.defaults` vocabulary).
      resume: continue from the run directory's latest checkpoint (if any).
      log: where progress lines go.
      devices: devices for the mesh (default all).

    Raises:
        config.ConfigError / ValueError: invalid config or data, before any compilation.
    """
    t_start = time.time()
    config_lib.validate(config)
    run_dir = pathlib.Path(config.train.output_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh, devices)  # a mesh/device mismatch fails before any work
    resolve_builtin(config, run_dir)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", config.train.save_total_limit)
    start = resume_point(ckpt, config, resume, log)
    tokenizer = load_tokenizer(config.tokenizer.path or config.model.path)
    from easytune.data import pipeline
    train_seqs, val_seqs, report = pipeline.prepare_dataset(config.data, tokenizer)
    setup = build(config, tokenizer, mesh)
    plan = make_plan(len(train_seqs["input_ids"]), config.train, sharding_lib.data_parallel_size(setup.mesh))
    n_train = lora_lib.count_params(setup.trainable)
    if config.data.sequence_len > setup.model_cfg.max_position_embeddings:
        log(f"warning: data.sequence_len={config.data.sequence_len} exceeds the model's max_position_embeddings="
            f"{setup.model_cfg.max_position_embeddings}; positions beyond it were never trained")
    _print_plan(plan, report, setup, n_train, n_train + lora_lib.count_params(setup.frozen), log)
    if start >= plan.total_steps:
        log(f"{run_dir} is already complete at optimizer step {start} (of {plan.total_steps}); nothing to do")
        ckpt.close()
        summary_file = run_dir / "summary.json"
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {"run_dir": str(run_dir)}

    tx, schedule = optim_lib.make_optimizer(config.optim, plan.total_steps, plan.accum)
    state = init_state(setup, tx, config.train.seed)
    state_sh = jax.tree_util.tree_map(lambda x: x.sharding, state)
    t_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.trainable)
    f_sh = jax.tree_util.tree_map(lambda x: x.sharding, setup.frozen)
    b_sh = {k: sharding_lib.batch_sharding(setup.mesh) for k in SEQ_KEYS}
    rep = sharding_lib.replicated(setup.mesh)
    use_dropout = config.method == "lora" and config.lora.lora_dropout > 0
    train_fn = jax.jit(step_lib.make_train_step(setup.model, tx, use_dropout),
                       in_shardings=(state_sh, f_sh, b_sh, rep), out_shardings=(state_sh, rep), donate_argnums=0)
    eval_fn = jax.jit(step_lib.make_eval_step(setup.model), in_shardings=(t_sh, f_sh, b_sh), out_shardings=rep)

    if start:
        state, _ = ckpt.restore(start, state)
        log(f"resumed from {run_dir / 'checkpoints' / str(start)} (optimizer step {start})")
    if is_main:  # only now: a refused or failed resume leaves the run's config.json as it was
        (run_dir / "config.json").write_text(config.to_json(indent=2))
    writer = MetricsWriter(run_dir, enabled=is_main, keep_up_to_step=start)
    eval_rows = plan.micro_rows

    history = {"first_eval": None, "last_eval": None, "last_train_loss": None}
    ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows)
    if ev:
        _check_finite(ev["eval/loss"], start, "validation", run_dir)
        history["first_eval"] = ev["eval/loss"]
        log(f"step {start}: eval loss {ev['eval/loss']:.4f} (perplexity {ev['eval/perplexity']:.2f})")
        if start == 0:
            writer.write(0, ev)

    def save(step):
        ckpt.save(step, state, {"step": int(step), "config": config.to_dict()})

    bar = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps, desc="train",
               disable=not is_main, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t_last, tok_since = time.time(), 0.0
    for step in bar:
        micro = window_batches(train_seqs, plan, step, config.data.seed)
        window_tokens = jnp.float32(max(sum(float(m["loss_mask"].sum()) for m in micro), 1.0))
        loss = 0.0
        for m in micro:
            tok_since += float((m["segment_ids"] > 0).sum())
            state, metrics = train_fn(state, setup.frozen, sharding_lib.put_batch(m, setup.mesh), window_tokens)
            loss += float(metrics["loss"])
        done = step + 1
        _check_finite(loss, done, "training", run_dir)
        history["last_train_loss"] = loss
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if done % config.train.log_steps == 0 or done == plan.total_steps:
            now = time.time()
            writer.write(done, {"train/loss": loss, "learning_rate": float(schedule(step)),
                                "grad_norm": float(metrics["grad_norm"]), "epoch": done / plan.steps_per_epoch,
                                "tokens_per_second": tok_since / max(now - t_last, 1e-9)})
            t_last, tok_since = now, 0.0
        if config.train.eval_steps and done % config.train.eval_steps == 0 and done != plan.total_steps:
            ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows)
            if ev:
                writer.write(done, ev)
                bar.write(f"step {done}: train loss {loss:.4f}, eval loss {ev['eval/loss']:.4f}")
        if config.train.save_steps and done % config.train.save_steps == 0 and done != plan.total_steps:
            save(done)
    bar.close()

    ev = evaluate(eval_fn, setup, state.trainable, val_seqs, eval_rows)
    if ev:
        writer.write(plan.total_steps, ev)
        history["last_eval"] = ev["eval/loss"]
    if plan.total_steps > start or ckpt.latest_step() is None:
        save(plan.total_steps)
    ckpt.close()
    writer.close()
    smp = sample(setup, state.trainable, val_seqs, config.train.sample_max_new_tokens)
    summary = {
            "run_dir": str(run_dir), "method": config.method, "optimizer_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch, "global_batch": plan.global_batch,
            "final_train_loss": history["last_train_loss"], "initial_eval_loss": history["first_eval"],
            "final_eval_loss": history["last_eval"], "trainable_params": n_train,
            "wall_time_s": round(time.time() - t_start, 1), "data": report, "sample": smp,
    }
    if is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary, log)
    return summary


def _print_summary(s: dict, log) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    log(f"run directory: {s['run_dir']}")
    log(f"final train loss {fmt(s['final_train_loss'])}; validation loss {fmt(s['initial_eval_loss'])} -> "
        f"{fmt(s['final_eval_loss'])}; {s['optimizer_steps']} steps in {s['wall_time_s']} s")
    if s.get("sample"):
        log(f"prompt:    {s['sample']['prompt']!r}")
        log(f"generated: {s['sample']['generated']!r}")
        log(f"reference: {s['sample']['reference']!r}")


# ----------------------------------------------------------------------------------------- reloading

def load_run(run_dir: str | pathlib.Path, step: int | None = None):
    """Rebuilds a run's model from ``RUN_DIR/config.json`` and its latest (or given) checkpoint.

    Returns:
        ``(setup, trainable)``: :class:`Setup` (frozen base, tokenizer, model) and the restored trainable
        variables.

    Raises:
        FileNotFoundError: no ``config.json`` or no checkpoint in ``run_dir``.
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
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no checkpoint")
    state, _ = ckpt.restore(step, state)
    ckpt.close()
    return setup, state.trainable
