"""Import a GGUF file (llama.cpp's format) as a Hugging Face model directory.

GGUF stores the config as ``{arch}.*`` metadata, the weights as named tensors and the vocabulary as
``tokenizer.ggml.*`` arrays. :func:`convert_gguf` turns one such file into what
``transformers.AutoModelForCausalLM.from_pretrained`` and ``easytune.models.hf_weights.load_hf_model`` read:
``config.json``, safetensors and tokenizer files. Architectures (``general.architecture`` -> HF
``model_type``): ``llama`` -> ``llama``, or ``mixtral`` when ``llama.expert_count > 0``; ``qwen3`` ->
``qwen3``; ``qwen3moe`` -> ``qwen3_moe``; ``gemma2`` -> ``gemma2``; ``gemma3`` -> ``gemma3_text``;
``phi3`` -> ``phi3``. Any other architecture is refused, naming it and :data:`SUPPORTED_ARCHITECTURES`.

Axis letters: ``V`` vocab, ``D`` embed, ``H`` query heads, ``K`` kv heads, ``F`` mlp, ``E`` head dim,
``X`` experts. Weights keep the torch layout ``[out, in]``: numpy ``t.data`` of a GGUF tensor is already
``[out, in]`` (GGUF's own shape list is ggml order ``[in, out]``); stacked expert tensors are
``[X, out, in]``.

What llama.cpp's ``convert_hf_to_gguf.py`` does on the way in, and what is undone here:

* RoPE layout (``llama`` only, Mixtral included). llama.cpp's "normal" RoPE rotates interleaved pairs
  ``(x[2i], x[2i+1])``; HF rotates halves (``rotate_half``). ``LlamaModel.permute`` reorders the rows of
  ``Wq`` / ``Wk`` per head; :func:`unpermute_rope` inverts it. Qwen3, Gemma and Phi-3 use llama.cpp's NEOX
  RoPE (halves, as HF) and are stored unpermuted.
* Gemma norms. ``GemmaModel`` / ``Gemma2Model`` / ``Gemma3Model.modify_tensors`` add 1 to every
  ``*norm.weight`` (HF stores ``w`` and computes ``x * (1 + w)``; llama.cpp multiplies by the stored
  value); 1 is subtracted again.
* Experts. ``LlamaModel`` / ``Qwen2MoeModel.modify_tensors`` stack the per-expert matrices into
  ``ffn_{gate,up,down}_exps [X, out, in]``; they are split back into Mixtral
  ``block_sparse_moe.experts.e.{w1,w3,w2}`` / Qwen3-MoE ``mlp.experts.e.{gate,up,down}_proj``.
* Phi-3 keeps HF's fused ``qkv_proj`` (``attn_qkv``) and ``gate_up_proj`` (``ffn_up``, gate rows first);
  its LongRoPE factors are tensors (``rope_factors_long`` / ``rope_factors_short``) that go back into
  ``rope_parameters``.
* Tokenizer. A SentencePiece vocab (``tokenizer.ggml.model == "llama"``) has pieces, scores and types but
  no ``.model`` file; one is rebuilt with ``sentencepiece_model_pb2`` (or a given one is copied after
  checking its pieces). A GPT-2 byte-level BPE vocab (``"gpt2"``) is rebuilt as a ``tokenizers``
  ``tokenizer.json`` when its pre-tokenizer (``tokenizer.ggml.pre``) is one whose Hugging Face form is
  known (:data:`BPE_PRE_TOKENIZERS`); otherwise the model is written without tokenizer files and a
  warning says so.

References:
    GGUF spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (metadata keys, token types).
    llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel``, ``Qwen2MoeModel``, ``Qwen3Model``,
    ``Qwen3MoeModel``, ``Gemma2Model``, ``Gemma3Model``, ``Phi3MiniModel``: the forward direction),
    ``gguf-py/gguf/constants.py`` / ``tensor_mapping.py`` (tensor and key names), ``src/llama-model.cpp``
    (defaults a GGUF may leave out, e.g. Gemma's sliding-window pattern and attention scale) and
    ``src/llama-vocab.cpp`` (pre-tokenizer regexes).
    transformers ``convert_llama_weights_to_hf.py`` (``permute`` for Wq/Wk); the ``*Config`` classes of
    ``models/{llama,mixtral,qwen3,qwen3_moe,gemma2,gemma3,phi3}`` (config keys written).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any

import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from easytune.models.hf_config import config_from_hf, config_to_hf
from easytune.models.hf_weights import save_hf_state_dict

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

SUPPORTED_ARCHITECTURES = ("llama", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
_GEMMA = ("gemma2", "gemma3")
_QK_NORM = ("qwen3", "qwen3moe", "gemma3")
_NO_ID = 0xFFFFFFFF  # GGUF's "no such token" id (e.g. padding_token_id)
_DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's rope_freq_base_train when {arch}.rope.freq_base is absent
_DEFAULT_CONTEXT = 2048
_BYTE = 6  # GGUF / SentencePiece token type of byte-fallback pieces <0x00>..<0xFF>
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types of special / added tokens
# llama-model.cpp load_hparams: Gemma 2 slides on every other layer (window 4096 when the key is absent),
# Gemma 3 on five of six; both use head_dim ** -0.5 as attention scale except the 27B models
# (46 / 62 layers), which use (hidden_size // num_heads) ** -0.5; Gemma 2 soft-caps at 50 / 30 by default;
# Gemma 3's sliding layers use RoPE base 10000.
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA2_WINDOW, _GEMMA2_ATTN_SOFTCAP, _GEMMA2_FINAL_SOFTCAP = 4096, 50.0, 30.0
_GEMMA3_LOCAL_THETA = 10000.0

# Byte-level BPE pre-tokenizers whose Hugging Face tokenizer.json form is known, by tokenizer.ggml.pre:
# (Split regex or None for GPT-2's built-in ByteLevel regex, NFC normalizer, BPE ignore_merges).
# Regexes: the "original regex from tokenizer.json" of llama.cpp src/llama-vocab.cpp (Qwen2 / Qwen3
# tokenizer.json, Llama 3 tokenizer.json); ignore_merges as llama-vocab.cpp sets it (LLAMA3 pre types).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE_TOKENIZERS = {
    "qwen2": (_QWEN2_REGEX, True, False),
    "llama-bpe": (_LLAMA3_REGEX, False, True),
    "llama3": (_LLAMA3_REGEX, False, True),
    "llama-v3": (_LLAMA3_REGEX, False, True),
    "gpt2": (None, False, False),
}


def convert_gguf(
    src: PathLike, out_dir: PathLike, tokenizer_model: PathLike | None = None
) -> pathlib.Path:
    """Converts a GGUF file of a supported architecture into a Hugging Face model directory.

    Weights are dequantized to float32 and mapped to the HF names of the family (the inverse of
    llama.cpp's ``convert_hf_to_gguf.py``; see the module docstring): ``Wq`` / ``Wk`` rows of ``llama``
    files go from interleaved-pair RoPE to HF's ``rotate_half`` layout (:func:`unpermute_rope`), Gemma
    norms lose the 1 llama.cpp added, stacked experts are split per expert. ``lm_head`` is dropped and
    ``tie_word_embeddings=True`` when ``output.weight`` is absent or equal to ``token_embd.weight``.
    ``max_position_embeddings`` is ``{arch}.context_length`` as the file states (for stories260K the
    converter default 2048, although that model was trained at 512).

    The config is checked with ``easytune.models.hf_config.config_from_hf`` before anything is written;
    the ``llama`` family's ``config.json`` is that config written back by ``config_to_hf``, the other
    families' is the transformers config dict built by :func:`hf_config_from_gguf`.

    The tokenizer comes from, in order: ``tokenizer_model``; a ``tokenizer.model`` next to ``src``; a
    SentencePiece model rebuilt from the GGUF's ``tokenizer.ggml.*`` arrays (:func:`sentencepiece_from_gguf`)
    when ``tokenizer.ggml.model == "llama"``; a byte-level BPE ``tokenizer.json`` (:func:`bpe_from_gguf`)
    when it is ``"gpt2"`` with merges and a pre-tokenizer in :data:`BPE_PRE_TOKENIZERS`. A model file
    must have exactly the GGUF's pieces. Any other vocab (e.g. a BPE pre-tokenizer not listed) is
    converted without tokenizer files and a warning names the reason.

    Args:
        src: path of a ``.gguf`` file whose ``general.architecture`` is in :data:`SUPPORTED_ARCHITECTURES`.
        out_dir: directory to write (created; files of the same names are replaced).
        tokenizer_model: optional SentencePiece ``.model`` file to ship as ``tokenizer.model``.

    Returns:
        ``out_dir`` as a path. It holds ``config.json``, ``generation_config.json`` and safetensors
        (written by ``easytune.models.hf_weights.save_hf_state_dict``) and, when there is a tokenizer,
        ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` (and ``tokenizer.model``
        for SentencePiece).

    Raises:
        ValueError: naming the file and the problem, when ``out_dir`` (or a parent) exists and is not
            a directory, ``src`` is missing, not GGUF or truncated / corrupt (naming the first tensor
            that extends past the end of the file, when the header is intact), its architecture is
            not supported, metadata or tensors are missing, unexpected, misshapen or of an unsupported
            quantization, a feature is not supported (RoPE scaling other than linear / Phi-3 LongRoPE,
            partial rotary outside Phi-3, per-layer sizes, experts outside ``llama`` / ``qwen3moe``),
            ``config_from_hf`` rejects the config, or ``tokenizer_model`` is missing or has other pieces.

    References:
        llama.cpp ``convert_hf_to_gguf.py`` (the forward transforms); transformers
        ``convert_llama_weights_to_hf.py`` (``permute``); GGUF spec (metadata keys).
    """
    src = pathlib.Path(src)
    out_dir = pathlib.Path(out_dir)
    _check_out_dir(out_dir)
    reader = _open_reader(src)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    hf_config = hf_config_from_gguf(meta, src)
    arch = meta["general.architecture"]
    tensors = {t.name: t for t in reader.tensors}
    if arch == "phi3":
        _phi3_rope_factors(tensors, meta, hf_config, src)
    state_dict = _state_dict(tensors, hf_config, arch, src)
    head = state_dict.get("lm_head.weight")
    if head is None or np.array_equal(head, state_dict["model.embed_tokens.weight"]):
        state_dict.pop("lm_head.weight", None)
        hf_config["tie_word_embeddings"] = True
    if hf_config["model_type"] == "llama":
        hf_config = config_to_hf(config_from_hf(hf_config))  # the repo's config.json layout
    else:
        try:
            config_from_hf(hf_config)
        except ValueError as e:
            raise ValueError(f"{src}: the converted {hf_config['model_type']} config is not one easytune "
                             f"loads: {e}") from e
    tokenizer = _tokenizer(meta, src, tokenizer_model)  # validate before writing

    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_state_dict(state_dict, hf_config, out_dir)
    if tokenizer is not None:
        _write_tokenizer(tokenizer, meta, hf_config, out_dir)
    return out_dir


def _check_out_dir(out_dir: pathlib.Path) -> None:
    """Raises ValueError when ``out_dir``, or the nearest of its parents that exists, is not a directory."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output directory exists and is not a directory")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{out_dir}: cannot create the output directory, {parent} exists and"
                                 " is not a directory")
            return


class _TruncatedError(ValueError):
    """A tensor's data extends past the end of the GGUF file."""


class _CheckedReader(gguf.GGUFReader):
    """``gguf.GGUFReader`` that checks each tensor's data lies inside the file before mapping it.

    The stock reader slices the memmap and reshapes, so a short file fails with numpy's
    ``cannot reshape array of size ...``. The tensor-info layout used here (``field.parts`` =
    name length, name, n_dims, dims, type, offset) is the one ``GGUFReader._build_tensors`` reads.
    """

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
            except (ValueError, KeyError):
                continue  # unknown type: the stock reader raises, reported as corrupt
            n_elems = 1
            for d in dims.tolist():
                n_elems *= int(d)
            need = n_elems * type_size // block
            begin = int(start_offs) + int(offset[0])
            if begin + need > size:
                raise _TruncatedError(
                    f"tensor {bytes(name).decode('utf-8', 'replace')} needs {need} bytes at offset"
                    f" {begin} (to byte {begin + need}), but the file has only {size} bytes"
                )
        super()._build_tensors(start_offs, fields)


def _open_reader(src: pathlib.Path):
    """Opens ``src`` with ``gguf.GGUFReader`` after checking it exists and starts with ``GGUF``."""
    if not src.is_file():
        raise ValueError(f"{src}: no such GGUF file")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{src}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return _CheckedReader(src)
    except _TruncatedError as e:
        raise ValueError(f"{src}: file appears truncated or corrupt: {e}") from e
    except Exception as e:  # the reader raises ValueError / struct / index errors on corrupt files
        raise ValueError(f"{src}: unreadable GGUF file, file appears truncated or corrupt: {e}") from e


def hf_config_from_gguf(meta: dict[str, Any], src: PathLike = "<gguf>") -> dict[str, Any]:
    """Maps GGUF ``{arch}.*`` and ``tokenizer.ggml.*`` metadata to a transformers ``config.json`` dict.

    Keys read (``{arch}.`` prefix; defaults are llama.cpp's where it has one): ``embedding_length``,
    ``block_count``, ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv``,
    ``attention.key_length`` / ``value_length`` (head dim), ``context_length``,
    ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``, ``rope.dimension_count``,
    ``rope.scaling.type`` / ``factor`` (linear only), ``vocab_size``; experts: ``expert_count``,
    ``expert_used_count``, ``expert_feed_forward_length``, ``expert_weights_norm``; Gemma:
    ``attention.sliding_window``, ``attention.sliding_window_pattern``, ``attn_logit_softcapping``,
    ``final_logit_softcapping``, ``rope.freq_base_swa``; Phi-3: ``rope.scaling.original_context_length``,
    ``attention.sliding_window`` (0 = none). Phi-3's LongRoPE factors are tensors, added by
    ``convert_gguf``.

    Args:
        meta: GGUF metadata, key -> ``gguf.ReaderField.contents()`` (str, int, float or list).
        src: file name for error messages.

    Returns:
        A ``config.json`` dict of the family's transformers config class (``LlamaConfig``,
        ``MixtralConfig``, ``Qwen3Config``, ``Qwen3MoeConfig``, ``Gemma2Config``, ``Gemma3TextConfig``,
        ``Phi3Config``). ``tie_word_embeddings`` and ``attention_bias`` start False; the caller sets
        them from the tensors.

    Raises:
        ValueError: architecture not in :data:`SUPPORTED_ARCHITECTURES` (naming it and the list), required
            keys missing, per-layer sizes, partial rotary outside Phi-3, RoPE scaling other than linear
            (Phi-3: LongRoPE), value head dim different from key head dim, or experts on an architecture
            other than llama / qwen3moe.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{src}: general.architecture {arch!r} is not supported (only "
                         f"{', '.join(map(repr, SUPPORTED_ARCHITECTURES))})")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{src}: metadata key '{arch}.{key}' is missing")
        if isinstance(value, list):  # per-layer values (OpenELM style)
            if len(set(value)) != 1:
                raise ValueError(f"{src}: per-layer {arch}.{key} {value} is not supported")
            value = value[0]
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    value_dim = int(get("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ValueError(f"{src}: {arch}.attention.value_length={value_dim} differs from key_length={head_dim}"
                         " (not supported)")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim and arch != "phi3":
        raise ValueError(
            f"{src}: partial rotary ({arch}.rope.dimension_count={rope_dims}, head_dim={head_dim})"
            " is not supported")
    experts = int(get("expert_count", 0))
    if experts and arch not in ("llama", "qwen3moe"):
        raise ValueError(f"{src}: mixture of experts ({arch}.expert_count={experts}) is supported for the "
                         "llama (Mixtral) and qwen3moe architectures only")
    if arch == "qwen3moe" and not experts:
        raise ValueError(f"{src}: metadata key 'qwen3moe.expert_count' is missing or 0")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens else None))

    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None or value == _NO_ID or value >= vocab else int(value)

    ffn = int(get("feed_forward_length", 0 if arch == "qwen3moe" else None)) or None  # MoE: dense layers' F
    theta = _f32(get("rope.freq_base", _DEFAULT_ROPE_THETA))
    cfg = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", _DEFAULT_CONTEXT)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5 if arch == "llama" else None)),
        "tie_word_embeddings": False,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=_f32(get("rope.scaling.factor")))
    elif scaling != "none" and not (arch == "phi3" and scaling == "longrope"):
        raise ValueError(f"{src}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported "
                         "(supported: none, linear; Phi-3 LongRoPE)")
    if arch == "llama" and not experts:
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   rope_theta=theta, rope_scaling=None if scaling == "none" else rope,
                   attention_bias=False, mlp_bias=False)
        return cfg
    moe = dict(num_experts_per_tok=int(get("expert_used_count")),
               moe_intermediate_size=int(get("expert_feed_forward_length", ffn))) if experts else {}
    if arch == "llama":  # Mixtral: llama.cpp's LLM_ARCH_LLAMA with experts (no attention biases)
        cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                   rope_theta=theta, rope_parameters=rope, sliding_window=None, num_local_experts=experts,
                   num_experts_per_tok=moe["num_experts_per_tok"],
                   intermediate_size=moe["moe_intermediate_size"])
    elif arch in ("qwen3", "qwen3moe"):
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu", rope_theta=theta,
                   rope_parameters=rope, attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=layers)
        if arch == "qwen3moe":  # llama.cpp's qwen3moe graph normalises the top-k weights (norm_w = true)
            cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=experts,
                       norm_topk_prob=bool(get("expert_weights_norm", True)), decoder_sparse_step=1,
                       mlp_only_layers=[], **moe)
            cfg.pop("max_window_layers")
            if cfg["intermediate_size"] is None:  # only dense (mlp_only_layers) layers use it; there are none
                cfg["intermediate_size"] = moe["moe_intermediate_size"]
    elif arch in _GEMMA:
        cfg.update(_gemma_fields(meta, arch, get, cfg, rope, src))
    else:
        cfg.update(_phi3_fields(get, cfg, rope, rope_dims, src))
    return cfg


def _gemma_fields(meta: dict[str, Any], arch: str, get, cfg: dict[str, Any], rope: dict, src) -> dict:
    """``Gemma2Config`` / ``Gemma3TextConfig`` keys (llama-model.cpp defaults for what GGUF leaves out)."""
    layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    window = int(get("attention.sliding_window", _GEMMA2_WINDOW if arch == "gemma2" else 0)) or None
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA_SWA_PATTERN[arch])
    if isinstance(pattern, list):  # per-layer flags, True = sliding (llama_hparams::swa_layers)
        if len(pattern) != layers:
            raise ValueError(f"{src}: {arch}.attention.sliding_window_pattern has {len(pattern)} entries for "
                             f"{layers} layers")
        sliding = [bool(b) for b in pattern]
    else:  # llama_hparams::set_swa_pattern(n): layer i slides when i % n < n - 1 (n = 0: every layer)
        n = int(pattern)
        sliding = [n == 0 or i % n < n - 1 for i in range(layers)]
    if window is None:
        sliding = [False] * layers
    big = layers == _GEMMA_27B_LAYERS[arch]  # llama.cpp's LLM_TYPE_27B attention scale
    out = dict(
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=False,
        query_pre_attn_scalar=hidden // heads if big else cfg["head_dim"],
        sliding_window=window,
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
    )
    if arch == "gemma2":
        attn_cap = _f32(get("attn_logit_softcapping", _GEMMA2_ATTN_SOFTCAP))
        final_cap = _f32(get("final_logit_softcapping", _GEMMA2_FINAL_SOFTCAP))
        out.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2", rope_theta=rope["rope_theta"],
                   rope_parameters=rope, attn_logit_softcapping=attn_cap or None,
                   final_logit_softcapping=final_cap or None)
    else:
        local = {"rope_type": "default", "rope_theta": _f32(get("rope.freq_base_swa", _GEMMA3_LOCAL_THETA))}
        final_cap = _f32(get("final_logit_softcapping", 0.0))
        out.update(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
                   rope_parameters={"full_attention": rope, "sliding_attention": local},
                   attn_logit_softcapping=None, final_logit_softcapping=final_cap or None,
                   use_bidirectional_attention=False)
    return out


def _phi3_fields(get, cfg: dict[str, Any], rope: dict, rope_dims: int, src) -> dict:
    """``Phi3Config`` keys; LongRoPE factors come later from the tensors (``_phi3_rope_factors``)."""
    if cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]:
        raise ValueError(f"{src}: phi3 head dim {cfg['head_dim']} differs from hidden_size / head_count "
                         "(Phi3Config has no head_dim)")
    if rope["rope_type"] != "default":
        raise ValueError(f"{src}: RoPE scaling {rope['rope_type']!r} is not supported for phi3 (LongRoPE only)")
    rope["partial_rotary_factor"] = rope_dims / cfg.pop("head_dim")  # Phi-4-mini: 0.75
    return dict(
        architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_act="silu", rope_theta=rope["rope_theta"],
        rope_parameters=rope,
        original_max_position_embeddings=int(get("rope.scaling.original_context_length",
                                                 cfg["max_position_embeddings"])),
        sliding_window=int(get("attention.sliding_window", 0)) or None,  # converter writes 0 for None
    )


def _phi3_rope_factors(tensors: dict, meta: dict[str, Any], cfg: dict[str, Any], src: pathlib.Path) -> None:
    """Moves ``rope_factors_long`` / ``rope_factors_short`` out of ``tensors`` into LongRoPE ``rope_parameters``.

    ``Phi3MiniModel.generate_extra_tensors`` writes the HF ``long_factor`` / ``short_factor`` lists as
    float32 tensors [rotary_dim / 2] and ``phi3.rope.scaling.attn_factor`` as the LongRoPE default
    ``sqrt(1 + ln(s) / ln(L0))``, ``s = max_position_embeddings / L0`` (1 when ``s <= 1``); an
    ``attention_factor`` is written only when the stored one differs from that default (HF
    ``_compute_longrope_parameters`` recomputes the default itself).
    """
    long, short = tensors.pop("rope_factors_long.weight", None), tensors.pop("rope_factors_short.weight", None)
    if long is None and short is None:
        return
    if long is None or short is None:
        raise ValueError(f"{src}: only one of rope_factors_long / rope_factors_short is present")
    rope = cfg["rope_parameters"]
    n = round(cfg["hidden_size"] // cfg["num_attention_heads"] * rope["partial_rotary_factor"]) // 2
    factors = {}
    for key, t in (("long_factor", long), ("short_factor", short)):
        w = _dequantize(t, src).reshape(-1)
        if w.shape != (n,):
            raise ValueError(f"{src}: tensor {t.name} has {w.size} entries, expected rotary_dim / 2 = {n}")
        factors[key] = [_f32(v) for v in w]
    rope.update(rope_type="longrope", **factors)
    l0, length = cfg["original_max_position_embeddings"], cfg["max_position_embeddings"]
    default = math.sqrt(1 + math.log(length / l0) / math.log(l0)) if length > l0 else 1.0
    stored = meta.get("phi3.rope.scaling.attn_factor")
    if stored is not None and not math.isclose(stored, default, rel_tol=1e-6):
        rope["attention_factor"] = _f32(stored)


def _f32(value: float) -> float:
    """The shortest decimal of a float32 metadata value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders Q/K projection rows from interleaved-pair RoPE to HF ``rotate_half`` layout.

    Within each head, row ``2 j + p`` (pair ``j``, member ``p``) moves to row ``p hd/2 + j``:
    ``w.reshape(n_heads, hd/2, 2, ...).swapaxes(1, 2).reshape(w.shape)``.

    Args:
        w: ``[n_heads * hd, D]`` weight or ``[n_heads * hd]`` bias, rows in interleaved layout.
        n_heads: H for ``Wq``, K for ``Wk``.

    Returns:
        Array of the same shape and dtype, rows in rotate_half layout.

    References:
        transformers ``convert_llama_weights_to_hf.py`` ``permute`` (the same map, applied to Meta
        weights); llama.cpp ``LlamaModel.permute`` is its inverse.
    """
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _tensor_specs(cfg: dict[str, Any], arch: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name -> (HF name, numpy shape) of every tensor the family may hold.

    Names follow gguf-py ``TENSOR_NAMES`` / ``tensor_mapping.py``. An HF name with ``{e}`` is a stacked
    expert tensor ``[X, out, in]`` saved as one ``[out, in]`` tensor per expert.
    """
    V, D, L = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E = cfg.get("head_dim") or D // H
    F = cfg["intermediate_size"]
    specs = {"token_embd.weight": ("model.embed_tokens.weight", (V, D)),
             "output_norm.weight": ("model.norm.weight", (D,)),
             "output.weight": ("lm_head.weight", (V, D))}
    block = {"attn_norm.weight": ("input_layernorm.weight", (D,)),
             "attn_output.weight": ("self_attn.o_proj.weight", (D, H * E))}
    if arch == "phi3":
        block["attn_qkv.weight"] = ("self_attn.qkv_proj.weight", ((H + 2 * K) * E, D))
    else:
        for g, h, rows in (("attn_q", "q_proj", H * E), ("attn_k", "k_proj", K * E), ("attn_v", "v_proj", K * E)):
            block[f"{g}.weight"] = (f"self_attn.{h}.weight", (rows, D))
            if "attention_bias" in cfg:  # families whose config has attention_bias (q, k, v and o)
                block[f"{g}.bias"] = (f"self_attn.{h}.bias", (rows,))
        if "attention_bias" in cfg:
            block["attn_output.bias"] = ("self_attn.o_proj.bias", (D,))
    if arch in _QK_NORM:
        block["attn_q_norm.weight"] = ("self_attn.q_norm.weight", (E,))
        block["attn_k_norm.weight"] = ("self_attn.k_norm.weight", (E,))
    if arch in _GEMMA:  # gguf-py: FFN_PRE_NORM is "ffn_norm", ATTN_POST_NORM "post_attention_norm"
        block["post_attention_norm.weight"] = ("post_attention_layernorm.weight", (D,))
        block["ffn_norm.weight"] = ("pre_feedforward_layernorm.weight", (D,))
        block["post_ffw_norm.weight"] = ("post_feedforward_layernorm.weight", (D,))
    else:
        block["ffn_norm.weight"] = ("post_attention_layernorm.weight", (D,))
    if arch == "phi3":
        block["ffn_up.weight"] = ("mlp.gate_up_proj.weight", (2 * F, D))  # gate rows, then up rows
        block["ffn_down.weight"] = ("mlp.down_proj.weight", (D, F))
    elif cfg["model_type"] in ("mixtral", "qwen3_moe"):
        X, Fe = cfg.get("num_local_experts", cfg.get("num_experts")), cfg.get("moe_intermediate_size", F)
        if cfg["model_type"] == "mixtral":
            prefix, gate, up, down = "block_sparse_moe", "w1", "w3", "w2"
        else:
            prefix, gate, up, down = "mlp", "gate_proj", "up_proj", "down_proj"
        block["ffn_gate_inp.weight"] = (f"{prefix}.gate.weight", (X, D))
        block["ffn_gate_exps.weight"] = (f"{prefix}.experts.{{e}}.{gate}.weight", (X, Fe, D))
        block["ffn_up_exps.weight"] = (f"{prefix}.experts.{{e}}.{up}.weight", (X, Fe, D))
        block["ffn_down_exps.weight"] = (f"{prefix}.experts.{{e}}.{down}.weight", (X, D, Fe))
    else:
        block["ffn_gate.weight"] = ("mlp.gate_proj.weight", (F, D))
        block["ffn_up.weight"] = ("mlp.up_proj.weight", (F, D))
        block["ffn_down.weight"] = ("mlp.down_proj.weight", (D, F))
    for i in range(L):
        for g, (h, shape) in block.items():
            specs[f"blk.{i}.{g}"] = (f"model.layers.{i}.{h}", shape)
    return specs


def _state_dict(tensors: dict, cfg: dict[str, Any], arch: str, src: pathlib.Path) -> dict[str, np.ndarray]:
    """Renames, dequantizes, un-transforms and shape-checks GGUF tensors into an HF state dict.

    Sets ``cfg["attention_bias"]`` (families that have it) from the bias tensors found.
    """
    specs = _tensor_specs(cfg, arch)

    def listed(xs):
        return f"{xs[:6]}{' ...' if len(xs) > 6 else ''}"

    unknown = sorted(set(tensors) - set(specs))
    if unknown:
        raise ValueError(f"{src}: unsupported tensors for architecture {arch!r}: {listed(unknown)}")
    optional = {"output.weight"} | {g for g in specs if g.endswith(".bias")}
    missing = sorted(set(specs) - set(tensors) - optional)
    if missing:
        raise ValueError(f"{src}: missing tensors {listed(missing)}")
    biases = sorted(g for g in tensors if g.endswith(".bias"))
    if biases and len(biases) != 4 * cfg["num_hidden_layers"]:
        raise ValueError(f"{src}: attention biases on only some projections/layers: {listed(biases)}")
    if "attention_bias" in cfg:
        cfg["attention_bias"] = bool(biases)

    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    sd = {}
    for g, t in tensors.items():
        name, shape = specs[g]
        w = _dequantize(t, src)
        if w.shape != shape:
            raise ValueError(f"{src}: tensor {g} ({name}) has shape {w.shape}, expected {shape}")
        if arch == "llama" and ".attn_q." in g:  # LlamaModel.permute, llama arch only
            w = unpermute_rope(w, H)
        elif arch == "llama" and ".attn_k." in g:
            w = unpermute_rope(w, K)
        if arch in _GEMMA and name.endswith("norm.weight"):  # Gemma*Model.modify_tensors: data_torch + 1
            w = w - np.float32(1)
        if "{e}" in name:
            for e in range(w.shape[0]):
                sd[name.replace("{e}", str(e))] = np.ascontiguousarray(w[e])
        else:
            sd[name] = np.ascontiguousarray(w)
    return sd


def _dequantize(t, src: pathlib.Path) -> np.ndarray:
    """A GGUF tensor as a float32 ``[out, in]`` array (a copy, not the file's memmap)."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, gguf.quants.QuantError) as e:
        raise ValueError(f"{src}: tensor {t.name} has unsupported type {t.tensor_type.name}: {e}") from e
    return np.array(w, dtype=np.float32)


def _tokenizer(meta: dict[str, Any], src: pathlib.Path, tokenizer_model: PathLike | None) -> tuple[str, Any] | None:
    """``("sentencepiece", model bytes)``, ``("bpe", tokenizers.Tokenizer)`` or None (warning logged)."""
    tokens = meta.get("tokenizer.ggml.tokens")
    path = pathlib.Path(tokenizer_model) if tokenizer_model is not None else None
    if path is not None and not path.is_file():
        raise ValueError(f"{path}: tokenizer model file not found")
    if path is None and (src.parent / "tokenizer.model").is_file():
        path = src.parent / "tokenizer.model"
    if path is not None:
        data = path.read_bytes()
        _check_pieces(data, tokens, path, src)
        return "sentencepiece", data
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama" and tokens:
        return "sentencepiece", sentencepiece_from_gguf(meta)
    if kind == "gpt2" and tokens:
        try:
            return "bpe", bpe_from_gguf(meta)
        except ValueError as e:
            reason = str(e)
    else:
        reason = (f"tokenizer.ggml.model is {kind!r}{'' if tokens else ' without tokenizer.ggml.tokens'}, "
                  "neither a SentencePiece ('llama') nor a byte-level BPE ('gpt2') vocab")
    log.warning("%s: no faithful tokenizer can be rebuilt: %s; writing the model WITHOUT tokenizer files "
                "(pass --tokenizer-model FILE.model for a SentencePiece vocab, or copy the model family's "
                "Hugging Face tokenizer files into the output directory)", src, reason)
    return None


def _check_pieces(data: bytes, tokens: list[str] | None, path: pathlib.Path, src: pathlib.Path):
    """Raises ValueError unless ``data`` is a SentencePiece model with the pieces ``tokens``."""
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{path}: not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
    pieces = [p.piece for p in proto.pieces]
    if tokens is not None and pieces != list(tokens):
        first = next((i for i, (a, b) in enumerate(zip(pieces, tokens)) if a != b),
                     min(len(pieces), len(tokens)))
        raise ValueError(
            f"{path}: tokenizer does not match the vocab of {src} ({len(pieces)} vs {len(tokens)}"
            f" pieces, first difference at id {first})"
        )


def sentencepiece_from_gguf(meta: dict[str, Any]) -> bytes:
    """Rebuilds a SentencePiece BPE ``.model`` from GGUF ``tokenizer.ggml.*`` metadata.

    Pieces, scores and types are copied id by id (GGUF token types use SentencePiece's numbering);
    byte fallback is on when byte pieces exist. Normalization is what llama.cpp applies to a GGUF
    SentencePiece vocab, and what the HF fast Llama tokenizer does: identity normalizer, spaces
    escaped to ``▁``, a ``▁`` prefix unless ``tokenizer.ggml.add_space_prefix`` is false, and runs
    of spaces kept (``remove_extra_whitespaces=False``).

    Args:
        meta: GGUF metadata with ``tokenizer.ggml.tokens`` (and optionally ``scores``,
            ``token_type``, ``{unknown,bos,eos,padding}_token_id``, ``add_space_prefix``).

    Returns:
        The serialized ``sentencepiece_model_pb2.ModelProto`` (the bytes of a ``.model`` file).

    References:
        sentencepiece ``sentencepiece_model.proto``; llama.cpp ``llm_tokenizer_spm`` (no whitespace
        collapsing); transformers ``convert_slow_tokenizer.LlamaConverter``.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    proto = sp_pb2.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        kind = int(kind) if int(kind) in range(1, 7) else 1  # NORMAL for GGUF's 0 = undefined
        proto.pieces.add(piece=piece, score=float(score), type=kind)

    def special(key, default):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return default if value is None or value == _NO_ID or value >= len(tokens) else int(value)

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = any(int(k) == _BYTE for k in types)
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id = special("unknown", 0)
    trainer.bos_id = special("bos", -1)
    trainer.eos_id = special("eos", -1)
    trainer.pad_id = special("padding", -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def bpe_from_gguf(meta: dict[str, Any]):
    """Rebuilds a byte-level BPE ``tokenizers.Tokenizer`` from GGUF ``"gpt2"`` vocab metadata.

    The vocab is ``tokenizer.ggml.tokens`` (id = position), the merges ``tokenizer.ggml.merges``
    (``"left right"`` strings, rank = position), tokens of type CONTROL (3) become special added tokens
    and USER_DEFINED (4) ones plain added tokens (both matched before BPE, unnormalized). The
    normalizer / pre-tokenizer / BPE options are the Hugging Face ``tokenizer.json`` ones of the
    pre-tokenizer named by ``tokenizer.ggml.pre`` (:data:`BPE_PRE_TOKENIZERS`): ``qwen2`` (Qwen2 / Qwen3:
    NFC, Split(regex) + ByteLevel), ``llama-bpe`` / ``llama3`` / ``llama-v3`` (Llama 3: Split(regex) +
    ByteLevel, ``ignore_merges``), ``gpt2`` (ByteLevel's own regex). BOS / EOS are added by a
    ``TemplateProcessing`` post-processor when ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so.

    Args:
        meta: GGUF metadata with ``tokenizer.ggml.tokens``, ``merges``, ``pre`` (and optionally
            ``token_type``, ``{bos,eos}_token_id``, ``add_{bos,eos}_token``).

    Returns:
        A ``tokenizers.Tokenizer``.

    Raises:
        ValueError: naming the reason, when there are no merges, the pre-tokenizer is not in
            :data:`BPE_PRE_TOKENIZERS`, or a token string repeats.

    References:
        llama.cpp ``convert_hf_to_gguf.py`` ``_set_vocab_gpt2`` / ``get_vocab_base`` (the forward direction),
        ``src/llama-vocab.cpp`` (pre-tokenizer regexes, ``ignore_merges``); HF ``tokenizer.json`` of
        Qwen2.5 / Qwen3 and Llama 3.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    merges = meta.get("tokenizer.ggml.merges")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not merges:
        raise ValueError("tokenizer.ggml.model is 'gpt2' but there are no tokenizer.ggml.merges")
    if pre not in BPE_PRE_TOKENIZERS:
        raise ValueError(f"tokenizer.ggml.model is 'gpt2' with pre-tokenizer {pre!r} (tokenizer.ggml.pre), whose "
                         f"Hugging Face form is not known here (known: {', '.join(BPE_PRE_TOKENIZERS)})")
    regex, nfc, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    vocab = {}
    for i, token in enumerate(tokens):
        if vocab.setdefault(token, i) != i:
            raise ValueError(f"tokenizer.ggml.tokens repeats {token!r} (ids {vocab[token]} and {i})")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [AddedToken(tokens[i], special=int(k) == _CONTROL, normalized=False)
             for i, k in enumerate(types) if int(k) in (_CONTROL, _USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])

    def special(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None or value == _NO_ID or value >= len(tokens) else (tokens[value], int(value))

    bos = special("bos") if meta.get("tokenizer.ggml.add_bos_token", False) else None
    eos = special("eos") if meta.get("tokenizer.ggml.add_eos_token", False) else None
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        tok.post_processor = byte_level
    else:
        first = [bos[0]] if bos else []
        last = [eos[0]] if eos else []
        template = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last), pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
            special_tokens=[t for t in {bos, eos} if t is not None])
        tok.post_processor = processors.Sequence([byte_level, template])
    return tok


def _write_tokenizer(tokenizer: tuple[str, Any], meta: dict[str, Any], cfg: dict[str, Any], out_dir: pathlib.Path):
    """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json (and tokenizer.model for SPM)."""
    kind, obj = tokenizer
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def piece(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    unk = meta.get("tokenizer.ggml.unknown_token_id", 0 if kind == "sentencepiece" else None)
    specials = {
        "bos_token": piece(cfg["bos_token_id"]),
        "eos_token": piece(cfg["eos_token_id"]),
        "unk_token": piece(unk if unk != _NO_ID else None),
        "pad_token": piece(cfg["pad_token_id"]),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    gemma = cfg["model_type"].startswith("gemma")
    if kind == "sentencepiece":  # transformers GemmaTokenizer: no "▁" prefix; LlamaTokenizer: legacy=False
        tok_class = "GemmaTokenizer" if gemma else "LlamaTokenizer"
    else:
        tok_class = "PreTrainedTokenizerFast"
    tok_config = {
        "tokenizer_class": tok_class,
        **specials,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", kind == "sentencepiece")),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    if kind == "sentencepiece" and not gemma:
        tok_config["legacy"] = False
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]

    for stale in ("tokenizer.json", "tokenizer.model"):  # from an earlier convert
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    if kind == "bpe":
        obj.save(str(out_dir / "tokenizer.json"))
        return
    (out_dir / "tokenizer.model").write_bytes(obj)
    try:  # the fast tokenizer: transformers converts tokenizer.model and saves tokenizer.json
        import transformers  # v5: LlamaTokenizerFast is LlamaTokenizer; v4: the fast class converts

        cls = transformers.GemmaTokenizerFast if gemma else transformers.LlamaTokenizerFast
        with tempfile.TemporaryDirectory() as tmp:
            cls.from_pretrained(out_dir).save_pretrained(tmp)
            shutil.copy(pathlib.Path(tmp) / "tokenizer.json", out_dir / "tokenizer.json")
    except Exception as e:  # transformers absent or unable to convert; tokenizer.model still works
        log.warning("%s: could not write tokenizer.json with transformers: %s", out_dir, e)
