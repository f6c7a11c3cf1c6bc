"""Added tokens and the resized vocabulary: a run's tokenizer with ``tokenizer.added_tokens`` (normal) and
``tokenizer.added_special_tokens`` (special: chat markers), and ``embed_tokens`` / ``lm_head`` grown to hold every
token id, the new rows set to the mean of the old ones.

A tokenizer with more tokens than the model has rows (``len(tokenizer) > vocab_size``, from
``tokenizer.added_tokens`` or a tokenizer that already holds them) resizes the model to ``len(tokenizer)``, rounded up
to a multiple of ``tokenizer.pad_to_multiple_of`` when set; a tokenizer that fits (most checkpoints pad their
vocabulary) changes nothing, and the vocabulary never shrinks. Axis letters: ``V`` vocab (rows), ``D`` embed.

References:
    transformers 5.25 ``PreTrainedModel.resize_token_embeddings(new_num_tokens, pad_to_multiple_of,
    mean_resizing=True)`` (``modeling_utils.py``): old rows copied, new rows from
    ``_init_added_embeddings_weights_with_mean``, which samples ``N(mean, 1e-9 * covariance)`` of the old rows (in fp32)
    when that covariance is positive definite and otherwise sets every new row to the mean. The sample differs from the
    mean by about ``3e-5`` standard deviations of the old rows; easytune takes the mean itself (the fallback path, and
    what axolotl and unsloth use), which makes a resize reproducible (the same base gives the same rows in a run, its
    export and its reload). ``lm_head`` is resized the same way from its own rows
    (``_init_added_lm_head_weights_with_mean``); a tied head is the embedding.
    axolotl ``loaders/tokenizer.py`` ``load_tokenizer`` (``tokens``: ``AddedToken(t, rstrip=False, lstrip=False,
    normalized=False)``, not special) and its config check refusing an adapter with new tokens unless
    ``lora_modules_to_save`` holds ``embed_tokens`` and ``lm_head``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from easytune import config as config_lib
from easytune.tokenizer import load_tokenizer, resolve_chat_template

EMBED_PATH = ("model", "embed_tokens", "embedding")  # [V, D]
LM_HEAD_PATH = ("lm_head", "kernel")  # [D, V]
EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # peft's EMBEDDING_LAYER_NAMES


def added_tokens(config) -> list[str]:
    """``tokenizer.added_tokens`` as a list (a list, or a comma-separated string on the command line)."""
    return config_lib.split_list(config.tokenizer.get("added_tokens", []) or [])


def added_special_tokens(config) -> list[str]:
    """``tokenizer.added_special_tokens`` as a list (a list, or a comma-separated string on the command line)."""
    return config_lib.split_list(config.tokenizer.get("added_special_tokens", []) or [])


def new_tokens_key(config) -> str:
    """The config key that adds tokens (``"tokenizer.added_tokens"``, ``"tokenizer.added_special_tokens"``, both
    joined by ``" / "``), for messages; ``""`` when neither is set."""
    keys = [k for k, v in (("tokenizer.added_tokens", added_tokens(config)),
                           ("tokenizer.added_special_tokens", added_special_tokens(config))) if v]
    return " / ".join(keys)


def load_run_tokenizer(config):
    """The tokenizer of a run: ``tokenizer.path`` (or ``model.path``) with ``tokenizer.added_tokens`` and
    ``tokenizer.added_special_tokens`` added (:func:`easytune.tokenizer.load_tokenizer`) and the run's chat template
    (:func:`run_chat_template`). Every place that tokenizes a run's data or decodes its output loads it this way, so
    ids and prompts agree between data preparation, training, export and generation.

    Raises:
        FileNotFoundError, ValueError: as :func:`easytune.tokenizer.load_tokenizer`.
    """
    tokenizer = load_tokenizer(config.tokenizer.path or config.model.path, added_tokens=added_tokens(config),
                               added_special_tokens=added_special_tokens(config))
    template = run_chat_template(config)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def run_chat_template(config) -> str | None:
    """The chat template a run trains with, which its tokenizer then carries: ``data.chat_template`` (a built-in
    name, a ``.jinja`` / ``.json`` file or a Jinja string; :func:`easytune.tokenizer.resolve_chat_template`), else
    the one template every ``data.datasets`` entry that sets one agrees on; None (the tokenizer's own) otherwise.
    Setting it on the run's tokenizer is what axolotl's ``chat_template`` does: the exported model's
    ``tokenizer_config.json``, ``easytune generate --chat``, transformers and vLLM then format prompts as the
    model was trained.

    Raises:
        ValueError: the template cannot be read (a missing file; the key named).
    """
    data = config.get("data") or {}
    spec = str(data.get("chat_template", "") or "")
    if not spec:
        specs = {str(d.get("chat_template", "") or "") for d in (data.get("datasets", []) or [])} - {""}
        spec = specs.pop() if len(specs) == 1 else ""
    if not spec:
        return None
    try:
        return resolve_chat_template(spec)[0]
    except ValueError as e:
        raise ValueError(f"data.chat_template: {e}") from None


def missing_added_tokens(config, tokenizer) -> list[str]:
    """The entries of ``tokenizer.added_tokens`` and ``tokenizer.added_special_tokens`` that ``tokenizer`` does not
    have as one token."""
    vocab = tokenizer.get_vocab()
    return [t for t in added_tokens(config) + added_special_tokens(config) if t not in vocab]


def target_vocab_size(n_tokens: int, vocab_size: int, pad_to_multiple_of: int = 0) -> int:
    """Rows ``embed_tokens`` / ``lm_head`` need: ``vocab_size`` when the ``n_tokens`` ids fit, else ``n_tokens``
    rounded up to a multiple of ``pad_to_multiple_of`` (0 = no rounding), as ``resize_token_embeddings(n_tokens,
    pad_to_multiple_of)``; never fewer than ``vocab_size``.

    Raises:
        ValueError: ``pad_to_multiple_of`` < 0.
    """
    if pad_to_multiple_of < 0:
        raise ValueError(f"tokenizer.pad_to_multiple_of must be >= 0 (0 = no rounding), got {pad_to_multiple_of}")
    if n_tokens <= vocab_size:
        return vocab_size
    m = pad_to_multiple_of or 1
    return max(vocab_size, -(-n_tokens // m) * m)


def mean_rows(weight, n: int):
    """``n`` new rows for a ``[V, D]`` matrix: each the mean of its ``V`` rows, computed in float32 and stored in the
    matrix's dtype (transformers' ``_init_added_embeddings_weights_with_mean`` without the ``1e-9 * covariance``
    noise). Returns ``[n, D]``."""
    xp = np if isinstance(weight, np.ndarray) else jnp  # host weights stay on the host (no device copy)
    mean = xp.mean(weight.astype(np.float32), axis=0)
    return xp.broadcast_to(mean, (n, weight.shape[1])).astype(weight.dtype)


def resize_params(params, model_config, new_vocab: int, source: str = "tokenizer"):
    """Grows ``embed_tokens`` ``[V, D]`` and an untied ``lm_head`` kernel ``[D, V]`` to ``new_vocab`` rows: the old
    rows kept, the new ones set to the mean of the old (:func:`mean_rows`, each matrix its own mean); a tied model
    resizes the embedding once.

    Args:
        params: a float param tree (numpy or jax), easytune's layout (``model/embed_tokens/embedding``,
            ``lm_head/kernel``).
        model_config: its ``ModelConfig`` (``vocab_size``, ``tie_word_embeddings``).
        new_vocab: rows after the resize (>= ``model_config.vocab_size``).
        source: what asked for the resize, for error messages.

    Returns:
        ``(model_config, params)`` with ``vocab_size = new_vocab``; unchanged when ``new_vocab`` equals it.

    Raises:
        ValueError: ``new_vocab`` smaller than the vocabulary (never shrinks); an ``lm_head`` stored as NF4 (QLoRA
            without ``lm_head`` in ``qlora.llm_int8_skip_modules`` / ``lora.modules_to_save``).
    """
    old = model_config.vocab_size
    if new_vocab == old:
        return model_config, params
    if new_vocab < old:
        raise ValueError(f"{source}: {new_vocab} rows asked for but the model has {old}; easytune never shrinks the "
                         f"vocabulary (token ids beyond {new_vocab} would lose their rows)")
    flat = traverse_util.flatten_dict(params)
    add = new_vocab - old
    emb = flat[EMBED_PATH]
    # numpy weights (as loading reads them) are grown on the host, so an 8B model's [V, D] embedding is never first
    # placed whole on one device before the shardings are applied
    xp = np if isinstance(emb, np.ndarray) else jnp
    flat[EMBED_PATH] = xp.concatenate([emb, mean_rows(emb, add)], axis=0)
    if not model_config.tie_word_embeddings:
        head = flat[LM_HEAD_PATH]
        if not hasattr(head, "shape") or getattr(head, "ndim", 0) != 2:
            raise ValueError(f"{source}: lm_head is stored quantized (NF4) and cannot be resized; keep it in float: "
                             f"add lm_head to lora.modules_to_save (or qlora.llm_int8_skip_modules)")
        flat[LM_HEAD_PATH] = xp.concatenate([head, mean_rows(head.T, add).T], axis=1)
    return dataclasses.replace(model_config, vocab_size=new_vocab), traverse_util.unflatten_dict(flat)


def check_trainable(method: str, modules_to_save, tied: bool, why: str) -> None:
    """Refuses a LoRA/QLoRA run whose new token rows could not learn: new tokens need ``embed_tokens`` (and an untied
    ``lm_head``) in ``lora.modules_to_save``, else their rows stay at the mean of the old ones (axolotl's check).

    Args:
        method: ``config.method``; full fine-tuning trains every row and always passes.
        modules_to_save: ``lora.modules_to_save``.
        tied: the model ties ``lm_head`` to ``embed_tokens`` (no separate ``lm_head`` to save).
        why: what brings new tokens (``"tokenizer.added_tokens is set"``, a resize), for the message.

    Raises:
        easytune.config.ConfigError: a module missing, naming the key and the value to set.
    """
    if method not in ("lora", "qlora"):
        return
    names = {str(m).rsplit(".", 1)[-1] for m in modules_to_save}
    need = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    missing = [m for m in need if m not in names]
    if missing:
        want = ",".join(dict.fromkeys([*map(str, modules_to_save), *need]))
        raise config_lib.ConfigError(
                f"lora.modules_to_save: {why}, but with method={method!r} the rows of new tokens are trained only "
                f"through lora.modules_to_save, which lacks {missing}; set --config.lora.modules_to_save={want} "
                f"(or use method='full')")


def hf_rows(params, model_config) -> dict[str, np.ndarray]:
    """The embedding layers of ``params`` as peft names them (``model.embed_tokens``, ``lm_head``; a tied head is the
    embedding) -> their ``[V, D]`` weight, host numpy."""
    flat = traverse_util.flatten_dict(params)
    emb = np.asarray(flat[EMBED_PATH])
    head = emb if model_config.tie_word_embeddings else np.ascontiguousarray(np.asarray(flat[LM_HEAD_PATH]).T)
    return {"model.embed_tokens": emb, "lm_head": head}


def config_vocab_size(model_dir) -> int | None:
    """``vocab_size`` of a Hugging Face model dir's ``config.json`` (its text config for a multimodal one); None when
    there is none."""
    import json
    import pathlib
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
    v = cfg.get("vocab_size")
    return int(v) if isinstance(v, int) else None
