"""The Trainer: the lifecycle of one training run, in named stages.

``train(config)``: :func:`set_up` (run directory, tokenizer, data, plan, mesh, model, optimizer, train state,
jitted steps) -> :func:`restore` (a checkpoint to continue from, progress) -> :func:`compile_step` -> the
optimizer steps, each calling the compiled :func:`easytune.train.step.train_step` once per micro-batch, with
:func:`after_step` for the bookkeeping (non-finite updates, logs, periodic :func:`evaluate` and checkpoints)
-> :func:`finish` (final eval and checkpoint, ``summary.json``, one generated sample, learning curves).

Data order is a pure function of (seed, optimizer step): epoch ``e`` visits the training sequences in the
permutation ``default_rng(seed + e)``, so a resumed run sees exactly the batches it would have seen
(:mod:`easytune.train.batches`); the model, shardings and jitted steps come from :mod:`easytune.train.setup`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from easytune import config_check, paths, quant
from easytune import lora as lora_lib
from easytune import sharding as sharding_lib
from easytune import vocab as vocab_lib
from easytune.data import packed
from easytune.data.quickstart import resolve_builtin
from easytune.models import attend as attend_lib
from easytune.train import batches as batches_lib
from easytune.train import checkpoint as ckpt_lib
from easytune.train import console, curves, guards
from easytune.train import metrics as metrics_lib
from easytune.train import optim as optim_lib
from easytune.train import setup as setup_lib
from easytune.train import step as step_lib


class NonFiniteError(ValueError):
    """Training stopped: ``train.max_consecutive_nonfinite`` updates in a row had a NaN/Inf loss or gradient."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished optimizer step was saved first."""

    def __init__(self, signum: int, step: int, path: pathlib.Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} after optimizer step {step}; checkpoint "
                         f"saved in {path}; continue with `easytune train CONFIG --resume`")


@dataclasses.dataclass
class Run:
    """What the stages of one run share: built by :func:`set_up`, advanced by the optimizer steps."""
    config: Any
    log: Callable
    is_main: bool  # process 0: the one that prints and writes logs and the summary
    run_dir: pathlib.Path
    t_start: float
    tokenizer: Any = None
    train_seqs: Any = None  # easytune.data.packed.PackedSequences (rows gathered from the prepared folder)
    val_seqs: Any = None
    report: dict = dataclasses.field(default_factory=dict)  # the data report of data.prepare.prepare_dataset
    ckpt: ckpt_lib.Checkpointer | None = None
    candidate: int = 0  # the checkpoint step resume_point chose (0: a fresh run)
    setup: setup_lib.Setup | None = None
    plan: batches_lib.Plan | None = None
    part: Any = None  # this process's rows of every micro-batch
    n_train: int = 0  # trainable parameters
    n_all: int = 0  # all parameters (an NF4 kernel counts as in * out)
    every: int = 0  # evaluation interval in optimizer steps (0: none)
    schedule: Any = None  # the learning-rate schedule (of the optimizer step)
    state: step_lib.TrainState | None = None
    train_jit: Any = None  # jax.jit(step.train_step) with the spec bound
    train_fn: Any = None  # train_jit compiled for this run (compile_step)
    eval_fn: Any = None  # jax.jit(step.eval_step) with the spec bound
    progress: dict = dataclasses.field(default_factory=lambda: {
        "best_eval_loss": None, "best_step": None, "evals_since_best": 0, "skipped_updates": 0,
        "nonfinite_in_a_row": 0, "stopped_early": None, "first_eval": None})  # checkpointed with the state
    start: int = 0  # the optimizer step this process starts (or resumes) at
    best_ckpt: ckpt_lib.Checkpointer | None = None
    step_flops: float = 0.0  # FLOPs of one optimizer step (all devices)
    peak: float = 1.0  # the devices' peak FLOP/s, all together
    writer: metrics_lib.MetricsWriter | None = None
    bar: Any = None
    sup_per_seq: np.ndarray | None = None  # supervised tokens per training sequence
    tok_per_seq: np.ndarray | None = None  # non-padding tokens per training sequence
    t_last: float = 0.0  # throughput window: since this time, these tokens in these optimizer steps
    tok_since: float = 0.0
    steps_since: int = 0
    done: int = 0  # optimizer steps finished
    loss: float | None = None  # the last optimizer step's train loss
    ev: dict = dataclasses.field(default_factory=dict)  # the last evaluation
    last_eval_step: int = -1
    untrained: dict | None = None  # the untrained-token check's finding (easytune.train.untrained.Finding.as_dict)


def train(config: ml_collections.ConfigDict, resume: bool = False, log=print, devices=None,
          dry_run: bool = False) -> dict:
    """Runs one training job described by ``config``; returns the summary (also in ``summary.json``).

    A run directory that already holds checkpoints is resumed (bit-identical per-step losses to an
    uninterrupted run); SIGINT/SIGTERM save a checkpoint and raise :class:`Interrupted`.

    Multi-host: with ``distributed.*`` set (or on a TPU VM) every process runs this same function;
    ``jax.distributed.initialize`` is called first, each process gathers only its rows of every batch, and
    only process 0 prints, writes ``metrics.jsonl``/TensorBoard/``summary.json``; all processes write and
    read the orbax checkpoints (``train.output_dir`` must be shared storage, e.g. ``gs://`` on a pod).

    Args:
      config: a validated-on-entry ConfigDict (:func:`easytune.config.defaults` vocabulary).
      resume: say that the run should continue from its latest checkpoint (it does so anyway when there is one).
      log: where progress lines go.
      devices: devices for the mesh (default all).
      dry_run: stop after printing the plan, the mesh and every array's sharding and bytes per device
        (parameters, optimizer state) and the compiled step's memory; nothing is trained or saved.

    Raises:
        config.ConfigError / ValueError: invalid config or data, before any compilation.
        NonFiniteError: ``train.max_consecutive_nonfinite`` skipped updates in a row (names the step).
        Interrupted: SIGINT or SIGTERM (after saving a checkpoint).
    """
    run = set_up(config, resume, log, devices, dry_run)
    if dry_run:
        return _dry_run(run)
    if restore(run):
        summary_file = run.run_dir / "summary.json"  # the finished run's summary
        return json.loads(summary_file.read_text()) if summary_file.is_file() else {"run_dir": str(run.run_dir)}
    compile_step(run)
    open_logs(run)
    seed, mesh, frozen = config.data.seed, run.setup.mesh, run.setup.frozen
    try:
        with guards.SignalGuard() as signals:
            for step in run.bar:  # one optimizer step: the micro-batches of its accumulation window
                window_tokens = _window_tokens(run, step)
                loss = 0.0
                for m in batches_lib.window_batches(run.train_seqs, run.plan, step, seed, run.part):
                    run.state, metrics = run.train_fn(run.state, frozen, sharding_lib.put_batch(m, mesh),
                                                      window_tokens)
                    loss += float(metrics["loss"])
                if after_step(run, step, loss, metrics, signals):
                    break  # early stopping
        _final_eval_and_save(run)
    finally:
        for closable in (run.bar, run.ckpt, run.best_ckpt, run.writer):
            closable.close()
    return finish(run)


def set_up(config, resume: bool, log, devices, dry_run: bool) -> Run:
    """Set-up stage: validates the config, starts the processes, makes the mesh and the run directory, then
    prepares the data (process 0 first), finds a checkpoint to resume and builds the model, plan, optimizer,
    train state and jitted steps (:func:`_build`). A mesh/device mismatch fails before any work."""
    t_start = time.time()
    config_check.validate(config)
    paths.check_remote(config.train.output_dir)
    sharding_lib.initialize_distributed(config.distributed, log)  # before anything touches a device
    sharding_lib.check_same_config(config.to_json())  # every host must run the same job
    is_main = jax.process_index() == 0
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    run_dir = paths.run_path(config.train.output_dir)  # a local folder or gs://bucket/run (all hosts share it)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(config, log if is_main else _quiet, is_main, run_dir, t_start)
    with guards.main_first("data"):  # process 0 builds the data and its cache; the others then read them
        resolve_builtin(config, run_dir)
        run.tokenizer = vocab_lib.load_run_tokenizer(config)
        from easytune.data.prepare import prepare_dataset
        run.train_seqs, run.val_seqs, run.report = prepare_dataset(config.data, run.tokenizer)
    if not dry_run or (run_dir / "checkpoints").exists():  # a dry run checks a resume too, creating nothing
        run.ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", config.train.save_total_limit)
        run.candidate = ckpt_lib.resume_point(run.ckpt, config, resume, run.log)
        if dry_run:
            run.ckpt.close()
            run.log(f"dry run: a real run would continue from optimizer step {run.candidate}" if run.candidate
                    else "dry run: a real run would start from step 0")
    _build(run, mesh)
    return run


def _build(run: Run, mesh) -> None:
    """Model and shardings, the plan (logged), the optimizer, a fresh train state and the jitted steps."""
    config, log = run.config, run.log
    setup = run.setup = setup_lib.build(config, run.tokenizer, mesh)
    setup = run.setup = untrained_check(run, setup)
    plan = run.plan = batches_lib.make_plan(len(run.train_seqs), config.train,
                                            sharding_lib.data_parallel_size(setup.mesh))
    run.part = sharding_lib.local_rows(setup.mesh, plan.micro_rows)
    run.n_train = lora_lib.count_params(setup.trainable)
    run.n_all = run.n_train + quant.count_params(setup.frozen)  # an NF4 kernel counts as in * out params
    if config.data.sequence_len > setup.model_cfg.max_position_embeddings:
        log(f"warning: data.sequence_len={config.data.sequence_len} exceeds the model's max_position_embeddings="
            f"{setup.model_cfg.max_position_embeddings}; positions beyond it were never trained")
    console.print_plan(plan, run.report, setup, run.n_train, run.n_all, log)
    run.every = batches_lib.eval_interval(config.train, plan)
    if run.every:
        log(f"evaluation every {run.every} optimizer steps on {run.report['val_sequences']} validation sequences"
            + (f"; early stopping after {config.train.early_stopping_patience} evaluations without a decrease "
               f"> {config.train.early_stopping_min_delta}" if config.train.early_stopping_patience else ""))
    tx, run.schedule = optim_lib.make_optimizer(config.optim, plan.total_steps, plan.accum)
    run.state = setup_lib.init_state(setup, tx, config.train.seed)
    run.train_jit, run.eval_fn = setup_lib.jit_steps(setup, run.state, setup_lib.step_spec(setup, tx))


def untrained_check(run: Run, setup: setup_lib.Setup) -> setup_lib.Setup:
    """Pre-flight check (:func:`easytune.train.untrained.check`): warns about tokens the data uses whose
    ``embed_tokens`` / ``lm_head`` row is all zero and, with ``model.fix_untrained_tokens``, returns the setup with
    those trainable rows set to the mean of the trained rows (before the optimizer state is made from them);
    the finding is kept in ``run.untrained`` for the dry-run report."""
    from easytune.train import untrained as untrained_lib
    fix = bool(run.config.model.get("fix_untrained_tokens", False))
    setup, finding = untrained_lib.check(setup, run.train_seqs, run.val_seqs, fix, run.log)
    run.untrained = finding.as_dict() if finding else None
    return setup


def _first_batch(run: Run, step: int):
    """The first micro-batch of optimizer step ``step``, placed on the mesh (to lower the train step with)."""
    first = batches_lib.window_batches(run.train_seqs, run.plan, step, run.config.data.seed, run.part)[0]
    return sharding_lib.put_batch(first, run.setup.mesh)


def _dry_run(run: Run) -> dict:
    """``--dry-run``: the dry-run report of :mod:`easytune.train.dry_run` of the step lowered for this run."""
    lowered = run.train_jit.lower(run.state, run.setup.frozen, _first_batch(run, 0), jnp.float32(1.0))
    from easytune.train import dry_run as dry_run_lib
    out = dry_run_lib.report(run.setup, run.state, lowered, run.plan, run.log)
    out["untrained_tokens"] = run.untrained  # what the pre-flight check found (None: nothing)
    return out


def restore(run: Run) -> bool:
    """Resume stage: restores the checkpoint chosen by :func:`easytune.train.checkpoint.resume_point` (state,
    progress, checked data position) and drops best checkpoints past it; True when the run is already complete
    (nothing to do)."""
    log, plan = run.log, run.plan
    if run.candidate:
        got = run.ckpt.restore_latest(run.state, log, max_step=run.candidate)
        if got is None:
            log(f"warning: no checkpoint in {run.ckpt.directory} could be restored; starting from step 0")
        else:
            run.start, run.state, meta = got
            batches_lib.check_data_position(meta, plan, run.start, run.config.data.seed)
            run.progress.update(meta.get("progress", {}))
            log(f"resumed from {run.run_dir / 'checkpoints' / str(run.start)} (optimizer step {run.start}, epoch "
                f"{run.start / plan.steps_per_epoch:.2f})")
    if run.start >= plan.total_steps or (run.start and run.progress["stopped_early"]):
        log(f"{run.run_dir} is already complete at optimizer step {run.start} (of {plan.total_steps}); "
            "nothing to do")
        run.ckpt.close()
        return True
    run.best_ckpt = ckpt_lib.Checkpointer(run.run_dir / "best", max_to_keep=1)
    for s in run.best_ckpt.all_steps():  # a best checkpoint past the resumed step belongs to the lost future
        if s > run.start:
            run.best_ckpt.manager.delete(s)
    if not run.best_ckpt.all_steps() and run.progress["best_step"]:
        run.progress["best_step"] = run.progress["best_eval_loss"] = None
    return False


def compile_step(run: Run) -> None:
    """Compiles the train step once for this run (``run.train_fn``) and takes its FLOPs per optimizer step
    (for MFU) from XLA's cost analysis, or the 6NT estimate where that undercounts (a scanned layer stack)."""
    config, setup, plan = run.config, run.setup, run.plan
    lowered = run.train_jit.lower(run.state, setup.frozen, _first_batch(run, run.start), jnp.float32(1.0))
    run.train_fn = lowered.compile()
    run.step_flops = metrics_lib.compiled_flops(run.train_fn, setup.mesh.size) * plan.accum
    flops_src = "XLA cost analysis"
    mc, seq = setup.model_cfg, config.data.sequence_len
    blockwise = attend_lib.resolve(mc, seq, seq, jnp.dtype(mc.compute_dtype)) == "blockwise"
    if mc.scan_layers or blockwise:  # XLA counts the body of a loop (layer scan, attention blocks) once
        tokens = plan.global_batch * seq  # as easytune.estimate: 6NT, or 4NT + 6N'T (LoRA), plus attention
        attention = 12.0 * mc.num_hidden_layers * seq * mc.num_attention_heads * mc.head_dim  # PaLM app. B
        run.step_flops = tokens * (attention + (6.0 * run.n_all if config.method in ("full", "pretrain")
                                                else 4.0 * run.n_all + 6.0 * run.n_train))
        flops_src = ("6NT + 12LTd estimate (Transformer Math 101, PaLM appendix B): XLA's cost analysis counts "
                     "the body of a loop once (" + ("scanned layers" if mc.scan_layers else "blockwise attention")
                     + ")")
    run.peak, peak_src = metrics_lib.peak_flops(setup.mesh.devices.flat, config.train.peak_tflops)
    run.log(f"throughput: {run.step_flops:.4g} FLOPs per optimizer step ({flops_src}); peak {run.peak:.4g} FLOP/s "
            f"({peak_src})")


def open_logs(run: Run) -> None:
    """Writes ``config.json`` (only now: a refused or failed resume leaves it as it was), opens the metrics
    writer, evaluates the starting point and starts the progress bar and the throughput window."""
    config, start = run.config, run.start
    if run.is_main:
        (run.run_dir / "config.json").write_text(config.to_json(indent=2))
    run.writer = metrics_lib.MetricsWriter(run.run_dir, enabled=run.is_main, keep_up_to_step=start)
    run.ev = _evaluate(run)
    if run.ev:
        ev = run.ev
        _check_finite(ev["eval/loss"], start, "validation", run.run_dir)
        run.log(f"step {start}: eval loss {ev['eval/loss']:.4f} (perplexity {ev['eval/perplexity']:.2f}"
                + (f", {ev['eval/bits_per_byte']:.3f} bits/byte)" if "eval/bits_per_byte" in ev else ")"))
        if start == 0:
            run.progress["first_eval"] = ev["eval/loss"]
            record_eval(run, 0, ev)
    run.sup_per_seq = run.train_seqs.supervised_per_row()
    run.tok_per_seq = run.train_seqs.tokens_per_row()
    run.bar = tqdm(range(start, run.plan.total_steps), initial=start, total=run.plan.total_steps, desc="train",
                   disable=not run.is_main, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0)
    run.t_last, run.tok_since, run.steps_since = time.time(), 0.0, 0
    run.done, run.loss, run.last_eval_step = start, None, start if run.ev else -1


def _window_tokens(run: Run, step: int) -> jax.Array:
    """Supervised tokens of optimizer step ``step``'s whole window (every process's rows; float32, >= 1): the
    loss denominator of each micro-step. Also counts the window's non-padding tokens for the throughput."""
    rows = batches_lib.window_rows(run.plan, step, run.config.data.seed)
    window_tokens = jnp.float32(max(float(run.sup_per_seq[rows[rows >= 0]].sum()), 1.0))
    run.tok_since += float(run.tok_per_seq[rows[rows >= 0]].sum())
    return window_tokens


def after_step(run: Run, step: int, loss: float, metrics: dict, signals: guards.SignalGuard) -> bool:
    """Bookkeeping after optimizer step ``step`` (0-based) with train ``loss``: non-finite streaks, the log
    line, periodic evaluation and checkpoints; True when early stopping ends the run.

    Raises:
        NonFiniteError: the streak of skipped updates reached ``train.max_consecutive_nonfinite``.
        Interrupted: a signal arrived (after saving this step's checkpoint).
    """
    config, plan, progress = run.config, run.plan, run.progress
    run.done, run.steps_since, run.loss = step + 1, run.steps_since + 1, loss
    done = run.done
    skipped = int(optim_lib.skipped_updates(run.state.opt_state))
    stop_error = _track_nonfinite(run, loss, skipped)
    run.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
    if done % config.train.log_steps == 0 or done == plan.total_steps or stop_error:
        dt = max(time.time() - run.t_last, 1e-9)
        run.writer.write(done, {"train/loss": loss, "learning_rate": float(run.schedule(step)),
                                "grad_norm": float(metrics["grad_norm"]), "epoch": done / plan.steps_per_epoch,
                                "tokens_per_second": run.tok_since / dt,
                                "mfu": run.step_flops * run.steps_since / dt / run.peak,
                                "skipped_updates": float(skipped)})
        run.t_last, run.tok_since, run.steps_since = time.time(), 0.0, 0
    if stop_error:
        raise stop_error
    if run.every and done % run.every == 0 and done != plan.total_steps and _periodic_eval(run):
        return True
    if signals.received:
        save_checkpoint(run, done)
        raise Interrupted(signals.received[0], done, run.ckpt.directory / str(done))
    if (config.train.save_steps and done % config.train.save_steps == 0 and done != plan.total_steps
            and not progress["nonfinite_in_a_row"]):  # no checkpoint inside a non-finite streak
        save_checkpoint(run, done)
        run.t_last = time.time()  # saving is not training time
    return False


def _track_nonfinite(run: Run, loss: float, skipped: int) -> NonFiniteError | None:
    """Counts a skipped update (``optim`` skips non-finite ones) or a non-finite loss; the error to raise
    once ``train.max_consecutive_nonfinite`` come in a row, else None."""
    progress, done = run.progress, run.done
    if not (skipped > progress["skipped_updates"] or not math.isfinite(loss)):
        progress["nonfinite_in_a_row"] = 0
        return None
    progress["skipped_updates"] = skipped
    progress["nonfinite_in_a_row"] += 1
    n = progress["nonfinite_in_a_row"]
    run.bar.write(f"step {done}: non-finite loss ({loss}) or gradient; update skipped "
                  f"({n} in a row, {skipped} in the run)")
    if n < run.config.train.max_consecutive_nonfinite:
        return None
    last = run.ckpt.latest_step()
    return NonFiniteError(
        f"training stopped at optimizer step {done}: {n} updates in a row had a non-finite "
        f"loss or gradient (train.max_consecutive_nonfinite={n}); the last good checkpoint "
        + (f"{run.ckpt.directory / str(last)} (step {last}) is kept" if last is not None else
           "does not exist (none was saved yet)")
        + "; lower optim.learning_rate or check the data")


def evaluate(eval_fn, setup: setup_lib.Setup, trainable, val_seqs, rows: int,
             val_bytes: int | None = None) -> dict[str, float]:
    """Token-weighted validation loss (nats/token) and perplexity over the whole validation split; with
    ``val_bytes`` (UTF-8 bytes of the supervised validation targets) also bits per byte,
    ``sum(nll) / ln 2 / val_bytes``, which compares across tokenizers (Gao et al. 2020, The Pile, section 4).

    Args:
        eval_fn: ``eval_fn(trainable, frozen, batch) -> dict(loss_sum, tokens)``, the jitted
            :func:`easytune.train.step.eval_step` with its ``spec`` bound.
        rows: sequences per evaluation batch (a multiple of the data-parallel devices).

    Returns:
        ``{"eval/loss", "eval/perplexity"[, "eval/bits_per_byte"]}``; ``{}`` without validation data.
    """
    if val_seqs is None or len(packed.as_sequences(val_seqs)) == 0:
        return {}
    total, tokens = 0.0, 0.0
    for b in batches_lib.eval_batches(val_seqs, rows):
        out = eval_fn(trainable, setup.frozen, sharding_lib.put_global_batch(b, setup.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    out = {"eval/loss": loss, "eval/perplexity": float(math.exp(min(loss, 50.0)))}
    if val_bytes:
        out["eval/bits_per_byte"] = total / math.log(2.0) / val_bytes
    return out


def _evaluate(run: Run) -> dict[str, float]:
    """Evaluate stage: :func:`evaluate` of the current trainable variables on the validation split."""
    return evaluate(run.eval_fn, run.setup, run.state.trainable, run.val_seqs, run.plan.micro_rows,
                    run.report.get("val_bytes"))


def _periodic_eval(run: Run) -> bool:
    """An evaluation every ``run.every`` optimizer steps; True when early stopping says stop."""
    done, progress = run.done, run.progress
    run.ev = _evaluate(run)
    if not run.ev:
        return False
    stop = record_eval(run, done, run.ev)
    run.last_eval_step, run.t_last = done, time.time()  # evaluation is not training time
    run.bar.write(f"step {done}: train loss {run.loss:.4f}, eval loss {run.ev['eval/loss']:.4f}")
    if stop:
        progress["stopped_early"] = done
        run.bar.write(f"early stopping at step {done}: no eval loss decrease > "
                      f"{run.config.train.early_stopping_min_delta} for {run.config.train.early_stopping_patience} "
                      f"evaluations; best {progress['best_eval_loss']:.4f} at step {progress['best_step']}")
    return stop


def record_eval(run: Run, step: int, ev: dict) -> bool:
    """Logs an evaluation and keeps the best checkpoint; True when early stopping says stop.

    As transformers' Trainer + EarlyStoppingCallback: the best checkpoint follows every new minimum; the
    patience count restarts only on a decrease by more than ``train.early_stopping_min_delta``.
    """
    min_delta, patience = run.config.train.early_stopping_min_delta, run.config.train.early_stopping_patience
    progress = run.progress
    run.writer.write(step, ev)
    loss, best = ev["eval/loss"], progress["best_eval_loss"]
    significant = best is None or loss < best - min_delta
    if best is None or loss < best:
        progress.update(best_eval_loss=loss, best_step=step)
        if step > 0:
            for s in run.best_ckpt.all_steps():
                run.best_ckpt.manager.delete(s)
            run.best_ckpt.save(step, run.state, {"step": int(step), "eval_loss": loss,
                                                 "config": run.config.to_dict()})
    progress["evals_since_best"] = 0 if significant else progress["evals_since_best"] + 1
    return bool(patience) and progress["evals_since_best"] >= patience


def save_checkpoint(run: Run, step: int) -> None:
    """Checkpoint stage: the train state at optimizer step ``step`` with its epoch, progress, data position
    and config (what a resume checks and continues from)."""
    plan, config = run.plan, run.config
    run.ckpt.save(step, run.state, {"step": int(step), "epoch": step / plan.steps_per_epoch,
                                    "progress": run.progress,
                                    "data_position": batches_lib.data_position(plan, step, config.data.seed),
                                    "config": config.to_dict()})


def _final_eval_and_save(run: Run) -> None:
    """After the last optimizer step: an evaluation unless one was just done, and the final checkpoint."""
    run.bar.close()
    if run.last_eval_step != run.done:
        run.ev = _evaluate(run)
        if run.ev:
            record_eval(run, run.done, run.ev)
    if run.done > run.start or run.ckpt.latest_step() is None:
        save_checkpoint(run, run.done)


def finish(run: Run) -> dict:
    """Finish stage: a generated sample, ``summary.json`` (process 0), the learning curves and their
    diagnosis, and the summary printed; returns the summary."""
    config, plan, progress, ev, run_dir = run.config, run.plan, run.progress, run.ev, run.run_dir
    smp = setup_lib.sample(run.setup, run.state.trainable, run.val_seqs, config.train.sample_max_new_tokens)
    summary_file = run_dir / "summary.json"
    old = json.loads(summary_file.read_text()) if (run.start and summary_file.is_file()) else {}
    summary = {
            "run_dir": str(run_dir), "method": config.method, "optimizer_steps": run.done,
            "planned_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "global_batch": plan.global_batch, "final_train_loss": run.loss,
            "initial_eval_loss": progress["first_eval"] if progress["first_eval"] is not None
            else old.get("initial_eval_loss"),
            "final_eval_loss": ev["eval/loss"] if ev else None,
            "final_eval_bits_per_byte": ev.get("eval/bits_per_byte") if ev else None,
            "best_eval_loss": progress["best_eval_loss"], "best_step": progress["best_step"],
            "best_checkpoint": str(run_dir / "best" / str(progress["best_step"]))
            if progress["best_step"] else None,
            "stopped_early_at": progress["stopped_early"], "skipped_updates": progress["skipped_updates"],
            "trainable_params": run.n_train, "wall_time_s": round(time.time() - run.t_start, 1),
            "data": run.report, "sample": smp,
    }
    if run.is_main:
        summary_file.write_text(json.dumps(summary, indent=2, default=str))
        try:
            summary["diagnosis"] = curves.plot_run(run_dir)
        except Exception as e:  # a plot must never fail a finished run
            run.log(f"warning: could not plot the learning curves ({type(e).__name__}: {e})")
    console.print_summary(summary, run.log)
    return summary


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0 on a multi-host run."""


def _check_finite(loss: float, step: int, what: str, run_dir) -> None:
    """ValueError when a ``what`` (e.g. validation) loss is NaN/Inf: the run stops, its checkpoints kept."""
    if not math.isfinite(loss):
        raise ValueError(f"{what} loss is {loss} at optimizer step {step}; stopping. The checkpoints in "
                         f"{run_dir / 'checkpoints'} are kept (lower optim.learning_rate, check the data)")
