"""GGUF import of the new families: tiny random transformers models -> GGUF -> ``convert_gguf`` -> transformers.

Each test builds a tiny random model (fp32, ``torch.manual_seed``), saves it with ``save_pretrained`` and writes
the GGUF file llama.cpp's ``convert_hf_to_gguf.py`` would write for it (:func:`_write_gguf`, the forward
direction, written here from the llama.cpp source: metadata from ``TextModel.set_gguf_parameters`` and the
family classes' ``set_gguf_parameters``, tensor names from gguf-py's own ``TensorNameMap``, transforms from the
family classes' ``modify_tensors``). The GGUF is converted back with ``convert_gguf`` and the result loaded with
``transformers.AutoModelForCausalLM``: its fp32 logits must equal the original's within 1e-5 and its config the
original's architecture fields.

References (llama.cpp ``convert_hf_to_gguf.py``; commit-independent class names):
  * ``TextModel.set_gguf_parameters``: block_count, context_length, embedding_length, feed_forward_length,
    head_count(_kv), rope.freq_base (+ rope.freq_base_swa from rope_parameters["sliding_attention"]),
    rope.scaling.type/factor (linear), layer_norm_rms_epsilon, expert_count / expert_used_count,
    key_length / value_length (from head_dim).
  * ``LlamaModel``: vocab_size, rope.dimension_count; ``permute`` of q_proj / k_proj rows; Mixtral experts
    stacked to ``layers.{bid}.feed_forward.experts.{w1,w2,w3}.weight``.
  * ``Qwen2MoeModel``: expert_feed_forward_length; experts stacked to
    ``model.layers.{bid}.mlp.experts.{gate,up,down}_proj.weight``. ``Qwen3Model`` / ``Qwen3MoeModel``: no extras.
  * ``Gemma2Model``: its own set_gguf_parameters (no RoPE keys), attn/final_logit_softcapping,
    attention.sliding_window; lm_head skipped; ``norm.weight + 1``.
  * ``Gemma3Model``: TextModel's keys + sliding_window, final_logit_softcapping; ``norm.weight + 1``.
  * ``Phi3MiniModel``: its own set_gguf_parameters (rope.scaling.original_context_length,
    rope.dimension_count = partial * D // H, attention.sliding_window 0 for None) and
    ``generate_extra_tensors`` (rope_factors_long / _short, rope.scaling.attn_factor).
"""

import json
import math

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from easytune.models.gguf import BPE_PRE_TOKENIZERS, SUPPORTED_ARCHITECTURES, convert_gguf  # noqa: E402

ATOL = 1e-5
V = 64
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, rms_norm_eps=1e-6)


# ---------------------------------------------------------------- the forward direction (convert_hf_to_gguf)


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``LlamaModel.permute`` (rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _stack_experts(sd: dict, n_layers: int, n_experts: int, hf_prefix: str, names: dict[str, str]) -> dict:
    """``LlamaModel`` / ``Qwen2MoeModel.modify_tensors``: per-expert [out, in] -> one [X, out, in] per kind.

    ``names`` maps the per-expert HF leaf (``w1`` / ``gate_proj``) to the merged name template ``{bid}``.
    """
    for bid in range(n_layers):
        for leaf, merged in names.items():
            keys = [f"model.layers.{bid}.{hf_prefix}.experts.{x}.{leaf}.weight" for x in range(n_experts)]
            sd[merged.format(bid=bid)] = np.stack([sd.pop(k) for k in keys])
    return sd


def _write_gguf(model_dir, path, extra_tensors=None, tokenizer=None):
    """The GGUF ``convert_hf_to_gguf.py`` writes for the HF dir ``model_dir`` (F32, no tokenizer unless given).

    ``tokenizer(writer)`` adds the ``tokenizer.ggml.*`` keys; without it ``{arch}.vocab_size`` says V.
    """
    hp = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.float().numpy() for k, v in safetensors_torch.load_file(model_dir / "model.safetensors").items()}
    mt = hp["model_type"]
    arch = {"llama": "llama", "mixtral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma2": "gemma2",
            "gemma3_text": "gemma3", "phi3": "phi3"}[mt]
    L, D, H, K = hp["num_hidden_layers"], hp["hidden_size"], hp["num_attention_heads"], hp["num_key_value_heads"]
    rope = hp.get("rope_parameters") or {}
    w = gguf.GGUFWriter(path, arch)
    if mt == "phi3":  # Phi3MiniModel.set_gguf_parameters
        partial = rope.get("partial_rotary_factor", 1.0)
        w.add_context_length(hp["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(hp["original_max_position_embeddings"])
        w.add_embedding_length(D)
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_block_count(L)
        w.add_head_count(H)
        w.add_head_count_kv(K)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_rope_dimension_count(int(partial * D) // H)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_sliding_window(hp.get("sliding_window") or 0)
        if rope.get("rope_type") == "longrope":  # generate_extra_tensors
            scale = hp["max_position_embeddings"] / hp["original_max_position_embeddings"]
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(hp["original_max_position_embeddings"])) if scale > 1 else 1.0)
            sd["rope_factors_long.weight"] = np.array(rope["long_factor"], np.float32)
            sd["rope_factors_short.weight"] = np.array(rope["short_factor"], np.float32)
    elif mt == "gemma2":  # Gemma2Model.set_gguf_parameters (no TextModel keys, so no rope.freq_base)
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(D)
        w.add_block_count(L)
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(H)
        w.add_head_count_kv(K)
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
    else:  # TextModel.set_gguf_parameters (+ LlamaModel / Qwen2MoeModel / Gemma3Model extras)
        full = rope.get("full_attention", rope)
        w.add_block_count(L)
        w.add_context_length(hp["max_position_embeddings"])
        w.add_embedding_length(D)
        w.add_feed_forward_length(hp["intermediate_size"])
        w.add_head_count(H)
        w.add_head_count_kv(K)
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        if "sliding_attention" in rope:
            w.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        if mt in ("mixtral", "qwen3_moe"):
            w.add_expert_count(hp.get("num_local_experts", hp.get("num_experts")))
            w.add_expert_used_count(hp["num_experts_per_tok"])
        if hp.get("head_dim") is not None:
            w.add_key_length(hp["head_dim"])
            w.add_value_length(hp["head_dim"])
        if mt in ("llama", "mixtral"):
            w.add_vocab_size(hp["vocab_size"])
            w.add_rope_dimension_count(hp.get("head_dim") or D // H)
        if mt == "qwen3_moe":
            w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
        if mt == "gemma3_text":  # (it also re-adds context / heads / eps / key length: the same values)
            if hp.get("final_logit_softcapping"):
                w.add_final_logit_softcapping(hp["final_logit_softcapping"])
            w.add_sliding_window(hp["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if tokenizer is not None:
        tokenizer(w)
    elif mt not in ("llama", "mixtral"):
        w.add_vocab_size(hp["vocab_size"])

    if mt in ("llama", "mixtral"):  # LlamaModel.modify_tensors
        for k in list(sd):
            if k.endswith(("q_proj.weight", "q_proj.bias")):
                sd[k] = _llama_permute(sd[k], H)
            elif k.endswith(("k_proj.weight", "k_proj.bias")):
                sd[k] = _llama_permute(sd[k], K)
    if mt == "mixtral":
        _stack_experts(sd, L, hp["num_local_experts"], "block_sparse_moe",
                       {x: "layers.{bid}.feed_forward.experts." + x + ".weight" for x in ("w1", "w2", "w3")})
    if mt == "qwen3_moe":
        _stack_experts(sd, L, hp.get("num_local_experts", hp.get("num_experts")), "mlp",
                       {x: "model.layers.{bid}.mlp.experts." + x + ".weight"
                        for x in ("gate_proj", "up_proj", "down_proj")})
    if mt in ("gemma2", "gemma3_text"):  # Gemma2Model / Gemma3Model.modify_tensors
        sd.pop("lm_head.weight", None)
        sd = {k: v + 1 if k.endswith("norm.weight") else v for k, v in sd.items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], L)
    for k, v in sd.items():
        name = k if k.startswith("rope_factors") else names.get_name(k, try_suffixes=(".weight", ".bias"))
        assert name is not None, k
        w.add_tensor(name, np.ascontiguousarray(v, np.float32))
    for name, v in (extra_tensors or {}).items():
        w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- tiny models


def _tiny(kind: str):
    """(transformers config, the fields the converted config must match) of a tiny model of ``kind``."""
    T = transformers
    if kind == "qwen3":
        return T.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=16, rope_theta=1e6), ["head_dim"]
    if kind == "qwen3_tied":
        return (T.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=8, tie_word_embeddings=True),
                ["head_dim", "tie_word_embeddings"])
    if kind == "qwen3_moe":  # llama.cpp's qwen3moe graph always renormalises the top-k weights: norm_topk_prob
        return (T.Qwen3MoeConfig(**COMMON, num_hidden_layers=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=16, norm_topk_prob=True),
                ["head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"])
    if kind == "llama":  # the llama path too: linear RoPE scaling, q/k/v/o biases (q/k bias rows permuted)
        return (T.LlamaConfig(**COMMON, num_hidden_layers=2, attention_bias=True,
                              rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                ["attention_bias", "rope_parameters"])
    if kind == "mixtral":
        return (T.MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                rope_theta=1e6),
                ["num_local_experts", "num_experts_per_tok", "intermediate_size"])
    if kind == "gemma2":  # llama.cpp's attention scale is head_dim ** -0.5 (not 27B): query_pre_attn_scalar=E
        return (T.Gemma2Config(**COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=4, attn_logit_softcapping=0.5, final_logit_softcapping=2.0),
                ["head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types", "attn_logit_softcapping",
                 "final_logit_softcapping", "hidden_activation", "tie_word_embeddings"])
    if kind == "gemma3":  # 7 layers: pattern 6 makes layer 5 full attention, the rest sliding
        return (T.Gemma3TextConfig(**COMMON, num_hidden_layers=7, head_dim=8, query_pre_attn_scalar=8,
                                   sliding_window=4, final_logit_softcapping=3.0,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 1e4}}),
                ["head_dim", "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
                 "rope_parameters"])
    if kind == "phi3":  # LongRoPE on a partial rotary (Phi-4-mini style): 4 of 8 dims rotate, factors [2]
        rope = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.25], "long_factor": [3.0, 5.5]}
        return (T.Phi3Config(**COMMON, num_hidden_layers=2, original_max_position_embeddings=32,
                             rope_parameters=rope, pad_token_id=0, eos_token_id=1, bos_token_id=2),
                ["original_max_position_embeddings", "rope_parameters", "sliding_window"])
    raise KeyError(kind)


def _hf_model(kind, out, seed=0):
    config, fields = _tiny(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 0 (Gemma) / 1: give them values so a lost offset shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in kind else 1.0))
    model.save_pretrained(out)
    return model, fields


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


IDS = [[3, 17, 42, 5, 63, 8, 21, 0, 33, 12, 50, 7], [9, 1, 2, 60, 44, 31, 18, 26, 4, 39, 58, 11]]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_tied", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3"])
def test_family_roundtrip_logits(kind, tmp_path):
    model, fields = _hf_model(kind, tmp_path / "hf")
    src = _write_gguf(tmp_path / "hf", tmp_path / f"{kind}.gguf")
    out = convert_gguf(src, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(model)
    for field in fields + ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "num_key_value_heads", "rms_norm_eps"]:
        assert getattr(back.config, field) == getattr(model.config, field), field
    np.testing.assert_allclose(_logits(back, IDS), _logits(model, IDS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "phi3"])
def test_easytune_loads_converted_dir(kind, tmp_path):
    """easytune's own loader and model on the converted dir: the issue's 1e-4 against transformers."""
    pytest.importorskip("flax")
    from easytune.models.hf_weights import load_hf_model
    from easytune.models.llama import LlamaForCausalLM

    model, _ = _hf_model(kind, tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / f"{kind}.gguf"), tmp_path / "out")
    config, params = load_hf_model(out)
    ours = LlamaForCausalLM(config).apply({"params": params}, np.array(IDS, np.int32))
    np.testing.assert_allclose(np.asarray(ours), _logits(model, IDS), atol=1e-4, rtol=0)


def test_mixtral_experts_are_split_per_expert(tmp_path):
    """The on-disk names are the ones save_pretrained writes, expert e's w1 being row block e of ffn_gate_exps."""
    from safetensors.numpy import load_file

    _hf_model("mixtral", tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "m.gguf"), tmp_path / "out")
    ours, ref = load_file(out / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", 4, 2)


def test_gemma_norms_lose_the_added_one(tmp_path):
    from safetensors.numpy import load_file

    _hf_model("gemma2", tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "g.gguf"), tmp_path / "out")
    ours, ref = load_file(out / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in ours and json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    norms = [k for k in ref if k.endswith("norm.weight")]
    assert len(norms) == 3 * 4 + 1
    for k in norms:  # (w + 1) - 1 in float32
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-7, rtol=0, err_msg=k)


def test_phi3_rope_factors_become_rope_parameters(tmp_path):
    _hf_model("phi3", tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "p.gguf"), tmp_path / "out")
    rope = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["partial_rotary_factor"] == 0.5
    assert (rope["short_factor"], rope["long_factor"]) == ([1.0, 1.25], [3.0, 5.5])
    assert "attention_factor" not in rope  # the stored one is the LongRoPE default, recomputed by transformers


def test_phi3_long_context_logits(tmp_path):
    """Past original_max_position_embeddings (32) transformers switches to the long factors."""
    model, _ = _hf_model("phi3", tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "p.gguf"), tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = [list(np.random.default_rng(0).integers(0, V, 40))]
    np.testing.assert_allclose(_logits(back, ids), _logits(model, ids), atol=ATOL, rtol=0)


def test_quantized_experts_dequantize(tmp_path):
    """Q8_0 stacked experts [X, F, D] dequantize and split like F32 ones (8-bit error only)."""
    _hf_model("qwen3_moe", tmp_path / "hf")
    src = _write_gguf(tmp_path / "hf", tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(src)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(tmp_path / "q8.gguf", "qwen3moe")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.array(t.data)
        if "_exps" in t.name and data.shape[-1] % 32 == 0:  # gate / up [X, F, D=32]; down [X, D, F=16] stays F32
            w.add_tensor(t.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from safetensors.numpy import load_file

    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8.gguf").tensors} == {"Q8_0", "F32"}
    exact = load_file(convert_gguf(src, tmp_path / "a") / "model.safetensors")
    quant = load_file(convert_gguf(tmp_path / "q8.gguf", tmp_path / "b") / "model.safetensors")
    assert set(exact) == set(quant)
    for k in exact:
        tol = 0.02 * np.abs(exact[k]).max() if ".experts." in k else 0
        np.testing.assert_allclose(quant[k], exact[k], atol=tol, rtol=0, err_msg=k)


# ---------------------------------------------------------------- tokenizers

TEXTS = ["Hello world", "Hello  world  ", "I'm here, you'RE there; they'll've gone.", "12345 + 678 = 7023",
         "Ünïcödé naïve café", "日本語のテキスト", "emoji 😀👍", "tabs\tand\nnew\n\nlines\r\n", "",
         "<|im_start|>user\nhi<|im_end|>"]
CORPUS = ["Hello world, hello there. I'm fine; you're fine.", "The quick brown fox jumps over the lazy dog 123 4567.",
          "Naïve café, ünïcödé text.", "def f(x):\n    return x + 1\n"] * 20


def _qwen_style_bpe():
    """A byte-level BPE trained with ``tokenizers``, laid out as Qwen2.5 / Qwen3's ``tokenizer.json`` is
    (NFC; Split(regex, isolated) + ByteLevel(use_regex=False); ByteLevel decoder; specials as added tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_PRE_TOKENIZERS["qwen2"][0]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _gpt2_vocab(tok, pre="qwen2"):
    """``TextModel._set_vocab_gpt2`` / ``get_vocab_base``: tokens by id, CONTROL for specials, merges as "a b"."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([int(t) for t in types])
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab["<|endoftext|>"])
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_pad_token_id(vocab["<|endoftext|>"])
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return len(tokens), add


def _qwen3_with_vocab(tmp_path, n_vocab):
    config = transformers.Qwen3Config(**{**COMMON, "vocab_size": n_vocab}, num_hidden_layers=1, head_dim=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")


def test_qwen_bpe_tokenizer_is_rebuilt(tmp_path):
    ref = _qwen_style_bpe()
    n, add = _gpt2_vocab(ref)
    _qwen3_with_vocab(tmp_path, n)
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "q.gguf", tokenizer=add), tmp_path / "out")
    assert not (out / "tokenizer.model").exists()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.is_fast
    for text in TEXTS:
        ids = ref.encode(text).ids
        assert tok(text, add_special_tokens=True).input_ids == ids, text  # no BOS (add_bos_token false)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_llama3_bpe_adds_bos(tmp_path):
    """pre 'llama-bpe' with add_bos_token: BOS first, as Llama 3's TemplateProcessing does."""
    ref = _qwen_style_bpe()
    n, add = _gpt2_vocab(ref, pre="llama-bpe")

    def add_bos(w):
        add(w)
        w.add_add_bos_token(True)
    _qwen3_with_vocab(tmp_path, n)
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "q.gguf", tokenizer=add_bos), tmp_path / "out")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    bos = ref.token_to_id("<|endoftext|>")
    assert tok("Hello world").input_ids[0] == bos
    assert tok("Hello world", add_special_tokens=False).input_ids == ref.encode("Hello world").ids


def test_unknown_bpe_pre_tokenizer_writes_no_tokenizer(tmp_path, caplog):
    ref = _qwen_style_bpe()
    n, add = _gpt2_vocab(ref, pre="deepseek-coder")
    _qwen3_with_vocab(tmp_path, n)
    src = _write_gguf(tmp_path / "hf", tmp_path / "q.gguf", tokenizer=add)
    with caplog.at_level("WARNING", logger="easytune.models.gguf"):
        out = convert_gguf(src, tmp_path / "out")
    assert "'deepseek-coder'" in caplog.text and "WITHOUT tokenizer files" in caplog.text
    assert (out / "model.safetensors").is_file() and not list(out.glob("tokenizer*"))


def test_gemma_sentencepiece_without_space_prefix(tmp_path):
    """Gemma2Model.set_vocab: SentencePiece pieces + add_space_prefix False; the rebuilt model and the
    transformers fast tokenizer encode as the original SentencePiece model (no "▁" prefix)."""
    spm = pytest.importorskip("sentencepiece")
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, split_digits=True,
                                   allow_whitespace_only_pieces=True, minloglevel=2)
    ref = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = ref.get_piece_size()

    def add(w):  # LlamaModel._create_vocab_sentencepiece: piece, score, type per id
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list([ref.id_to_piece(i) for i in range(n)])
        w.add_token_scores([ref.get_score(i) for i in range(n)])
        kinds = [gguf.TokenType.UNKNOWN if ref.is_unknown(i) else gguf.TokenType.CONTROL if ref.is_control(i)
                 else gguf.TokenType.BYTE if ref.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
        w.add_token_types([int(k) for k in kinds])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_pad_token_id(0)
        w.add_unk_token_id(3)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)

    config = transformers.Gemma2Config(**{**COMMON, "vocab_size": n}, num_hidden_layers=2, head_dim=8)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    out = convert_gguf(_write_gguf(tmp_path / "hf", tmp_path / "g.gguf", tokenizer=add), tmp_path / "out")
    ours = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    fast = transformers.AutoTokenizer.from_pretrained(out)
    assert fast.is_fast and (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (2, 1, 0)
    for text in TEXTS[:-1] + [" leading space", "Hello world"]:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert fast(text, add_special_tokens=False).input_ids == ids, text
    assert fast("Hello").input_ids[0] == 2


# ---------------------------------------------------------------- refusals


def _qwen3_gguf(tmp_path, **meta):
    """A tiny qwen3 GGUF with metadata keys added / overridden (``{"qwen3.x": (value, GGUFValueType)}``)."""
    _hf_model("qwen3", tmp_path / "hf")
    src = _write_gguf(tmp_path / "hf", tmp_path / "base.gguf")
    reader = gguf.GGUFReader(src)
    arch = meta.pop("arch", "qwen3")
    w = gguf.GGUFWriter(tmp_path / "edited.gguf", arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in meta:
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name.replace("qwen3.", f"{arch}.", 1), field.contents(), field.types[0], sub_type=sub)
    for name, (value, vtype) in meta.items():
        w.add_key_value(name, value, vtype)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "edited.gguf"


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    src = _qwen3_gguf(tmp_path, arch="qwen2moe")
    with pytest.raises(ValueError, match=r"edited\.gguf.*'qwen2moe' is not supported.*'qwen3'.*'gemma3'.*'phi3'"):
        convert_gguf(src, tmp_path / "out")
    assert set(SUPPORTED_ARCHITECTURES) == {"llama", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3"}


@pytest.mark.parametrize("meta, pattern", [
    ({"qwen3.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}, r"RoPE scaling 'yarn'"),
    ({"qwen3.rope.dimension_count": (8, gguf.GGUFValueType.UINT32)}, r"partial rotary.*dimension_count=8"),
    ({"qwen3.expert_count": (4, gguf.GGUFValueType.UINT32)}, r"qwen3\.expert_count=4.*llama.*qwen3moe"),
    ({"qwen3.attention.value_length": (8, gguf.GGUFValueType.UINT32)}, r"value_length=8 differs"),
])
def test_unsupported_metadata_is_refused(tmp_path, meta, pattern):
    src = _qwen3_gguf(tmp_path, **meta)
    with pytest.raises(ValueError, match=r"edited\.gguf.*" + pattern):
        convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_qwen3_without_qk_norm_is_refused(tmp_path):
    _hf_model("qwen3", tmp_path / "hf")
    src = _write_gguf(tmp_path / "hf", tmp_path / "q.gguf")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(tmp_path / "llama_like.gguf", "qwen3")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        if not t.name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"missing tensors.*attn_k_norm"):
        convert_gguf(tmp_path / "llama_like.gguf", tmp_path / "out")
