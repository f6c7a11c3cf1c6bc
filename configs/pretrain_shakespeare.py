"""Pretrain a small Llama from scratch on Tiny Shakespeare with your own tokenizer, on a CPU in minutes.

Every weight starts random (``model.preset`` with ``model.config_overrides``, seed ``train.seed``); the tokenizer
is a byte-level BPE that you train on the same text first, so the vocabulary fits the corpus (1024 tokens: 2.27
bytes/token on held-out Shakespeare; docs/guide/methods.md, "Pretrain").

  easytune tokenizer train --files ../shared/data/corpus/tinyshakespeare/input.txt \\
      --vocab-size 1024 --out models/shakespeare-tok
  easytune train configs/pretrain_shakespeare.py

Sized for 2 CPU cores: the "10m" preset's shape narrowed to 128 wide x 4 layers (0.9M parameters with this
vocab), rows of 128 tokens, 16 rows a step. On an accelerator drop the overrides
(``--config.model.config_overrides= --config.data.sequence_len=256 --config.train.micro_batch_size=32``):
the full "10m" (3.7M parameters) then reaches about 1.9 bits/byte (docs/guide/methods.md).
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "pretrain"                  # every weight trained, causal LM loss on every token
    c.model.preset = "10m"
    c.model.config_overrides = ("hidden_size=128,intermediate_size=384,num_hidden_layers=4,"
                                "num_attention_heads=4,num_key_value_heads=4")
    c.tokenizer.path = "models/shakespeare-tok"
    c.data.train_files = ["../shared/data/corpus/tinyshakespeare/input.txt"]
    c.data.format = "text"                 # <s> document </s> per file, cut into rows of sequence_len
    c.data.packing = True                  # with several documents: rows never attend across them
    c.data.sequence_len = 128
    c.data.val_set_size = 0.05             # the last 5% of the text (held out in order, as nanoGPT)
    c.optim.learning_rate = 2e-3           # a model this small takes a high rate (nanoGPT's Shakespeare: 1e-3)
    c.optim.warmup_steps = 30
    c.optim.lr_scheduler = "cosine"
    c.optim.cosine_min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.adam_beta2 = 0.99
    c.train.micro_batch_size = 16
    c.train.max_steps = 600
    c.train.eval_steps = 50
    c.train.early_stopping_patience = 4    # 1 MB of text: stop when validation loss turns up
    c.train.save_steps = 200
    c.train.log_steps = 10
    c.train.output_dir = "runs/pretrain_shakespeare"
    c.train.sample_max_new_tokens = 64
    return c
