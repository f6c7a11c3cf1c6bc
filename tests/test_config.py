"""Configs: every shipped recipe loads and validates; bad keys and values are rejected naming the key."""

from __future__ import annotations

import pathlib

import pytest

from easytune import cli, config_check, mixture
from easytune import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    c = config_lib.load_config(path)
    assert c.method in config_lib.METHODS
    doc = (path.read_text().split('"""')[1])
    assert f"easytune train configs/{path.name}" in doc, "each recipe's docstring gives the command to run it"


def test_quickstart_validates():
    config_check.validate(config_lib.load_config(REPO / "configs" / "quickstart.py"))


@pytest.mark.parametrize("override, key", [
    ("lora.r=0", "lora.r"),
    ("lora.lora_dropout=1.5", "lora.lora_dropout"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("optim.lr_scheduler=cosinus", "optim.lr_scheduler"),
    ("mesh.fsdp=0", "mesh.fsdp"),
    ("method=dpo", "method"),
    ("lora.target_modules=(q", "lora.target_modules"),
    ("optim.adam_beta2=1.5", "optim.adam_beta2"),
])
def test_invalid_values_name_the_key(override, key):
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    c.method = "lora"
    config_lib.apply_overrides(c, [override])
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_check.validate(c)


def test_unknown_key_suggests_close_match():
    c = config_lib.defaults()
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'lora\.rank'.*lora\.r"):
        config_lib.apply_overrides(c, ["--config.lora.rank=8"])
    with pytest.raises(config_lib.ConfigError, match="train.micro_batch_size"):
        config_lib.apply_overrides(c, ["--config.train.micro_batch_size=two"])


def test_missing_data_file_is_named(tmp_path):
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    c.data.builtin = ""
    c.data.train_files = [str(tmp_path / "nope.jsonl")]
    c.tokenizer.path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"tokenizer\.path.*holds no tokenizer"):
        config_check.validate(c)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(config_lib.ConfigError, match=r"data\.train_files.*nope\.jsonl"):
        config_check.validate(c)


def test_get_config_must_return_configdict(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'method': 'lora'}\n")
    with pytest.raises(config_lib.ConfigError, match="must return an ml_collections.ConfigDict"):
        config_lib.load_config(bad)


def test_cli_reports_config_errors_without_traceback(capsys):
    rc = cli.main(["train", str(REPO / "configs" / "quickstart.py"), "--config.lora.rr=4"])
    assert rc == 2
    assert "unknown config key 'lora.rr'" in capsys.readouterr().err


def test_cli_rejects_target_modules_matching_nothing(tmp_path, capsys):
    from tests.helpers import save_tiny_hf_llama
    model_dir = tmp_path / "m"
    save_tiny_hf_llama(model_dir)
    rc = cli.main(["modules", str(model_dir), "--target-modules", "qkv_proj"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "matches no linear module" in err and "q_proj" in err
    assert cli.main(["modules", str(model_dir), "--target-modules", "q_proj,v_proj"]) == 0
    out = capsys.readouterr().out
    assert out.count("<- LoRA target") == 4 and "model.layers.0.self_attn.q_proj.weight" in out


def test_list_keys_are_lists_and_take_the_comma_form_from_the_command_line():
    c = config_lib.defaults()
    for key in config_lib.LIST_KEYS:  # every list key holds a list in defaults()
        node = c
        for part in key.split("."):
            node = node[part]
        assert isinstance(node, list), key
    config_lib.apply_overrides(c, ["--config.data.train_files=a.jsonl, b/*.jsonl", "--config.data.clean.fields=output",
                                   "--config.lora.modules_to_save=['lm_head']", "--config.data.roles_to_train="])
    assert c.data.train_files == ["a.jsonl", "b/*.jsonl"] and c.data.clean.fields == ["output"]
    assert c.lora.modules_to_save == ["lm_head"] and c.data.roles_to_train == []
    config_lib.apply_overrides(c, ["--config.data.train_files=['x,y.jsonl']"])  # a literal keeps a comma in a path
    assert c.data.train_files == ["x,y.jsonl"]


@pytest.mark.parametrize("value, want", [
    ("all-linear", "all-linear"), ("q_proj,v_proj", ["q_proj", "v_proj"]), ("q_proj", ["q_proj"]),
    (["q_proj"], ["q_proj"]), (("k_proj", "o_proj"), ["k_proj", "o_proj"]),
    (r"model\.layers\.[01]\.mlp\.(up|down)_proj", r"model\.layers\.[01]\.mlp\.(up|down)_proj"),
    (r"model\.layers\.\d{1,2}\.q_proj", r"model\.layers\.\d{1,2}\.q_proj"),  # a regex with a comma stays one
])
def test_target_modules_forms(value, want):
    from easytune import lora as lora_lib
    assert config_lib.target_modules_value(value) == want
    c = config_lib.defaults()
    c.lora.target_modules = value
    assert lora_lib.parse_target_modules(c.lora.target_modules) == lora_lib.parse_target_modules(want)
    if isinstance(value, str):
        config_lib.apply_overrides(c, [f"--config.lora.target_modules={value}"])
        assert c.lora.target_modules == want


def test_old_run_config_with_comma_strings_loads_and_compares_equal():
    old = {"method": "lora", "lora": {"target_modules": "q_proj,v_proj", "modules_to_save": ""},
           "qlora": {"llm_int8_skip_modules": "lm_head"}, "model": {"remat": False},
           "data": {"train_files": "a.jsonl,b.jsonl", "roles_to_train": "assistant",
                    "clean": {"phrase_files": "", "fields": "output"}}}  # written before lists (and some keys)
    c = config_lib.with_defaults(old)
    assert c.data.train_files == ["a.jsonl", "b.jsonl"] and c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.lora.modules_to_save == [] and c.qlora.llm_int8_skip_modules == ["lm_head"]
    assert c.data.roles_to_train == ["assistant"] and c.data.clean.fields == ["output"]
    assert c.data.sequence_len == config_lib.defaults().data.sequence_len  # a key the old file lacks
    flat_old = {"data.train_files": "a.jsonl,b.jsonl", "lora.target_modules": "q_proj,v_proj", "model.remat": False,
                "data.clean.phrase_files": ""}
    flat_now = {"data.train_files": ["a.jsonl", "b.jsonl"], "lora.target_modules": ["q_proj", "v_proj"],
                "model.remat": "none", "data.clean.phrase_files": []}
    assert config_lib.canonical_flat(flat_old) == config_lib.canonical_flat(flat_now)
    assert config_lib.with_defaults({"train_files": "a.jsonl"}, "data").train_files == ["a.jsonl"]
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'data\.trian_files'.*data\.train_files"):
        config_lib.with_defaults({"data": {"trian_files": "a.jsonl"}})


def test_recipe_giving_a_list_key_a_string_is_a_config_error(tmp_path):
    bad = tmp_path / "old.py"
    bad.write_text("from easytune.config import defaults\n\ndef get_config():\n    c = defaults()\n"
                   "    c.data.train_files = 'a.jsonl'\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match=r"old\.py: .*train_files.*take Python lists"):
        config_lib.load_config(bad)


@pytest.mark.parametrize("key,entries", [("data.train_files", ["a.jsonl", 3]), ("data.clean.phrase_files", [3]),
                                         ("lora.modules_to_save", [None]), ("data.roles_to_train", ["assistant", ""]),
                                         ("data.clean.fields", [3]), ("lora.target_modules", ["q_proj", 1])])
def test_list_entries_must_be_strings(key, entries):
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    section, name = key.rsplit(".", 1)
    node = c
    for part in section.split("."):
        node = node[part]
    node[name] = entries
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key}': entries must be non-empty strings"):
        config_check.validate(c)


def test_wrong_type_in_a_recipe_names_the_file_and_hints_lists_only_for_list_keys(tmp_path):
    bad = tmp_path / "typed.py"
    bad.write_text("from easytune.config import defaults\n\ndef get_config():\n    c = defaults()\n"
                   "    c.train.max_steps = '3'\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match=r"typed\.py: a value in get_config\(\) has the wrong type") as e:
        config_lib.load_config(bad)
    assert "take Python lists" not in str(e.value)


def test_a_run_config_json_is_not_a_recipe(tmp_path):
    run_cfg = tmp_path / "config.json"
    run_cfg.write_text("{}")
    with pytest.raises(config_lib.ConfigError, match=r"config\.json: a config is a Python recipe"):
        config_lib.load_config(run_cfg)


@pytest.mark.parametrize("text,match", [("{", r"Expecting property name"), ("[1]", r"must be a mapping"),
                                        ('{"lora": "x"}', r"config key 'lora': must be a mapping"),
                                        ('{"train": {"bogus_key": 1}}', r"unknown config key 'train\.bogus_key'"),
                                        ('{"lora": {"r": "eight"}}', r"config key 'lora\.r': cannot use 'eight'")])
def test_damaged_run_config_json_is_named(tmp_path, text, match):
    run_cfg = tmp_path / "config.json"
    run_cfg.write_text(text)
    with pytest.raises(config_lib.ConfigError, match=rf"{tmp_path}/config\.json: .*{match}"):
        config_lib.read_run_config(run_cfg)
    assert config_lib.read_run_config(_write(tmp_path / "ok.json", '{"data": {"train_files": "a,b"}}')
                                      ).data.train_files == ["a", "b"]


def _write(path, text):
    path.write_text(text)
    return path


def test_cli_modules_and_estimate_refuse_a_bad_regex(tmp_path, capsys):
    from tests.helpers import save_tiny_hf_llama
    model_dir = tmp_path / "m"
    save_tiny_hf_llama(model_dir)
    assert cli.main(["modules", str(model_dir), "--target-modules", "q_proj["]) == 2
    assert "target_modules 'q_proj[' is not a valid regex" in capsys.readouterr().err
    args = ["estimate", str(REPO / "configs" / "quickstart.py"), f"--config.model.path={model_dir}",
            "--config.model.preset=", "--config.method=lora"]
    assert cli.main(args + ["--config.lora.target_modules=q_proj["]) == 2
    assert "is not a valid regex" in capsys.readouterr().err
    assert cli.main(args + ["--config.lora.target_modules=nothing"]) == 2
    assert "matches no linear module of this model" in capsys.readouterr().err
    assert cli.main(args + ["--config.lora.target_modules=q_proj"]) == 0


def test_tokenizer_eval_names_a_missing_dir(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello\n")
    assert cli.main(["tokenizer", "eval", str(tmp_path / "nope"), "--files", str(tmp_path / "a.txt")]) == 2
    assert f"tokenizer dir not found: {tmp_path / 'nope'}" in capsys.readouterr().err


# --- issue 16: streaming prepare keys and data.datasets (a mixture) ---

def _files_config(tmp_path):
    """quickstart with its own files instead of data.builtin (a stub tokenizer dir passes the tokenizer check)."""
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    c.data.builtin = ""
    c.tokenizer.path = str(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        (tmp_path / name).write_text('{"instruction": "x", "output": "y"}\n')
    return c


def test_streaming_keys_have_their_defaults():
    d = config_lib.defaults().data
    assert (d.num_proc, d.bad_records, d.max_bad_fraction, d.batch_records, d.datasets) == (0, "error", 0.01, 2000, [])
    assert "data.datasets" not in config_lib.LIST_KEYS  # a list of dicts, not of strings


@pytest.mark.parametrize("override, key", [
    ("data.num_proc=-1", "data.num_proc"), ("data.bad_records=drop", "data.bad_records"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction"), ("data.max_bad_fraction=-0.1", "data.max_bad_fraction"),
    ("data.batch_records=0", "data.batch_records"),
])
def test_streaming_keys_are_validated(override, key):
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    config_check.validate(c)
    config_lib.apply_overrides(c, [override])
    with pytest.raises(config_lib.ConfigError, match=rf"config key '{key.replace('.', '[.]')}': must be"):
        config_check.validate(c)


def test_validate_checks_each_source_of_a_mixture(tmp_path):
    c = _files_config(tmp_path)
    c.data.datasets = [dict(train_files=[str(tmp_path / "a.jsonl")], weight=0.5),
                       dict(path=str(tmp_path / "*.jsonl"), type="alpaca", num_samples=3)]
    config_check.validate(c)  # no data.train_files needed
    c.data.datasets = c.data.datasets + [dict(train_files=[str(tmp_path / "nope.jsonl")])]
    with pytest.raises(config_lib.ConfigError, match=r"data\.datasets\[2\]\.train_files': no file matches .*nope"):
        config_check.validate(c)
    c.data.datasets = [dict(train_files=[str(tmp_path / "a.jsonl")], weight=-1)]
    with pytest.raises(config_lib.ConfigError, match=r"data\.datasets\[0\]\.weight'"):
        config_check.validate(c)
    c.data.datasets = [dict(train_files=[str(tmp_path / "a.jsonl")], format="chat", roles_to_train=[])]
    with pytest.raises(config_lib.ConfigError, match=r"data\.datasets\[0\]\.roles_to_train': is empty"):
        config_check.validate(c)
    c.method = "pretrain"  # each source's format is checked, not data.format
    c.data.datasets = [dict(train_files=[str(tmp_path / "a.jsonl")], format="text"),
                       dict(train_files=[str(tmp_path / "b.jsonl")], type="pretrain")]
    config_check.validate(c)
    c.data.datasets = [dict(train_files=[str(tmp_path / "a.jsonl")], format="text"),
                       dict(train_files=[str(tmp_path / "b.jsonl")])]  # inherits data.format "alpaca"
    with pytest.raises(config_lib.ConfigError, match=r"data\.datasets\[1\]\.format': method 'pretrain'"):
        config_check.validate(c)
    q = config_lib.load_config(REPO / "configs" / "quickstart.py")
    q.data.datasets = [dict(train_files=["a.jsonl"])]
    with pytest.raises(config_lib.ConfigError, match=r"data\.datasets': data\.builtin makes its own data"):
        config_check.validate(q)


def test_datasets_from_the_command_line_as_json():
    c = config_lib.defaults()
    config_lib.apply_overrides(c, ['--config.data.datasets=[{"path": "a.jsonl", "type": "sharegpt", "weight": 0.5},'
                                   ' {"train_files": "b.jsonl,c.jsonl", "train_on_inputs": true}]'])
    assert c.data.datasets == [{"path": ["a.jsonl"], "type": "sharegpt", "weight": 0.5},
                               {"train_files": ["b.jsonl", "c.jsonl"], "train_on_inputs": True}]
    assert [s["format"] for s in mixture.dataset_sources(c.data)] == ["chat", "alpaca"]
    config_lib.apply_overrides(c, ["--config.data.datasets={'train_files': ['x.jsonl'], 'num_samples': 5}"])
    assert c.data.datasets == [{"train_files": ["x.jsonl"], "num_samples": 5}]  # a Python literal, one dict
    config_lib.apply_overrides(c, ["--config.data.datasets="])
    assert c.data.datasets == []
    with pytest.raises(config_lib.ConfigError, match=r"config key 'data\.datasets': .* is not JSON .*list of dicts"):
        config_lib.apply_overrides(c, ['--config.data.datasets=[{"train_files": ["a.jsonl"]'])
    with pytest.raises(config_lib.ConfigError, match=r"config key 'data\.datasets': must be a list of dicts"):
        config_lib.apply_overrides(c, ["--config.data.datasets=[1, 2]"])


def test_datasets_round_trip_through_the_run_config(tmp_path):
    recipe = tmp_path / "mix.py"
    recipe.write_text("from easytune.config import defaults\n\ndef get_config():\n    c = defaults()\n"
                      "    c.data.datasets = [dict(train_files=('a.jsonl',), format='alpaca', weight=0.5),\n"
                      "                       dict(path='b.jsonl,c.jsonl', type='sharegpt', num_samples=7)]\n"
                      "    c.data.num_proc = 2\n    return c\n")
    c = config_lib.load_config(recipe)
    assert c.data.datasets == [{"train_files": ["a.jsonl"], "format": "alpaca", "weight": 0.5},
                               {"path": ["b.jsonl", "c.jsonl"], "type": "sharegpt", "num_samples": 7}]
    run_cfg = tmp_path / "config.json"
    run_cfg.write_text(c.to_json(indent=2))  # what train/loop.py writes
    back = config_lib.read_run_config(run_cfg)
    assert back.data.datasets == c.data.datasets and back.data.num_proc == 2
    assert mixture.dataset_sources(back.data) == mixture.dataset_sources(c.data)
    assert back.to_dict() == c.to_dict()
    # a run config / checkpoint whose entry wrote train_files as "a,b" compares equal to today's list form
    old = {"data.datasets": [{"train_files": "a.jsonl,b.jsonl", "weight": 1}]}
    now = {"data.datasets": [{"train_files": ["a.jsonl", "b.jsonl"], "weight": 1.0}]}
    assert config_lib.canonical_flat(old) == config_lib.canonical_flat(now)
    assert config_lib.with_defaults({"datasets": old["data.datasets"]}, "data").datasets == now["data.datasets"]


def test_datasets_value_is_plain_dicts_with_list_keys_as_lists():
    entry = config_lib.defaults().data.clean  # a ConfigDict entry becomes a plain dict
    got = config_lib.datasets_value(({"path": "a.jsonl,b.jsonl", "roles_to_train": ("gpt",), "weight": 2}, entry))
    assert got == [{"path": ["a.jsonl", "b.jsonl"], "roles_to_train": ["gpt"], "weight": 2}, entry.to_dict()]
    assert type(got[1]) is dict
    assert config_lib.datasets_value([]) == [] and config_lib.datasets_value("x") == "x"  # not a list: as it is
    assert config_lib.datasets_value(["a.jsonl"]) == ["a.jsonl"]  # not a mapping: left for dataset_sources


class _FakeCheckpointer:
    """resume_point's view of a Checkpointer: the newest checkpoint's metadata."""

    def __init__(self, directory, config):
        self.directory = directory
        self.config = config

    def latest_meta(self, log):
        return 10, {"config": self.config.to_dict()}


def test_resume_allows_num_proc_and_batch_records_but_not_another_mixture(tmp_path):
    from easytune.train import checkpoint
    saved = config_lib.defaults()
    saved.data.datasets = [dict(train_files=["a.jsonl"], weight=0.5)]
    ckpt = _FakeCheckpointer(tmp_path / "checkpoints", saved)
    now = config_lib.with_defaults(saved.to_dict())
    now.data.num_proc, now.data.batch_records, now.data.bad_records = 7, 10, "skip"
    assert checkpoint.resume_point(ckpt, now, True, lambda _: None) == 10
    now.data.datasets = [dict(train_files=["a.jsonl"], weight=1.0)]
    with pytest.raises(config_lib.ConfigError, match=r"cannot resume .* data\.datasets \(checkpoint"):
        checkpoint.resume_point(ckpt, now, True, lambda _: None)
