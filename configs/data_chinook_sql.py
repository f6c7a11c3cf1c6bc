"""Your data, from an SQL dump: the Chinook music database's Track table as completion text, LoRA on stories260K.

Each ``INSERT INTO [Track]`` row becomes one record (``data.sql_table``); ``data.text_template`` writes it
as a sentence; exact duplicates are dropped. Convert the model once, look at the data, then train:

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune prepare configs/data_chinook_sql.py --debug
  easytune train configs/data_chinook_sql.py

Tests run it with ``--config.train.max_steps=2``.
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "lora"
    c.model.path = "models/stories260K"
    c.lora.r = 8
    c.lora.lora_alpha = 16
    c.data.train_files = ["../shared/data/raw/sql/Chinook_Sqlite.sql"]
    c.data.sql_table = "Track"
    c.data.format = "completion"
    c.data.text_template = "{Name} is a song by {Composer}, {Milliseconds} ms long."
    c.data.clean.dedup_exact = True
    c.data.sequence_len = 128
    c.data.packing = True
    c.data.val_set_size = 0.05
    c.optim.learning_rate = 3e-3
    c.train.micro_batch_size = 8
    c.train.max_steps = 60
    c.train.eval_steps = 20
    c.train.output_dir = "runs/data_chinook_sql"
    c.train.sample_max_new_tokens = 24
    return c
