"""Your data, from a spreadsheet: TruthfulQA's CSV questions and best answers as Alpaca records, LoRA on stories260K.

``data.columns`` maps CSV columns to Alpaca fields (``instruction=Question,output=Best Answer``); the byte
order mark of the file is handled; records holding refusal / boilerplate phrases from our default list are
dropped. Convert the model once, then:

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune prepare configs/data_truthfulqa_csv.py --debug
  easytune train configs/data_truthfulqa_csv.py
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "lora"
    c.model.path = "models/stories260K"
    c.lora.r = 8
    c.lora.lora_alpha = 16
    c.data.train_files = ["../shared/data/raw/csv/TruthfulQA.csv"]
    c.data.columns = "instruction=Question,output=Best Answer"
    c.data.format = "alpaca"
    c.data.clean.phrases = "default"
    c.data.clean.dedup_exact = True
    c.data.sequence_len = 256
    c.data.packing = True
    c.data.val_set_size = 0.05
    c.optim.learning_rate = 3e-3
    c.train.micro_batch_size = 8
    c.train.max_steps = 60
    c.train.eval_steps = 20
    c.train.output_dir = "runs/data_truthfulqa_csv"
    c.train.sample_max_new_tokens = 24
    return c
