"""The quickstart task: sorting digits up or down, in Alpaca format, with its own tokenizer.

A generated instruction task that a tiny Llama trained from scratch learns on a
laptop CPU in about a minute or two, and whose validation split measures
generalisation: every record is a fresh random digit string and records are
unique in (task, input), so a validation record is never a training record
(there are 1.1e8 inputs of 5-8 digits; a few thousand are drawn).

Records::

        {"instruction": "Sort the digits in ascending order.", "input": "4907215", "output": "0124579"}
        {"instruction": "Arrange these digits from largest to smallest.", "input": "33100", "output": "33100"}

Each record is ascending or descending (half each) with one of several
paraphrased instructions (``TASKS``), so the model must read the instruction.
Sorting is the most reliable choice we measured: the answer depends on the
input's *multiset* of digits, so attention that counts ("the smallest digit not
yet written") solves it, which small transformers learn fast; reversal needs the
input's length and an index that moves by two per output token. Measured with
``easytune.models.llama`` (tied embeddings, AdamW, warmup + cosine, batch 32
rows of 64 tokens, 2 CPU cores; exact match of greedy answers on 200 held-out
records): D=64/2 layers, lr 3e-3, 300 packed steps, about 40 s: 188-199/200 over
four runs; D=128/4 layers (``model.preset="quickstart"``), lr 3e-3, 400 steps:
195/200 in about 100 s packed, 178/200 in about 175 s unpacked (three quarters
of each unpacked row is padding). Mixing in reversal dropped D=64 to 139/200.

Tokenizer: a byte-level BPE (``tokenizers``; GPT-2's byte alphabet, so any text
round-trips) trained on the generated records, Llama's special tokens ``<unk>``
= 0, ``<s>`` = 1, ``</s>`` = 2, and a post-processor adding ``<s>`` like Llama's
tokenizer. Two choices keep sequences short:

* digits are split individually (``Digits(individual_digits=True)``, as Llama
    and GPT-4 tokenizers), so each digit is always exactly one token and the model
    never has to undo a merge;
* merges are learnt across word boundaries (``ByteLevel(use_regex=False)``), so
    the fixed Alpaca template, repeated in every record, collapses into one or two
    tokens: a record is 14-20 tokens instead of about 65 with GPT-2's word split,
    and three or four fit in one 64-token packed row.

Saved as ``transformers.PreTrainedTokenizerFast`` (``tokenizer.json`` +
``tokenizer_config.json``), which ``AutoTokenizer.from_pretrained(dir)`` loads offline.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import tempfile

from easytune import paths

VERSION = 2  # bump when the generated data or tokenizer changes (invalidates built dirs)

TASKS = {
        "sort": dict(
                instructions=("Sort the digits in ascending order.",
                              "Arrange these digits from smallest to largest.",
                              "Put the digits in increasing order.",
                              "Rewrite the number with its digits sorted."),
                solve=lambda digits: "".join(sorted(digits))),
        "sort_desc": dict(
                instructions=("Sort the digits in descending order.",
                              "Arrange these digits from largest to smallest.",
                              "Put the digits in decreasing order.",
                              "Rewrite the number with its digits sorted from largest to smallest."),
                solve=lambda digits: "".join(sorted(digits, reverse=True))),
        "reverse": dict(
                instructions=("Reverse the digits.", "Write the digits in reverse order."),
                solve=lambda digits: digits[::-1]),
        "copy": dict(
                instructions=("Repeat the digits.", "Copy the input."),
                solve=lambda digits: digits),
}
DEFAULT_TASKS = ("sort", "sort_desc")
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def make_records(num_records: int, seed: int = 0, tasks=DEFAULT_TASKS, min_digits: int = 5,
                 max_digits: int = 8) -> list[dict]:
    """Generates unique Alpaca records of the digit tasks.

    Args:
        num_records: how many records (all distinct in (instruction, input)).
        seed: seed of ``random.Random``; same seed, same records.
        tasks: names from ``TASKS``, drawn uniformly per record.
        min_digits, max_digits: input length range, digits, inclusive.

    Returns:
        ``[{"instruction": str, "input": str, "output": str}, ...]``.

    Raises:
        ValueError: an unknown task, or more records than distinct inputs.
    """
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown quickstart task {t!r}; available: {sorted(TASKS)}")
    space = sum(10 ** n for n in range(min_digits, max_digits + 1)) * len(tasks)
    if num_records > space // 2:
        raise ValueError(f"{num_records} records requested; at most {space // 2} for these lengths")
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < num_records:
        task = TASKS[rng.choice(tasks)]
        n = rng.randint(min_digits, max_digits)
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        key = (task["solve"], digits)
        if key in seen:
            continue
        seen.add(key)
        records.append({"instruction": rng.choice(task["instructions"]), "input": digits,
                        "output": task["solve"](digits)})
    return records


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Trains the quickstart byte-level BPE (see module docstring) on ``texts``.

    Args:
        texts: training text (the rendered records).
        vocab_size: upper bound; the trainer stops earlier when no pair repeats.

    Returns:
        A ``tokenizers.Tokenizer`` with ``<unk>``=0, ``<s>``=1, ``</s>``=2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike) -> None:
    """Saves a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` dir.

    ``tokenizer_class`` is written as ``"PreTrainedTokenizerFast"``, which both
    transformers 4 and 5 resolve (5 names its own class ``TokenizersBackend``, which
    4 does not know).
    """
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 model_max_length=512, clean_up_tokenization_spaces=False)
    hf.save_pretrained(os.fspath(out_dir))
    cfg_path = pathlib.Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(records: list[dict], path: pathlib.Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_quickstart(out_dir: str | os.PathLike, seed: int = 0, num_records: int = 6000,
                     num_test: int = 200, tasks=DEFAULT_TASKS) -> dict:
    """Writes the quickstart data and tokenizer into ``out_dir`` (reused if already built).

    Layout: ``train.jsonl`` (``num_records`` records; ``data.val_set_size`` splits
    validation from it), ``test.jsonl`` (``num_test`` further records, never in
    ``train.jsonl``, for generation demos), ``tokenizer/``, and ``quickstart.json``
    (the parameters; a dir built with other parameters is rebuilt).

    Args:
        out_dir: target directory (created).
        seed: generation seed; same seed, byte-identical files.
        num_records: training records (including the validation share).
        num_test: held-out records for generation.
        tasks: names from ``TASKS``.

    Returns:
        ``dict(tokenizer_dir=str, train_file=str, test_file=str, tasks=list, num_records=int)``.
    """
    out = pathlib.Path(out_dir)
    params = {"version": VERSION, "seed": seed, "num_records": num_records, "num_test": num_test,
              "tasks": list(tasks)}
    result = {"tokenizer_dir": str(out / "tokenizer"), "train_file": str(out / "train.jsonl"),
              "test_file": str(out / "test.jsonl"), "tasks": list(tasks), "num_records": num_records}
    meta = out / "quickstart.json"
    if meta.is_file() and json.loads(meta.read_text()) == params and all(
            pathlib.Path(result[k]).exists() for k in ("tokenizer_dir", "train_file", "test_file")):
        return result

    from easytune.data.formats import alpaca_prompt

    records = make_records(num_records + num_test, seed=seed, tasks=tasks)
    train, test = records[:num_records], records[num_records:]
    out.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".quickstart-", dir=out))
    try:
        _write_jsonl(train, tmp / "train.jsonl")
        _write_jsonl(test, tmp / "test.jsonl")
        texts = [alpaca_prompt(r) + r["output"] for r in train]
        save_tokenizer(train_tokenizer(texts), tmp / "tokenizer")
        meta.unlink(missing_ok=True)  # a half-replaced dir must never look built
        for name in ("train.jsonl", "test.jsonl", "tokenizer"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        meta.write_text(json.dumps(params, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def resolve_builtin(config, run_dir) -> None:
    """``data.builtin='quickstart'``: build our generated dataset and tokenizer into ``RUN_DIR/data`` and point
    ``data.train_files`` / ``tokenizer.path`` at them (so a resumed run or ``generate`` needs nothing else).
    A ``gs://`` run directory gets them in the local ``~/.cache/easytune/quickstart`` instead (the tokenizer
    and readers need local files; the data is rebuilt the same from the seed)."""
    if config.data.builtin != "quickstart":
        return
    local = (pathlib.Path(os.environ.get("EASYTUNE_CACHE", pathlib.Path.home() / ".cache" / "easytune")) / "quickstart"
             if paths.is_remote(run_dir) else pathlib.Path(os.fspath(run_dir)) / "data")
    assets = build_quickstart(local, seed=config.data.seed)
    config.data.train_files = [str(assets["train_file"])]
    config.tokenizer.path = str(assets["tokenizer_dir"])
    config.data.format = "alpaca"
