"""Pretraining data: documents framed <s> ... </s>, packed without crossing documents, the validation tail held out
in order, bits per byte, and the ``pretrain`` method's config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from easytune import config as config_lib
from easytune import config_check
from easytune.data import formats, prepare

DOCS = ["The first document is short.", "A second one, a little longer than the first, to span rows.",
        "Third."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from easytune import tokenizer as tok_lib
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("\n".join(DOCS * 50), encoding="utf-8")
    tok_lib.train_and_save([str(root / "c.txt")], root / "tok", 300, "bpe")
    return AutoTokenizer.from_pretrained(str(root / "tok"))


def test_each_document_framed_with_bos_and_eos(tok):
    stream = formats.format_text(DOCS, tok)
    want = []
    for d in DOCS:  # Llama's pretraining framing, built here from the tokenizer directly
        want += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stream == want
    assert stream.count(tok.bos_token_id) == len(DOCS)


def _data_cfg(path, **kw):
    c = config_lib.defaults().data
    c.train_files, c.format, c.sequence_len, c.val_set_size = [str(path)], "text", 8, 0
    for k, v in kw.items():
        c[k] = v
    return c


def test_packed_text_never_crosses_documents(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "{d}"}}\n' for d in DOCS), encoding="utf-8")
    train, _, report = prepare.prepare_dataset(_data_cfg(path, packing=True), tok)
    assert report["packing"] is True
    bos = tok.bos_token_id
    for r in range(len(train["input_ids"])):
        ids, seg, pos = train["input_ids"][r], train["segment_ids"][r], train["positions"][r]
        for t in range(1, len(ids)):
            if seg[t] and seg[t] == seg[t - 1]:
                assert ids[t] != bos  # a document starts only at a segment start
                assert pos[t] == pos[t - 1] + 1
    # every document's tokens are supervised exactly once (all targets but each document's first token)
    n_doc_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 2 for d in DOCS)
    assert report["train_supervised_tokens"] == n_doc_tokens - len(DOCS)
    # unpacked, the same stream crosses documents inside a row
    flat, _, _ = prepare.prepare_dataset(_data_cfg(path, packing=False), tok)
    assert (flat["segment_ids"] <= 1).all() and (flat["input_ids"][:, 1:] == bos).any()


def test_text_validation_is_the_tail_in_order(tok, tmp_path):
    path = tmp_path / "one.txt"
    text = " ".join(f"line {i}." for i in range(300))
    path.write_text(text, encoding="utf-8")
    train, val, report = prepare.prepare_dataset(_data_cfg(path, val_set_size=3), tok)
    stream = formats.format_text([text], tok)
    n = math.ceil((len(stream) - 1) / 8)
    assert len(train["input_ids"]) == n - 3 and len(val["input_ids"]) == 3
    # the validation rows are the last rows of the stream, in order
    np.testing.assert_array_equal(val["input_ids"][0], stream[(n - 3) * 8:(n - 2) * 8])
    # bits per byte denominator: the UTF-8 bytes of the supervised validation targets (ASCII text here)
    targets = val["target_ids"][val["loss_mask"] > 0].tolist()
    assert report["val_bytes"] == len(tok.decode(targets, skip_special_tokens=True).encode("utf-8"))


def test_pretrain_config_checks(tmp_path):
    c = config_lib.defaults()
    c.method, c.model.preset, c.data.builtin = "pretrain", "tiny", "quickstart"
    with pytest.raises(config_lib.ConfigError, match="'data.format'.*'text'"):
        config_check.validate(c)
    c.data.format = "text"
    config_check.validate(c)
    c.model.config_overrides = "hidden_size=96,num_hidden_layers=3"
    config_check.validate(c)
    assert config_lib.parse_config_overrides(c.model.config_overrides) == {"hidden_size": 96,
                                                                           "num_hidden_layers": 3}
    for bad, msg in (("hidden=96", "did you mean hidden_size"), ("hidden_size", "name=value"),
                     ("num_hidden_layers=-2", "positive number")):
        c.model.config_overrides = bad
        with pytest.raises(config_lib.ConfigError, match=f"model.config_overrides.*{msg}"):
            config_check.validate(c)
