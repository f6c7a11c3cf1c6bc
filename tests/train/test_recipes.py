"""Short versions of the shipped recipes, run through the command line as a user would."""

from __future__ import annotations

import json
import pathlib

import pytest

from easytune import cli

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quickstart_cli_prints_results(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = cli.main(["train", str(REPO / "configs" / "quickstart.py"), f"--config.train.output_dir={out}",
                   "--config.train.max_steps=8", "--config.train.eval_steps=4", "--config.train.micro_batch_size=2",
                   "--config.data.val_set_size=16", "--config.train.sample_max_new_tokens=6"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"run directory: {out}" in text
    assert "final train loss" in text and "generated:" in text and "reference:" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert cli.main(["generate", str(out), "--instruction", "Sort the digits in ascending order.",
                     "--input", "4907215", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "### Instruction:\nSort the digits in ascending order.\n\n### Input:\n4907215\n\n### Response:\n" in printed


def _stories260k_lora(shared_data, tmp_path, out) -> list[str]:
    """stories260K converted from the shared GGUF into ``tmp_path``, and the arguments of
    ``configs/stories260k_lora.py`` on it (Tiny Shakespeare, run directory ``out``)."""
    model_dir = tmp_path / "stories260K"
    assert cli.main(["convert", str(shared_data / "models" / "stories260K" / "stories260K.gguf"),
                     str(model_dir)]) == 0
    return [str(REPO / "configs" / "stories260k_lora.py"), f"--config.model.path={model_dir}",
            f"--config.data.train_files={shared_data / 'corpus' / 'tinyshakespeare' / 'input.txt'}",
            f"--config.train.output_dir={out}"]


@pytest.mark.slow
def test_stories260k_lora_short(shared_data, tmp_path, capsys):
    """The real pretrained stories260K, converted from GGUF, LoRA on Tiny Shakespeare: val loss falls."""
    out = tmp_path / "run"
    rc = cli.main(["train", *_stories260k_lora(shared_data, tmp_path, out), "--config.train.max_steps=10",
                   "--config.train.micro_batch_size=1", "--config.train.gradient_accumulation_steps=2",
                   "--config.data.sequence_len=64", "--config.data.val_set_size=32",
                   "--config.train.eval_steps=0", "--config.train.sample_max_new_tokens=8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3
    # a LoRA checkpoint holds only the adapters (+ their optimizer state and the step), not the base model
    tree = json.loads((out / "checkpoints" / "10" / "state" / "_METADATA").read_text())["tree_metadata"]
    assert any("'lora_A'" in k for k in tree)
    assert not any("'embed_tokens'" in k or "'kernel'" in k or "'weight'" in k for k in tree), list(tree)[:5]
    assert cli.main(["generate", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("ROMEO:")


@pytest.mark.slow
def test_stories260k_lora_8192_tokens(shared_data, tmp_path, capsys):
    """Issue 17: LoRA on stories260K with 8,192-token sequences trains on a CPU machine (default attention:
    blockwise, memory linear in length) and one step lowers the validation loss."""
    out = tmp_path / "run"
    rc = cli.main(["train", *_stories260k_lora(shared_data, tmp_path, out), "--config.train.max_steps=1",
                   "--config.optim.warmup_steps=0",
                   "--config.train.micro_batch_size=1", "--config.train.gradient_accumulation_steps=1",
                   "--config.data.sequence_len=8192", "--config.data.val_set_size=1",
                   "--config.train.eval_steps=0", "--config.train.sample_max_new_tokens=0"])
    assert rc == 0
    assert "blockwise attention" in capsys.readouterr().out  # the FLOPs line names why it estimates
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.1
