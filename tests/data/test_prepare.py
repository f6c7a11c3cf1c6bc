"""``easytune prepare`` and ``prepare_dataset`` end to end: raw files -> cleaned records -> sequences, the cache,
the report, ``--debug``, and one-line errors for bad input before anything compiles.

References: counts computed independently from the files (``csv``, ``sqlite3``, ``json``), the tokenizer's
own encoding, and the arrays of an uncached run.
"""

import csv
import json
import shutil
import sqlite3
import textwrap

import ml_collections
import numpy as np
import pytest

from easytune import cli
from easytune.data import formats, prepare, sequences, sources
from tests.data.test_sequences import check_invariants


@pytest.fixture(scope="module")
def tok_dir(llama2_tok_dir):
    return llama2_tok_dir


@pytest.fixture(scope="module")
def tok(llama2_tok):
    return llama2_tok


def _cfg(**kw):
    from easytune.config import defaults
    d = defaults().data
    d.val_set_size = 0
    d.sequence_len = 128
    for k, v in kw.items():
        node = d
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return d


def test_chinook_sql_to_completion_sequences(shared_data, tok):
    sql = shared_data / "raw" / "sql" / "Chinook_Sqlite.sql"
    cfg = _cfg(train_files=[str(sql)], sql_table="Artist", format="completion", text_template="Artist: {Name}",
               packing=True, **{"clean.dedup_exact": True})
    train, _, report = prepare.prepare_dataset(cfg, tok)
    db = sqlite3.connect(":memory:")
    db.executescript(sql.read_text(encoding="utf-8"))
    names = [r[0] for r in db.execute("SELECT Name FROM Artist ORDER BY ArtistId")]
    assert report["records_read"] == len(names) == 275
    assert report["records"] == report["examples"] == len({n.casefold() for n in names})
    # supervised tokens: every token after BOS of "Artist: NAME" + EOS, per the tokenizer's own encoding
    kept = list(dict.fromkeys(names))  # (no two Chinook artists differ only by case or punctuation)
    assert report["train_supervised_tokens"] == sum(len(tok(f"Artist: {n}", add_special_tokens=False)["input_ids"]) + 1
                                                    for n in kept)


def test_truthfulqa_csv_to_alpaca_with_phrase_filter(shared_data, tok):
    f = shared_data / "raw" / "csv" / "TruthfulQA.csv"
    cfg = _cfg(train_files=[str(f)], columns="instruction=Question,output=Best Answer", format="alpaca",
               **{"clean.phrases": "default"})
    _, _, report = prepare.prepare_dataset(cfg, tok)
    with open(f, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    from easytune.data import clean
    pattern = clean.phrase_pattern(clean.load_phrases("default"))
    hits = sum(bool(pattern.search(r["Question"] + "\n" + r["Best Answer"])) for r in rows)
    assert report["records_read"] == 817 and report["records"] == 817 - hits
    assert report["clean_steps"][0]["dropped"] == hits


def test_chat_jsonl_with_template_file(shared_data, tok, tmp_path):
    conv = json.loads((shared_data / "instruct" / "axolotl" / "conversation.json").read_text())
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps(conv) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                    {"role": "assistant", "content": "Hello"}]}) + "\n")
    tmpl = shared_data / "tokenizers" / "chat_templates" / "mistralrs_mistral.json"
    cfg = _cfg(train_files=[str(f)], format="chat", chat_template=str(tmpl), sequence_len=4096)
    train, _, report = prepare.prepare_dataset(cfg, tok)
    assert report["examples"] == 2 and report["train_truncated"] == 0
    # one trained EOS per assistant turn: 6 in the conversation, 1 in the short one
    trained_eos = int(((train["target_ids"] == tok.eos_token_id) & (train["loss_mask"] > 0)).sum())
    assert trained_eos == sum(m["from"] == "gpt" for m in conv["conversations"]) + 1


def test_cache_is_reused_and_invalidated(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(20)))
    cache = tmp_path / "cache"
    cfg = _cfg(train_files=[str(f)], format="completion", val_set_size=4, dataset_prepared_path=str(cache))
    a = prepare.prepare_dataset(cfg, tok)
    assert a[2]["cache"] and len(list(cache.iterdir())) == 1
    b = prepare.prepare_dataset(cfg, tok)  # from the cache
    for x, y in zip(a[:2], b[:2]):
        for k in sequences.SEQUENCE_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == y[k].dtype
    assert b[2]["train_supervised_tokens"] == a[2]["train_supervised_tokens"]
    cfg.val_set_size = 0  # an empty validation split round-trips through the cache too
    d = prepare.prepare_dataset(cfg, tok)
    assert prepare.prepare_dataset(cfg, tok)[1]["input_ids"].shape == d[1]["input_ids"].shape == (0, 128)
    cfg.sequence_len = 64  # a config change: a new entry
    prepare.prepare_dataset(cfg, tok)
    f.write_text(f.read_text() + json.dumps({"text": "one more"}) + "\n")  # a data change: a new entry
    c = prepare.prepare_dataset(cfg, tok)
    assert len(list(cache.iterdir())) == 4 and c[2]["records"] == 21


def _write_config(tmp_path, tok_dir, **data):
    lines = "\n".join(f"    c.data.{k} = {v!r}" for k, v in data.items())
    p = tmp_path / "cfg.py"
    p.write_text(textwrap.dedent(f'''
        """Test config: easytune train configs/cfg.py"""
        from easytune.config import defaults
        def get_config():
            c = defaults()
            c.method = "full"
            c.model.preset = "tiny"
            c.tokenizer.path = {str(tok_dir)!r}
            c.train.output_dir = {str(tmp_path / "run")!r}
            c.data.val_set_size = 0
        ''') + lines + "\n    return c\n")
    return p


def test_prepare_cli_report_and_debug(tmp_path, tok_dir, capsys):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("yes", "no", "yes")))
    cfg = _write_config(tmp_path, tok_dir, train_files=[str(f)], **{"clean.dedup_exact": True})
    assert cli.main(["prepare", str(cfg), "--debug", "--config.data.sequence_len=64"]) == 0
    out = capsys.readouterr().out
    assert "read:    3 records from 1 file(s): a.jsonl" in out
    assert "dedup_exact: 0 changed, 1 dropped (e.g. a.jsonl:3)" in out
    assert "train:   2 examples -> 2 sequences of 64 tokens" in out
    assert "tokens per example:" in out and f"cache:   {tmp_path / 'run' / 'prepared_data'}" in out
    # --debug: the prompt is masked (label -100, in brackets), the response and EOS carry their own ids
    assert "['<s>'(-100)]" in out
    assert "'</s>'(2)" in out


@pytest.mark.parametrize("name, content, data, match", [
        ("bad.jsonl", '{"text": "a"}\n{"text": "b",}\n', {}, r"bad\.jsonl:2: invalid JSON at line 2"),
        ("miss.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', {"format": "alpaca"},
         r"miss\.jsonl:2: missing required field 'output'"),
        ("dup.jsonl", '{"text": "As an AI language model, no."}\n', {"clean.phrases": "default"},
         r"no records left after cleaning: all 1 records of .*dup\.jsonl were dropped \(phrases\(drop\): 1\)"),
        ("t.sql", "INSERT INTO a (x) VALUES ('1');\n", {"sql_table": "b"},
         r"t\.sql: no INSERT rows for table 'b' \(data\.sql_table\); tables with INSERT rows: a"),
        ("q.csv", "Question\nq\n", {"columns": "instruction=Question,output=Answer"},
         r"q\.csv: no column 'Answer' \(available: Question\)"),
])
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, tok_dir, capsys, name, content, data, match):
    f = tmp_path / name
    f.write_text(content)
    cfg = _write_config(tmp_path, tok_dir, train_files=[str(f)], **{"format": "completion", **data})
    assert cli.main(["prepare", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("easytune: error: ") and err[1].startswith("(set EASYTUNE_DEBUG=1")
    import re
    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override, key", [
        ("data.excess_length_strategy=cut", "data.excess_length_strategy"),
        ("data.format=sharegpt", "data.format"),
        ("data.clean.phrase_action=delete", "data.clean.phrase_action"),
        ("data.clean.unicode_normalization=NFX", "data.clean.unicode_normalization"),
        ("data.clean.near_dup_threshold=1.5", "data.clean.near_dup_threshold"),
        ("data.clean.phrase_files=/nope/list.txt", "data.clean.phrase_files"),
        ("data.chat_template=/nope/template.jinja", "data.chat_template"),
])
def test_bad_data_keys_are_config_errors_naming_the_key(tmp_path, tok_dir, override, key):
    from easytune import config as config_lib
    from easytune import config_check
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x"}\n')
    c = config_lib.load_config(_write_config(tmp_path, tok_dir, train_files=[str(f)]))
    config_check.validate(c)
    config_lib.apply_overrides(c, [override])
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}'"):
        config_check.validate(c)


# ------------------------------------------------------------------ prepare_dataset on partial configs


@pytest.fixture(scope="module")
def llama_tok(shared_data, tmp_path_factory):
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("llama2_tok")
    shutil.copy(shared_data / "tokenizers" / "llama2" / "tokenizer.model", d / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(d))


def _partial_cfg(**kw):
    """A ``config.data`` holding only some keys (the others take their defaults in ``prepare_dataset``)."""
    d = dict(train_files="", format="alpaca", val_set_size=0.1, sequence_len=256, packing=True,
                      train_on_inputs=False, seed=0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


def test_prepare_dataset_alpaca_report_is_consistent(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    cfg = _partial_cfg(train_files=f + ", " + f.replace("alpaca_tiny", "alpaca_t*ny"))  # comma string; file read once
    train, val, report = prepare.prepare_dataset(cfg, llama_tok)
    check_invariants(train, 256)
    check_invariants(val, 256)
    assert report["records"] == report["examples"] == 100
    assert (report["train_examples"], report["val_examples"]) == (90, 10)
    assert report["train_sequences"] == train["input_ids"].shape[0] < 90   # packed
    assert report["val_supervised_tokens"] == sequences.count_supervised_tokens(val)
    # Supervised tokens: the output + eos tokens that survive truncation to T + 1 = 257 tokens.
    examples = formats.format_records(sources.read_records([f]), "alpaca", llama_tok)
    assert report["train_truncated"] + report["val_truncated"] == sequences.num_truncated(examples, 256) > 0
    assert report["train_supervised_tokens"] + report["val_supervised_tokens"] == sum(
            sum(ex["loss_mask"][1:257]) for ex in examples)
    # Unpacked: one row per example, same supervision.
    train_u, val_u, report_u = prepare.prepare_dataset(_partial_cfg(train_files=[f], packing=False), llama_tok)
    assert report_u["train_sequences"] == 90 and report_u["val_sequences"] == 10
    assert report_u["train_supervised_tokens"] == report["train_supervised_tokens"]


def test_prepare_dataset_text_trains_on_every_token(shared_data, llama_tok):
    f = shared_data / "corpus" / "tinystories" / "tinystories_sample.txt"
    cfg = _partial_cfg(train_files=[str(f)], format="text", val_set_size=0, sequence_len=64)
    train, val, report = prepare.prepare_dataset(cfg, llama_tok)
    stream = formats.format_text([f.read_text()], llama_tok)
    assert report["tokens"] >= len(stream) and val["input_ids"].shape[0] == 0
    assert report["train_supervised_tokens"] == len(stream) - 1
    # split_train_val shuffles rows; every row is a contiguous slice of the stream.
    rows = sorted(train["input_ids"][:, 0].tolist())
    assert rows == sorted(stream[i] for i in range(0, len(stream) - 1, 64))


def test_prepare_dataset_text_format_reads_jsonl_documents(shared_data, llama_tok):
    f = str(shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl")
    texts = [r["text"] for r in sources.read_records([f])]
    train, _, report = prepare.prepare_dataset(_partial_cfg(train_files=[f], format="text", val_set_size=0,
                                                     sequence_len=512, packing=False), llama_tok)
    stream = formats.format_text(texts, llama_tok)
    assert report["train_supervised_tokens"] == len(stream) - 1
    assert (train["segment_ids"] > 0).sum() == len(stream) - 1
    # packed: each document cut on its own, so each one's first token (its <s>) is no target
    train, _, report = prepare.prepare_dataset(_partial_cfg(train_files=[f], format="text", val_set_size=0,
                                                     sequence_len=512, packing=True), llama_tok)
    docs = [t for t in texts if t]
    assert report["train_supervised_tokens"] == len(stream) - len(docs)
    with pytest.raises(ValueError, match=r"c4_demo\.jsonl:1: missing required field 'content'"):
        prepare.prepare_dataset(_partial_cfg(train_files=[f], format="text", text_field="content"), llama_tok)


def test_prepare_dataset_accepts_plain_dict_and_whole_config(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    plain = dict(_partial_cfg(train_files=[f], val_set_size=5).to_dict())
    whole = ml_collections.ConfigDict({"data": _partial_cfg(train_files=[f], val_set_size=5).to_dict()})
    a = prepare.prepare_dataset(plain, llama_tok)
    b = prepare.prepare_dataset(whole, llama_tok)
    assert a[2] == b[2] and a[2]["val_examples"] == 5
    np.testing.assert_array_equal(a[0]["input_ids"], b[0]["input_ids"])


def test_prepare_dataset_errors_name_the_file(tmp_path, llama_tok):
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing required field 'output'"):
        prepare.prepare_dataset(_partial_cfg(train_files=[str(f)]), llama_tok)
    with pytest.raises(FileNotFoundError, match=r"nope\*\.jsonl"):
        prepare.prepare_dataset(_partial_cfg(train_files=[str(tmp_path / "nope*.jsonl")]), llama_tok)


def test_sequence_len_shorter_than_every_prompt_is_an_error(shared_data, llama_tok):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    examples = formats.format_records(sources.read_records([f]), "alpaca", llama_tok)
    T = 16
    train, _ = sequences.split_train_val(examples, 0.1, seed=0)
    prompts = sorted(ex["loss_mask"].index(1) for ex in train)
    assert prompts[0] > T  # every example keeps only prompt tokens after truncation
    median = float(np.median(prompts))
    with pytest.raises(ValueError, match=rf"0 supervised tokens: data\.sequence_len = {T} .*longest {prompts[-1]} "
                                         rf"tokens, median {median:g} tokens.*larger") as info:
        prepare.prepare_dataset(_partial_cfg(train_files=[f], sequence_len=T), llama_tok)
    assert "data.val_set_size" not in str(info.value)


def test_mostly_truncated_data_warns_with_count_and_key(shared_data, llama_tok, caplog):
    f = str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")
    with caplog.at_level("WARNING", logger="easytune.data.prepare"):
        _, _, report = prepare.prepare_dataset(_partial_cfg(train_files=[f], sequence_len=64), llama_tok)
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
        prepare.prepare_dataset(_partial_cfg(train_files=[str(empty)]), llama_tok)
    null = tmp_path / "null.jsonl"
    null.write_text('{"instruction": "a", "output": null}\n')
    with pytest.raises(ValueError, match=r"null\.jsonl:1: required field 'output' is null"):
        prepare.prepare_dataset(_partial_cfg(train_files=[str(null)]), llama_tok)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: file is not valid UTF-8"):
        prepare.prepare_dataset(_partial_cfg(train_files=[str(latin)]), llama_tok)
