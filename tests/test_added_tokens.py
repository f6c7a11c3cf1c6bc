"""``tokenizer.added_tokens`` and the resized vocabulary against their references: the tokenizer as transformers'
``add_tokens``, new rows as transformers' ``resize_token_embeddings(mean_resizing=True)``, the trained run exported as
a merged model transformers loads and as the adapter peft writes and loads (fp32, 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from easytune import vocab as vocab_lib  # noqa: E402
from easytune.config import ConfigError  # noqa: E402
from easytune.models import hf_weights  # noqa: E402
from tests.helpers import save_tiny_hf_llama, tiny_run_config  # noqa: E402

NEW = ["<tool_call>", "</tool_call>", "<|obs|>"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Quickstart data + tokenizer, a tiny untied transformers Llama with that vocab, and the tokenizer with NEW
    added saved as its own dir (a tokenizer that already has them)."""
    from easytune.tokenizer import load_tokenizer
    from tests.helpers import quickstart_base
    root = tmp_path_factory.mktemp("base")
    out = quickstart_base(root)
    load_tokenizer(out["tokenizer"], NEW).save_pretrained(str(root / "tok_added"))
    out["tok_added"] = root / "tok_added"
    return out


def _config(base, out, **over):
    c = tiny_run_config(out, **{"method": "lora", "model.preset": "", "data.builtin": "", "train.max_steps": 3,
                                "train.eval_steps": 3, "train.save_steps": 3, "train.sample_max_new_tokens": 0,
                                "optim.warmup_steps": 1, "optim.learning_rate": 2e-2, **over})
    c.model.path, c.data.train_files = str(base["model"]), [str(base["train"])]
    c.tokenizer.path = c.tokenizer.path or str(base["tokenizer"])
    return c


def test_added_tokens_are_transformers_add_tokens(base):
    """Ids, splitting and decoding equal transformers' ``add_tokens`` with axolotl's ``AddedToken`` settings."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from easytune import config as config_lib
    from easytune.tokenizer import load_tokenizer
    ref = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    n = len(ref)
    assert ref.add_tokens([AddedToken(t, rstrip=False, lstrip=False, normalized=False) for t in NEW]) == 3
    c = _config(base, "/tmp/unused")
    config_lib.apply_overrides(c, ["tokenizer.added_tokens=<tool_call>,</tool_call>,<|obs|>"])
    assert vocab_lib.added_tokens(c) == NEW
    tok = vocab_lib.load_run_tokenizer(c)
    assert len(tok) == n + 3 and tok.convert_tokens_to_ids(NEW) == [n, n + 1, n + 2]
    text = "call<tool_call>{\"a\": 1}</tool_call> then<|obs|>ok"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert n in tok(text)["input_ids"] and n + 2 in tok(text)["input_ids"]  # never split
    assert "<tool_call>" in tok.decode(tok(text)["input_ids"], skip_special_tokens=True)  # normal, not special
    assert vocab_lib.missing_added_tokens(c, load_tokenizer(base["tokenizer"])) == NEW
    with pytest.raises(ValueError, match="tokenizer.added_tokens: entries must be non-empty"):
        load_tokenizer(base["tokenizer"], ["<a>", " "])


@pytest.mark.parametrize("vocab,hidden,tied", [(16, 32, False), (96, 32, False), (16, 32, True)])
def test_resize_equals_transformers_mean_resizing(tmp_path, vocab, hidden, tied):
    """New rows vs ``resize_token_embeddings(n, mean_resizing=True)``. With fewer rows than the hidden size the old
    rows' covariance is singular and transformers sets the mean itself: equal to 1e-6. Otherwise it samples
    N(mean, 1e-9 cov): equal to the noise (~3e-5 std), and the mean of its new rows is ours. Tied: resized once."""
    import torch
    model = save_tiny_hf_llama(tmp_path, vocab=vocab, hidden=hidden, tied=tied)
    cfg, params = hf_weights.load_hf_model(tmp_path)
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab + 5)
    cfg2, params2 = vocab_lib.resize_params(params, cfg, vocab + 5)
    assert cfg2.vocab_size == vocab + 5 and ("lm_head" in params2) == (not tied)
    ref = model.model.embed_tokens.weight.detach().numpy()
    emb = np.asarray(params2["model"]["embed_tokens"]["embedding"])
    std = ref[:vocab].std()
    np.testing.assert_array_equal(emb[:vocab], ref[:vocab])
    np.testing.assert_allclose(emb[vocab:], ref[vocab:], atol=1e-6 if vocab < hidden else 1e-4 * std, rtol=0)
    if not tied:
        head = np.asarray(params2["lm_head"]["kernel"]).T
        np.testing.assert_allclose(head, model.lm_head.weight.detach().numpy(),
                                   atol=1e-6 if vocab < hidden else 1e-4 * std, rtol=0)
    # the same model in easytune and transformers: logits of the new ids too
    from easytune.models.llama import LlamaForCausalLM
    ids = np.array([[1, vocab, 3, vocab + 4, 2]], np.int32)
    with torch.no_grad():
        want = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(cfg2).apply({"params": params2}, ids))
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_target_vocab_size_rounds_as_transformers(tmp_path):
    """``pad_to_multiple_of`` as ``resize_token_embeddings(n, pad_to_multiple_of=m)``; a tokenizer that fits never
    shrinks the model."""
    model = save_tiny_hf_llama(tmp_path, vocab=16)
    model.resize_token_embeddings(21, pad_to_multiple_of=8)
    assert vocab_lib.target_vocab_size(21, 16, 8) == model.config.vocab_size == 24
    assert vocab_lib.target_vocab_size(21, 16) == 21
    assert vocab_lib.target_vocab_size(10, 16, 8) == 16  # fits: unchanged (transformers would shrink to 16 -> 16)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        vocab_lib.target_vocab_size(21, 16, -1)


def test_build_resizes_full_qlora_and_on_a_mesh(base, tmp_path):
    """``build`` grows the model for ``tokenizer.added_tokens`` (full, QLoRA); on a tensor-parallel mesh an odd new
    vocab is replicated with a note and ``pad_to_multiple_of`` makes it shard; a tokenizer that fits changes
    nothing; a tokenizer loaded without the added tokens is refused."""
    import jax

    from easytune.tokenizer import load_tokenizer
    from easytune.train import setup as setup_lib
    n = len(load_tokenizer(base["tokenizer"]))
    c = _config(base, tmp_path / "a", **{"method": "full", "tokenizer.added_tokens": ",".join(NEW)})
    s = setup_lib.build(c, vocab_lib.load_run_tokenizer(c))
    assert s.model_cfg.vocab_size == n + 3 and s.base_vocab_size == n
    emb = np.asarray(s.trainable["params"]["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[n:], np.broadcast_to(emb[:n].mean(0), (3, emb.shape[1])), atol=1e-6)
    with pytest.raises(ValueError, match="load_run_tokenizer"):
        setup_lib.build(c, load_tokenizer(base["tokenizer"]))
    q = _config(base, tmp_path / "q", **{"method": "qlora", "lora.modules_to_save": "embed_tokens,lm_head",
                                         "tokenizer.added_tokens": ",".join(NEW)})
    s = setup_lib.build(q, vocab_lib.load_run_tokenizer(q))
    assert s.trainable["params"]["lm_head"]["kernel"].shape[1] == n + 3
    assert set(s.base_rows) == {"model.embed_tokens", "lm_head"}
    mesh = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "method": "full", "tokenizer.added_tokens": "<x>"}
    if len(jax.devices()) == 8 and (n + 1) % 2:
        s = setup_lib.build(_config(base, tmp_path / "m", **mesh), vocab_lib.load_run_tokenizer(
            _config(base, tmp_path / "m", **mesh)))
        spec = s.trainable["params"]["lm_head"]["kernel"].sharding.spec
        assert s.model_cfg.vocab_size == n + 1 and "tensor" not in tuple(spec)
        m8 = _config(base, tmp_path / "m8", **mesh, **{"tokenizer.pad_to_multiple_of": 8})
        s = setup_lib.build(m8, vocab_lib.load_run_tokenizer(m8))
        assert s.model_cfg.vocab_size % 8 == 0 and s.model_cfg.vocab_size >= n + 1
        assert "tensor" in tuple(s.trainable["params"]["lm_head"]["kernel"].sharding.spec)
    fits = _config(base, tmp_path / "f", method="full")
    s = setup_lib.build(fits, vocab_lib.load_run_tokenizer(fits))
    assert s.model_cfg.vocab_size == n and s.base_vocab_size is None


def test_lora_with_new_tokens_needs_modules_to_save(base, tmp_path):
    """axolotl's rule: LoRA with new tokens refuses unless embed_tokens and lm_head (tied: embed_tokens) are saved."""
    from easytune.train import setup as setup_lib
    for mts, tied, want in (("", False, "embed_tokens,lm_head"), ("lm_head", False, "lm_head,embed_tokens"),
                            ("", True, "embed_tokens ")):
        c = _config(base, tmp_path / "r", **{"lora.modules_to_save": mts, "tokenizer.added_tokens": "<x>"})
        if tied:
            save_tiny_hf_llama(tmp_path / "tied", vocab=len(vocab_lib.load_run_tokenizer(c)) - 1, tied=True)
            c.model.path = str(tmp_path / "tied")
        with pytest.raises(ConfigError, match=f"lora.modules_to_save.*lacks.*--config.lora.modules_to_save=.*{want}"):
            setup_lib.build(c, vocab_lib.load_run_tokenizer(c))
    c = _config(base, tmp_path / "t", **{"lora.modules_to_save": "embed_tokens", "tokenizer.added_tokens": "<x>"})
    c.model.path = str(tmp_path / "tied")
    assert setup_lib.build(c, vocab_lib.load_run_tokenizer(c)).model_cfg.tie_word_embeddings


@pytest.fixture(scope="module")
def resized_run(base, tmp_path_factory):
    """A LoRA run whose tokenizer (tokenizer.path) already holds NEW: the model grows by 3 rows."""
    from easytune.train import loop
    out = tmp_path_factory.mktemp("runs") / "lora"
    c = _config(base, out, **{"lora.modules_to_save": "embed_tokens,lm_head", "lora.target_modules": "q_proj,v_proj"})
    c.tokenizer.path = str(base["tok_added"])
    lines = []
    loop.train(c, log=lambda *a: lines.append(" ".join(map(str, a))))
    (out / "log.txt").write_text("\n".join(lines))
    return out


@pytest.mark.slow
def test_the_plan_says_how_the_vocabulary_grew(base, resized_run):
    from easytune.tokenizer import load_tokenizer
    n = len(load_tokenizer(base["tokenizer"]))
    log = (resized_run / "log.txt").read_text()
    assert (f"vocabulary: {n} -> {n + 3} rows of embed_tokens / lm_head for a tokenizer of {n + 3} tokens; new rows "
            f"start at the mean of the old ones, trained through embed_tokens, lm_head") in log


def _ids(n):
    return np.array([[1, 5, n, 9, n + 1, 23, n + 2, 7]], np.int32)


def _torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.slow
def test_resized_run_exports_as_peft_and_transformers(base, resized_run, tmp_path):
    """The adapter holds exactly the keys and shapes peft writes after ``resize_token_embeddings`` (same LoraConfig),
    and ``PeftModel.from_pretrained`` on a base resized with transformers gives easytune's logits, new ids included;
    the merged model loads in transformers with vocab_size grown, the tokenizer with the tokens, the same logits."""
    import peft
    import safetensors.numpy
    import transformers

    from easytune import export
    from easytune import lora as lora_lib
    from easytune.train import setup as setup_lib
    run = setup_lib.load_run(resized_run)
    setup, trainable = run
    n = setup.base_vocab_size
    ids = _ids(n)
    ours = np.asarray(setup.model.apply(lora_lib.combine(trainable, setup.frozen), ids))
    out = export.export_adapter(resized_run, tmp_path / "adapter", run=run)
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")

    def resized_base():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(base["model"])).eval()
        m.resize_token_embeddings(n + 3)
        return m

    ref = peft.get_peft_model(resized_base(), peft.LoraConfig(
            task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"],
            modules_to_save=["embed_tokens", "lm_head"]))
    ref.save_pretrained(str(tmp_path / "ref"))
    want = safetensors.numpy.load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in want.items()}
    emb = setup.base_rows["model.embed_tokens"]
    np.testing.assert_array_equal(tensors["base_model.model.model.embed_tokens.original_module.weight"], emb)
    np.testing.assert_allclose(emb[n:], np.broadcast_to(emb[:n].mean(0), (3, emb.shape[1])), atol=1e-6)
    pm = peft.PeftModel.from_pretrained(resized_base(), str(out)).eval()
    np.testing.assert_allclose(_torch_logits(pm, ids), ours, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).convert_tokens_to_ids(NEW) == [n, n + 1, n + 2]

    merged = export.export_merged(resized_run, tmp_path / "merged", run=run)
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == n + 3
    model = transformers.AutoModelForCausalLM.from_pretrained(str(merged)).eval()
    np.testing.assert_allclose(_torch_logits(model, ids), ours, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(str(merged)).convert_tokens_to_ids(NEW) == [n, n + 1, n + 2]


@pytest.mark.slow
def test_tied_resized_run_adapter_loads_in_peft(base, tmp_path):
    """A tied base (one resize) with embed_tokens trained: the adapter says ``ensure_weight_tying`` so peft ties
    lm_head to the trained embedding as easytune computes; its logits are easytune's, new ids included."""
    import peft
    import transformers

    from easytune import export
    from easytune import lora as lora_lib
    from easytune.tokenizer import load_tokenizer
    from easytune.train import loop
    from easytune.train import setup as setup_lib
    n = len(load_tokenizer(base["tokenizer"]))
    save_tiny_hf_llama(tmp_path / "tied", vocab=n, tied=True)
    c = _config(base, tmp_path / "run", **{"lora.modules_to_save": "embed_tokens", "train.max_steps": 2})
    c.model.path, c.tokenizer.path = str(tmp_path / "tied"), str(base["tok_added"])
    loop.train(c, log=lambda *a: None)
    run = setup_lib.load_run(tmp_path / "run")
    ours = np.asarray(run[0].model.apply(lora_lib.combine(run[1], run[0].frozen), _ids(n)))
    out = export.export_adapter(tmp_path / "run", tmp_path / "adapter", run=run)
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tied")).eval()
    m.resize_token_embeddings(n + 3)
    pm = peft.PeftModel.from_pretrained(m, str(out)).eval()
    np.testing.assert_allclose(_torch_logits(pm, _ids(n)), ours, atol=1e-4, rtol=0)


def test_a_token_the_vocabulary_has_is_left_alone(base):
    """Re-adding a piece the vocabulary has (transformers' ``add_tokens`` would make it an added token matched before
    the merges) leaves the tokenizer as loaded: same length, same ids for text around it, EOS still special."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from easytune.tokenizer import load_tokenizer
    plain = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    text = "Sort the digits in ascending order: 4907215. The sorted result follows."
    # a piece of the vocabulary whose re-adding changes how this text tokenizes under transformers' add_tokens
    piece = None
    for cand in sorted((t for t in plain.get_vocab() if t.isalpha() and len(t) >= 2), key=len):
        ref = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
        ref.add_tokens([AddedToken(cand, rstrip=False, lstrip=False, normalized=False)])
        if ref(text)["input_ids"] != plain(text)["input_ids"]:
            piece = cand
            break
    assert piece is not None, "no vocabulary piece changes the text's tokenization when re-added"
    tok = load_tokenizer(base["tokenizer"], [piece, plain.eos_token, "<tool_call>"])
    assert len(tok) == len(plain) + 1 and tok.convert_tokens_to_ids("<tool_call>") == len(plain)
    assert tok(text)["input_ids"] == plain(text)["input_ids"]
    assert plain.eos_token_id in tok.all_special_ids


@pytest.mark.parametrize("raw", ["<a>,,<b>", "<a> ,<b>", ",", " <a>"])
def test_comma_separated_added_tokens_refuse_blank_or_padded_entries(raw):
    from easytune import config as config_lib
    with pytest.raises(ConfigError, match="tokenizer.added_tokens"):
        config_lib.apply_overrides(config_lib.defaults(), [f"tokenizer.added_tokens={raw}"])
    c = config_lib.apply_overrides(config_lib.defaults(), ["tokenizer.added_tokens=['<a>', ' x']"])
    assert list(c.tokenizer.added_tokens) == ["<a>", " x"]


CHAT = ["<|im_start|>", "<|im_end|>"]


def test_added_special_tokens_are_transformers_add_special_tokens(base, tmp_path):
    """``tokenizer.added_special_tokens`` vs transformers' ``add_special_tokens({"additional_special_tokens": ...},
    replace_extra_special_tokens=False)`` after ``add_tokens`` of ``tokenizer.added_tokens``: same ids, special
    flags, split and decoding; ``save_pretrained`` (what export writes) keeps the flags."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from easytune import config as config_lib
    from easytune.tokenizer import load_tokenizer
    ref = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    n = len(ref)
    ref.add_tokens([AddedToken("<tool_call>", rstrip=False, lstrip=False, normalized=False)])
    assert ref.add_special_tokens({"additional_special_tokens": CHAT}, replace_extra_special_tokens=False) == 2
    c = _config(base, "/tmp/unused")
    config_lib.apply_overrides(c, ["tokenizer.added_tokens=<tool_call>",
                                   "tokenizer.added_special_tokens=<|im_start|>,<|im_end|>"])
    assert vocab_lib.added_special_tokens(c) == CHAT
    assert vocab_lib.new_tokens_key(c) == "tokenizer.added_tokens / tokenizer.added_special_tokens"
    tok = vocab_lib.load_run_tokenizer(c)
    assert len(tok) == len(ref) == n + 3 and tok.convert_tokens_to_ids(CHAT) == [n + 1, n + 2]
    flags = {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}
    assert flags == {i: (t.content, t.special) for i, t in ref.added_tokens_decoder.items()}
    assert flags[n + 1] == ("<|im_start|>", True) and flags[n] == ("<tool_call>", False)
    assert set(CHAT) <= set(tok.all_special_tokens) and tok.all_special_ids == ref.all_special_ids
    text = "<|im_start|>user\nhi<tool_call>x<|im_end|>\n"
    ids = tok(text)["input_ids"]
    assert ids == ref(text)["input_ids"] and n + 1 in ids and n + 2 in ids  # never split
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" not in tok.decode(ids, skip_special_tokens=True)
    assert "<tool_call>" in tok.decode(ids, skip_special_tokens=True)
    tok.save_pretrained(str(tmp_path / "saved"))  # export: setup.tokenizer.save_pretrained
    back = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert {i: (t.content, t.special) for i, t in back.added_tokens_decoder.items()} == flags
    assert back.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    plain = load_tokenizer(base["tokenizer"])
    assert vocab_lib.missing_added_tokens(c, plain) == ["<tool_call>", *CHAT]
    assert len(load_tokenizer(back.name_or_path, (), CHAT)) == len(back)  # already there: left alone
    with pytest.raises(ValueError, match="tokenizer.added_special_tokens: entries must be non-empty"):
        load_tokenizer(base["tokenizer"], (), ["<a>", ""])
    with pytest.raises(ValueError, match="'<a>' is also in tokenizer.added_tokens"):
        load_tokenizer(base["tokenizer"], ["<a>"], ["<a>"])


def test_chat_markers_added_as_special_tokens_end_turns(base):
    """ChatML on a tokenizer given ``<|im_start|>,<|im_end|>``: the ids equal transformers'
    ``apply_chat_template(tokenize=True)`` after ``add_special_tokens``. As special tokens (as in Qwen's tokenizer)
    each assistant ``<|im_end|>`` is trained and the newline after it is not; added as normal tokens
    (``tokenizer.added_tokens``) the newline is trained too, which is why ``tokenizer.added_special_tokens`` exists."""
    from transformers import AutoTokenizer

    from easytune.data.formats import format_chat
    from easytune.tokenizer import CHAT_TEMPLATES, load_tokenizer
    template = CHAT_TEMPLATES["chatml"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "See you."}]
    ref = AutoTokenizer.from_pretrained(str(base["tokenizer"]))
    ref.add_special_tokens({"additional_special_tokens": CHAT}, replace_extra_special_tokens=False)
    want = list(ref.apply_chat_template(msgs, tokenize=True, chat_template=template)["input_ids"])
    for kw, newline_trained in (({"added_special_tokens": CHAT}, False), ({"added_tokens": CHAT}, True)):
        tok = load_tokenizer(base["tokenizer"], **kw)
        [ex] = format_chat([{"messages": msgs}], tok, chat_template=template)
        ids, mask = ex["input_ids"], ex["loss_mask"]
        assert ids == want
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        assert trained == ("Hello!<|im_end|>See you.<|im_end|>" if not newline_trained
                           else "Hello!<|im_end|>\nSee you.<|im_end|>\n"), kw
        end = tok.convert_tokens_to_ids("<|im_end|>")
        after = [(mask[p], mask[p + 1], tok.decode([ids[p + 1]])) for p, i in enumerate(ids) if i == end and mask[p]]
        assert after == [(1, int(newline_trained), "\n")] * 2, kw


@pytest.mark.parametrize("raw", ["<a>,,<b>", "<a> ,<b>", ",", " <a>"])
def test_comma_separated_added_special_tokens_refuse_blank_or_padded_entries(raw):
    from easytune import config as config_lib
    with pytest.raises(ConfigError, match="tokenizer.added_special_tokens"):
        config_lib.apply_overrides(config_lib.defaults(), [f"tokenizer.added_special_tokens={raw}"])
    c = config_lib.apply_overrides(config_lib.defaults(), ["tokenizer.added_special_tokens=<|im_start|>,<|im_end|>"])
    assert list(c.tokenizer.added_special_tokens) == CHAT
    c = config_lib.apply_overrides(config_lib.defaults(), ["tokenizer.added_special_tokens=['<a>', ' x']"])
    assert list(c.tokenizer.added_special_tokens) == ["<a>", " x"]


def test_lora_with_added_special_tokens_needs_modules_to_save(base, tmp_path):
    """The LoRA refusal of new tokens without ``lora.modules_to_save`` also fires for ``added_special_tokens``."""
    from easytune.train import setup as setup_lib
    c = _config(base, tmp_path / "r", **{"lora.modules_to_save": "", "tokenizer.added_special_tokens": "<|im_end|>"})
    with pytest.raises(ConfigError, match="tokenizer.added_special_tokens is set.*lacks.*modules_to_save=embed_tokens,"
                                          "lm_head"):
        setup_lib.build(c, vocab_lib.load_run_tokenizer(c))
    with pytest.raises(ValueError, match="tokenizer.added_special_tokens: the tokenizer given lacks"):
        from easytune.tokenizer import load_tokenizer
        setup_lib.build(c, load_tokenizer(base["tokenizer"]))
