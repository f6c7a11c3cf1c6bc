"""Configs: every shipped recipe loads and validates; bad keys and values are rejected naming the key."""

from __future__ import annotations

import pathlib

import pytest

from easytune import config as config_lib
from easytune import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    c = config_lib.load_config(path)
    assert c.method in config_lib.METHODS
    doc = (path.read_text().split('"""')[1])
    assert f"easytune train configs/{path.name}" in doc, "each recipe's docstring gives the command to run it"


def test_quickstart_validates():
    config_lib.validate(config_lib.load_config(REPO / "configs" / "quickstart.py"))


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
        config_lib.validate(c)


def test_unknown_key_suggests_close_match():
    c = config_lib.defaults()
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'lora\.rank'.*lora\.r"):
        config_lib.apply_overrides(c, ["--config.lora.rank=8"])
    with pytest.raises(config_lib.ConfigError, match="train.micro_batch_size"):
        config_lib.apply_overrides(c, ["--config.train.micro_batch_size=two"])


def test_missing_data_file_is_named(tmp_path):
    c = config_lib.load_config(REPO / "configs" / "quickstart.py")
    c.data.builtin = ""
    c.data.train_files = str(tmp_path / "nope.jsonl")
    c.tokenizer.path = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"tokenizer\.path.*holds no tokenizer"):
        config_lib.validate(c)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(config_lib.ConfigError, match=r"data\.train_files.*nope\.jsonl"):
        config_lib.validate(c)


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
