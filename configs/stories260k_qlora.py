"""QLoRA fine-tuning of the real pretrained stories260K Llama (TinyStories) on Shakespeare.

The same task as ``stories260k_lora.py``, with the frozen base kernels stored in 4-bit NormalFloat with
double quantization (``method = "qlora"``, easytune/quant.py) and dequantized inside the jitted step; only
the LoRA weights and their AdamW state are float. Convert the GGUF first (once):

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune estimate configs/stories260k_qlora.py
  easytune train configs/stories260k_qlora.py
  easytune export runs/stories260k_qlora --merged out/qlora_merged --adapter out/qlora_adapter

The tests run a short version: ``--config.train.max_steps=10``.
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "qlora"
    c.model.path = "models/stories260K"
    c.qlora.bnb_4bit_quant_type = "nf4"
    c.qlora.bnb_4bit_use_double_quant = True
    c.qlora.llm_int8_skip_modules = ["lm_head"]
    c.lora.r = 16
    c.lora.lora_alpha = 32
    c.lora.lora_dropout = 0.05
    c.lora.target_modules = "all-linear"
    c.data.train_files = ["../shared/data/corpus/tinyshakespeare/input.txt"]
    c.data.format = "text"
    c.data.sequence_len = 128
    c.data.val_set_size = 0.05
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 10
    c.optim.lr_scheduler = "cosine"
    c.train.micro_batch_size = 16
    c.train.gradient_accumulation_steps = 2
    c.train.max_steps = 150
    c.train.eval_steps = 50
    c.train.save_steps = 50
    c.train.log_steps = 5
    c.train.output_dir = "runs/stories260k_qlora"
    c.train.sample_max_new_tokens = 40
    return c
