"""Data: read raw files -> clean -> format + tokenize -> split -> pack into ``[N, T]`` training sequences.

``prepare_dataset(config.data, tokenizer)`` is the entry point; see ``pipeline.py`` for the sequence arrays
and cache (the trainer's batches: ``easytune.train.batches``), ``formats.py`` for the record formats, ``clean.py`` for the cleaning steps,
``sources.py`` (+ ``raw.py`` for HTML / CSV / SQL / Parquet) for the readers and ``report.py`` for
``easytune prepare``.
"""

from easytune.data.clean import clean_records
from easytune.data.formats import alpaca_prompt, format_chat, format_records, format_text
from easytune.data.pipeline import (
    build_sequences,
    chunk_text,
    count_supervised_tokens,
    num_truncated,
    prepare_dataset,
    split_train_val,
)
from easytune.data.sources import ReadOptions, expand_paths, read_records

__all__ = [
    "ReadOptions", "alpaca_prompt", "build_sequences", "chunk_text", "clean_records",
    "count_supervised_tokens", "expand_paths", "format_chat", "format_records", "format_text",
    "num_truncated", "prepare_dataset", "read_records", "split_train_val",
]
