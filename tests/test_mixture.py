"""The sources of a data mixture: ``data.datasets`` entries (axolotl names, format aliases, weight / num_samples)
resolved against the ``data.*`` keys, and bad entries refused naming ``data.datasets[i]``."""

from __future__ import annotations

import pytest

from easytune import config as config_lib
from easytune import mixture


def test_dataset_sources_of_a_single_source_are_the_data_keys():
    d = config_lib.defaults().data
    d.train_files = ["a.jsonl", "b/*.jsonl"]
    d.format, d.columns, d.train_on_inputs = "chat", "messages=conv", True
    (src,) = mixture.dataset_sources(d)
    assert set(src) == set(mixture.SOURCE_KEYS) | set(mixture.MIXTURE_KEYS)
    assert {k: src[k] for k in mixture.SOURCE_KEYS} == {k: d[k] for k in mixture.SOURCE_KEYS}
    assert (src["weight"], src["num_samples"], src["name"]) == (None, None, "")
    assert type(src["train_files"]) is list and src["train_files"] == ["a.jsonl", "b/*.jsonl"]
    # a partial mapping takes the defaults of the keys it lacks
    assert mixture.dataset_sources({"train_files": ["a.jsonl"]})[0]["format"] == "alpaca"


def test_dataset_sources_of_a_mixture_with_axolotl_names():
    d = config_lib.defaults().data
    d.role_map, d.csv_delimiter = "human=user", ";"  # inherited by entries that do not set them
    d.datasets = [dict(path="chats/*.jsonl", type="sharegpt", weight=0.5, role_map={"gpt": "assistant"}),
                  dict(train_files="b.jsonl, c.jsonl", format="completion", field="body", num_samples=100),
                  {"train_files": ["d.csv"], "type": "chat_template.default", "name": "extra",
                   "roles_to_train": "assistant,tool", "train_on_inputs": True}]
    a, b, e = mixture.dataset_sources(d)
    assert (a["train_files"], a["format"], a["weight"], a["num_samples"], a["name"]) == (
        ["chats/*.jsonl"], "chat", 0.5, None, "chats")
    assert a["role_map"] == "gpt=assistant" and a["csv_delimiter"] == ";"
    assert (b["train_files"], b["format"], b["text_field"], b["weight"], b["num_samples"], b["name"]) == (
        ["b.jsonl", "c.jsonl"], "completion", "body", None, 100, "b")
    assert b["role_map"] == "human=user"
    assert (e["format"], e["roles_to_train"], e["train_on_inputs"], e["weight"], e["name"]) == (
        "chat", ["assistant", "tool"], True, 1.0, "extra")
    assert all(isinstance(s["weight"], float) for s in (a, e))


@pytest.mark.parametrize("name, want", [("alpaca", "alpaca"), ("chat", "chat"), ("sharegpt", "chat"),
                                        ("chat_template", "chat"), ("Completion", "completion"), ("text", "text"),
                                        ("pretrain", "text"), ("pretokenized", "pretokenized")])
def test_dataset_source_format_aliases(name, want):
    d = config_lib.defaults().data
    d.datasets = [dict(train_files=["a.jsonl"], type=name)]
    assert mixture.dataset_sources(d)[0]["format"] == want


@pytest.mark.parametrize("entries, match", [
    ([dict(train_files=["a.jsonl"], wieght=2.0)], r"data\.datasets\[0\]': unknown key 'wieght'; did you mean "
                                                  r"weight\? valid keys: train_files, format, .*num_samples, name"),
    ([dict(train_files=["a.jsonl"]), dict(format="alpaca")], r"data\.datasets\[1\]': no train_files \(or path\)"),
    ([dict(train_files=["a.jsonl"], weight=0.5, num_samples=10)], r"data\.datasets\[0\]': give weight .* not both"),
    ([dict(train_files=["a.jsonl"], weight=0)], r"data\.datasets\[0\]\.weight': must be a number > 0"),
    ([dict(train_files=["a.jsonl"], weight="half")], r"data\.datasets\[0\]\.weight'"),
    ([dict(train_files=["a.jsonl"], num_samples=0)], r"data\.datasets\[0\]\.num_samples': must be an int >= 1"),
    ([dict(train_files=["a.jsonl"], num_samples=2.5)], r"data\.datasets\[0\]\.num_samples'"),
    ([dict(train_files=["a.jsonl"]), dict(path="b.jsonl", type="alpaca_chat")],
     r"data\.datasets\[1\]\.format': unknown format 'alpaca_chat'; use one of alpaca, chat"),
    ([dict(train_files=["a.jsonl"], path="b.jsonl")], r"data\.datasets\[0\]': 'train_files' and 'path' both give"),
    ([dict(train_files=["a.jsonl", ""])], r"data\.datasets\[0\]\.train_files': must be a list of non-empty strings"),
    ([dict(train_files=["a.jsonl"], train_on_inputs="yes")], r"data\.datasets\[0\]\.train_on_inputs'"),
    ([dict(train_files=["a.jsonl"], text_field=3)], r"data\.datasets\[0\]\.text_field': must be a string"),
    ([dict(train_files=["x/a.jsonl"]), dict(train_files=["y/a.jsonl"])],
     r"data\.datasets\[1\]\.name': 'a' already names data\.datasets\[0\]"),
    (["a.jsonl"], r"data\.datasets\[0\]': must be a dict"),
])
def test_dataset_sources_refuse_bad_entries(entries, match):
    d = config_lib.defaults().data
    d.datasets = entries
    with pytest.raises(config_lib.ConfigError, match=match):
        mixture.dataset_sources(d)


def test_train_files_beside_datasets_is_refused():
    d = config_lib.defaults().data
    d.train_files, d.datasets = ["a.jsonl"], [dict(train_files=["b.jsonl"])]
    with pytest.raises(config_lib.ConfigError, match=r"data\.train_files': set it .* or data\.datasets .*not both"):
        mixture.dataset_sources(d)
