"""PEFT adapters trained elsewhere, read by easytune: logits, merge and continued training against ``peft``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from easytune import adapter as adapter_lib
from easytune.config import ConfigError
from easytune.models import hf_weights
from easytune.models.llama import LlamaForCausalLM
from tests.helpers import tiny_run_config

IDS = np.array([[1, 5, 9, 23, 42, 7, 11, 3, 60, 2, 17, 33]], np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart tokenizer and a tiny random transformers Llama with its vocab."""
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("base"))


def _peft_adapter(base_dir, out, seed=0, **lora_kw):
    """A PEFT adapter with random (non-zero) A and B, saved with ``save_pretrained``; returns the PeftModel."""
    import peft
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg).eval()
    if cfg.modules_to_save:  # make the saved copy differ from the base, as training would
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(out))
    return pm


def _peft_logits(pm) -> np.ndarray:
    import torch
    with torch.no_grad():
        return pm(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


ADAPTERS = {
    "suffixes": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_lm_head": dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                           modules_to_save=["lm_head"]),
    "regex": dict(r=2, lora_alpha=16, target_modules=r"model\.layers\.1\.self_attn\.(k_proj|o_proj)"),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_logits_equal_peft(base, tmp_path, name):
    pm = _peft_adapter(base["model"], tmp_path / "adapter", **ADAPTERS[name])
    config, params = hf_weights.load_hf_model(base["model"])
    lcfg, lora, saved = adapter_lib.load_peft_adapter(tmp_path / "adapter", params, config)
    lora, params = adapter_lib.init_from_adapter(tmp_path / "adapter", params, config, lcfg)  # saved modules in
    model = LlamaForCausalLM(config, lora_scale=lcfg.scale)
    ours = np.asarray(model.apply({"params": params, "lora": lora}, IDS))
    np.testing.assert_allclose(ours, _peft_logits(pm), atol=1e-4, rtol=0)
    if name == "rslora_lm_head":
        assert lcfg.use_rslora and lcfg.scale == pytest.approx(4 / np.sqrt(8)) and "lm_head" in saved


def test_merge_adapter_equals_peft_merge(base, tmp_path):
    import torch
    import transformers

    from easytune import cli
    pm = _peft_adapter(base["model"], tmp_path / "adapter", **ADAPTERS["rslora_lm_head"])
    want = _peft_logits(pm)
    assert cli.main(["export", str(tmp_path / "adapter"), "--base", str(base["model"]),
                     "--merged", str(tmp_path / "merged")]) == 0
    merged, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        got = merged.eval()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    peft_merged = pm.merge_and_unload().state_dict()
    ours = hf_weights.load_hf_model(tmp_path / "merged")[1]
    np.testing.assert_allclose(ours["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"],
                               peft_merged["model.layers.0.self_attn.q_proj.weight"].numpy().T, atol=1e-6)


@pytest.mark.slow
def test_continue_training_from_adapter(base, tmp_path):
    """``lora.init_from``: the run starts from the adapter's weights, trains, and exports an adapter peft loads."""
    from easytune import export
    from easytune.tokenizer import load_tokenizer
    from easytune.train import loop
    from easytune.train import setup as setup_lib
    pm = _peft_adapter(base["model"], tmp_path / "adapter", **ADAPTERS["suffixes"])
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items() if "lora_" in k}

    def cfg(**over):
        c = tiny_run_config(tmp_path / "run", **{
            "method": "lora", "model.preset": "", "data.builtin": "", "lora.r": 4, "lora.lora_alpha": 8,
            "lora.target_modules": "q_proj,v_proj,down_proj", "lora.init_from": str(tmp_path / "adapter"),
            "train.max_steps": 2, "train.sample_max_new_tokens": 0, **over})
        c.model.path, c.tokenizer.path, c.data.train_files = (str(base["model"]), str(base["tokenizer"]),
                                                              [str(base["train"])])
        return c

    c = cfg()
    setup = setup_lib.build(c, load_tokenizer(c.tokenizer.path))
    a = np.asarray(setup.trainable["lora"]["model"]["layers_1"]["mlp"]["down_proj"]["lora_A"])
    np.testing.assert_array_equal(a, sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"].T)
    with pytest.raises(ConfigError, match="lora.init_from.*method is 'full'"):
        from easytune import config_check
        config_check.validate(cfg(method="full"))
    with pytest.raises(ConfigError, match=r"lora.r=4.*lora.target_modules"):
        bad = cfg(**{"lora.r": 8, "lora.target_modules": "q_proj"})
        setup_lib.build(bad, load_tokenizer(bad.tokenizer.path))
    loop.train(c, log=lambda *a: None)
    export.export_adapter(tmp_path / "run", tmp_path / "continued")
    lcfg, lora, _ = adapter_lib.load_peft_adapter(tmp_path / "continued",
                                                  *reversed(hf_weights.load_hf_model(base["model"])))
    moved = np.asarray(lora["model"]["layers_1"]["mlp"]["down_proj"]["lora_B"]).T
    start = sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
    assert moved.shape == start.shape and not np.allclose(moved, start)  # trained on from the adapter


def test_bad_adapters_are_refused(base, tmp_path):
    import safetensors.numpy
    import torch
    _peft_adapter(base["model"], tmp_path / "a", **ADAPTERS["suffixes"])
    config, params = hf_weights.load_hf_model(base["model"])
    cfg_file = tmp_path / "a" / "adapter_config.json"
    good = json.loads(cfg_file.read_text())

    cfg_file.write_text(json.dumps({**good, "use_dora": True}))
    with pytest.raises(ValueError, match="'use_dora'"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    cfg_file.write_text(json.dumps({**good, "r": 3}))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, (\d+)\), expected \(3, \1\)"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    cfg_file.write_text(json.dumps({**good, "target_modules": ["q_proj", "v_proj", "down_proj", "up_proj"]}))
    with pytest.raises(ValueError, match="selects 'model.layers.0.mlp.up_proj' but the file has no lora_A"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    cfg_file.write_text(json.dumps(good))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    safetensors.numpy.save_file({**tensors, key: np.full_like(tensors[key], np.nan)}, str(weights))
    with pytest.raises(ValueError, match="NaN or infinite"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    safetensors.numpy.save_file(tensors, str(weights))
    # the output of a merge may not be its own base or adapter dir
    from easytune import export
    with pytest.raises(ValueError, match="is the base itself"):
        export.export_merged_adapter(base["model"], tmp_path / "a", base["model"])
    with pytest.raises(ValueError, match="is the adapter itself"):
        export.export_merged_adapter(base["model"], tmp_path / "a", tmp_path / "a")

    # .bin: only torch.load(weights_only=True) — a pickled object is refused, plain tensors load
    weights.unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "a" / "adapter_model.bin")
    lcfg, lora, _ = adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    assert lcfg.r == 4 and len(lora["model"]) == 2
    torch.save([torch.zeros(3)], tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.bin: expected a dict"):
        adapter_lib.load_peft_adapter(tmp_path / "a", params, config)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        adapter_lib.load_peft_adapter(tmp_path, params, config)
