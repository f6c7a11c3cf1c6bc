"""Import a llama-architecture GGUF file as a Hugging Face model directory.

GGUF (llama.cpp's file format) stores the config as ``llama.*`` metadata, the weights as named tensors
and, for SentencePiece models, the vocabulary as ``tokenizer.ggml.*`` arrays. :func:`convert_gguf`
turns one such file into what ``transformers.AutoModelForCausalLM.from_pretrained`` and
``easytune.models.hf_weights.load_hf_model`` read: ``config.json``, safetensors and tokenizer files.

Axis letters: ``V`` vocab, ``D`` embed, ``H`` query heads, ``K`` kv heads, ``F`` mlp, ``hd`` head dim.
Weights keep the torch layout ``[out, in]``: numpy ``t.data`` of a GGUF tensor is already
``[out, in]`` (GGUF's own shape list is ggml order ``[in, out]``).

Two facts make the conversion more than a rename:

* RoPE layout. llama.cpp's "normal" RoPE rotates interleaved pairs ``(x[2i], x[2i+1])`` (the Meta /
  llama2.c layout); HF Llama rotates halves (``rotate_half``). The rows of ``Wq`` and ``Wk`` are
  permuted per head, the inverse of the permutation llama.cpp's ``convert_hf_to_gguf.py`` applies.
* Tokenizer. The GGUF holds pieces, scores and token types but no SentencePiece ``.model`` file; one
  is rebuilt with ``sentencepiece_model_pb2`` (or a given one is copied after checking its pieces).

References:
    GGUF spec, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (metadata keys, token types).
    transformers ``models/llama/convert_llama_weights_to_hf.py`` (``permute`` for Wq/Wk).
    llama.cpp ``convert_hf_to_gguf.py`` (``LlamaModel.permute``, the forward direction).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any

import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from easytune.models.hf_config import config_from_hf, config_to_hf
from easytune.models.hf_weights import save_hf_state_dict

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

_NO_ID = 0xFFFFFFFF  # GGUF's "no such token" id (e.g. padding_token_id)
_DEFAULT_ROPE_THETA = 10000.0  # llama.cpp's default when llama.rope.freq_base is absent
_DEFAULT_CONTEXT = 2048
_BYTE = 6  # GGUF / SentencePiece token type of byte-fallback pieces <0x00>..<0xFF>

# GGUF tensor name -> HF state-dict name; block tensors are blk.{i}.NAME -> model.layers.{i}.NAME.
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}


def convert_gguf(
    src: PathLike, out_dir: PathLike, tokenizer_model: PathLike | None = None
) -> pathlib.Path:
    """Converts a llama-architecture GGUF file into a Hugging Face Llama model directory.

    Weights are dequantized to float32. ``Wq`` / ``Wk`` rows go from interleaved-pair RoPE to HF's
    ``rotate_half`` layout (:func:`unpermute_rope`). ``lm_head`` is dropped and
    ``tie_word_embeddings=True`` when ``output.weight`` is absent or equal to ``token_embd.weight``.
    ``max_position_embeddings`` is ``llama.context_length`` as the file states (for stories260K the
    converter default 2048, although that model was trained at 512).

    The tokenizer comes from, in order: ``tokenizer_model``; a ``tokenizer.model`` next to ``src``;
    a SentencePiece model rebuilt from the GGUF's ``tokenizer.ggml.*`` arrays
    (:func:`sentencepiece_from_gguf`). A model file must have exactly the GGUF's pieces. A GGUF whose
    tokenizer is not SentencePiece (``tokenizer.ggml.model`` other than ``"llama"``, e.g. Llama 3's
    ``"gpt2"``) is converted without tokenizer files (a warning is logged).

    Args:
        src: path of a ``.gguf`` file with ``general.architecture == "llama"``.
        out_dir: directory to write (created; files of the same names are replaced).
        tokenizer_model: optional SentencePiece ``.model`` file to ship as ``tokenizer.model``.

    Returns:
        ``out_dir`` as a path. It holds ``config.json``, ``generation_config.json`` and safetensors
        (written by ``easytune.models.hf_weights.save_hf_state_dict``) and, when there is a tokenizer,
        ``tokenizer.model``, ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``.

    Raises:
        ValueError: naming the file and the problem, when ``out_dir`` (or a parent) exists and is not
            a directory, ``src`` is missing, not GGUF or truncated / corrupt (naming the first tensor
            that extends past the end of the file, when the header is intact), its architecture is
            not llama, metadata or tensors are missing, unexpected, misshapen or of an unsupported
            quantization, or ``tokenizer_model`` is missing or has other pieces.

    References:
        transformers ``convert_llama_weights_to_hf.py`` (``permute``); GGUF spec (metadata keys).
    """
    src = pathlib.Path(src)
    out_dir = pathlib.Path(out_dir)
    _check_out_dir(out_dir)
    reader = _open_reader(src)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    hf_config = hf_config_from_gguf(meta, src)
    state_dict = _state_dict({t.name: t for t in reader.tensors}, hf_config, src)
    head = state_dict.get("lm_head.weight")
    if head is None or np.array_equal(head, state_dict["model.embed_tokens.weight"]):
        state_dict.pop("lm_head.weight", None)
        hf_config["tie_word_embeddings"] = True
    hf_config = config_to_hf(config_from_hf(hf_config))  # the repo's config.json layout
    sp_model = _sentencepiece_model(meta, src, tokenizer_model)  # validate before writing

    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_state_dict(state_dict, hf_config, out_dir)
    if sp_model is not None:
        _write_tokenizer(sp_model, meta, hf_config, out_dir)
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
    """Maps GGUF ``llama.*`` and ``tokenizer.ggml.*`` metadata to a ``LlamaConfig`` dict.

    Args:
        meta: GGUF metadata, key -> ``gguf.ReaderField.contents()`` (str, int, float or list).
        src: file name for error messages.

    Returns:
        A ``config.json`` dict (``model_type="llama"``, ``hidden_act="silu"``). ``tie_word_embeddings``
        and ``attention_bias`` start False; the caller sets them from the tensors.

    Raises:
        ValueError: architecture other than llama, required keys missing, partial rotary, RoPE
            scaling, per-layer sizes or mixture of experts (none supported).
    """
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{src}: general.architecture is {arch!r}; only 'llama' is supported")

    def get(key, default=None):
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"{src}: metadata key 'llama.{key}' is missing")
        if isinstance(value, list):  # per-layer values (OpenELM style)
            if len(set(value)) != 1:
                raise ValueError(f"{src}: per-layer llama.{key} {value} is not supported")
            value = value[0]
        return value

    if get("expert_count", 0):
        raise ValueError(f"{src}: mixture of experts (llama.expert_count) is not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{src}: RoPE scaling {scaling!r} (llama.rope.scaling.type) is not supported")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ValueError(
            f"{src}: partial rotary (llama.rope.dimension_count={rope_dims}, head_dim={head_dim})"
            " is not supported"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(get("vocab_size", len(tokens) if tokens else None))

    def token_id(key):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None or value == _NO_ID or value >= vocab else int(value)

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length", _DEFAULT_CONTEXT)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", _DEFAULT_ROPE_THETA)),
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": token_id("bos"),
        "eos_token_id": token_id("eos"),
        "pad_token_id": token_id("padding"),
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    }


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


def _state_dict(tensors: dict, cfg: dict[str, Any], src: pathlib.Path) -> dict[str, np.ndarray]:
    """Renames, dequantizes, un-permutes and shape-checks GGUF tensors into an HF state dict."""
    V, D, F = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]
    H, K, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    block_shapes = {
        "input_layernorm.weight": (D,),
        "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * hd, D),
        "self_attn.k_proj.weight": (K * hd, D),
        "self_attn.v_proj.weight": (K * hd, D),
        "self_attn.o_proj.weight": (D, H * hd),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
        "self_attn.q_proj.bias": (H * hd,),
        "self_attn.k_proj.bias": (K * hd,),
        "self_attn.v_proj.bias": (K * hd,),
        "self_attn.o_proj.bias": (D,),
    }
    names = dict(_GLOBAL_TENSORS)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg["num_hidden_layers"]):
        for g, h in _BLOCK_TENSORS.items():
            names[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
            shapes[f"model.layers.{i}.{h}"] = block_shapes[h]

    def listed(xs):
        return f"{xs[:6]}{' ...' if len(xs) > 6 else ''}"

    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise ValueError(f"{src}: unsupported tensors {listed(unknown)}")
    optional = {"output.weight"} | {g for g in names if g.endswith(".bias")}
    missing = sorted(set(names) - set(tensors) - optional)
    if missing:
        raise ValueError(f"{src}: missing tensors {listed(missing)}")
    biases = sorted(g for g in tensors if g.endswith(".bias"))
    if biases and len(biases) != 4 * cfg["num_hidden_layers"]:
        raise ValueError(f"{src}: attention biases on only some projections/layers: {listed(biases)}")
    cfg["attention_bias"] = bool(biases)

    sd = {}
    for g, t in tensors.items():
        w = _dequantize(t, src)
        if w.shape != shapes[names[g]]:
            raise ValueError(
                f"{src}: tensor {g} ({names[g]}) has shape {w.shape}, expected {shapes[names[g]]}"
            )
        if ".attn_q." in g:
            w = unpermute_rope(w, H)
        elif ".attn_k." in g:
            w = unpermute_rope(w, K)
        sd[names[g]] = np.ascontiguousarray(w)
    return sd


def _dequantize(t, src: pathlib.Path) -> np.ndarray:
    """A GGUF tensor as a float32 ``[out, in]`` array (a copy, not the file's memmap)."""
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, gguf.quants.QuantError) as e:
        raise ValueError(f"{src}: tensor {t.name} has unsupported type {t.tensor_type.name}: {e}") from e
    return np.array(w, dtype=np.float32)


def _sentencepiece_model(
    meta: dict[str, Any], src: pathlib.Path, tokenizer_model: PathLike | None
) -> bytes | None:
    """Serialized SentencePiece model for the GGUF vocab, or None when there is none to make."""
    tokens = meta.get("tokenizer.ggml.tokens")
    path = pathlib.Path(tokenizer_model) if tokenizer_model is not None else None
    if path is not None and not path.is_file():
        raise ValueError(f"{path}: tokenizer model file not found")
    if path is None and (src.parent / "tokenizer.model").is_file():
        path = src.parent / "tokenizer.model"
    if path is not None:
        data = path.read_bytes()
        _check_pieces(data, tokens, path, src)
        return data
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama" or not tokens:
        log.warning("%s: tokenizer.ggml.model is %r, not a SentencePiece vocab; "
                    "writing no tokenizer files", src, kind)
        return None
    return sentencepiece_from_gguf(meta)


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


def _write_tokenizer(sp_model: bytes, meta: dict[str, Any], cfg: dict[str, Any], out_dir: pathlib.Path):
    """Writes tokenizer.model, tokenizer.json (via transformers), tokenizer_config, special tokens."""
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def piece(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
    specials = {
        "bos_token": piece(cfg["bos_token_id"]),
        "eos_token": piece(cfg["eos_token_id"]),
        "unk_token": piece(unk if unk != _NO_ID else None),
        "pad_token": piece(cfg["pad_token_id"]),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        **specials,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    if meta.get("tokenizer.chat_template"):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]

    (out_dir / "tokenizer.json").unlink(missing_ok=True)  # stale from an earlier convert
    (out_dir / "tokenizer.model").write_bytes(sp_model)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    try:  # the fast tokenizer: transformers converts tokenizer.model and saves tokenizer.json
        import transformers  # v5: LlamaTokenizerFast is LlamaTokenizer; v4: the fast class converts

        with tempfile.TemporaryDirectory() as tmp:
            transformers.LlamaTokenizerFast.from_pretrained(out_dir).save_pretrained(tmp)
            shutil.copy(pathlib.Path(tmp) / "tokenizer.json", out_dir / "tokenizer.json")
    except Exception as e:  # transformers absent or unable to convert; tokenizer.model still works
        log.warning("%s: could not write tokenizer.json with transformers: %s", out_dir, e)
