"""The generated quickstart task and tokenizer (easytune/data/quickstart.py)."""

import json
import os

import pytest

from easytune.data import prepare, quickstart, sources

N = 600  # records per test build: fast, and enough for the tokenizer to learn the template


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return quickstart.build_quickstart(tmp_path_factory.mktemp("qs") / "quickstart", seed=0, num_records=N)


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built["tokenizer_dir"])


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_files_and_records(built):
    train, test = _read(built["train_file"]), _read(built["test_file"])
    assert len(train) == N and len(test) == 200
    descending = set(quickstart.TASKS["sort_desc"]["instructions"])
    for r in train + test:
        assert set(r) == {"instruction", "input", "output"} and r["input"].isdigit() and 5 <= len(r["input"]) <= 8
        assert r["output"] == "".join(sorted(r["input"], reverse=r["instruction"] in descending)), r
    # Both directions occur, and no (direction, input) pair repeats: validation tests generalisation.
    assert 0.4 < sum(r["instruction"] in descending for r in train) / N < 0.6
    keys = [(r["instruction"] in descending, r["input"]) for r in train + test]
    assert len(set(keys)) == len(keys)


def test_instructions_come_from_the_task_table(built):
    allowed = {i for name in quickstart.DEFAULT_TASKS for i in quickstart.TASKS[name]["instructions"]}
    used = {r["instruction"] for r in _read(built["train_file"])}
    assert used == allowed


def test_deterministic_for_a_seed(tmp_path, built):
    again = quickstart.build_quickstart(tmp_path / "again", seed=0, num_records=N)
    other = quickstart.build_quickstart(tmp_path / "other", seed=1, num_records=N)
    read = lambda p: open(p, "rb").read()
    assert read(again["train_file"]) == read(built["train_file"])
    assert read(os.path.join(again["tokenizer_dir"], "tokenizer.json")) == \
            read(os.path.join(built["tokenizer_dir"], "tokenizer.json"))
    assert read(other["train_file"]) != read(built["train_file"])


def test_idempotent_reuse_and_rebuild_on_new_params(tmp_path):
    out = tmp_path / "qs"
    first = quickstart.build_quickstart(out, seed=0, num_records=100, num_test=10)
    stamp = os.stat(first["train_file"]).st_mtime_ns
    assert quickstart.build_quickstart(out, seed=0, num_records=100, num_test=10) == first
    assert os.stat(first["train_file"]).st_mtime_ns == stamp        # reused, not rewritten
    quickstart.build_quickstart(out, seed=0, num_records=120, num_test=10)
    assert len(_read(first["train_file"])) == 120                   # other params: rebuilt in place
    assert sorted(p.name for p in out.iterdir()) == ["quickstart.json", "test.jsonl", "tokenizer", "train.jsonl"]


def test_autotokenizer_loads_with_llama_special_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tok("12").input_ids[0] == 1 and tok("12").input_ids.count(1) == 1  # adds BOS like Llama's tokenizer


def test_tokenizer_round_trips_and_splits_digits(built, tok):
    records = _read(built["test_file"])  # text the tokenizer was not trained on
    for r in records:
        ids = tok(r["output"], add_special_tokens=False).input_ids
        assert len(ids) == len(r["output"])                         # one token per digit
        assert tok.decode(ids) == r["output"]
    text = "Any text round-trips: üñï 123 \n\t ok"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_examples_fit_a_64_token_row(built, tok):
    cfg = dict(train_files=[built["train_file"]], format="alpaca", val_set_size=0.05, sequence_len=64,
                          packing=True, train_on_inputs=False, seed=0)
    train, val, report = prepare.prepare_dataset(cfg, tok)
    assert report["train_truncated"] == report["val_truncated"] == 0 and report["seam_fallbacks"] == 0
    assert report["train_sequences"] < report["train_examples"] / 2      # several records per packed row
    lengths = [len(r["output"]) + 1 for r in sources.read_records([built["train_file"]])]
    assert report["train_supervised_tokens"] + report["val_supervised_tokens"] == sum(lengths)


def test_unknown_task_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown quickstart task 'add'"):
        quickstart.build_quickstart(tmp_path, tasks=("add",))
