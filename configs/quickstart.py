"""Quickstart: train a tiny Llama from scratch on a generated instruction task, on a CPU, in minutes.

Everything is built by easytune itself, nothing is downloaded: the task records (alpaca format) and a BPE
tokenizer trained on them land in ``RUN_DIR/data``; the model is a ~1M-parameter Llama (``model.preset``).
Validation records are held out, so the sample printed at the end shows generalisation, not recall.

Run:   easytune train configs/quickstart.py
Tiny:  easytune train configs/quickstart.py --config.train.max_steps=20   (what the tests run)
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "full"
    c.model.preset = "quickstart"
    c.data.builtin = "quickstart"
    c.data.val_set_size = 200
    c.data.sequence_len = 64
    c.data.packing = True
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 30
    c.optim.lr_scheduler = "cosine"
    c.optim.cosine_min_lr_ratio = 0.1
    c.optim.weight_decay = 0.01
    c.train.micro_batch_size = 32
    c.train.max_steps = 400
    c.train.eval_steps = 100
    c.train.save_steps = 200
    c.train.log_steps = 10
    c.train.output_dir = "runs/quickstart"
    c.train.sample_max_new_tokens = 24
    c.mesh.fsdp = -1
    return c
