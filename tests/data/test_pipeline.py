"""Split, shift, pack, pad, chunk, and prepare_dataset end to end (easytune/data/pipeline.py)."""

import json
import shutil

import ml_collections
import numpy as np
import pytest

from easytune.data import formats, pipeline, sources


def _ex(ids, mask=None):
    return {"input_ids": list(ids), "loss_mask": list(mask) if mask is not None else [0] + [1] * (len(ids) - 1)}


def _check_invariants(seqs, T):
    """Properties every sequences dict must have (SPEC Data section)."""
    assert set(seqs) == set(pipeline.SEQUENCE_KEYS)
    for k, v in seqs.items():
        assert v.shape == seqs["input_ids"].shape and v.shape[1] == T
        assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
    seg, pos, mask = seqs["segment_ids"], seqs["positions"], seqs["loss_mask"]
    assert np.all(mask[seg == 0] == 0)                 # padding never supervised
    for r in range(seg.shape[0]):
        s = seg[r]
        real = s > 0
        n = real.sum()
        assert np.all(real[:n]) and not np.any(real[n:])  # padding only at the end
        assert np.all(np.diff(s[:n]) >= 0) and (n == 0 or s[0] == 1)
        starts = np.r_[True, s[1:n] != s[:n - 1]]
        # positions restart at every document start and count up by one inside it
        assert np.all(pos[r, :n][starts] == 0)
        assert np.all(pos[r, 1:n][~starts[1:]] == pos[r, :n - 1][~starts[1:]] + 1)


def test_unpacked_rows_shift_by_one_and_pad_by_position():
    T = 6
    examples = [_ex([5, 6, 7, 8]), _ex([9, 0, 3], [0, 0, 1])]
    seqs = pipeline.build_sequences(examples, T, packing=False, pad_id=0)
    _check_invariants(seqs, T)
    np.testing.assert_array_equal(seqs["input_ids"], [[5, 6, 7, 0, 0, 0], [9, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["target_ids"], [[6, 7, 8, 0, 0, 0], [0, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["loss_mask"], [[1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["segment_ids"], [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(seqs["positions"], [[0, 1, 2, 0, 0, 0], [0, 1, 0, 0, 0, 0]])
    # Token 0 is a real target in row 1 and also the pad id: only segment/loss_mask tell them apart.
    assert seqs["target_ids"][1, 0] == 0 and seqs["segment_ids"][1, 0] == 1


def test_packing_is_greedy_sequential_with_segments_and_positions():
    T = 8
    lengths = [4, 5, 3, 9, 2, 6]          # pairs: 3, 4, 2, 8, 1, 5
    rng = np.random.default_rng(0)
    examples = [_ex(rng.integers(3, 100, n)) for n in lengths]
    seqs = pipeline.build_sequences(examples, T, packing=True)
    _check_invariants(seqs, T)
    # rows: [3+4], [2], [8], [1+5]  (the 2-pair example does not fit after 7, nothing jumps the queue)
    np.testing.assert_array_equal(seqs["segment_ids"], [
            [1, 1, 1, 2, 2, 2, 2, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
            [1, 2, 2, 2, 2, 2, 0, 0]])
    # Every example appears whole and in order; targets never cross a document boundary.
    docs = []
    for r in range(seqs["input_ids"].shape[0]):
        for s in range(1, seqs["segment_ids"][r].max() + 1):
            sel = seqs["segment_ids"][r] == s
            docs.append((seqs["input_ids"][r, sel], seqs["target_ids"][r, sel], seqs["loss_mask"][r, sel]))
    assert len(docs) == len(examples)
    for ex, (inp, tgt, mask) in zip(examples, docs):
        ids = np.asarray(ex["input_ids"])
        np.testing.assert_array_equal(inp, ids[:-1])
        np.testing.assert_array_equal(tgt, ids[1:])
        np.testing.assert_array_equal(mask, np.asarray(ex["loss_mask"][1:], np.float32))


def test_long_examples_are_truncated_and_counted():
    T = 4
    examples = [_ex(range(3, 10)), _ex(range(3, 8)), _ex(range(3, 5))]  # 7, 5 (= T + 1: fits), 2 tokens
    assert pipeline.num_truncated(examples, T) == 1
    for packing in (False, True):
        seqs = pipeline.build_sequences(examples, T, packing=packing)
        _check_invariants(seqs, T)
        np.testing.assert_array_equal(seqs["input_ids"][0], [3, 4, 5, 6])
        np.testing.assert_array_equal(seqs["target_ids"][0], [4, 5, 6, 7])
        assert seqs["input_ids"].shape[0] == 3  # truncation never spills into another row


def test_examples_without_targets_are_skipped_and_empty_input_gives_zero_rows():
    seqs = pipeline.build_sequences([_ex([7])], 4, packing=True)
    assert seqs["input_ids"].shape == (0, 4) and pipeline.count_supervised_tokens(seqs) == 0


def test_mismatched_mask_is_rejected():
    with pytest.raises(ValueError, match="example 0"):
        pipeline.build_sequences([{"input_ids": [1, 2, 3], "loss_mask": [0, 1]}], 4, packing=False)


def test_count_supervised_tokens_equals_masks_after_shift():
    examples = [_ex([1, 5, 6, 2], [0, 0, 1, 1]), _ex([1, 7, 2])]
    for packing in (False, True):
        seqs = pipeline.build_sequences(examples, 8, packing)
        assert pipeline.count_supervised_tokens(seqs) == 2 + 2


def test_chunk_text_makes_every_token_after_the_first_a_target_once():
    stream = list(range(3, 3 + 23))
    T = 5
    chunks = pipeline.chunk_text(stream, T)
    assert len(chunks) == 5 and all(len(c["input_ids"]) == T + 1 for c in chunks[:-1])
    seqs = pipeline.build_sequences(chunks, T, packing=False)
    _check_invariants(seqs, T)
    targets = seqs["target_ids"][seqs["loss_mask"] > 0]
    np.testing.assert_array_equal(targets, stream[1:])
    assert pipeline.chunk_text(stream[:1], T) == [] and pipeline.chunk_text(stream[:6], T) == [_ex(stream[:6])]


@pytest.mark.parametrize("size, n_val", [(0, 0), (0.05, 5), (0.101, 11), (7, 7), (7.0, 7)])
def test_split_sizes(size, n_val):
    train, val = pipeline.split_train_val(list(range(100)), size, seed=0)
    assert len(val) == n_val and len(train) == 100 - n_val
    assert sorted(train + val) == list(range(100))


def test_split_is_deterministic_and_seeded():
    items = list(range(50))
    a = pipeline.split_train_val(items, 0.2, seed=3)
    assert a == pipeline.split_train_val(items, 0.2, seed=3)
    assert a != pipeline.split_train_val(items, 0.2, seed=4)


@pytest.mark.parametrize("size", [-1, 2.5, 10, 10.0])
def test_bad_split_sizes(size):
    with pytest.raises(ValueError, match="val_set_size"):
        pipeline.split_train_val(list(range(10)), size, seed=0)


@pytest.fixture(scope="module")
def llama_tok(shared_data, tmp_path_factory):
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("llama2_tok")
    shutil.copy(shared_data / "tokenizers" / "llama2" / "tokenizer.model", d / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(d))


def _cfg(**kw):
    d = dict(train_files="", format="alpaca", val_set_size=0.1, sequence_len=256, packing=True,
                      train_on_inputs=False, seed=0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_prepare_dataset_alpaca_report_is_consistent(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    cfg = _cfg(train_files=f + ", " + f.replace("alpaca_tiny", "alpaca_t*ny"))  # comma string; file read once
    train, val, report = pipeline.prepare_dataset(cfg, llama_tok)
    _check_invariants(train, 256)
    _check_invariants(val, 256)
    assert report["records"] == report["examples"] == 100
    assert (report["train_examples"], report["val_examples"]) == (90, 10)
    assert report["train_sequences"] == train["input_ids"].shape[0] < 90   # packed
    assert report["val_supervised_tokens"] == pipeline.count_supervised_tokens(val)
    # Supervised tokens: the output + eos tokens that survive truncation to T + 1 = 257 tokens.
    examples = formats.format_records(sources.read_records([f]), "alpaca", llama_tok)
    assert report["train_truncated"] + report["val_truncated"] == pipeline.num_truncated(examples, 256) > 0
    assert report["train_supervised_tokens"] + report["val_supervised_tokens"] == sum(
            sum(ex["loss_mask"][1:257]) for ex in examples)
    # Unpacked: one row per example, same supervision.
    train_u, val_u, report_u = pipeline.prepare_dataset(_cfg(train_files=[f], packing=False), llama_tok)
    assert report_u["train_sequences"] == 90 and report_u["val_sequences"] == 10
    assert report_u["train_supervised_tokens"] == report["train_supervised_tokens"]


def test_prepare_dataset_text_trains_on_every_token(shared_data, llama_tok):
    f = shared_data / "corpus" / "tinystories" / "tinystories_sample.txt"
    cfg = _cfg(train_files=[str(f)], format="text", val_set_size=0, sequence_len=64)
    train, val, report = pipeline.prepare_dataset(cfg, llama_tok)
    stream = formats.format_text([f.read_text()], llama_tok)
    assert report["tokens"] >= len(stream) and val["input_ids"].shape[0] == 0
    assert report["train_supervised_tokens"] == len(stream) - 1
    # split_train_val shuffles rows; every row is a contiguous slice of the stream.
    rows = sorted(train["input_ids"][:, 0].tolist())
    assert rows == sorted(stream[i] for i in range(0, len(stream) - 1, 64))


def test_prepare_dataset_text_format_reads_jsonl_documents(shared_data, llama_tok):
    f = str(shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl")
    texts = [r["text"] for r in sources.read_records([f])]
    train, _, report = pipeline.prepare_dataset(_cfg(train_files=[f], format="text", val_set_size=0,
                                                     sequence_len=512, packing=False), llama_tok)
    stream = formats.format_text(texts, llama_tok)
    assert report["train_supervised_tokens"] == len(stream) - 1
    assert (train["segment_ids"] > 0).sum() == len(stream) - 1
    # packed: each document cut on its own, so each one's first token (its <s>) is no target
    train, _, report = pipeline.prepare_dataset(_cfg(train_files=[f], format="text", val_set_size=0,
                                                     sequence_len=512, packing=True), llama_tok)
    docs = [t for t in texts if t]
    assert report["train_supervised_tokens"] == len(stream) - len(docs)
    with pytest.raises(ValueError, match=r"c4_demo\.jsonl:1: missing required field 'content'"):
        pipeline.prepare_dataset(_cfg(train_files=[f], format="text", text_field="content"), llama_tok)


def test_prepare_dataset_accepts_plain_dict_and_whole_config(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    plain = dict(_cfg(train_files=[f], val_set_size=5).to_dict())
    whole = ml_collections.ConfigDict({"data": _cfg(train_files=[f], val_set_size=5).to_dict()})
    a = pipeline.prepare_dataset(plain, llama_tok)
    b = pipeline.prepare_dataset(whole, llama_tok)
    assert a[2] == b[2] and a[2]["val_examples"] == 5
    np.testing.assert_array_equal(a[0]["input_ids"], b[0]["input_ids"])


def test_prepare_dataset_errors_name_the_file(tmp_path, llama_tok):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing required field 'output'"):
        pipeline.prepare_dataset(_cfg(train_files=[str(f)]), llama_tok)
    with pytest.raises(FileNotFoundError, match=r"nope\*\.jsonl"):
        pipeline.prepare_dataset(_cfg(train_files=[str(tmp_path / "nope*.jsonl")]), llama_tok)


def test_val_set_size_errors_name_the_config_key():
    for size in (-1, 2.5, 10):
        with pytest.raises(ValueError, match=r"data\.val_set_size"):
            pipeline.split_train_val(list(range(10)), size, seed=0)


def test_sequence_len_shorter_than_every_prompt_is_an_error(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    examples = formats.format_records(sources.read_records([f]), "alpaca", llama_tok)
    T = 16
    train, _ = pipeline.split_train_val(examples, 0.1, seed=0)
    prompts = sorted(ex["loss_mask"].index(1) for ex in train)
    assert prompts[0] > T  # every example keeps only prompt tokens after truncation
    median = float(np.median(prompts))
    with pytest.raises(ValueError, match=rf"0 supervised tokens: data\.sequence_len = {T} .*longest {prompts[-1]} "
                                         rf"tokens, median {median:g} tokens.*larger") as info:
        pipeline.prepare_dataset(_cfg(train_files=[f], sequence_len=T), llama_tok)
    assert "data.val_set_size" not in str(info.value)


def test_mostly_truncated_data_warns_with_count_and_key(shared_data, llama_tok, caplog):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    with caplog.at_level("WARNING", logger="easytune.data.pipeline"):
        _, _, report = pipeline.prepare_dataset(_cfg(train_files=[f], sequence_len=64), llama_tok)
    dropped = report["train_dropped_unsupervised"] + report["val_dropped_unsupervised"]
    truncated = report["train_truncated"] + report["val_truncated"] + dropped
    assert truncated > 50 and report["train_supervised_tokens"] > 0
    # Examples whose response starts past token 65 keep no supervised token: dropped, never a 0/0 loss.
    examples = formats.format_records(sources.read_records([f]), "alpaca", llama_tok)
    assert dropped == sum(not any(ex["loss_mask"][1:65]) for ex in examples) > 0
    assert report["train_examples"] + report["val_examples"] == 100 - dropped
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{truncated} of 100 examples" in warning and "data.sequence_len" in warning
    assert f"{dropped} of them kept no supervised token and were dropped" in warning
    assert "more than half" in warning and "larger data.sequence_len (now 64)" in warning


def test_prepare_dataset_rejects_empty_and_null_inputs(tmp_path, llama_tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"no records in .*empty\.jsonl"):
        pipeline.prepare_dataset(_cfg(train_files=[str(empty)]), llama_tok)
    null = tmp_path / "null.jsonl"
    null.write_text('{"instruction": "a", "output": null}\n')
    with pytest.raises(ValueError, match=r"null\.jsonl:1: required field 'output' is null"):
        pipeline.prepare_dataset(_cfg(train_files=[str(null)]), llama_tok)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: file is not valid UTF-8"):
        pipeline.prepare_dataset(_cfg(train_files=[str(latin)]), llama_tok)
