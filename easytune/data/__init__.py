"""Data: read raw files -> clean -> format + tokenize -> split -> pack into ``[N, T]`` training sequences.

``prepare.prepare_dataset(config.data, tokenizer)`` is the entry point (streaming, and its cache). ``files`` holds
the shared low-level readers, ``sources`` (+ ``raw`` for HTML / CSV / SQL / Parquet) the record readers, ``clean``
the cleaning steps, ``formats`` the record formats, ``stream`` the batched tokenization in worker processes,
``packed`` the prepared folder on disk and the rows gathered from it, ``sequences`` the sequence arrays (split,
pack, pad), ``report`` ``easytune prepare`` and ``quickstart`` our generated dataset. The trainer's batches are in
``easytune.train.batches``.
"""
