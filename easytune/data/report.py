"""``easytune prepare``: run the data pipeline once, cache it, and describe what each stage did.

:func:`prepare` is what the CLI verb calls; :func:`describe` turns ``prepare_dataset``'s report
into the printed text (records in/out per stage and why, supervised tokens, a histogram of
tokens per example, truncations, drops), and :func:`debug_pairs` shows sequences as
(token, label) pairs, the masked ones marked, as axolotl's ``--debug`` does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from easytune import paths
from easytune import vocab as vocab_lib
from easytune.data import clean, packed, quickstart
from easytune.data.prepare import prepare_dataset


def describe(report: Mapping) -> str:
    """The prepare report as text (one stage per line, then the histogram).

    Args:
        report: the dict returned by ``prepare.prepare_dataset``.

    Returns:
        Multi-line text.
    """
    r = report
    files = r.get("files", [])
    lines = [f"read:    {r['records_read']} records from {len(files)} file(s): "
             + ", ".join(os.path.basename(f) for f in files[:4]) + (" ..." if len(files) > 4 else "")]
    if r.get("clean_steps"):
        lines.append(f"clean:   {r['records_read']} -> {r['records']} records")
        lines.append(clean.describe_steps(r["clean_steps"]))
        if r.get("near_dedup_languages"):
            lines.append(clean.describe_languages(r["near_dedup_languages"]))
    else:
        lines.append("clean:   no cleaning step enabled (data.clean.*)")
    fb = []
    if r.get("seam_fallbacks"):
        fb.append(f"{r['seam_fallbacks']} prompt/response seam fallbacks")
    if r.get("chat_fallbacks"):
        fb.append(f"{r['chat_fallbacks']} chat turns located by content")
    lines.append(f"format:  {r['records']} records -> {r['examples']} {r['format']} examples, {r['tokens']} tokens"
                 + (f" ({'; '.join(fb)})" if fb else ""))
    if r.get("bad_records"):
        n = r["bad_records"]
        lines.append(f"bad:     {n} record{'s' if n != 1 else ''} skipped (data.bad_records = 'skip'), e.g.")
        lines += [f"  {b}" for b in r.get("bad_examples", [])]
    for s in r.get("sources") or []:
        lines.append(f"source:  {s['name'] or '-'} ({s['format']}, {s['files']} file(s)): {s['examples']} examples "
                     f"taken of {s['examples_available']}, {s['tokens']} tokens; {100 * s['share']:.1f}% of the "
                     f"examples, {100 * s['token_share']:.1f}% of the tokens")
    if r.get("dropped_too_long"):
        lines.append(f"length:  {r['dropped_too_long']} examples longer than sequence_len + 1 = "
                     f"{r['sequence_len'] + 1} "
                     f"tokens dropped (data.excess_length_strategy = 'drop')")
    for split in ("train", "val"):
        lines.append(
                f"{split + ':':8s} {r[f'{split}_examples']} examples -> {r[f'{split}_sequences']} sequences of "
                f"{r['sequence_len']} tokens (packing {r['packing']}); {r[f'{split}_supervised_tokens']} supervised "
                f"tokens; {r[f'{split}_truncated']} truncated; {r[f'{split}_dropped_unsupervised']} dropped with no "
                f"supervised token left")
    if r.get("val_copies_left_out"):
        lines.append(f"         {r['val_copies_left_out']} repeated copies of validation examples (a source's weight "
                     f"> 1) left out: an example is in one split only")
    hist = r.get("length_histogram") or []
    if hist:
        lines.append("tokens per example:")
        top = max(c for _, _, c in hist) or 1
        for lo, hi, c in hist:
            span = f"{lo:>6}-{hi:<6}" if hi > lo else f"{lo:>6} {'':6}"
            lines.append(f"  {span} {c:>6}  {'#' * max(int(round(40 * c / top)), 1 if c else 0)}")
    if r.get("cache"):
        lines.append(f"cache:   {r['cache']}")
    return "\n".join(lines)


def debug_pairs(seqs: Mapping[str, np.ndarray], tokenizer, rows: int = 2, max_tokens: int = 80) -> str:
    """The first documents of ``seqs`` as ``token(label)`` pairs; masked tokens show label ``-100``.

    Pairs follow the Hugging Face convention (the label of a token is the token itself when it
    is supervised, -100 when not), rebuilt from the shifted arrays: a document's tokens are its
    first ``input_ids`` then its ``target_ids``, and token ``t``'s label comes from ``loss_mask[t - 1]``.
    Masked tokens are wrapped in brackets so they stand out without colour.

    Args:
        seqs: ``[N, T]`` arrays from ``prepare_dataset``.
        tokenizer: the tokenizer used (for the token strings).
        rows: documents shown (the first segment of each of the first rows).
        max_tokens: tokens shown per document.

    Returns:
        Text, one block per document.
    """
    out = []
    seqs = packed.as_sequences(seqs)
    head = seqs.gather(np.arange(min(rows, len(seqs))))
    for r in range(len(head["input_ids"])):
        seg = head["segment_ids"][r]
        pos = np.flatnonzero(seg == 1)
        if not len(pos):
            continue
        ids = [int(head["input_ids"][r, pos[0]])] + [int(t) for t in head["target_ids"][r, pos]]
        mask = [0] + [int(m) for m in head["loss_mask"][r, pos]]
        # start where the supervision starts when the prompt alone would fill the window
        first = mask.index(1) if 1 in mask else 0
        start = 0 if first < max_tokens * 3 // 4 else first - max_tokens // 4
        window = slice(start, start + max_tokens)
        pieces = tokenizer.convert_ids_to_tokens(ids[window])
        shown = [f"{p!r}({i})" if m else f"[{p!r}(-100)]" for p, i, m in zip(pieces, ids[window], mask[window])]
        before = f"(tokens {start}-{start + len(pieces) - 1}) ... " if start else ""
        more = f" ... (+{len(ids) - start - max_tokens} tokens)" if len(ids) > start + max_tokens else ""
        out.append(f"sequence {r}, document 1: {len(ids)} tokens, {sum(mask)} supervised; "
                   f"[masked] tokens have label -100\n"
                   + before + " ".join(shown) + more)
    return "\n\n".join(out)


def prepare(config, debug: bool = False, log=print) -> dict:
    """Runs ``prepare_dataset`` for a whole config, caching the result, and prints the report.

    The cache goes to ``data.dataset_prepared_path``, or ``<train.output_dir>/prepared_data``
    when that is empty; set ``data.dataset_prepared_path`` to the printed folder's parent so
    ``easytune train`` reuses it.

    Args:
        config: a validated config (``easytune.config``).
        debug: also print :func:`debug_pairs` of the first training sequences.
        log: where the lines go.

    Returns:
        The report dict.

    Raises:
        ValueError / FileNotFoundError: bad data (file, line and field named).
    """
    run_dir = paths.run_path(config.train.output_dir)
    quickstart.resolve_builtin(config, run_dir)
    if not config.data.dataset_prepared_path and not paths.is_remote(run_dir):  # the cache is local files
        config.data.dataset_prepared_path = str(run_dir / "prepared_data")
    tokenizer = vocab_lib.load_run_tokenizer(config)
    train, _, report = prepare_dataset(config.data, tokenizer)
    log(describe(report))
    if debug:
        log(debug_pairs(train, tokenizer))
    return report
