"""Your data, from web pages: a folder of saved Wikipedia HTML pages as plain text, LoRA on stories260K.

BeautifulSoup keeps the visible article text (``data.html_selector`` picks Wikipedia's content block; no
scripts, navigation boxes, references or edit links), mojibake and whitespace are repaired, and the pages
are cut into 128-token rows. Convert the model once, then:

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune prepare configs/data_wikipedia_html.py
  easytune train configs/data_wikipedia_html.py
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "lora"
    c.model.path = "models/stories260K"
    c.lora.r = 8
    c.lora.lora_alpha = 16
    c.data.train_files = ["../shared/data/raw/html"]
    c.data.html_selector = "#mw-content-text"
    c.data.format = "text"
    c.data.clean.fix_mojibake = True
    c.data.clean.unicode_normalization = "NFC"
    c.data.clean.normalize_whitespace = True
    c.data.sequence_len = 128
    c.data.val_set_size = 0.05
    c.optim.learning_rate = 3e-3
    c.train.micro_batch_size = 8
    c.train.max_steps = 60
    c.train.eval_steps = 20
    c.train.output_dir = "runs/data_wikipedia_html"
    c.train.sample_max_new_tokens = 24
    return c
