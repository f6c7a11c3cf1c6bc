"""The Trainer: the lifecycle of a run, in named functions.

``train(config)``: set up the run directory -> tokenizer and model -> data -> plan (steps, batches) ->
mesh and shardings -> train state (fresh or resumed) -> optimizer steps with periodic eval, logs and
checkpoints -> final eval, checkpoint, ``summary.json`` and one generated sample.

Data order is a pure function of (seed, optimizer step): epoch ``e`` visits the training sequences in the
permutation ``default_rng(seed + e)``, so a resumed run sees exactly the batches it would have seen
(:mod:`easytune.train.batches`); the model, shardings and jitted steps come from :mod:`easytune.train.setup`.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from easytune import config as config_lib
from easytune import lora as lora_lib
from easytune import paths
from easytune import sharding as sharding_lib
from easytune.train import batches as batches_lib
from easytune.train import checkpoint as ckpt_lib
from easytune.train import curves
from easytune.train import metrics as metrics_lib
from easytune.train import optim as optim_lib
from easytune.train.batches import (Plan, eval_batches, eval_interval, gather_rows, make_plan, window_batches,
                                    window_rows)
from easytune.train.metrics import MetricsWriter
from easytune.train.setup import (Setup, build, init_state, jit_steps, load_model, load_run, load_tokenizer,
                                  lora_config, resolve_builtin, sample)

# The Trainer's public names, including those of the modules it is built from (tests and the CLI use them).
__all__ = ["train", "evaluate", "resume_point", "NonFiniteError", "Interrupted", "RESUMABLE_CHANGES", "Plan",
           "make_plan", "window_rows", "gather_rows", "window_batches", "eval_batches", "eval_interval",
           "MetricsWriter", "Setup", "build", "init_state", "jit_steps", "load_model", "load_run",
           "load_tokenizer", "lora_config", "resolve_builtin", "sample"]


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0 on a multi-host run."""


class _main_first:
    """``with _main_first(name):`` process 0 runs the block first, the others after it (a barrier): for
    work that writes shared files (the prepared-data cache, built-in datasets). One process: no barrier."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        if jax.process_count() > 1 and jax.process_index() != 0:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"easytune:{self.name}")

    def __exit__(self, exc_type, *rest):
        if jax.process_count() > 1 and jax.process_index() == 0 and exc_type is None:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"easytune:{self.name}")
        return False


def evaluate(eval_fn, setup: Setup, trainable, val_seqs, rows: int, val_bytes: int | None = None) -> dict[str, float]:
    """Token-weighted validation loss (nats/token) and perplexity over the whole validation split; with
    ``val_bytes`` (UTF-8 bytes of the supervised validation targets) also bits per byte,
    ``sum(nll) / ln 2 / val_bytes``, which compares across tokenizers (Gao et al. 2020, The Pile, section 4)."""
    if val_seqs is None or len(val_seqs["input_ids"]) == 0:
        return {}
    total, tokens = 0.0, 0.0
    for b in eval_batches(val_seqs, rows):
        out = eval_fn(trainable, setup.frozen, sharding_lib.put_global_batch(b, setup.mesh))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    out = {"eval/loss": loss, "eval/perplexity": float(math.exp(min(loss, 50.0)))}
    if val_bytes:
        out["eval/bits_per_byte"] = total / math.log(2.0) / val_bytes
    return out


# Keys that may differ between a checkpoint's config and a resumed run: logging, intervals, where to save,
# the mesh and the processes (orbax reshards on restore) and the run length (the LR schedule then stretches, noted in the log).
# With data.builtin, the data and tokenizer paths are derived from the run dir (which may have moved).
RESUMABLE_CHANGES = ("train.max_steps", "train.num_epochs", "train.eval_steps", "train.save_steps",
                     "train.log_steps", "train.save_total_limit", "train.sample_max_new_tokens",
                     "train.output_dir", "train.evals_per_epoch", "train.early_stopping_patience",
                     "train.early_stopping_min_delta", "train.max_consecutive_nonfinite", "train.peak_tflops",
                     "optim.pretrain_learning_rate", "optim.pretrain_batch_tokens",
                     "mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.replicated_warn_bytes",
                     # another device count needs another split of the same global batch (the data position
                     # check below refuses a different global batch)
                     "train.micro_batch_size", "train.gradient_accumulation_steps",
                     # the same math computed another way (rematerialised, or the loss in chunks)
                     "model.remat", "train.loss_chunk_tokens",
                     "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
                     "distributed.initialization_timeout", "distributed.auto")


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
    from easytune.config import remat_policy_name  # an old checkpoint says remat false, now "none"
    for flat in (saved, now):
        if "model.remat" in flat:
            flat["model.remat"] = remat_policy_name(flat["model.remat"])
    defaults = traverse_util.flatten_dict(config_lib.defaults().to_dict(), sep=".")
    for key in now:  # a key added to easytune after the checkpoint was written: it had the default then
        if key not in saved and key in defaults:
            saved[key] = defaults[key]
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
    if len(setup.sharding_notes) > 10:
        log(f"  ... and {len(setup.sharding_notes) - 10} more (easytune train CONFIG --dry-run lists them all)")


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
    t_start = time.time()
    config_lib.validate(config)
    paths.check_remote(config.train.output_dir)
    sharding_lib.initialize_distributed(config.distributed, log)  # before anything touches a device
    sharding_lib.check_same_config(config.to_json())  # every host must run the same job
    is_main = jax.process_index() == 0
    if not is_main:
        log = _quiet
    mesh = sharding_lib.make_mesh(config.mesh, devices)  # a mesh/device mismatch fails before any work
    run_dir = paths.run_path(config.train.output_dir)  # a local folder or gs://bucket/run (all hosts share it)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _main_first("data"):  # process 0 builds the data and its cache; the others then read them
        resolve_builtin(config, run_dir)
        tokenizer = load_tokenizer(config.tokenizer.path or config.model.path)
        from easytune.data import pipeline
        train_seqs, val_seqs, report = pipeline.prepare_dataset(config.data, tokenizer)
    if not dry_run or (run_dir / "checkpoints").exists():  # a dry run checks a resume too, creating nothing
        ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", config.train.save_total_limit)
        candidate = resume_point(ckpt, config, resume, log)
        if dry_run:
            ckpt.close()
            log(f"dry run: a real run would continue from optimizer step {candidate}" if candidate else
                "dry run: a real run would start from step 0")
    setup = build(config, tokenizer, mesh)
    plan = make_plan(len(train_seqs["input_ids"]), config.train, sharding_lib.data_parallel_size(setup.mesh))
    part = sharding_lib.local_rows(setup.mesh, plan.micro_rows)  # this process's rows of every micro-batch
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
    train_jit, eval_fn = jit_steps(setup, state, tx)
    if dry_run:
        first = sharding_lib.put_batch(window_batches(train_seqs, plan, 0, config.data.seed, part)[0], setup.mesh)
        from easytune.train import dry_run as dry_run_lib
        return dry_run_lib.report(setup, state, train_jit.lower(state, setup.frozen, first, jnp.float32(1.0)),
                                  plan, log)
    progress = {"best_eval_loss": None, "best_step": None, "evals_since_best": 0, "skipped_updates": 0,
                "nonfinite_in_a_row": 0, "stopped_early": None, "first_eval": None}
    start = 0
    if candidate:
        got = ckpt.restore_latest(state, log, max_step=candidate)
        if got is None:
            log(f"warning: no checkpoint in {ckpt.directory} could be restored; starting from step 0")
        else:
            start, state, meta = got
            batches_lib.check_data_position(meta, plan, start, config.data.seed)
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

    first = sharding_lib.put_batch(window_batches(train_seqs, plan, start, config.data.seed, part)[0], setup.mesh)
    train_fn = train_jit.lower(state, setup.frozen, first, jnp.float32(1.0)).compile()  # once; FLOPs for MFU
    step_flops, flops_src = metrics_lib.compiled_flops(train_fn, setup.mesh.size) * plan.accum, "XLA cost analysis"
    if setup.model_cfg.scan_layers:  # XLA counts the body of the layer scan once, not once per layer
        tokens = plan.global_batch * config.data.sequence_len  # as easytune.estimate: 6NT, or 4NT + 6N'T (LoRA)
        n_all = n_train + quant_count(setup.frozen)
        step_flops = tokens * (6.0 * n_all if config.method in ("full", "pretrain") else 4.0 * n_all + 6.0 * n_train)
        flops_src = "6NT estimate (Transformer Math 101): XLA's cost analysis counts a scanned layer once"
    peak, peak_src = metrics_lib.peak_flops(setup.mesh.devices.flat, config.train.peak_tflops)
    log(f"throughput: {step_flops:.4g} FLOPs per optimizer step ({flops_src}); peak {peak:.4g} FLOP/s "
        f"({peak_src})")

    if is_main:  # only now: a refused or failed resume leaves the run's config.json as it was
        (run_dir / "config.json").write_text(config.to_json(indent=2))
    writer = MetricsWriter(run_dir, enabled=is_main, keep_up_to_step=start)
    eval_rows = plan.micro_rows
    min_delta, patience = config.train.early_stopping_min_delta, config.train.early_stopping_patience

    def save(step):
        ckpt.save(step, state, {"step": int(step), "epoch": step / plan.steps_per_epoch, "progress": progress,
                                "data_position": batches_lib.data_position(plan, step, config.data.seed),
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

    sup_per_seq = train_seqs["loss_mask"].sum(axis=1, dtype=np.float64)  # supervised tokens per sequence
    tok_per_seq = (train_seqs["segment_ids"] > 0).sum(axis=1).astype(np.float64)  # non-padding tokens
    bar = tqdm(range(start, plan.total_steps), initial=start, total=plan.total_steps, desc="train",
               disable=not is_main, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    t_last, tok_since, steps_since = time.time(), 0.0, 0
    done, loss, last_eval_step = start, None, start if ev else -1
    try:
        with _SignalGuard() as signals:
            for step in bar:
                rows = window_rows(plan, step, config.data.seed)  # the global window: its token counts
                window_tokens = jnp.float32(max(float(sup_per_seq[rows[rows >= 0]].sum()), 1.0))
                tok_since += float(tok_per_seq[rows[rows >= 0]].sum())
                micro = window_batches(train_seqs, plan, step, config.data.seed, part)
                loss = 0.0
                for m in micro:
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
