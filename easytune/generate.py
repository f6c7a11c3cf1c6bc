"""Greedy decoding with the Flax Llama model.

The prompt is placed in a fixed-size int32 buffer ``[L]`` (``L`` = prompt + new tokens, rounded up to a
multiple of ``_BUCKET`` so that nearby lengths share one compilation). One jitted ``lax.while_loop``
runs the full forward pass over the buffer each step and takes the argmax of the logits at the last
real position; padding sits after that position, so the causal mask keeps it out of the result. No KV
cache yet: a step costs a full forward over ``L`` tokens, which is fine for the short generations used
in tests and the CLI's previews.

Axis letters: ``B`` batch (1 here), ``L`` buffer length, ``V`` vocab.

References:
    transformers ``GenerationMixin.generate`` with ``do_sample=False`` (greedy search): the behaviour
    matched, including stopping after (and returning) the first eos token.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from easytune.models.llama import LlamaForCausalLM, ModelConfig

PyTree = Any
_BUCKET = 64  # buffer lengths are rounded up to a multiple of this (fewer recompilations)


def greedy_generate(
    model_config: ModelConfig,
    params: PyTree,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    lora: PyTree | None = None,
    lora_scale: float = 1.0,
) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_ids``.

    .. math::
        x_{t+1} = \\arg\\max_v \\mathrm{logits}(x_{1..t})_v

    Decoding stops after ``max_new_tokens`` tokens or right after an eos token, which is included in
    the result (as ``transformers`` ``generate`` returns it). Ties go to the lowest id (``argmax``).

    Args:
        model_config: the model's config (also decides compute dtype).
        params: the ``'params'`` collection (jax or numpy arrays), as from ``load_hf_model``.
        prompt_ids: at least one token id, each in ``[0, vocab_size)``; no BOS is added here.
        max_new_tokens: number of tokens to generate at most (>= 0).
        eos_token_id: id or ids that end generation; None uses ``model_config.eos_token_id``; an empty
            sequence never stops early.
        lora: optional ``'lora'`` collection (``{path: {lora_A: [in, r], lora_B: [r, out]}}``).
        lora_scale: LoRA scale (alpha / r), used only with ``lora``.

    Returns:
        The new token ids only (not the prompt), ``len <= max_new_tokens``.

    Raises:
        ValueError: empty prompt, an id outside the vocabulary, or negative ``max_new_tokens``.
    """
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. the BOS id)")
    bad = [i for i in prompt if not 0 <= i < model_config.vocab_size]
    if bad:
        raise ValueError(
            f"prompt ids {bad[:5]} are outside the vocabulary [0, {model_config.vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return []
    if eos_token_id is None:
        eos_token_id = model_config.eos_token_id
    if eos_token_id is None:
        eos_token_id = ()
    stops = [int(eos_token_id)] if isinstance(eos_token_id, (int, np.integer)) else list(eos_token_id)

    n, stop = len(prompt), len(prompt) + max_new_tokens
    size = -(-stop // _BUCKET) * _BUCKET
    buffer = np.zeros(size, np.int32)  # [L]
    buffer[:n] = prompt
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    eos = np.full(-(-(len(stops) + 1) // 8) * 8, -1, np.int32)  # [E], -1 padded: one shape, one compile
    eos[:len(stops)] = stops
    out, end = _decode(variables, jnp.asarray(buffer), n, stop, jnp.asarray(eos),
                       config=model_config, lora_scale=float(lora_scale))
    return np.asarray(out)[n:int(end)].tolist()


@functools.partial(jax.jit, static_argnames=("config", "lora_scale"))
def _decode(variables, buffer, start, stop, eos, *, config: ModelConfig, lora_scale: float):
    """Fills ``buffer [L]`` from index ``start`` up to ``stop`` (exclusive) or the first eos.

    Args:
        variables: ``{'params': ..., 'lora'?: ...}``.
        buffer: int32 [L], the prompt in ``[0, start)``, zeros after.
        start, stop: int32 scalars, ``0 < start < stop <= L``.
        eos: int32 [E] stop ids (padded with -1, which no argmax produces).
        config, lora_scale: static model settings.

    Returns:
        ``(buffer, end)``: the filled buffer and the index one past the last generated token.
    """
    model = LlamaForCausalLM(config, lora_scale=lora_scale)

    def cond(state):
        _, length, done = state
        return jnp.logical_and(~done, length < stop)

    def body(state):
        buf, length, _ = state
        logits = model.apply(variables, buf[None])  # [1, L, V] float32
        token = jnp.argmax(logits[0, length - 1]).astype(jnp.int32)
        return buf.at[length].set(token), length + 1, jnp.any(token == eos)

    buf, end, _ = jax.lax.while_loop(cond, body, (buffer, jnp.int32(start), jnp.bool_(False)))
    return buf, end
