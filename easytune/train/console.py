"""What a run prints to its log: the plan before training and the summary after it."""

from __future__ import annotations

import jax

from easytune import vocab as vocab_lib
from easytune.train import curves
from easytune.train.batches import Plan
from easytune.train.setup import Setup


def print_plan(plan: Plan, report: dict, setup: Setup, trainable_params: int, total_params: int, log) -> None:
    """Logs what a run is about to do: the data (records -> examples -> sequences), the batch arithmetic
    (micro-batch x data-parallel devices x accumulation, steps per epoch, optimizer steps), the mesh, the
    trainable share of the parameters and the first arrays left unsharded."""
    sup = report.get("train_supervised_tokens", 0)
    log(f"data: {report['records']} records ({report['format']}) -> {report['train_examples']} train / "
        f"{report['val_examples']} validation examples -> {plan.num_sequences} / {report['val_sequences']} "
        f"sequences of {report['sequence_len']} tokens (packing {report['packing']}, "
        f"{report['train_truncated']} truncated); {sup} supervised train tokens")
    if report.get("cache"):
        log(f"  prepared data: {report['cache']} ({'reused' if report.get('reused') else 'prepared now'})")
    dropped = plan.num_sequences - plan.steps_per_epoch * plan.global_batch
    log(f"batch: micro_batch_size {plan.micro_batch_size} x {plan.dp} data-parallel devices x accumulation "
        f"{plan.accum} = global batch {plan.global_batch} sequences; {plan.num_sequences} sequences / "
        f"{plan.global_batch} = {plan.steps_per_epoch} steps/epoch (drop_last {plan.drop_last}"
        + (f": {dropped} sequences unused per epoch" if plan.drop_last and dropped else "") +
        f"), {plan.total_steps} optimizer steps ({plan.total_steps / plan.steps_per_epoch:g} epochs); "
        f"~{sup / max(plan.num_sequences, 1) * plan.global_batch:.0f} supervised tokens/step")
    log(f"mesh: {dict(setup.mesh.shape)} over {setup.mesh.size} {jax.devices()[0].platform} devices; "
        f"trainable params {trainable_params:,} of {total_params:,} ({100 * trainable_params / total_params:.2f}%)")
    base_vocab = getattr(setup, "base_vocab_size", None)
    if base_vocab:  # tokenizer.added_tokens (or a larger tokenizer / adapter vocabulary) grew the model
        saved = ", ".join(setup.lora_cfg.modules_to_save) if setup.lora_cfg else "every row (full fine-tuning)"
        log(f"vocabulary: {base_vocab} -> {setup.model_cfg.vocab_size} rows of embed_tokens"
            + ("" if setup.model_cfg.tie_word_embeddings else " / lm_head")
            + f" for a tokenizer of {len(setup.tokenizer)} tokens; "
            + ("the new rows come from the lora.init_from adapter" if setup.lora_cfg and setup.config.lora.init_from
               else "new rows start at the mean of the old ones") + f", trained through {saved}")
        new = sorted((i, t) for t, i in setup.tokenizer.get_vocab().items() if i >= base_vocab)
        more = f" ... ({len(new)} in all)" if len(new) > 8 else ""
        origin = ("" if vocab_lib.new_tokens_key(setup.config) else "; from tokenizer.path, not "
                  "tokenizer.added_tokens / added_special_tokens: check it is the model's tokenizer")
        log(f"  new token ids {base_vocab}+: {[t for _, t in new[:8]]}{more}{origin}")
    for note in setup.sharding_notes[:10]:
        log(f"  not sharded: {note}")
    if len(setup.sharding_notes) > 10:
        log(f"  ... and {len(setup.sharding_notes) - 10} more (easytune train CONFIG --dry-run lists them all)")


def print_summary(s: dict, log) -> None:
    """Logs a finished run's summary (the dict :func:`easytune.train.loop.train` returns): losses, best
    checkpoint, early stop, skipped updates, the curves' diagnosis and the generated sample."""
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
