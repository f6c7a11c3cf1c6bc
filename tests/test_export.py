"""``easytune export`` against the references: transformers loads the merged checkpoint, peft the adapter, and
both give easytune's logits for the run (fp32, 1e-4)."""

from __future__ import annotations

import json
import logging
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from easytune import export
from easytune import lora as lora_lib
from easytune.train import loop
from easytune.train import setup as setup_lib
from tests.helpers import tiny_run_config

IDS = np.array([[1, 5, 9, 23, 42, 7, 11, 3, 60, 2, 17, 33]], np.int32)


def _config(out, **overrides):
    defaults = {"train.max_steps": 4, "train.eval_steps": 4, "train.save_steps": 4,
                "train.sample_max_new_tokens": 0, "optim.warmup_steps": 1,
                "optim.learning_rate": 2e-2}  # LoRA's B starts at zero: move it enough that the adapter matters
    return tiny_run_config(out, **{**defaults, **overrides})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart data + tokenizer, and a tiny random transformers Llama (untied) with that vocab."""
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("base"))


def _lora_run(base, out, **overrides):
    c = _config(out, **{"method": "lora", "model.preset": "", "data.builtin": "", **overrides})
    c.model.path = str(base["model"])
    c.tokenizer.path = str(base["tokenizer"])
    c.data.train_files = [str(base["train"])]
    loop.train(c, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "lora": _lora_run(base, root / "lora"),
        "rslora_lm_head": _lora_run(base, root / "rslora", **{
            "lora.r": 4, "lora.use_rslora": True, "lora.target_modules": "q_proj,v_proj,down_proj",
            "lora.modules_to_save": "lm_head", "data.chat_template": "chatml"}),
    }


@pytest.fixture(scope="module")
def full_run(base, tmp_path_factory):
    """Full fine-tuning of a ``model.preset='tiny'`` model (no ``model.path``) on the same data."""
    out = tmp_path_factory.mktemp("runs") / "full"
    c = _config(out, **{"method": "full", "data.builtin": ""})
    c.tokenizer.path = str(base["tokenizer"])
    c.data.train_files = [str(base["train"])]
    loop.train(c, log=lambda *a: None)
    return out


def _easytune_logits(run):
    setup, trainable = run
    variables = lora_lib.combine(trainable, setup.frozen)
    return np.asarray(setup.model.apply(variables, IDS))


def _torch_logits(model):
    import torch
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _load_transformers(path):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return model.eval()


@pytest.mark.slow
def test_merged_full_run_loads_in_transformers(full_run, tmp_path):
    from transformers import AutoTokenizer
    run = setup_lib.load_run(full_run)
    out = export.export_merged(full_run, tmp_path / "merged")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    np.testing.assert_allclose(_torch_logits(_load_transformers(out)), _easytune_logits(run), atol=1e-4, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == run[0].tokenizer.get_vocab()


@pytest.mark.parametrize("name", ["lora", "rslora_lm_head"])
@pytest.mark.slow
def test_merged_lora_run_equals_easytune(runs, name, tmp_path):
    run = setup_lib.load_run(runs[name])
    out = export.export_merged(runs[name], tmp_path / "merged", run=run)
    ours = _easytune_logits(run)
    np.testing.assert_allclose(_torch_logits(_load_transformers(out)), ours, atol=1e-4, rtol=0)
    base_logits = _torch_logits(_load_transformers(run[0].config.model.path))
    assert np.abs(ours - base_logits).max() > 1e-2  # the fine-tune changed the model: the test means something


@pytest.mark.parametrize("name", ["lora", "rslora_lm_head"])
@pytest.mark.slow
def test_adapter_loads_in_peft(runs, name, tmp_path, caplog):
    import peft
    run = setup_lib.load_run(runs[name])
    setup = run[0]
    with caplog.at_level(logging.WARNING, logger="easytune.export"):
        out = export.export_adapter(runs[name], tmp_path / "adapter", run=run)
    cfg = json.loads((out / "adapter_config.json").read_text())
    lcfg = setup_lib.lora_config(setup.config)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (lcfg.r, lcfg.lora_alpha, lcfg.use_rslora)
    assert cfg["base_model_name_or_path"] == str(setup.config.model.path)
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    hidden = setup.model_cfg.hidden_size
    assert a.shape == (lcfg.r, hidden) and b.shape == (hidden, lcfg.r)
    if name == "lora":
        assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
        assert cfg["modules_to_save"] is None and not [r for r in caplog.records if r.name.startswith("easytune")]
    else:
        assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        assert cfg["modules_to_save"] == ["lm_head"]
        assert tensors["base_model.model.lm_head.weight"].shape == (setup.model_cfg.vocab_size, hidden)
        assert any("vLLM" in r.getMessage() and "lm_head" in r.getMessage() for r in caplog.records)

    base = _load_transformers(setup.config.model.path)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    np.testing.assert_allclose(_torch_logits(model), _easytune_logits(run), atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_target_modules_regex_when_suffixes_would_select_more():
    linear = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    assert export._target_modules(linear, linear) == ["q_proj", "v_proj"]
    only0 = linear[:2]
    rx = export._target_modules(only0, linear)
    assert [n for n in linear if re.fullmatch(rx, n)] == only0


@pytest.mark.slow
def test_adapter_of_a_full_run_is_refused(full_run, tmp_path):
    with pytest.raises(ValueError, match="method='full'.*lora"):
        export.export_adapter(full_run, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_cli_export(runs, full_run, tmp_path, capsys):
    from easytune import cli
    assert cli.main(["export", str(runs["lora"]), "--merged", str(tmp_path / "m"),
                     "--adapter", str(tmp_path / "a")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    assert cli.main(["export", str(full_run), "--adapter", str(tmp_path / "fa")]) == 2
    assert "method='full'" in capsys.readouterr().err
    assert cli.main(["export", str(full_run)]) == 2


@pytest.mark.slow
def test_the_run_chat_template_is_exported(runs, tmp_path):
    """``data.chat_template`` (a built-in name here) is the template of the run's tokenizer, so the merged model and
    the adapter carry it in ``tokenizer_config.json``, and transformers formats a chat as the model was trained."""
    from transformers import AutoTokenizer

    from easytune.tokenizer import CHAT_TEMPLATES
    run = setup_lib.load_run(runs["rslora_lm_head"])
    assert run[0].tokenizer.chat_template == CHAT_TEMPLATES["chatml"]
    merged = export.export_merged(runs["rslora_lm_head"], tmp_path / "merged", run=run)
    adapter = export.export_adapter(runs["rslora_lm_head"], tmp_path / "adapter", run=run)
    msgs = [{"role": "user", "content": "Sort 312."}]
    for out in (merged, adapter):
        tok = AutoTokenizer.from_pretrained(str(out))
        assert tok.chat_template == CHAT_TEMPLATES["chatml"]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
            "<|im_start|>user\nSort 312.<|im_end|>\n<|im_start|>assistant\n")
    lora_tok = setup_lib.load_run(runs["lora"])[0].tokenizer  # no data.chat_template: the tokenizer's own (none)
    assert not lora_tok.chat_template


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.slow
def test_merged_export_of_resumed_run_on_tied_base(base, tmp_path, method):
    """A run on a tied-embedding base, stopped after 2 steps and resumed to 4, exports a checkpoint that stays
    tied (no lm_head.weight, tie_word_embeddings true) and equals easytune's logits in transformers."""
    from tests.helpers import save_tiny_hf_llama
    save_tiny_hf_llama(tmp_path / "tied", vocab=_vocab(base), tied=True, seed=1)

    def cfg(steps):
        c = _config(tmp_path / "run", **{"method": method, "model.preset": "", "data.builtin": "",
                                         "train.max_steps": steps, "train.save_steps": 2,
                                         "lora.modules_to_save": "embed_tokens" if method == "lora" else ""})
        c.model.path, c.tokenizer.path, c.data.train_files = (str(tmp_path / "tied"), str(base["tokenizer"]),
                                                              [str(base["train"])])
        return c

    loop.train(cfg(2), log=lambda *a: None)
    loop.train(cfg(4), resume=True, log=lambda *a: None)
    run = setup_lib.load_run(tmp_path / "run")
    assert run[0].model_cfg.tie_word_embeddings
    out = export.export_merged(tmp_path / "run", tmp_path / "merged", run=run)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in safetensors.numpy.load_file(out / "model.safetensors")
    model = _load_transformers(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ours = _easytune_logits(run)
    np.testing.assert_allclose(_torch_logits(model), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - _torch_logits(_load_transformers(tmp_path / "tied"))).max() > 1e-2
    with pytest.raises(ValueError, match="is the base itself"):
        export.export_merged(tmp_path / "run", tmp_path / "tied", run=run)
    if method == "full":  # a damaged latest checkpoint: reloading falls back to the previous one
        step2 = setup_lib.load_run(tmp_path / "run", step=2)[1]
        for f in (tmp_path / "run" / "checkpoints" / "4").rglob("*"):
            if f.is_file() and f.parent.name == "d":  # the array data files
                f.write_bytes(f.read_bytes()[:10])
        fallback = setup_lib.load_run(tmp_path / "run")[1]
        for a, b in zip(jax.tree_util.tree_leaves(fallback), jax.tree_util.tree_leaves(step2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _vocab(base):
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(str(base["tokenizer"])))
