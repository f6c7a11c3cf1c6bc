"""``easytune lr CONFIG``: the guide's fine-tuning learning rate, measured on the real prepared dataset.

``lr = base_lr * sqrt(supervised_tokens_per_step / pretrain_batch_tokens)`` (:func:`optim.suggest_learning_rate`).
"""

from __future__ import annotations

import json
import pathlib

from easytune import config as config_lib
from easytune import config_check
from easytune import sharding as sharding_lib
from easytune import vocab as vocab_lib
from easytune.data.quickstart import resolve_builtin
from easytune.train import optim as optim_lib
from easytune.train.batches import make_plan


def learning_rate_report(config, log=print) -> dict:
    """``easytune lr CONFIG``: the guide's learning rate measured on the real prepared dataset.

    ``lr = base_lr * sqrt(supervised_tokens_per_step / pretrain_batch_tokens)`` (:func:`optim.suggest_learning_rate`)
    with supervised tokens per step = the training split's mean supervised tokens per sequence x the global
    batch (sequences per optimizer step, over all data-parallel devices and accumulation micro-steps), and
    ``base_lr`` / ``pretrain_batch_tokens`` from ``optim.pretrain_*`` or the model family (``model_type`` in
    the model's ``config.json``, :data:`optim.PRETRAIN_HPARAMS`).

    Returns:
        dict: ``learning_rate``, ``base_lr``, ``pretrain_batch_tokens``, ``supervised_tokens_per_step``,
        ``steps_per_epoch``, ``supervised_tokens``, ``records``.

    Raises:
        config.ConfigError: unknown family and no ``optim.pretrain_*`` set (names the keys).
    """
    config_check.validate(config)
    from easytune import paths
    resolve_builtin(config, paths.run_path(config.train.output_dir))
    model_type = ""
    if config.model.path:
        model_type = json.loads((pathlib.Path(config.model.path) / "config.json").read_text()).get("model_type", "")
    fam = optim_lib.PRETRAIN_HPARAMS.get(model_type, {})
    base = config.optim.pretrain_learning_rate or fam.get("learning_rate", 0.0)
    batch_tokens = config.optim.pretrain_batch_tokens or fam.get("batch_tokens", 0)
    if not base or not batch_tokens:
        raise config_lib.ConfigError(
            f"config key 'optim.pretrain_learning_rate': no pretraining figures known for model_type "
            f"{model_type or '(from scratch)'!r} (known: {', '.join(sorted(optim_lib.PRETRAIN_HPARAMS))}); "
            f"set optim.pretrain_learning_rate and optim.pretrain_batch_tokens")
    tokenizer = vocab_lib.load_run_tokenizer(config)
    from easytune.data.prepare import prepare_dataset
    train_seqs, _, report = prepare_dataset(config.data, tokenizer)
    dp = sharding_lib.data_parallel_size(sharding_lib.make_mesh(config.mesh))
    plan = make_plan(len(train_seqs), config.train, dp)
    sup = float(train_seqs.supervised_per_row().sum())
    per_step = sup / plan.num_sequences * plan.global_batch  # a full global batch of average sequences
    lr = optim_lib.suggest_learning_rate(base, per_step, batch_tokens)
    source = "optim.pretrain_*" if (config.optim.pretrain_learning_rate and config.optim.pretrain_batch_tokens) \
        else f"{fam.get('family', model_type)} (model_type {model_type!r})"
    log(f"data: {int(sup):,} supervised tokens in {plan.steps_per_epoch} steps/epoch of {plan.global_batch} "
        f"sequences -> {per_step:,.0f} supervised tokens per optimizer step")
    log(f"pretraining: learning rate {base:g}, {batch_tokens:,} tokens per step ({source})")
    log(f"suggested optim.learning_rate = {base:g} * sqrt({per_step:,.0f} / {batch_tokens:,}) = {lr:.3g} "
        f"(configured: {config.optim.learning_rate:g})")
    return {"learning_rate": lr, "base_lr": base, "pretrain_batch_tokens": batch_tokens,
            "supervised_tokens_per_step": per_step, "steps_per_epoch": plan.steps_per_epoch,
            "supervised_tokens": sup, "records": report["records"]}
