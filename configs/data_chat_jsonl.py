"""Your data, as chat: ShareGPT / OpenAI-style conversations rendered with a chat template, LoRA on stories260K.

Every conversation is rendered with ``data.chat_template`` (here the Mistral-Instruct template; leave it
empty to use the tokenizer's own) exactly as ``tokenizer.apply_chat_template`` does; only assistant turns
(``data.roles_to_train``) and their end-of-turn ``</s>`` carry the loss. Convert the model once, then:

  easytune convert ../shared/data/models/stories260K/stories260K.gguf models/stories260K
  easytune prepare configs/data_chat_jsonl.py --debug
  easytune train configs/data_chat_jsonl.py
"""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "lora"
    c.model.path = "models/stories260K"
    c.lora.r = 8
    c.lora.lora_alpha = 16
    c.data.train_files = ["../shared/data/instruct/axolotl/conversation.json"]
    c.data.format = "chat"
    c.data.chat_template = "../shared/data/tokenizers/chat_templates/mistralrs_mistral.json"
    c.data.roles_to_train = ["assistant"]
    c.data.sequence_len = 512
    c.data.excess_length_strategy = "truncate"
    c.data.val_set_size = 0
    c.optim.learning_rate = 3e-3
    c.train.micro_batch_size = 1
    c.train.max_steps = 20
    c.train.output_dir = "runs/data_chat_jsonl"
    c.train.sample_max_new_tokens = 0
    return c
