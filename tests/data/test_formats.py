"""Formats: Alpaca prompt + masking on the real Llama 2 tokenizer and real Alpaca files (easytune/data/formats.py).

References: the ``text`` column of torchtune's ``alpaca_tiny.json`` (the first 100 records of tatsu-lab/alpaca,
rendered by the Alpaca authors) for the template; the Llama 2 SentencePiece tokenizer's own encoding of the
full text for the ids (Stanford Alpaca ``train.py`` tokenizes the full text and masks the prompt's length).
"""

import shutil

import pytest

from easytune.data import formats, sources

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def llama_dir(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("llama2_tok")
    shutil.copy(shared_data / "tokenizers" / "llama2" / "tokenizer.model", d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def llama_tok(llama_dir):
    from transformers import LlamaTokenizer

    # transformers 5: LlamaTokenizer(vocab_file=...) gives an empty vocab; from_pretrained(dir) works.
    tok = LlamaTokenizer.from_pretrained(str(llama_dir))
    assert len(tok) == 32000 and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    return tok


@pytest.fixture(scope="module")
def alpaca_tiny(shared_data):
    return sources.read_records([str(shared_data / "instruct" / "torchtune" / "alpaca_tiny.json")])


def _enc(tok, text):
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids


def test_prompt_matches_alpaca_rendered_text(alpaca_tiny):
    # Both template variants occur: 46 of the 100 records have an input.
    assert 0 < sum(bool(r["input"]) for r in alpaca_tiny) < len(alpaca_tiny)
    for r in alpaca_tiny:
        assert formats.alpaca_prompt(r) + r["output"] == r["text"], r["_source"]


def test_system_replaces_the_preamble():
    r = {"system": "You are terse.", "instruction": "Say hi.", "_source": "x:1"}
    assert formats.alpaca_prompt(r) == "You are terse.\n\n### Instruction:\nSay hi.\n\n### Response:\n"


def test_alpaca_ids_equal_full_text_encoding_and_mask_covers_output(alpaca_tiny, llama_tok):
    stats = {}
    examples = formats.format_records(alpaca_tiny, "alpaca", llama_tok, stats=stats)
    assert stats["seam_fallbacks"] == 0
    for r, ex in zip(alpaca_tiny, examples):
        ids, mask = ex["input_ids"], ex["loss_mask"]
        assert len(ids) == len(mask)
        # The ids are exactly the tokenizer's own encoding of the rendered text, between BOS and EOS.
        assert ids == [BOS] + _enc(llama_tok, r["text"]) + [EOS], r["_source"]
        assert ids.count(BOS) == 1 and ids[-1] == EOS
        # The mask is one contiguous span at the end; its tokens decode to exactly output + eos.
        first = mask.index(1)
        assert mask == [0] * first + [1] * (len(mask) - first)
        supervised = ids[first:]
        assert llama_tok.decode(supervised, clean_up_tokenization_spaces=False) == r["output"] + "</s>", r["_source"]
        # And the prompt part is the tokenizer's encoding of the prompt alone.
        assert ids[1:first] == _enc(llama_tok, formats.alpaca_prompt(r))


def test_alpaca_llama_factory_demo_has_no_seam_fallback(shared_data, llama_tok):
    records = sources.read_records([str(shared_data / "instruct" / "llama_factory" / "alpaca_en_demo.json")])
    stats = {}
    examples = formats.format_records(records, "alpaca", llama_tok, stats=stats)
    assert len(examples) == len(records) == 999 and stats["seam_fallbacks"] == 0
    for r, ex in zip(records[:200], examples):
        first = ex["loss_mask"].index(1)
        assert llama_tok.decode(ex["input_ids"][first:-1], clean_up_tokenization_spaces=False) == r["output"]


def test_train_on_inputs_trains_all_but_the_first_token(alpaca_tiny, llama_tok):
    examples = formats.format_records(alpaca_tiny[:10], "alpaca", llama_tok, train_on_inputs=True)
    plain = formats.format_records(alpaca_tiny[:10], "alpaca", llama_tok)
    for ex, ref in zip(examples, plain):
        assert ex["input_ids"] == ref["input_ids"]
        assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)


def test_bos_never_doubled_when_the_tokenizer_adds_it(llama_dir, llama_tok, alpaca_tiny):
    from transformers import LlamaTokenizer

    adding = LlamaTokenizer.from_pretrained(str(llama_dir), add_bos_token=True)
    assert adding("Hi").input_ids[0] == BOS  # this one adds BOS itself
    a = formats.format_records(alpaca_tiny[:5], "alpaca", adding)
    b = formats.format_records(alpaca_tiny[:5], "alpaca", llama_tok)
    assert a == b and all(ex["input_ids"].count(BOS) == 1 for ex in a)


def test_special_token_text_in_data_is_not_an_eos(llama_tok):
    r = {"instruction": "Print it.", "output": "a </s> b", "_source": "x.jsonl:1"}
    [ex] = formats.format_records([r], "alpaca", llama_tok)
    assert ex["input_ids"].count(EOS) == 1 and ex["input_ids"][-1] == EOS


@pytest.mark.parametrize("record, field", [
        ({"input": "x", "output": "y"}, "instruction"),
        ({"instruction": "x"}, "output"),
        ({"instruction": "x", "output": "  "}, "output"),
        ({"instruction": "", "output": "y"}, "instruction"),
])
def test_missing_or_empty_field_names_provenance_and_field(record, field, llama_tok):
    record = dict(record, _source="data/train.jsonl:17")
    with pytest.raises(ValueError, match=rf"data/train\.jsonl:17: .*'{field}'"):
        formats.format_records([record], "alpaca", llama_tok)


def test_error_from_a_real_file_names_its_line(tmp_path, llama_tok):
    f = tmp_path / "train.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outptu": "d"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:2: missing required field 'output'"):
        formats.format_records(sources.read_records([str(f)]), "alpaca", llama_tok)


def test_non_string_field_is_rejected(llama_tok):
    with pytest.raises(ValueError, match=r"x:3: field 'output' must be a string"):
        formats.format_records([{"instruction": "a", "output": 5, "_source": "x:3"}], "alpaca", llama_tok)


def test_completion_on_real_c4_records(shared_data, llama_tok):
    records = sources.read_records([str(shared_data / "corpus" / "llama_factory_pretrain" / "c4_demo.jsonl")])[:20]
    examples = formats.format_records(records, "completion", llama_tok)
    for r, ex in zip(records, examples):
        assert ex["input_ids"] == [BOS] + _enc(llama_tok, r["text"]) + [EOS]
        assert ex["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)


def test_completion_text_field_is_configurable(llama_tok):
    records = [{"content": "Hello world", "_source": "c.jsonl:1"}]
    [ex] = formats.format_records(records, "completion", llama_tok, text_field="content")
    assert ex["input_ids"] == [BOS] + _enc(llama_tok, "Hello world") + [EOS]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: missing required field 'text'"):
        formats.format_records(records, "completion", llama_tok)


def test_format_text_separates_documents_with_eos(shared_data, llama_tok):
    story = (shared_data / "corpus" / "tinystories" / "tinystories_sample.txt").read_text()
    docs = [story, "Second document.", ""]
    stream = formats.format_text(docs, llama_tok)
    a, b = _enc(llama_tok, story), _enc(llama_tok, "Second document.")
    assert stream == [BOS] + a + [EOS] + [BOS] + b + [EOS]  # each framed as Llama's; empty ones skipped


def test_unknown_format_is_rejected(llama_tok):
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'"):
        formats.format_records([], "sharegpt", llama_tok)


class _MergingTokenizer:
    """Character tokenizer that merges "\\nX" into one token: a BPE merge across the prompt/response seam."""

    bos_token_id, eos_token_id = 1, 2

    def _ids(self, text):
        out, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "\nX":
                out.append(1000)
                i += 2
            else:
                out.append(ord(text[i]) + 3)
                i += 1
        return out

    def __call__(self, texts, add_special_tokens=False, split_special_tokens=False, verbose=True):
        return {"input_ids": [self._ids(t) for t in texts]}


def test_seam_merge_falls_back_to_separate_response_tokenization():
    tok = _MergingTokenizer()
    r = {"instruction": "go", "output": "Xy", "_source": "m:1"}
    stats = {}
    [ex] = formats.format_records([r], "alpaca", tok, stats=stats)
    assert stats["seam_fallbacks"] == 1
    prompt = tok._ids(formats.alpaca_prompt(r))
    assert ex["input_ids"] == [1] + prompt + tok._ids("Xy") + [2]
    assert ex["loss_mask"] == [0] * (1 + len(prompt)) + [1, 1, 1]


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_null_required_field_says_null_not_missing(field, llama_tok):
    record = {"instruction": "a", "output": "b", "_source": "data/train.jsonl:4", field: None}
    with pytest.raises(ValueError, match=rf"data/train\.jsonl:4: required field '{field}' is null") as info:
        formats.format_records([record], "alpaca", llama_tok)
    assert "missing" not in str(info.value)
    # A null optional field still means "absent".
    formats.format_records([{"instruction": "a", "input": None, "output": "b", "_source": "x:1"}], "alpaca", llama_tok)
