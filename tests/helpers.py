"""Small builders shared by tests: a tiny random transformers Llama saved as an HF dir, batches."""

from __future__ import annotations

import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_run_config(out, **overrides):
    """The quickstart recipe shrunk for tests: ``model.preset='tiny'``, 16 validation examples, one sequence
    per device per micro-step, a log line every step, run dir ``out``. ``overrides`` are dotted config keys
    (``**{"train.max_steps": 4}``), applied as ``--config.KEY=VALUE`` would be."""
    from easytune import config as config_lib
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    c.model.preset = "tiny"
    c.data.val_set_size = 16
    c.train.log_steps = 1
    c.train.micro_batch_size = 1
    c.train.output_dir = str(out)
    config_lib.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


def save_tiny_hf_llama(path, *, vocab=96, hidden=32, layers=2, heads=4, kv_heads=2, inter=64, tied=False, seed=0):
    """A tiny random ``transformers.LlamaForCausalLM`` saved with ``save_pretrained``; returns the torch model."""
    import torch
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-5, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def uneven_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    """``[rows, seq]`` training batch whose rows have very different supervised lengths (1 .. seq-1 tokens),
    some padded (segment 0) — the case where averaging per-micro-batch means goes wrong."""
    ids = rng.integers(3, vocab, size=(rows, seq + 1)).astype(np.int32)
    lengths = rng.integers(2, seq + 1, size=rows)
    lengths[0], lengths[-1] = seq, 2
    seg = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    prompt = rng.integers(0, np.maximum(lengths - 1, 1))
    mask = ((np.arange(seq)[None, :] >= prompt[:, None]) & (seg > 0)).astype(np.float32)
    return dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:], loss_mask=mask, segment_ids=seg,
                positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy())


def quickstart_base(root) -> dict:
    """Quickstart data + tokenizer (200 records) and a tiny random transformers Llama (untied) with that vocab,
    under ``root``: ``{"model", "tokenizer", "train"}`` paths, for tests that train on a real HF base."""
    from transformers import AutoTokenizer

    from easytune.data import quickstart
    root = pathlib.Path(root)
    assets = quickstart.build_quickstart(root / "assets", num_records=200)
    vocab = len(AutoTokenizer.from_pretrained(str(assets["tokenizer_dir"])))
    save_tiny_hf_llama(root / "model", vocab=vocab)
    return {"model": root / "model", "tokenizer": assets["tokenizer_dir"], "train": assets["train_file"]}


def bpe_chat_tokenizer(corpus, specials, template, *, bos=None, eos=None, pad=None, unk=None, plain=(),
                       vocab_size=400):
    """A small ``PreTrainedTokenizerFast`` for chat-template tests: byte-level BPE (GPT-2 pre-tokenizer) trained on
    ``corpus`` to ``vocab_size`` tokens with ``specials`` first (ids 0..), the named ones as bos/eos/pad/unk and the
    rest as additional special tokens, ``plain`` added as normal tokens, ``chat_template`` = ``template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    named = {k: v for k, v in dict(bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk).items() if v}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **named)
    hf.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in named.values()]})
    if plain:
        hf.add_tokens(list(plain))
    hf.chat_template = template
    return hf
