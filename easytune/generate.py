"""KV-cached decoding (greedy, temperature, top-k, top-p) with the Flax Llama model.

A batch of prompts is left-padded into an int32 buffer ``[B, P]`` (``P`` = longest prompt rounded up
to a multiple of ``_BUCKET``); padding carries segment id 0 and the prompt segment id 1, so the
model's causal-and-same-segment mask keeps padding out of every real token's attention, and each row's
RoPE positions start at 0 on its first real token. One jitted function then

1. prefills the cache (``init_cache``, ``S = P + N`` slots, ``N`` = ``max_new_tokens`` rounded up to a
   multiple of ``_BUCKET``) with the whole prompt buffer in one forward pass and picks the first token
   from the logits at slot ``P - 1`` (every row's last prompt token sits there);
2. runs a ``lax.while_loop`` that feeds one token per row at slot ``P + i - 1`` (position
   ``len_b + i - 1``), attends to the cache and picks the next token, until every row has produced an
   eos or ``max_new_tokens`` tokens.

Rows are therefore computed exactly as each prompt alone would be, up to float summation order over
masked (zero-weight) slots. Bucketed shapes mean nearby prompt lengths and budgets share a compilation.

On a device ``mesh`` (``generate(..., mesh=...)``, as the end-of-run sample and ``easytune generate RUN_DIR``
call it) the variables stay where they are (a run's FSDP / tensor shardings, :mod:`easytune.sharding`), the
decode function is jitted with those in-shardings and replicated outputs, the hidden states are pinned to the
batch sharding (``activation_mesh``) and the KV cache is sharded over ``batch`` and ``kv_heads`` where the mesh
divides them (else replicated on that axis). NF4 :class:`easytune.quant.QTensor` kernels may be passed as
they are: each ``Linear`` dequantizes its own kernel in the layer (``quant.qmatmul``), as in training, so no
float copy of the whole base model is ever made (:func:`lower_generate` shows the argument bytes).

Axis letters: ``B`` batch, ``P`` padded prompt length, ``N`` generation buffer length, ``S`` cache
slots (P + N), ``V`` vocab.

References:
    transformers ``GenerationMixin.generate``: greedy search (``do_sample=False``) and sampling with
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper`` applied in that order;
    stopping after (and returning) the first eos token per row.
    Holtzman et al., "The Curious Case of Neural Text Degeneration", 2020 (nucleus / top-p sampling).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from easytune import sharding as sharding_lib
from easytune.models.llama import LlamaForCausalLM, init_cache
from easytune.models.model_config import ModelConfig

PyTree = Any
_BUCKET = 64  # prompt and generation lengths are rounded up to a multiple of this (fewer compiles)


def generate(
    model_config: ModelConfig,
    params: PyTree,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    rng: jax.Array | None = None,
    lora: PyTree | None = None,
    lora_scale: float = 1.0,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Continues each prompt of a batch, greedily or by sampling, with a KV cache.

    .. math::
        x_{t+1} = \\arg\\max_v \\ell_v \\quad (T = 0), \\qquad
        x_{t+1} \\sim \\mathrm{softmax}(\\mathrm{top\\_p}(\\mathrm{top\\_k}(\\ell / T))) \\quad (T > 0)

    where ``top_k`` keeps the k largest logits (0: all) and ``top_p`` keeps the smallest set of most
    likely tokens whose probability reaches ``top_p`` (always at least one). Greedy ties go to the
    lowest id. Each row stops after ``max_new_tokens`` tokens or right after its first eos token,
    which is included (as ``transformers`` ``generate`` returns it).

    Args:
        model_config: the model's config (also decides compute dtype).
        params: the ``'params'`` collection (jax or numpy arrays), as from ``load_hf_model``; kernels may
            be NF4 :class:`easytune.quant.QTensor` leaves (a QLoRA base), dequantized layer by layer.
        prompts: one or more prompts, each at least one token id in ``[0, vocab_size)``; lengths may
            differ; no BOS is added here.
        max_new_tokens: number of tokens to generate at most per row (>= 0).
        temperature: 0 for greedy decoding, > 0 to sample from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` most likely tokens when sampling (0 disables).
        top_p: nucleus threshold in ``(0, 1]`` when sampling (1 disables).
        eos_token_id: id or ids that end a row; None uses ``model_config.eos_token_id``; an empty
            sequence never stops early.
        rng: a jax PRNG key, required when ``temperature > 0`` (the same key gives the same tokens).
        lora: optional ``'lora'`` collection (``{path: {lora_A: [in, r], lora_B: [r, out]}}``).
        lora_scale: LoRA scale (alpha / r), used only with ``lora``.
        mesh: decode on this device mesh (module docstring): ``jax.Array`` leaves already sharded on it
            (``NamedSharding``) keep their sharding, every other leaf is replicated on it; None: one plain
            ``jax.jit`` (committed arrays keep their devices).

    Returns:
        For each prompt, the new token ids only (not the prompt), ``len <= max_new_tokens``.

    Raises:
        ValueError: no prompts, an empty prompt, an id outside the vocabulary, negative
            ``max_new_tokens``, ``temperature < 0``, ``top_k < 0``, ``top_p`` outside ``(0, 1]``, or
            sampling without ``rng``.
    """
    prep = _prepare(model_config, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, rng)
    if prep is None:
        return [[] for _ in prompts]
    stops, args, statics = prep
    fn, variables = _decoder(params, lora, model_config, float(lora_scale), mesh, **statics)
    out, end = fn(variables, *args)
    out = np.asarray(out)[:, :int(end)]
    result = []
    for row in out.tolist():
        hits = [j for j, tok in enumerate(row) if tok in stops]
        result.append(row[:hits[0] + 1] if hits else row)
    return result


def lower_generate(
    model_config: ModelConfig,
    params: PyTree,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    lora: PyTree | None = None,
    lora_scale: float = 1.0,
    mesh: Mesh | None = None,
    **sampling,
) -> jax.stages.Lowered:
    """The decode program :func:`generate` would run for these arguments, lowered and not run: its
    ``.compile().memory_analysis()`` gives per-device argument / temp bytes and ``.args_info`` the input
    avals (uint8 NF4 codes for a quantized base, not float kernels).

    Args:
        model_config, params, prompts, max_new_tokens, lora, lora_scale, mesh: as :func:`generate`.
        **sampling: ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``rng`` of :func:`generate`.

    Raises:
        ValueError: as :func:`generate`; also ``max_new_tokens == 0`` (nothing to decode).
    """
    prep = _prepare(model_config, prompts, max_new_tokens, sampling.get("temperature", 0.0),
                    sampling.get("top_k", 0), sampling.get("top_p", 1.0), sampling.get("eos_token_id"),
                    sampling.get("rng"))
    if prep is None:
        raise ValueError("lower_generate: max_new_tokens is 0, there is no decode program")
    _, args, statics = prep
    fn, variables = _decoder(params, lora, model_config, float(lora_scale), mesh, **statics)
    return fn.lower(variables, *args)


def _prepare(model_config, prompts, max_new_tokens, temperature, top_k, top_p, eos_token_id, rng):
    """Checks :func:`generate`'s arguments and builds the decode inputs.

    Returns:
        None when ``max_new_tokens == 0``, else ``(stops, args, statics)``: the stop ids (int list), the
        decode function's array arguments after ``variables`` (``buffer, lengths, max_new, eos, rng,
        temperature, top_k, top_p``) and its static ``new_slots`` / ``sample``.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists, e.g. [[1, 42, 7]]")
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    rows = []
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, (int, np.integer)):
            raise ValueError("prompts must be a list of token-id lists, not a flat list of ids; "
                             "wrap a single prompt as [ids]")
        row = [int(i) for i in prompt]
        if not row:
            raise ValueError(f"prompt {b} is empty; give at least one token (e.g. the BOS id)")
        bad = [i for i in row if not 0 <= i < model_config.vocab_size]
        if bad:
            raise ValueError(f"prompt {b}: ids {bad[:5]} are outside the vocabulary "
                             f"[0, {model_config.vocab_size})")
        rows.append(row)
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = disabled), got {top_p}")
    sample = temperature > 0.0
    if sample and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng, a jax PRNG key, e.g. "
                         "jax.random.key(0)")
    if max_new_tokens == 0:
        return None
    if eos_token_id is None:
        eos_token_id = model_config.eos_token_id
    if eos_token_id is None:
        eos_token_id = ()
    stops = ([int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer))
             else [int(i) for i in eos_token_id])

    lengths = np.array([len(r) for r in rows], np.int32)  # [B]
    p = -(-int(lengths.max()) // _BUCKET) * _BUCKET
    n = -(-int(max_new_tokens) // _BUCKET) * _BUCKET
    buffer = np.zeros((len(rows), p), np.int32)  # [B, P], left padded
    for b, row in enumerate(rows):
        buffer[b, p - len(row):] = row
    eos = np.full(-(-(len(stops) + 1) // 8) * 8, -1, np.int32)  # [E], -1 padded: one shape, one compile
    eos[:len(stops)] = stops
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding
    args = (jnp.asarray(buffer), jnp.asarray(lengths), jnp.int32(max_new_tokens), jnp.asarray(eos), rng,
            jnp.float32(temperature if sample else 1.0), jnp.int32(top_k), jnp.float32(top_p))
    return stops, args, {"new_slots": n, "sample": sample}


def greedy_generate(
    model_config: ModelConfig,
    params: PyTree,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    lora: PyTree | None = None,
    lora_scale: float = 1.0,
    mesh: Mesh | None = None,
) -> list[int]:
    """Greedy (argmax) continuation of one prompt: ``generate`` with a batch of one.

    Args:
        model_config, params, max_new_tokens, eos_token_id, lora, lora_scale, mesh: as ``generate``.
        prompt_ids: at least one token id, each in ``[0, vocab_size)``; no BOS is added here.

    Returns:
        The new token ids only (not the prompt), ``len <= max_new_tokens``.

    Raises:
        ValueError: empty prompt, an id outside the vocabulary, or negative ``max_new_tokens``.
    """
    return generate(model_config, params, [list(prompt_ids)], max_new_tokens,
                    eos_token_id=eos_token_id, lora=lora, lora_scale=lora_scale, mesh=mesh)[0]


def _filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p on float32 ``logits [B, V]``; removed entries -> -inf.

    Ties at a threshold are all kept (the set can exceed ``top_k`` only by equal logits).
    """
    logits = logits / temperature
    v = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [B, V] descending
    rank = jnp.arange(v, dtype=jnp.int32)
    ordered = jnp.where((top_k > 0) & (rank >= top_k), -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass of strictly more likely tokens
    keep = (before < top_p) & (ordered > -jnp.inf)
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _decoder(params, lora, config: ModelConfig, lora_scale: float, mesh: Mesh | None, *, new_slots: int,
             sample: bool):
    """``(fn, variables)``: the jitted decode function for these settings, called as ``fn(variables, buffer,
    lengths, max_new, eos, rng, temperature, top_k, top_p)`` (see :func:`_decode`), and ``variables``
    (``{'params'[, 'lora']}``) placed for it.

    Without ``mesh``: a plain ``jax.jit`` (committed arrays keep their devices). With ``mesh``: a ``jax.jit``
    with explicit in-shardings (each variable's own ``NamedSharding`` on ``mesh``, anything else replicated;
    the other inputs replicated) and replicated outputs. Both are cached per settings (and shardings).
    """
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    statics = tuple(sorted(dict(config=config, lora_scale=lora_scale, new_slots=new_slots, sample=sample).items()))
    if mesh is None:
        return _plain_decoder(statics), variables
    rep = sharding_lib.replicated(mesh)

    def own(x):
        sh = getattr(x, "sharding", None)
        return sh if isinstance(sh, NamedSharding) and sh.mesh == mesh else rep

    shardings = jax.tree_util.tree_map(own, variables)
    leaves, treedef = jax.tree_util.tree_flatten(shardings)
    variables = jax.device_put(variables, shardings)  # a no-op for leaves already placed
    return _mesh_decoder(mesh, treedef, tuple(leaves), statics), variables


@functools.lru_cache(maxsize=32)
def _plain_decoder(statics: tuple):
    """The jitted :func:`_decode` without a mesh, for the static settings ``statics``."""
    return jax.jit(functools.partial(_decode, **dict(statics)))


@functools.lru_cache(maxsize=8)
def _mesh_decoder(mesh: Mesh, treedef, leaves: tuple, statics: tuple):
    """The jitted :func:`_decode` on ``mesh`` with the variables' shardings (``treedef`` / ``leaves``)."""
    rep = sharding_lib.replicated(mesh)
    var_sh = jax.tree_util.tree_unflatten(treedef, list(leaves))
    return jax.jit(functools.partial(_decode, mesh=mesh, **dict(statics)),
                   in_shardings=(var_sh,) + (rep,) * 8, out_shardings=(rep, rep))


def _decode(variables, buffer, lengths, max_new, eos, rng, temperature, top_k, top_p, *,
            config: ModelConfig, lora_scale: float, new_slots: int, sample: bool, mesh: Mesh | None = None):
    """Prefills the cache with ``buffer`` and decodes up to ``max_new`` tokens per row (pure; jitted by
    :func:`_decoder`).

    Args:
        variables: ``{'params': ..., 'lora'?: ...}``.
        buffer: int32 [B, P], prompts left padded (row b's prompt in ``[P - lengths[b], P)``).
        lengths: int32 [B] prompt lengths (>= 1).
        max_new: int32 scalar, ``1 <= max_new <= new_slots``.
        eos: int32 [E] stop ids (padded with -1, which no token equals).
        rng: PRNG key (used only when ``sample``).
        temperature, top_k, top_p: sampling settings (float32, int32, float32 scalars).
        config, lora_scale: static model settings.
        new_slots: N, static size of the output buffer (and the generated part of the cache).
        sample: static; False is greedy argmax.
        mesh: static; when given, hidden states are pinned to the batch sharding and the KV cache to
            ``(batch, length, kv_heads, -)`` on it (``easytune.sharding.constrain``).

    Returns:
        ``(out, end)``: int32 [B, N] generated tokens (valid in ``[0, end)``, rows cut at their eos by
        the caller) and the number of decoding steps run.
    """
    with sharding_lib.activation_mesh(mesh):
        return _decode_loop(variables, buffer, lengths, max_new, eos, rng, temperature, top_k, top_p,
                            config, lora_scale, new_slots, sample)


def _constrain_cache(cache):
    """The KV cache pinned to its logical axes on the activation mesh: ``segment_ids`` [B, S] to (batch,
    length), every ``k`` / ``v`` [B, S, K, E] to (batch, length, kv_heads, -); a no-op without a mesh."""
    axes = {2: ("batch", "length"), 4: ("batch", "length", "kv_heads", None)}
    return jax.tree_util.tree_map(lambda x: sharding_lib.constrain(x, axes[x.ndim]), cache)


def _decode_loop(variables, buffer, lengths, max_new, eos, rng, temperature, top_k, top_p, config, lora_scale,
                 new_slots, sample):
    """The body of :func:`_decode` (under its ``activation_mesh``)."""
    model = LlamaForCausalLM(config, lora_scale=lora_scale)
    b, p = buffer.shape
    slot = jnp.arange(p, dtype=jnp.int32)[None, :]  # [1, P]
    first = p - lengths[:, None]  # [B, 1] first real slot per row
    positions = jnp.maximum(slot - first, 0)  # [B, P]
    segments = (slot >= first).astype(jnp.int32)  # [B, P] 0 = padding
    cache = _constrain_cache(init_cache(config, b, p + new_slots))

    def pick(logits, key):  # [B, V] float32 -> int32 [B]
        if not sample:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(
            key, _filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)

    logits, cache = model.apply(variables, buffer, positions, segments, cache=cache, cache_index=0)
    cache = _constrain_cache(cache)
    rng, key = jax.random.split(rng)
    token = pick(logits[:, -1], key)  # [B]
    out = jnp.zeros((b, new_slots), jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(state):
        _, _, i, done, _ = state
        return (i < max_new) & ~jnp.all(done)

    def body(state):
        cache, out, i, done, rng = state
        prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)  # [B, 1]
        logits, cache = model.apply(variables, prev, (lengths + i - 1)[:, None],
                                    jnp.ones((b, 1), jnp.int32), cache=cache,
                                    cache_index=p + i - 1)
        rng, key = jax.random.split(rng)
        token = pick(logits[:, 0], key)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return _constrain_cache(cache), out, i + 1, done | jnp.isin(token, eos), rng

    _, out, end, _, _ = jax.lax.while_loop(cond, body, (cache, out, jnp.int32(1), done, rng))
    return out, end


# ------------------------------------------------------------------------------------------ text level

def encode_prompt(tokenizer, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of one prompt, as the model saw text in training.

    Without ``chat``: BOS (when the tokenizer has one) then the text without other special tokens, as
    :mod:`easytune.data` builds training sequences. With ``chat``: the conversation
    ``[system?, user: prompt]`` rendered by the tokenizer's own chat template with the generation prompt
    (``tokenizer.apply_chat_template(..., add_generation_prompt=True)``); the template supplies BOS.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        prompt: the user's text.
        chat: render with the chat template.
        system: optional system message (chat only).

    Returns:
        The prompt's token ids (int list).

    Raises:
        ValueError: ``chat`` with a tokenizer that has no ``chat_template``, or ``system`` without ``chat``.
    """
    if not chat:
        if system is not None:
            raise ValueError("--system needs --chat (a system message is part of a chat template)")
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat: the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat_template; "
                         f"use --prompt for plain text, or add a chat_template to its tokenizer_config.json")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    # the template text, then tokens without added specials: exactly what apply_chat_template(tokenize=True) does
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja2's TemplateError / TemplateSyntaxError, raised from the template itself
        raise ValueError(f"--chat: the chat template of {getattr(tokenizer, 'name_or_path', '?')} failed on "
                         f"{[m['role'] for m in messages]}: {type(e).__name__}: {e}") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(model_config: ModelConfig, tokenizer=None, model_dir: str | None = None) -> list[int]:
    """Every token id that ends generation: the model's ``eos_token_id``, the ``eos_token_id`` (int or list)
    of ``MODEL_DIR/generation_config.json`` (chat models list their end-of-turn token there, e.g. Llama 3's
    ``<|eot_id|>``, Qwen's ``<|im_end|>``), and the tokenizer's ``eos_token_id``; as ``transformers``
    ``generate`` reads them from the generation config.

    Returns:
        Sorted unique ids (possibly empty).
    """
    import pathlib
    ids: set[int] = set()

    def add(v):
        if v is None:
            return
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if i is not None:
                ids.add(int(i))

    add(model_config.eos_token_id)
    if model_dir is not None:
        gen = pathlib.Path(model_dir) / "generation_config.json"
        if gen.is_file():
            from easytune.models.hf_config import read_json
            add(read_json(gen).get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return sorted(ids)


def unescape_stop(text: str) -> str:
    """A stop string as typed on a command line: ``\\n``, ``\\t`` and ``\\\\`` become newline, tab and one
    backslash (a shell passes ``--stop "\\n\\n"`` as backslash-n twice); everything else is kept as is."""
    import re
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def cut_at_stop(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int],
                stop: Sequence[str]) -> tuple[list[int], str]:
    """Cuts a continuation at the first stop string.

    The tokens kept are those up to and including the first token whose decoded text completes a stop
    string (transformers' ``StopStringCriteria`` stops after that token); the returned text ends just before
    the stop string (vLLM's default, ``include_stop_str_in_output=False``). Text is decoded together with the
    prompt, because SentencePiece drops the leading space of a piece decoded alone.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        prompt_ids: the prompt's token ids.
        new_ids: the generated token ids.
        stop: stop strings (empty ones are ignored).

    Returns:
        ``(kept_ids, text)``: the kept new token ids and the new text (special tokens skipped).
    """
    def text_of(ids):
        full = tokenizer.decode(list(prompt_ids) + list(ids), skip_special_tokens=True)
        return full[len(head):] if full.startswith(head) else full

    head = tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
    new_ids = list(new_ids)
    text = text_of(new_ids)
    stops = [s for s in stop if s]
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return new_ids, text
    pos, s = min(hits)
    for k in range(1, len(new_ids) + 1):  # the first token that completes the stop string
        if s in text_of(new_ids[:k]):
            return new_ids[:k], text[:pos]
    return new_ids, text[:pos]


def generate_text(model_config: ModelConfig, params: PyTree, tokenizer, prompts: Sequence[str],
                  max_new_tokens: int, *, chat: bool = False, system: str | None = None,
                  stop: Sequence[str] = (), model_dir: str | None = None, **kwargs) -> list[str]:
    """Text in, text out: encodes each prompt (:func:`encode_prompt`), decodes a batch with :func:`generate`
    (left-padded, KV-cached), stops at any of :func:`stop_token_ids` and cuts at ``stop`` strings
    (:func:`cut_at_stop`). ``max_new_tokens`` is cut to what ``max_position_embeddings`` leaves for the
    longest prompt.

    Args:
        model_config, params: the model.
        tokenizer: its ``transformers`` tokenizer.
        prompts: one or more texts.
        max_new_tokens: tokens to generate at most per prompt.
        chat, system: render prompts with the chat template (see :func:`encode_prompt`).
        stop: stop strings; the text ends before the first one (one that is a special token, e.g. a chat
            template's ``<|im_end|>``, stops generation at that token's id).
        model_dir: HF model dir whose ``generation_config.json`` lists extra eos ids.
        **kwargs: ``temperature``, ``top_k``, ``top_p``, ``rng``, ``lora``, ``lora_scale``, ``mesh`` of
            :func:`generate`.

    Returns:
        The generated text of each prompt (without the prompt).

    Raises:
        ValueError: as :func:`encode_prompt` and :func:`generate`; a prompt longer than the model's
            ``max_position_embeddings``.
    """
    ids = [encode_prompt(tokenizer, p, chat=chat, system=system) for p in prompts]
    longest = max(len(i) for i in ids)
    if longest >= model_config.max_position_embeddings:
        raise ValueError(f"a prompt has {longest} tokens; the model's max_position_embeddings is "
                         f"{model_config.max_position_embeddings}")
    budget = min(int(max_new_tokens), model_config.max_position_embeddings - longest)
    if budget < max_new_tokens:
        import logging
        logging.getLogger(__name__).warning(
            "max_new_tokens %d cut to %d: the longest prompt has %d tokens and max_position_embeddings is %d",
            max_new_tokens, budget, longest, model_config.max_position_embeddings)
    # a stop string that is one special token (a chat marker such as <|im_end|>) stops at its id: the text that
    # cut_at_stop reads is decoded with skip_special_tokens, where such a token never appears (vLLM: stop_token_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special = {t.content: int(i) for i, t in decoder.items() if getattr(t, "special", False)}
    eos = sorted(set(stop_token_ids(model_config, tokenizer, model_dir)) | {special[s] for s in stop if s in special})
    outs = generate(model_config, params, ids, budget, eos_token_id=eos, **kwargs)
    return [cut_at_stop(tokenizer, p, o, stop)[1] for p, o in zip(ids, outs)]
