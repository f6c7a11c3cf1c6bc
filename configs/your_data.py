"""Your data: try each format on the small example files in docs/examples/data, LoRA on stories260K.

The default reads ``docs/examples/data/alpaca.jsonl``; the "Your data, format by format" section of
docs/guide/data.md gives the overrides for every other example file (chat, tool calls, completion, text,
pretokenized, HTML, CSV, SQL). Convert the model once, then look at what each format trains
(``--debug`` prints the tokens, their labels and the masked ones in brackets):

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune prepare configs/your_data.py --debug
  easytune train configs/your_data.py
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "lora"
    c.model.path = "models/stories260K"
    c.lora.r = 8
    c.lora.lora_alpha = 16
    c.data.train_files = ["docs/examples/data/alpaca.jsonl"]
    c.data.format = "alpaca"
    c.data.val_set_size = 0
    c.data.sequence_len = 256
    c.optim.learning_rate = 3e-3
    c.train.micro_batch_size = 1
    c.train.max_steps = 10
    c.train.output_dir = "runs/your_data"
    c.train.sample_max_new_tokens = 0
    return c
