"""The Trainer end to end on the built-in quickstart data: files a run leaves, sharded == unsharded, resume."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from easytune import config as config_lib
from easytune.train import loop
from tests.helpers import tiny_run_config


def _config(out, **overrides):
    defaults = {"train.max_steps": 6, "train.eval_steps": 3, "train.save_steps": 3,
                "train.sample_max_new_tokens": 4, "optim.warmup_steps": 2}
    return tiny_run_config(out, **{**defaults, **overrides})


def _losses(run_dir):
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora8"
    summary = loop.train(_config(out, **{"method": "lora", "mesh.data": 2, "mesh.fsdp": 4}))
    return out, summary


@pytest.mark.slow
def test_run_dir_contents(lora_run):
    out, summary = lora_run
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "6").is_dir()
    assert summary["optimizer_steps"] == 6 and summary["global_batch"] == 8
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert set(summary["sample"]) == {"prompt", "generated", "reference"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu"} <= tags


@pytest.mark.slow
def test_eight_devices_equal_one(lora_run, tmp_path):
    """data=2 x fsdp=4 on 8 simulated devices vs 1 device: same per-step losses within 1e-5."""
    out8, _ = lora_run
    assert len(jax.devices()) == 8
    c1 = _config(tmp_path / "lora1", **{"method": "lora", "mesh.data": 1, "mesh.fsdp": 1,
                                        "train.micro_batch_size": 8, "train.sample_max_new_tokens": 0})
    loop.train(c1, devices=jax.devices()[:1])
    l8, l1 = _losses(out8), _losses(tmp_path / "lora1")
    assert sorted(l8) == sorted(l1) == list(range(1, 7))
    np.testing.assert_allclose([l8[s] for s in sorted(l8)], [l1[s] for s in sorted(l1)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh, atol", [((2, 4), 1e-6), ((1, 8), 1e-5)], ids=["same_mesh", "resharded"])
@pytest.mark.slow
def test_resume_continues_exactly(lora_run, tmp_path, mesh, atol):
    """Drop the final checkpoint of a finished run, resume from step 3 (on the same mesh, or resharded onto
    data=1 x fsdp=8): steps 4-6 repeat the uninterrupted run's losses."""
    out8, _ = lora_run
    run = tmp_path / "resumed"
    shutil.copytree(out8, run)
    shutil.rmtree(run / "checkpoints" / "6")
    c = _config(run, **{"method": "lora", "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                        "train.sample_max_new_tokens": 0})
    loop.train(c, resume=True)
    before, after = _losses(out8), _losses(run)
    assert sorted(after) == list(range(1, 7))  # steps past the checkpoint were replaced, not duplicated
    np.testing.assert_allclose([after[s] for s in (4, 5, 6)], [before[s] for s in (4, 5, 6)], atol=atol, rtol=0)


@pytest.mark.slow
def test_resume_refuses_a_changed_config_and_a_used_dir_resumes_automatically(lora_run, tmp_path, capsys):
    out8, _ = lora_run
    run = tmp_path / "changed"
    shutil.copytree(out8, run)
    before = (run / "config.json").read_text()
    c = _config(run, **{"method": "lora", "mesh.data": 2, "mesh.fsdp": 4, "lora.r": 4, "optim.learning_rate": 0.5})
    with pytest.raises(config_lib.ConfigError, match=r"lora\.r \(checkpoint 8, now 4\).*optim\.learning_rate"):
        loop.train(c, resume=True)
    assert (run / "config.json").read_text() == before  # a refused resume leaves the run as it was
    c = _config(run, **{"method": "lora", "mesh.data": 2, "mesh.fsdp": 4})
    summary = loop.train(c)  # same config, no --resume: resumed automatically; finished, so nothing to do
    assert "holds checkpoints (latest: step 6): resuming that run" in capsys.readouterr().out
    assert summary["final_eval_loss"] == lora_run[1]["final_eval_loss"]


def test_tokenizer_larger_than_model_vocab_grows_it_and_says_so(tmp_path):
    """A tokenizer with more tokens than the model has rows grows embed_tokens / lm_head (as axolotl resizes to
    the tokenizer); LoRA without them in modules_to_save is refused, and the plan names the new ids' tokens, so a
    wrong tokenizer.path shows."""
    from easytune.data import quickstart
    from easytune.tokenizer import load_tokenizer
    from tests.helpers import save_tiny_hf_llama
    assets = quickstart.build_quickstart(tmp_path / "assets", num_records=200)
    save_tiny_hf_llama(tmp_path / "model", vocab=96)
    c = _config(tmp_path / "run", **{"method": "lora", "model.preset": "", "data.builtin": ""})
    c.model.path = str(tmp_path / "model")
    c.tokenizer.path = str(assets["tokenizer_dir"])
    c.data.train_files = [str(assets["train_file"])]
    with pytest.raises(config_lib.ConfigError, match=r"the vocabulary grows from 96 to \d+ rows.*modules_to_save"):
        loop.train(c)
    tok = load_tokenizer(assets["tokenizer_dir"])
    c = _config(tmp_path / "run_full", **{"method": "full", "model.preset": "", "data.builtin": "",
                                          "train.max_steps": 1})
    c.model.path, c.tokenizer.path = str(tmp_path / "model"), str(assets["tokenizer_dir"])
    c.data.train_files = [str(assets["train_file"])]
    lines = []
    loop.train(c, log=lambda *a: lines.append(" ".join(map(str, a))))
    first = [t for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if i >= 96][:8]
    assert any(f"vocabulary: 96 -> {len(tok)} rows of embed_tokens / lm_head" in line for line in lines), lines
    assert any(f"new token ids 96+: {first}" in line and "check it is the model's tokenizer" in line
               for line in lines), lines
