"""PEFT adapters trained on a resized vocabulary (``resize_token_embeddings`` before ``get_peft_model``), read by
easytune: logits, merge, generation and continued training against ``peft`` (fp32, 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from easytune import adapter as adapter_lib  # noqa: E402
from easytune.models import hf_weights  # noqa: E402
from easytune.models.llama import LlamaForCausalLM  # noqa: E402
from tests.helpers import save_tiny_hf_llama, tiny_run_config  # noqa: E402

NEW = ["<tool_call>", "</tool_call>", "<|obs|>"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("base"))


def _peft_resized(base_dir, tok_dir, out, *, tied=False, ensure_weight_tying=False, seed=0, **lora_kw):
    """A tiny transformers Llama resized to the tokenizer with NEW, a peft LoRA with random A and B (and perturbed
    modules_to_save copies), saved with ``save_pretrained`` plus the tokenizer; returns ``(peft model, n_old)``."""
    import peft
    import torch
    import transformers

    from easytune.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir, NEW)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), attn_implementation="eager")
    n = model.config.vocab_size
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(tok))
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, ensure_weight_tying=ensure_weight_tying,
                          **lora_kw)
    pm = peft.get_peft_model(model, cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return pm, n


def _ids(n):
    return np.array([[1, 5, n, 9, n + 1, 23, n + 2, 7]], np.int32)


def _torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _easytune_logits(model_dir, adapter_dir, ids):
    config, params = hf_weights.load_hf_model(model_dir)
    config, params = adapter_lib.resize_for_adapter(adapter_dir, params, config)
    lcfg, lora, saved = adapter_lib.load_peft_adapter(adapter_dir, params, config)
    variables = {"params": adapter_lib.with_saved(params, saved), "lora": lora}
    return np.asarray(LlamaForCausalLM(config, lora_scale=lcfg.scale).apply(variables, ids)), config


SAVED = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])


@pytest.mark.parametrize("name,kw", [("modules_to_save", SAVED),
                                     ("embeddings_only", dict(r=2, lora_alpha=4, target_modules=["o_proj"]))])
def test_resized_adapter_logits_equal_peft(base, tmp_path, name, kw):
    """modules_to_save (peft writes <m>.weight, <m>.modules_to_save.weight, <m>.original_module.weight) and no
    modules_to_save (peft writes the resized base's <m>.weight): easytune's logits are peft's, new ids included."""
    import safetensors.numpy
    pm, n = _peft_resized(base["model"], base["tokenizer"], tmp_path / "ad", **kw)
    keys = set(safetensors.numpy.load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    if name == "modules_to_save":
        assert "base_model.model.model.embed_tokens.original_module.weight" in keys
    else:
        assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    assert adapter_lib.adapter_vocab_size(tmp_path / "ad") == n + 3
    ours, config = _easytune_logits(base["model"], tmp_path / "ad", _ids(n))
    assert config.vocab_size == n + 3
    np.testing.assert_allclose(ours, _torch_logits(pm, _ids(n)), atol=1e-4, rtol=0)


def test_resized_adapter_merge_generate_and_init_from(base, tmp_path):
    """``easytune export ADAPTER --base --merged``: transformers loads it (vocab_size grown, the adapter's tokenizer)
    with peft's logits; ``easytune generate --adapter`` gives peft's greedy tokens; ``lora.init_from`` starts a run
    at peft's function."""
    import torch
    import transformers

    from easytune import cli
    from easytune import lora as lora_lib
    from easytune import vocab as vocab_lib
    from easytune.train import setup as setup_lib
    pm, n = _peft_resized(base["model"], base["tokenizer"], tmp_path / "ad", **SAVED)
    ids = _ids(n)
    want = _torch_logits(pm, ids)
    assert cli.main(["export", str(tmp_path / "ad"), "--base", str(base["model"]),
                     "--merged", str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == n + 3
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    np.testing.assert_allclose(_torch_logits(merged, ids), want, atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert tok.convert_tokens_to_ids(NEW) == [n, n + 1, n + 2]

    prompt = "hello <tool_call>"
    texts = setup_lib.generate_from_dir(base["model"], [prompt], adapter=str(tmp_path / "ad"), max_new_tokens=8)
    enc = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        ref = pm.generate(input_ids=enc, attention_mask=torch.ones_like(enc), max_new_tokens=8, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert texts[0] == prompt + tok.decode(ref[0, enc.shape[1]:], skip_special_tokens=True)

    c = tiny_run_config(tmp_path / "run", **{
            "method": "lora", "model.preset": "", "data.builtin": "", "lora.r": 4, "lora.lora_alpha": 8,
            "lora.target_modules": "q_proj,v_proj", "lora.modules_to_save": "embed_tokens,lm_head",
            "lora.init_from": str(tmp_path / "ad")})
    c.model.path, c.tokenizer.path = str(base["model"]), str(tmp_path / "ad")
    setup = setup_lib.build(c, vocab_lib.load_run_tokenizer(c))
    assert setup.model_cfg.vocab_size == n + 3
    ours = np.asarray(setup.model.apply(lora_lib.combine(setup.trainable, setup.frozen), ids))
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)

    # other tokens at the adapter's new ids, or more of them: refused, never the adapter's rows for other tokens
    from easytune.config import ConfigError
    c.tokenizer.path = str(base["tokenizer"])
    for tokens, match in ((["<a>", "<b>", "<c>"], r"trained with the tokens \['<tool_call>'"),
                          ([*NEW, "<x>"], "continuing an adapter with new tokens is not supported"),
                          ([], r"this run's tokenizer has \[\] there")):
        c.tokenizer.added_tokens = tokens
        with pytest.raises(ConfigError, match=match):
            setup_lib.build(c, vocab_lib.load_run_tokenizer(c))


def test_tied_resized_adapter(base, tmp_path):
    """A tied base: with peft's ``ensure_weight_tying`` (lm_head = the trained embedding) the logits are peft's;
    without it peft keeps the base's output rows, which a tied easytune model cannot hold: refused by name."""
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(base["tokenizer"])))
    save_tiny_hf_llama(tmp_path / "tied", vocab=vocab, tied=True)
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    pm, n = _peft_resized(tmp_path / "tied", base["tokenizer"], tmp_path / "ad", ensure_weight_tying=True, **kw)
    ours, _ = _easytune_logits(tmp_path / "tied", tmp_path / "ad", _ids(n))
    np.testing.assert_allclose(ours, _torch_logits(pm, _ids(n)), atol=1e-4, rtol=0)
    _peft_resized(tmp_path / "tied", base["tokenizer"], tmp_path / "loose", **kw)
    with pytest.raises(ValueError, match="lm_head.weight.*ties lm_head.*ensure_weight_tying"):
        _easytune_logits(tmp_path / "tied", tmp_path / "loose", _ids(n))


def test_resized_adapter_errors(base, tmp_path):
    """An adapter read onto a base that was not grown names the fix; a base larger than the adapter is refused."""
    _peft_resized(base["model"], base["tokenizer"], tmp_path / "ad", **SAVED)
    config, params = hf_weights.load_hf_model(base["model"])
    with pytest.raises(ValueError, match="vocabulary of .* tokens.*resize_for_adapter"):
        adapter_lib.load_peft_adapter(tmp_path / "ad", params, config)
    from easytune import vocab as vocab_lib
    big_cfg, big = vocab_lib.resize_params(params, config, config.vocab_size + 10)
    with pytest.raises(ValueError, match="have .* rows but the base model has vocab_size"):
        adapter_lib.resize_for_adapter(tmp_path / "ad", big, big_cfg)
