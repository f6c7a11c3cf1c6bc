"""Data: read files -> format + tokenize -> split -> pack into ``[N, T]`` training sequences.

``prepare_dataset(config.data, tokenizer)`` is the entry point; see ``pipeline.py`` for the
sequence arrays, ``formats.py`` for the record formats and ``sources.py`` for the readers.
"""

from easytune.data.formats import alpaca_prompt, format_records, format_text
from easytune.data.pipeline import (
    build_sequences,
    chunk_text,
    count_supervised_tokens,
    num_truncated,
    prepare_dataset,
    split_train_val,
)
from easytune.data.sources import expand_paths, read_records

__all__ = [
    "alpaca_prompt", "build_sequences", "chunk_text", "count_supervised_tokens", "expand_paths",
    "format_records", "format_text", "num_truncated", "prepare_dataset", "read_records", "split_train_val",
]
