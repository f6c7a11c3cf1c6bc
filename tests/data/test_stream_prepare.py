"""The streaming prepare (``prepare.prepare_dataset`` over ``packed`` folders): the same sequences, masks and split as
the in-memory pipeline of list functions, for any ``num_proc`` and ``batch_records``; bad records, an early error for
a hopeless ``sequence_len``, mixtures, and memory that does not grow with the data.

References: the in-memory pipeline built here from the list functions (``sources.read_records``,
``clean.clean_records``, ``formats.format_records`` / ``format_text``, ``sequences.apply_excess_length``,
``split_train_val``, ``drop_unsupervised``, ``build_sequences``): what ``prepare_dataset`` computed before it
streamed.
"""

import gc
import gzip
import json
import os
import pathlib
import shutil
import tempfile
import tracemalloc

import numpy as np
import pytest

from easytune.config import ConfigError, defaults
from easytune.data import clean, formats, packed, prepare, sequences, sources
from easytune.data.report import describe
from tests.data.test_prepare import _cfg as _base_cfg


@pytest.fixture(scope="module")
def tok(llama2_tok):
    return llama2_tok


def _cfg(**kw):
    """``tests.data.test_prepare._cfg`` with one process unless a test asks for more."""
    return _base_cfg(**{"num_proc": 1, **kw})


def reference(d, tok):
    """``(train, val)`` dicts of ``[N, T]`` arrays from the in-memory pipeline (the pre-streaming prepare)."""
    d = prepare.data_config(d)
    records = sources.read_records(d.train_files, sources.ReadOptions.from_config(d))
    records, _ = clean.clean_records(records, d.clean)
    T, fmt, tf = int(d.sequence_len), d.format, d.text_field or "text"
    if d.text_template:
        records = formats.render_text_template(records, d.text_template, tf)
    if fmt == "text":
        texts = [formats.record_field(r, tf, required=tf not in r) for r in records]
        if d.packing:
            examples = [c for t in texts if t for c in sequences.chunk_text(formats.format_text([t], tok), T)]
        else:
            examples = sequences.chunk_text(formats.format_text(texts, tok), T)
    else:
        chat = {}
        if fmt == "chat":
            chat = dict(roles_to_train=list(d.roles_to_train), role_map=sources.parse_columns(d.role_map),
                        chat_template=formats.load_chat_template(d.chat_template))
        examples = formats.format_records(records, fmt, tok, train_on_inputs=bool(d.train_on_inputs),
                                          text_field=tf, **chat)
        examples, _ = sequences.apply_excess_length(examples, T, d.excess_length_strategy)
    train, val = sequences.split_train_val(examples, d.val_set_size, int(d.seed), contiguous=fmt == "text")
    return [sequences.build_sequences(sequences.drop_unsupervised(s, T)[0], T, bool(d.packing),
                                      warn_truncated=False) for s in (train, val)]


def assert_same(seqs, ref):
    assert len(seqs) == len(ref["input_ids"])
    for k in sequences.SEQUENCE_KEYS:
        np.testing.assert_array_equal(seqs[k], ref[k], err_msg=k)
        assert seqs[k].dtype == ref[k].dtype, k


CASES = {
    "alpaca_packed_val": dict(train_files=["instruct/torchtune/alpaca_tiny.json"], format="alpaca", sequence_len=256,
                              packing=True, val_set_size=0.1),
    "alpaca_drop_unpacked": dict(train_files=["instruct/llama_factory/alpaca_en_demo.json"], format="alpaca",
                                 sequence_len=96, excess_length_strategy="drop", val_set_size=7, seed=3),
    "alpaca_truncate_unsupervised": dict(train_files=["instruct/torchtune/alpaca_tiny.json"], format="alpaca",
                                         sequence_len=64, packing=True, val_set_size=0.2),
    "chat_template_file": dict(train_files=["instruct/axolotl/conversation.json"], format="chat", sequence_len=512,
                               chat_template="tokenizers/chat_templates/mistralrs_mistral.json", packing=True),
    "completion_csv_template": dict(train_files=["raw/csv/TruthfulQA.csv"], format="completion", sequence_len=64,
                                    text_template="Q: {Question}\nA: {Best Answer}", packing=True, val_set_size=0.05),
    "text_stream_docs": dict(train_files=["corpus/llama_factory_pretrain/c4_demo.jsonl"], format="text",
                             sequence_len=100, packing=False, val_set_size=0.1),
    "text_packed_docs": dict(train_files=["corpus/llama_factory_pretrain/c4_demo.jsonl"], format="text",
                             sequence_len=100, packing=True, val_set_size=3),
    "cleaned_dedup": dict(train_files=["instruct/llama_factory/alpaca_en_demo.json",
                                       "instruct/llama_factory/alpaca_en_demo.json"], format="alpaca",
                          sequence_len=128, packing=True, val_set_size=0.05,
                          **{"clean.dedup_exact": True, "clean.normalize_whitespace": True}),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("batch_records", [1000, 7])
def test_streamed_prepare_equals_the_in_memory_pipeline(shared_data, tok, name, batch_records):
    kw = dict(CASES[name])
    kw["train_files"] = [str(shared_data / f) for f in kw["train_files"]]
    if "chat_template" in kw:
        kw["chat_template"] = str(shared_data / kw["chat_template"])
    d = _cfg(batch_records=batch_records, **kw)
    ref_train, ref_val = reference(d, tok)
    train, val, report = prepare.prepare_dataset(d, tok)
    assert_same(train, ref_train)
    assert_same(val, ref_val)
    assert report["train_sequences"] == len(ref_train["input_ids"]) > 0
    assert report["train_supervised_tokens"] == sequences.count_supervised_tokens(ref_train)
    assert report["val_supervised_tokens"] == sequences.count_supervised_tokens(ref_val)
    assert report["val_bytes"] == sequences.supervised_bytes(ref_val, tok)
    np.testing.assert_array_equal(train.supervised_per_row(), ref_train["loss_mask"].sum(axis=1))
    np.testing.assert_array_equal(train.tokens_per_row(), (ref_train["segment_ids"] > 0).sum(axis=1))


def _write_alpaca(path, n, bad=(), long_prompt=False, seed=0):
    rng = np.random.default_rng(seed)
    words = "the a river stone cloud learns quickly under bright green model data token".split()
    with open(path, "w") as f:
        for i in range(n):
            if i in bad:
                f.write('{"instruction": "broken' + "\n" if i % 2 else json.dumps({"instruction": "x", "output": ""})
                        + "\n")
                continue
            k = int(rng.integers(5, 60)) + (300 if long_prompt else 0)
            ins = " ".join(rng.choice(words, k)) + f" {i}"
            out = " ".join(rng.choice(words, int(rng.integers(3, 40))))
            f.write(json.dumps({"instruction": ins, "input": "", "output": out}) + "\n")


def test_num_proc_and_batch_size_change_nothing(tmp_path, tok):
    f = tmp_path / "a.jsonl"
    _write_alpaca(f, 600)
    out = {}
    for num_proc, batch in ((1, 2000), (2, 50), (2, 97), (0, 13)):
        d = _cfg(train_files=[str(f)], num_proc=num_proc, batch_records=batch, packing=True, val_set_size=0.1)
        train, val, report = prepare.prepare_dataset(d, tok)
        out[num_proc, batch] = (train.gather(np.arange(len(train))), val.gather(np.arange(len(val))), report,
                                prepare.cache_key(prepare.data_config(d), tok))
    (t0, v0, r0, k0), *rest = out.values()
    for t, v, r, k in rest:
        for key in sequences.SEQUENCE_KEYS:
            np.testing.assert_array_equal(t[key], t0[key])
            np.testing.assert_array_equal(v[key], v0[key])
        assert r == r0 and k == k0
    assert r0["train_examples"] + r0["val_examples"] == 600


def test_bad_records_error_names_the_line_and_skip_counts_them(tmp_path, tok):
    f = tmp_path / "a.jsonl"
    _write_alpaca(f, 400, bad={10, 11, 250})  # line 11: empty output; line 12: invalid JSON; line 251: empty output
    with pytest.raises(ValueError, match=r"a\.jsonl:12: invalid JSON"):  # a batch is read before it is formatted
        prepare.prepare_dataset(_cfg(train_files=[str(f)], batch_records=64), tok)
    g = tmp_path / "g.jsonl"
    g.write_text("".join(line for i, line in enumerate(f.read_text().splitlines(True)) if i != 11))
    with pytest.raises(ValueError, match=r"g\.jsonl:11: required field 'output' is empty"):
        prepare.prepare_dataset(_cfg(train_files=[str(g)], batch_records=64), tok)
    train, _, report = prepare.prepare_dataset(_cfg(train_files=[str(f)], batch_records=64, bad_records="skip"),
                                               tok)
    assert report["bad_records"] == 3 and report["records_read"] == 399
    shown = " | ".join(report["bad_examples"])
    assert "a.jsonl:11: required field 'output' is empty" in shown
    assert "a.jsonl:12: invalid JSON" in shown and "a.jsonl:251:" in shown
    assert "bad:     3 records skipped (data.bad_records = 'skip')" in describe(report)
    assert report["train_examples"] == 397
    # the kept examples are exactly the good records' (the reference reads a copy without the bad lines)
    good = tmp_path / "good.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    good.write_text("".join(line for i, line in enumerate(lines) if i not in (10, 11, 250)))
    ref, _ = reference(_cfg(train_files=[str(good)]), tok)
    assert_same(train, ref)
    with pytest.raises(ValueError, match=r"3 of 400 records are bad, more than data\.max_bad_fraction = 0\.005.*"
                                         r"a\.jsonl:11"):
        prepare.prepare_dataset(_cfg(train_files=[str(f)], bad_records="skip", max_bad_fraction=0.005), tok)


def test_hopeless_sequence_len_is_reported_after_the_first_batch(tmp_path, tok, monkeypatch):
    f = tmp_path / "a.jsonl"
    _write_alpaca(f, 3000, long_prompt=True)
    read = []
    real = sources.iter_records

    def counting(*a, **kw):
        for r in real(*a, **kw):
            read.append(1)
            yield r

    monkeypatch.setattr(sources, "iter_records", counting)
    for batch in (2000, 100):  # the decision rests on the first 1000 examples, whatever the batch size
        read.clear()
        with pytest.raises(ValueError, match=r"data\.sequence_len = 32 is shorter than every prompt .*the first "
                                             r"1000 alpaca examples"):
            prepare.prepare_dataset(_cfg(train_files=[str(f)], sequence_len=32, batch_records=batch), tok)
        assert len(read) <= min(1000 + 2 * batch, 3000)  # the probe and what was read ahead
    assert len(read) < 3000  # (batch 2000: the first two batches hold it all; batch 100: not the whole file)
    # long prompts first, then short ones: not hopeless, the same result for any batch size
    g = tmp_path / "sorted.jsonl"
    short = tmp_path / "short.jsonl"
    _write_alpaca(short, 30, seed=2)
    g.write_text("".join(f.read_text().splitlines(True)[:40]) + short.read_text())
    ref, _ = reference(_cfg(train_files=[str(g)], sequence_len=48), tok)
    for batch in (10, 1000):
        train, _, _ = prepare.prepare_dataset(_cfg(train_files=[str(g)], sequence_len=48, batch_records=batch), tok)
        assert_same(train, ref)


def test_mixture_takes_each_sources_share(shared_data, tok, tmp_path):
    a = shared_data / "instruct" / "torchtune" / "alpaca_tiny.json"  # 100 alpaca records
    b = tmp_path / "b.jsonl"
    _write_alpaca(b, 40, seed=1)
    d = _cfg(datasets=[dict(train_files=[str(a)], format="alpaca", weight=0.5, name="tiny"),
                       dict(train_files=[str(b)], format="alpaca", weight=2.0),
                       dict(path=str(b), type="completion", field="output", num_samples=25, name="comp")],
             sequence_len=512, packing=True, val_set_size=0, train_files=[])
    train, _, report = prepare.prepare_dataset(d, tok)
    shares = {s["name"]: s for s in report["sources"]}
    assert [(s["examples_available"], s["examples"]) for s in report["sources"]] == [(100, 50), (40, 80), (40, 25)]
    assert shares["comp"]["share"] == pytest.approx(25 / 155) and report["examples"] == 155
    assert sum(s["tokens"] for s in report["sources"]) == report["tokens"]
    text = describe(report)
    assert "source:  tiny (alpaca, 1 file(s)): 50 examples taken of 100" in text and "16.1% of the examples" in text
    # every trained document is one of its source's examples, with the source's multiplicity
    docs = []
    rows = train.gather(np.arange(len(train)))
    for r in range(len(train)):
        seg, tgt = rows["segment_ids"][r], rows["target_ids"][r]
        for s in range(1, seg.max() + 1):
            docs.append(tuple(tgt[seg == s].tolist()))
    ex_a = [tuple(e["input_ids"][1:513]) for e in formats.format_records(sources.read_records([a]), "alpaca", tok)]
    ex_b = [tuple(e["input_ids"][1:]) for e in formats.format_records(sources.read_records([b]), "alpaca", tok)]
    ex_c = [tuple(e["input_ids"][1:]) for e in formats.format_records(sources.read_records([b]), "completion", tok,
                                                                        text_field="output")]
    count = {x: docs.count(x) for x in set(docs)}
    assert sum(count.get(x, 0) for x in set(ex_a)) == 50 and all(count.get(x, 0) <= 1 for x in ex_a)
    assert all(count[x] == 2 for x in ex_b)
    assert sum(count.get(x, 0) for x in set(ex_c)) == 25
    assert len(docs) == 155
    # with a validation split, a repeated example is never in both splits, and trains as often as its weight says
    d.val_set_size = 0.2
    train, val, report = prepare.prepare_dataset(d, tok)
    assert not set(train.order.tolist()) & set(val.order.tolist())
    times = np.bincount(train.order)
    once = set(train.order.tolist())
    assert len(once) + len(val.order) == 50 + 40 + 25 and report["val_examples"] == len(val.order) == 23
    # the store holds the sources one after another: tiny 0-99, b 100-139, comp 140-179
    assert all(times[e] == (2 if 100 <= e < 140 else 1) for e in once)
    assert report["train_examples"] == len(train.order) == len(once) + sum(100 <= e < 140 for e in once)
    assert report["val_copies_left_out"] == sum(100 <= e < 140 for e in val.order.tolist()) > 0
    assert f"{report['val_copies_left_out']} repeated copies of validation examples" in describe(report)
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]"):
        prepare.prepare_dataset(_cfg(datasets=[dict(format="alpaca")], train_files=[]), tok)


def test_text_folder_of_gz_files_equals_the_plain_files(shared_data, tok, tmp_path):
    src = shared_data / "corpus"
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(src / "tinystories" / "tinystories_sample.txt", folder / "a.txt")
    with gzip.open(folder / "b.txt.gz", "wt") as g:
        g.write((src / "llama_factory_pretrain" / "wiki_demo.txt").read_text())
    with gzip.open(folder / "c.jsonl.gz", "wt") as g:
        g.write((src / "llama_factory_pretrain" / "c4_demo.jsonl").read_text())
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(src / "tinystories" / "tinystories_sample.txt", plain / "a.txt")
    shutil.copy(src / "llama_factory_pretrain" / "wiki_demo.txt", plain / "b.txt")
    shutil.copy(src / "llama_factory_pretrain" / "c4_demo.jsonl", plain / "c.jsonl")
    for packing in (False, True):
        d = _cfg(train_files=[str(folder)], format="text", sequence_len=256, packing=packing, val_set_size=0.05,
                 batch_records=5)
        train, val, _ = prepare.prepare_dataset(d, tok)
        ref_train, ref_val = reference(_cfg(train_files=[str(plain)], format="text", sequence_len=256,
                                            packing=packing, val_set_size=0.05), tok)
        assert_same(train, ref_train)
        assert_same(val, ref_val)


def test_gather_rows_pads_and_checks_bounds(shared_data, tok):
    d = _cfg(train_files=[str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")], packing=True)
    train, _, _ = prepare.prepare_dataset(d, tok)
    full = train.gather(np.arange(len(train)))
    got = train.gather(np.array([2, -1, 0]))
    for k in sequences.SEQUENCE_KEYS:
        np.testing.assert_array_equal(got[k][[0, 2]], full[k][[2, 0]])
        assert not got[k][1].any()
    with pytest.raises(IndexError, match=f"row {len(train)} of the train split"):
        train.gather(np.array([len(train)]))


def test_temporary_folder_goes_with_the_sequences(shared_data, tok):
    train, val, _ = prepare.prepare_dataset(
        _cfg(train_files=[str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")]), tok)
    folder = train.dir
    assert (folder / "tokens.npy").is_file() and (folder / "report.json").is_file()
    del train, val
    gc.collect()
    assert not folder.parent.exists()


def test_what_a_killed_prepare_left_is_removed(tmp_path, tok, shared_data):
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    d = _cfg(train_files=[str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")],
             dataset_prepared_path=str(tmp_path / "cache"))
    key = prepare.cache_key(prepare.data_config(d), tok)
    host = socket.gethostname()
    stale = tmp_path / "cache" / f"{key}.tmp-{host}-{dead}-0123abcd"
    alive = tmp_path / "cache" / f"{key}.tmp-{host}-{os.getpid()}-0123abcd"  # a running prepare's: kept
    other = tmp_path / "cache" / f"{key}.tmp-{host}x-{dead}-0123abcd"  # another host's: kept
    for p in (stale, alive, other):
        p.mkdir(parents=True)
        (p / "tokens.npy").write_bytes(b"half")
    prepare.prepare_dataset(d, tok)
    assert not stale.exists() and alive.exists() and other.exists()
    tmp_stale = pathlib.Path(tempfile.gettempdir()) / f"{prepare.TEMP_PREFIX}{dead}-zz"
    tmp_stale.mkdir(exist_ok=True)
    train, _, _ = prepare.prepare_dataset(_cfg(train_files=d.train_files), tok)
    assert not tmp_stale.exists() and train.dir.parent.name.startswith(f"{prepare.TEMP_PREFIX}{os.getpid()}-")


def test_cache_folder_is_complete_or_absent(tmp_path, tok, shared_data, monkeypatch):
    d = _cfg(train_files=[str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")],
             dataset_prepared_path=str(tmp_path / "cache"))

    def boom(*a, **kw):
        raise KeyboardInterrupt  # killed while packing

    monkeypatch.setattr(packed, "write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(d, tok)
    assert not any((tmp_path / "cache").iterdir())  # nothing half-written is left to be reused
    monkeypatch.undo()
    train, _, report = prepare.prepare_dataset(d, tok)
    assert report["cache"] == str(train.dir) and (train.dir / "report.json").is_file()
    again, _, report2 = prepare.prepare_dataset(d, tok)
    assert report2 == dict(report, reused=True) and "reused" not in report
    assert_same(again, train.gather(np.arange(len(train))))


def _peak_bytes(d, tok) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        prepare.prepare_dataset(d, tok)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_data(tmp_path, tok):
    """Python/numpy allocations (tracemalloc) of a prepare 8x larger stay within 1.5x: batches, not the data."""
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    _write_alpaca(small, 3000)
    _write_alpaca(big, 24000)
    kw = dict(packing=True, val_set_size=0.01, batch_records=1000, sequence_len=256)
    p_small = _peak_bytes(_cfg(train_files=[str(small)], **kw), tok)
    p_big = _peak_bytes(_cfg(train_files=[str(big)], **kw), tok)
    assert big.stat().st_size > 7 * small.stat().st_size
    assert p_big < 1.5 * p_small, (p_small, p_big)


def test_format_documents_is_the_tokenizers_own_encoding(tok):
    """The batched fast path equals ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)``: text
    that looks like a special token stays text."""
    texts = ["Hello world", "", "a </s> b <s> c", "  leading spaces\n\nand lines", "日本語のテキスト"]
    docs = formats.format_documents(texts, tok)
    for t, d in zip(texts, docs):
        ids = tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        want = [] if not t else [tok.bos_token_id] + ids + [tok.eos_token_id]
        assert d == want
    assert docs[2].count(tok.eos_token_id) == 1


def test_a_large_text_file_streams_in_pieces_framed_as_one_document(shared_data, tok, tmp_path, monkeypatch):
    f = shared_data / "corpus" / "tinyshakespeare" / "input.txt"
    text = f.read_text()
    pieces = list(sources.iter_text(f, piece_bytes=50_000))
    assert len(pieces) > 10 and "".join(p["text"] for p in pieces) == text
    assert pieces[0]["_source"] == f"{f}:1" and pieces[-1]["_last_piece"] and not pieces[0]["_last_piece"]
    assert all(p["_source"] == f"{f}:{text[:text.index(p['text'])].count(chr(10)) + 1}" for p in pieces[:5])
    monkeypatch.setattr(prepare, "TEXT_PIECE_BYTES", 50_000)
    stream = formats.format_text([text], tok)
    for packing in (False, True):
        d = _cfg(train_files=[str(f)], format="text", sequence_len=256, packing=packing, batch_records=4)
        train, _, report = prepare.prepare_dataset(d, tok)
        rows = train.gather(np.arange(len(train)))
        ids = rows["input_ids"][rows["segment_ids"] > 0]
        # one document: one bos, one eos, whatever the pieces
        assert (ids == tok.bos_token_id).sum() == 1 and (rows["target_ids"] == tok.eos_token_id).sum() == 1
        # each piece is tokenized on its own: the stream differs from the whole file's by at most a token a seam
        assert abs(report["train_supervised_tokens"] - (len(stream) - 1)) <= len(pieces)


def test_batches_gathered_from_the_folder_are_todays_batches(shared_data, tok):
    """The trainer's windows (epoch permutations, partial last window, a host's share) over the prepared folder
    equal those over the in-memory arrays: a resumed run sees the same batches as before."""
    from easytune.train import batches
    d = _cfg(train_files=[str(shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl")], format="text",
             sequence_len=64, packing=True, val_set_size=0.05, batch_records=50)
    train, val, _ = prepare.prepare_dataset(d, tok)
    ref_train, ref_val = reference(d, tok)
    train_cfg = defaults().train
    train_cfg.micro_batch_size, train_cfg.gradient_accumulation_steps, train_cfg.drop_last = 3, 2, False
    plan = batches.make_plan(len(train), train_cfg, dp=2)
    assert plan.num_sequences == len(ref_train["input_ids"])
    for step in (0, 1, plan.steps_per_epoch - 1, plan.steps_per_epoch, 2 * plan.steps_per_epoch + 1):
        for part in (slice(None), slice(3, 6)):
            got = batches.window_batches(train, plan, step, 7, part)
            want = batches.window_batches(ref_train, plan, step, 7, part)
            for g, w in zip(got, want, strict=True):
                for k in sequences.SEQUENCE_KEYS:
                    np.testing.assert_array_equal(g[k], w[k])
    for g, w in zip(batches.eval_batches(val, 4), batches.eval_batches(ref_val, 4), strict=True):
        for k in sequences.SEQUENCE_KEYS:
            np.testing.assert_array_equal(g[k], w[k])
