"""``easytune prepare`` and ``prepare_dataset`` end to end: raw files -> cleaned records -> sequences, the cache,
the report, ``--debug``, and one-line errors for bad input before anything compiles.

References: counts computed independently from the files (``csv``, ``sqlite3``, ``json``), the tokenizer's
own encoding, and the arrays of an uncached run.
"""

import csv
import json
import sqlite3
import textwrap

import numpy as np
import pytest

from easytune import cli
from easytune.data import pipeline


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
    cfg = _cfg(train_files=str(sql), sql_table="Artist", format="completion", text_template="Artist: {Name}",
               packing=True, **{"clean.dedup_exact": True})
    train, _, report = pipeline.prepare_dataset(cfg, tok)
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
    cfg = _cfg(train_files=str(f), columns="instruction=Question,output=Best Answer", format="alpaca",
               **{"clean.phrases": "default"})
    _, _, report = pipeline.prepare_dataset(cfg, tok)
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
    cfg = _cfg(train_files=str(f), format="chat", chat_template=str(tmpl), sequence_len=4096)
    train, _, report = pipeline.prepare_dataset(cfg, tok)
    assert report["examples"] == 2 and report["train_truncated"] == 0
    # one trained EOS per assistant turn: 6 in the conversation, 1 in the short one
    trained_eos = int(((train["target_ids"] == tok.eos_token_id) & (train["loss_mask"] > 0)).sum())
    assert trained_eos == sum(m["from"] == "gpt" for m in conv["conversations"]) + 1


def test_cache_is_reused_and_invalidated(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(20)))
    cache = tmp_path / "cache"
    cfg = _cfg(train_files=str(f), format="completion", val_set_size=4, dataset_prepared_path=str(cache))
    a = pipeline.prepare_dataset(cfg, tok)
    assert a[2]["cache"] and len(list(cache.iterdir())) == 1
    b = pipeline.prepare_dataset(cfg, tok)  # from the cache
    for x, y in zip(a[:2], b[:2]):
        for k in pipeline.SEQUENCE_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == y[k].dtype
    assert b[2]["train_supervised_tokens"] == a[2]["train_supervised_tokens"]
    cfg.val_set_size = 0  # an empty validation split round-trips through the cache too
    d = pipeline.prepare_dataset(cfg, tok)
    assert pipeline.prepare_dataset(cfg, tok)[1]["input_ids"].shape == d[1]["input_ids"].shape == (0, 128)
    cfg.sequence_len = 64  # a config change: a new entry
    pipeline.prepare_dataset(cfg, tok)
    f.write_text(f.read_text() + json.dumps({"text": "one more"}) + "\n")  # a data change: a new entry
    c = pipeline.prepare_dataset(cfg, tok)
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
    cfg = _write_config(tmp_path, tok_dir, train_files=str(f), **{"clean.dedup_exact": True})
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
    cfg = _write_config(tmp_path, tok_dir, train_files=str(f), **{"format": "completion", **data})
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
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x"}\n')
    c = config_lib.load_config(_write_config(tmp_path, tok_dir, train_files=str(f)))
    config_lib.validate(c)
    config_lib.apply_overrides(c, [override])
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}'"):
        config_lib.validate(c)
