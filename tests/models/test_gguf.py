"""GGUF import: stories260K.gguf -> HF dir, checked against outside references.

References (all from ../shared/data/SOURCES.md unless stated):
  * the 40 greedy ids from BOS and the 5 top step-0 logits (fp64 NumPy forward, equal to llama2.c's
    ``-t 0.0`` sample), checked through transformers' ``LlamaForCausalLM`` and easytune's;
  * tok512's encoding of the Lily sentence, and tok512.model itself (same pieces as the GGUF vocab);
  * llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (the forward RoPE permutation).
"""

import json
import pathlib
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from easytune.models.gguf import convert_gguf, unpermute_rope  # noqa: E402

GOLDEN_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401,
              396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432,
              358, 394, 261, 370, 432, 352]
TOP5_IDS = [403, 385, 410, 317, 407]
TOP5_LOGITS = [17.0235, 15.4062, 13.1083, 12.7692, 12.4181]
LILY = "Once upon a time, there was a little girl named Lily."
LILY_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
LOGIT_ATOL = 1e-3  # SOURCES gives the logits to 4 decimals


@pytest.fixture(scope="module")
def gguf_path(shared_data) -> pathlib.Path:
    path = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def tok512(shared_data) -> pathlib.Path:
    path = shared_data / "tokenizers" / "tok512" / "tok512.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory) -> pathlib.Path:
    """stories260K converted from the GGUF alone (tokenizer rebuilt from its metadata)."""
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("stories260K"))


@pytest.fixture(scope="module")
def hf_model(converted):
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    return model.eval()


def _rewrite(src: pathlib.Path, dst: pathlib.Path, arch="llama", meta=None, drop=(), replace=None,
             add=None, transform=None):
    """Copies a GGUF with gguf.GGUFWriter, changing the arch, metadata values or tensors.

    ``transform(name, array) -> (array, raw_dtype or None)`` rewrites every kept tensor (quantizing).
    """
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = (meta or {}).get(name, field.contents())
        if name.startswith("llama."):
            name = f"{arch}." + name[len("llama."):]
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name in drop:
            continue
        data, raw_dtype = (replace or {}).get(t.name, np.array(t.data)), None
        if transform is not None:
            data, raw_dtype = transform(t.name, data)
        writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
    for name, data in (add or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _step0_top5(logits) -> tuple[list[int], np.ndarray]:
    logits = np.asarray(logits, np.float64)
    ids = np.argsort(-logits)[:5]
    return ids.tolist(), logits[ids]


# ---------------------------------------------------------------- config and weights


def test_config_matches_llama2c_facts(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (512, 64, 172)
    heads = (cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert cfg["num_hidden_layers"] == 5 and heads == (8, 4)
    assert cfg["head_dim"] == 8
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 10000.0
    assert cfg["max_position_embeddings"] == 2048  # llama.context_length as stored
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, None)


def test_tied_checkpoint_has_no_lm_head(converted):
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", framework="np") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names
    # 260K unique parameters: 32,768 embedding + 227,200 layers + 64 final norm (SOURCES)
    with safe_open(converted / "model.safetensors", framework="np") as f:
        assert sum(f.get_tensor(n).size for n in names) == 32768 + 227200 + 64


def test_unpermute_rope_inverts_llama_cpp_permute():
    def llama_cpp_permute(weights, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    rng = np.random.default_rng(0)
    for n_heads, hd, d in [(8, 8, 64), (4, 8, 64), (2, 16, 24)]:
        hf_w = rng.standard_normal((n_heads * hd, d)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(hf_w, n_heads), n_heads), hf_w)
        bias = rng.standard_normal(n_heads * hd)
        np.testing.assert_array_equal(unpermute_rope(llama_cpp_permute(bias, n_heads), n_heads), bias)


# ---------------------------------------------------------------- numerics against the golden run


def test_transformers_greedy_matches_golden(hf_model):
    out = hf_model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=40,
                            min_new_tokens=40, pad_token_id=0)
    assert out[0, 1:].tolist() == GOLDEN_IDS


def test_transformers_step0_logits(hf_model):
    with torch.no_grad():
        logits = hf_model(torch.tensor([[1]])).logits[0, -1].numpy()
    ids, values = _step0_top5(logits)
    assert ids == TOP5_IDS
    np.testing.assert_allclose(values, TOP5_LOGITS, atol=LOGIT_ATOL, rtol=0)


def test_easytune_step0_logits(converted):
    from easytune.models.hf_weights import load_hf_model
    from easytune.models.llama import LlamaForCausalLM

    config, params = load_hf_model(converted)
    logits = LlamaForCausalLM(config).apply({"params": params}, np.array([[1]], np.int32))
    assert logits.dtype == np.float32 and logits.shape == (1, 1, 512)
    ids, values = _step0_top5(logits[0, -1])
    assert ids == TOP5_IDS
    np.testing.assert_allclose(values, TOP5_LOGITS, atol=LOGIT_ATOL, rtol=0)


def test_missing_output_weight_is_tied(gguf_path, tmp_path):
    src = _rewrite(gguf_path, tmp_path / "no_output.gguf", drop=("output.weight",))
    out = convert_gguf(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ids, values = _step0_top5(model(torch.tensor([[1]])).logits[0, -1].numpy())
    assert ids == TOP5_IDS
    np.testing.assert_allclose(values, TOP5_LOGITS, atol=LOGIT_ATOL, rtol=0)


def test_distinct_output_weight_becomes_lm_head(gguf_path, tmp_path):
    """output = 2 * token_embd: untied lm_head, so every logit doubles (the final norm is unchanged)."""
    reader = gguf.GGUFReader(gguf_path)
    embd = next(np.array(t.data) for t in reader.tensors if t.name == "token_embd.weight")
    src = _rewrite(gguf_path, tmp_path / "untied.gguf", replace={"output.weight": 2 * embd})
    out = convert_gguf(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ids, values = _step0_top5(model(torch.tensor([[1]])).logits[0, -1].numpy())
    assert ids == TOP5_IDS
    np.testing.assert_allclose(values, 2 * np.array(TOP5_LOGITS), atol=2 * LOGIT_ATOL, rtol=0)


def test_quantized_gguf_keeps_golden_text(gguf_path, tmp_path):
    """Q8_0 matrices (F16 where rows are not a multiple of 32) still give the 40 golden ids.

    Dequantization is gguf's; what is tested is the plumbing (quantized shapes, permutation after
    dequantizing, tying detected on equal quantized matrices). 8-bit blocks move the step-0 logits
    by ~1e-2 here, so they get a written 0.05 tolerance.
    """
    q8 = gguf.GGMLQuantizationType.Q8_0

    def quantize(name, w):
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            return gguf.quants.quantize(w, q8), q8
        return (w.astype(np.float16) if w.ndim == 2 else w), None

    src = _rewrite(gguf_path, tmp_path / "q8.gguf", transform=quantize)
    types = {t.tensor_type.name for t in gguf.GGUFReader(src).tensors}
    assert types == {"Q8_0", "F16", "F32"}
    out = convert_gguf(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    generated = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=40,
                               min_new_tokens=40, pad_token_id=0)
    assert generated[0, 1:].tolist() == GOLDEN_IDS
    with torch.no_grad():
        ids, values = _step0_top5(model(torch.tensor([[1]])).logits[0, -1].numpy())
    assert ids == TOP5_IDS
    np.testing.assert_allclose(values, TOP5_LOGITS, atol=0.05, rtol=0)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("cls", ["AutoTokenizer", "LlamaTokenizer"])
def test_hf_tokenizer_encodes_golden(converted, cls):
    tok = getattr(transformers, cls).from_pretrained(converted)
    assert tok(LILY, add_special_tokens=False).input_ids == LILY_IDS
    assert tok(LILY).input_ids == [1] + LILY_IDS  # add_bos_token, no eos
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.decode(GOLDEN_IDS).startswith(LILY + " She loved to play outside in the park.")


def test_auto_tokenizer_is_fast_from_tokenizer_json(converted):
    assert (converted / "tokenizer.json").is_file()
    assert transformers.AutoTokenizer.from_pretrained(converted).is_fast


def test_rebuilt_sentencepiece_equals_tok512(converted, tok512):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    def pieces(path):
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(pathlib.Path(path).read_bytes())
        return [(p.piece, p.score, p.type) for p in proto.pieces]

    assert pieces(converted / "tokenizer.model") == pieces(tok512)
    sp = spm.SentencePieceProcessor(model_file=str(converted / "tokenizer.model"))
    assert sp.encode(LILY) == LILY_IDS
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)


def test_rebuilt_sentencepiece_encodes_corpus_as_tok512(converted, tok512, shared_data):
    corpus = shared_data / "corpus" / "tinystories" / "tinystories_sample.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} not found")
    ours = spm.SentencePieceProcessor(model_file=str(converted / "tokenizer.model"))
    ref = spm.SentencePieceProcessor(model_file=str(tok512))
    lines = [" ".join(line.split()) for line in corpus.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:  # tok512 collapses runs of spaces, llama.cpp does not: compare normalized text
        assert ours.encode(line) == ref.encode(line), line


def test_fast_tokenizer_matches_sentencepiece(converted, shared_data):
    corpus = shared_data / "corpus" / "tinystories" / "tinystories_sample.txt"
    texts = ["In 2023, 12345 cats ate 7.5 fish!", "Ünïcödé 日本 😀", "a\nb\tc", "Hello  world "]
    if corpus.is_file():
        texts += corpus.read_text().splitlines()
    sp = spm.SentencePieceProcessor(model_file=str(converted / "tokenizer.model"))
    fast = transformers.AutoTokenizer.from_pretrained(converted)
    for text in texts:
        ids = sp.encode(text)
        assert fast(text, add_special_tokens=False).input_ids == ids, text
        assert sp.decode(ids) == text


def test_explicit_tokenizer_model_is_copied(gguf_path, tok512, tmp_path):
    out = convert_gguf(gguf_path, tmp_path / "hf", tokenizer_model=tok512)
    assert (out / "tokenizer.model").read_bytes() == tok512.read_bytes()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(LILY).input_ids == [1] + LILY_IDS


def test_tokenizer_model_next_to_gguf_is_used(gguf_path, tok512, tmp_path):
    (tmp_path / "src").mkdir()
    src = tmp_path / "src" / gguf_path.name
    src.symlink_to(gguf_path)
    (tmp_path / "src" / "tokenizer.model").write_bytes(tok512.read_bytes())
    out = convert_gguf(src, tmp_path / "hf")
    assert (out / "tokenizer.model").read_bytes() == tok512.read_bytes()


def test_non_sentencepiece_vocab_writes_no_tokenizer(gguf_path, tmp_path, caplog):
    src = _rewrite(gguf_path, tmp_path / "bpe.gguf", meta={"tokenizer.ggml.model": "gpt2"})
    with caplog.at_level("WARNING", logger="easytune.models.gguf"):
        out = convert_gguf(src, tmp_path / "hf")
    assert "gpt2" in caplog.text
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("tokenizer*"))


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.gguf.*no such"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("not a gguf file")
    with pytest.raises(ValueError, match=r"model\.gguf.*not a GGUF"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(gguf_path, tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:1000])  # inside the metadata
    with pytest.raises(ValueError, match=r"truncated\.gguf.*truncated or corrupt"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_names_tensor_and_sizes(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    last = max(gguf.GGUFReader(gguf_path).tensors, key=lambda t: t.data_offset)
    bad = tmp_path / "short.gguf"
    bad.write_bytes(data[:last.data_offset + 10])  # header intact, last tensor cut short
    pattern = (rf"short\.gguf: file appears truncated or corrupt: tensor {re.escape(last.name)} needs "
               rf"{last.n_bytes} bytes at offset {last.data_offset} .*only {last.data_offset + 10} bytes")
    with pytest.raises(ValueError, match=pattern):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_dir_is_a_file(gguf_path, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    with pytest.raises(ValueError, match=r"out: output directory exists and is not a directory"):
        convert_gguf(gguf_path, out)
    with pytest.raises(ValueError, match=r"out[/\\]sub: cannot create.*out exists and is not a dir"):
        convert_gguf(gguf_path, out / "sub")
    assert out.read_text() == "keep me"


def test_other_architecture(gguf_path, tmp_path):
    src = _rewrite(gguf_path, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2'.*only 'llama'"):
        convert_gguf(src, tmp_path / "out")


def test_missing_tensor(gguf_path, tmp_path):
    src = _rewrite(gguf_path, tmp_path / "missing.gguf", drop=("blk.3.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"missing\.gguf.*missing tensors.*blk\.3\.ffn_up\.weight"):
        convert_gguf(src, tmp_path / "out")


def test_unsupported_tensor(gguf_path, tmp_path):
    src = _rewrite(gguf_path, tmp_path / "extra.gguf", add={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"extra\.gguf.*unsupported tensors.*rope_freqs\.weight"):
        convert_gguf(src, tmp_path / "out")


def test_wrong_tensor_shape(gguf_path, tmp_path):
    bad = {"blk.1.attn_k.weight": np.zeros((64, 64), np.float32)}  # 8 kv heads' worth, config says 4
    src = _rewrite(gguf_path, tmp_path / "shape.gguf", replace=bad)
    with pytest.raises(ValueError, match=r"shape\.gguf.*blk\.1\.attn_k\.weight.*\(64, 64\).*\(32, 64\)"):
        convert_gguf(src, tmp_path / "out")


def test_mismatched_tokenizer_model(gguf_path, shared_data, tmp_path):
    other = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    if not other.is_file():
        pytest.skip(f"{other} not found")
    with pytest.raises(ValueError, match=r"tokenizer\.model.*does not match.*stories260K\.gguf"):
        convert_gguf(gguf_path, tmp_path / "out", tokenizer_model=other)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_missing_tokenizer_model(gguf_path, tmp_path):
    with pytest.raises(ValueError, match=r"absent\.model.*not found"):
        convert_gguf(gguf_path, tmp_path / "out", tokenizer_model=tmp_path / "absent.model")
