"""Pretrain a small Llama from scratch on Tiny Shakespeare with your own tokenizer.

Every weight starts random (``model.preset``, seed ``train.seed``); the tokenizer is a byte-level BPE that you
train on the same text first, so the vocabulary fits the corpus (1024 tokens: 2.27 bytes/token on held-out
Shakespeare, against 1.87 at 512 and 2.95 at 4096; README "Pretrain your own small model").

  easytune tokenizer train --files ../shared/data/corpus/tinyshakespeare/input.txt \\
      --vocab-size 1024 --out models/shakespeare-tok
  easytune train configs/pretrain_shakespeare.py

The preset "10m" has 9.7M parameters with a 32000-token vocab; with this 1024-token vocab it is 3.7M
(192 wide, 8 layers). Measured on one H200: 809k tokens/s, early stop at step 700 (best eval loss 3.20 at
step 500, 1.91 bits/byte) in 86 s. A step is 1.8e11 FLOPs (``easytune estimate``), so a 2-core CPU needs
several seconds per step. ``--config.model.preset=25m`` (384 wide, 8 layers, like nanoGPT's Shakespeare
model) reached 3.26: the text, not the model, is the limit.
Tiny (smoke test): ``--config.train.max_steps=5 --config.data.sequence_len=64 --config.train.micro_batch_size=4``.
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "full"
    c.model.preset = "10m"
    c.tokenizer.path = "models/shakespeare-tok"
    c.data.train_files = "../shared/data/corpus/tinyshakespeare/input.txt"
    c.data.format = "text"                 # one token stream: <s> text </s>, cut into rows of sequence_len
    c.data.sequence_len = 256
    c.data.val_set_size = 0.05
    c.optim.learning_rate = 1e-3           # nanoGPT's Shakespeare recipe for a model this small
    c.optim.warmup_steps = 50
    c.optim.lr_scheduler = "cosine"
    c.optim.cosine_min_lr_ratio = 0.1
    c.optim.weight_decay = 0.1
    c.optim.adam_beta2 = 0.99
    c.train.micro_batch_size = 32
    c.train.max_steps = 1000
    c.train.eval_steps = 50
    c.train.early_stopping_patience = 4    # 1 MB of text: stop when validation loss turns up
    c.train.save_steps = 200
    c.train.log_steps = 10
    c.train.output_dir = "runs/pretrain_shakespeare"
    c.train.sample_max_new_tokens = 64
    return c
