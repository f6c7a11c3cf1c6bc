"""Record formats -> token ids + loss mask (alpaca, completion, text).

An *example* is ``{"input_ids": list[int], "loss_mask": list[int]}`` of equal
length ``L``: ``loss_mask[t] = 1`` means token ``t`` is a training target (it is
predicted from tokens ``< t``). Token 0 is never a target (nothing precedes it),
so its mask is always 0. ``pipeline.build_sequences`` shifts examples into the
``input_ids``/``target_ids`` arrays the trainer reads.

Formats:

* ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` rendered with the
    Stanford Alpaca prompt::

            ids  = [bos] + tok(prompt + output) + [eos]
            mask =   0   +  0 ... 0 | 1 ... 1   +   1      (train_on_inputs: 0, 1 ... 1)

* ``completion``: ``{"text"}`` (``text_field``): ``[bos] + tok(text) + [eos]``, all trained.
* ``text``: whole documents (plain-text files, or records' ``text_field``), each
    ``tok(doc) + [eos]``, concatenated into one stream after a single ``[bos]``;
    ``pipeline.chunk_text`` cuts the stream into training rows.

Tokenization choices (the same for every format):

* Special tokens are added here, never by the tokenizer: text is encoded with
    ``add_special_tokens=False`` and ``split_special_tokens=True`` (so a literal
    ``"</s>"`` inside user data is text, not an end-of-sequence), then ``bos`` is
    prepended when the tokenizer has a ``bos_token_id`` and ``eos`` appended. BOS
    therefore appears exactly once whether or not the tokenizer's own
    ``add_bos_token`` is set (Llama 2 sets it; transformers 5 ``LlamaTokenizer`` built
    from a bare ``tokenizer.model`` does not).
* The prompt/response boundary follows Stanford Alpaca's ``train.py``: the *full*
    text ``prompt + output`` is tokenized once, and the first ``len(tok(prompt))``
    tokens are the prompt. The ids are then exactly the tokenizer's encoding of the
    full text. Tokenizing the response alone and concatenating (axolotl's
    ``InstructionPromptTokenizingStrategy``) differs at the seam for SentencePiece
    tokenizers: alone, ``"Telegram"`` gets the dummy-prefix ``"▁Tele"``; after
    ``"### Response:\\n"`` it is ``"T", "ele"``. The full-text way trains the tokens the
    model sees at inference. When ``tok(prompt)`` is not a prefix of ``tok(full)``
    (a BPE merge across the seam; not seen with the Alpaca template, whose prompt
    ends in a newline) the example falls back to axolotl's concatenation
    ``tok(prompt) + tok(output)`` so the mask boundary stays exact;
    :func:`format_records` counts these in ``stats["seam_fallbacks"]``.

References:
    Taori et al., Stanford Alpaca (2023), ``train.py`` ``PROMPT_DICT`` and ``preprocess``;
    the ``text`` column of ``tatsu-lab/alpaca`` (``"### Response:\\n"``, also axolotl's and
    torchtune's Alpaca templates; Stanford's ``train.py`` omits that newline).
    LLaMA-Factory ``alpaca`` template: a ``system`` replaces the default preamble.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

FORMATS = ("alpaca", "completion", "text")

ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_SYSTEM_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.")
ALPACA_PROMPT = "{system}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "{system}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def _where(record: dict) -> str:
    return str(record.get("_source", "<record without _source>"))


def record_field(record: dict, name: str, required: bool) -> str:
    """Returns ``record[name]``, a string ('' when optional and absent or null).

    Args:
        record: a record with ``_source`` provenance.
        name: the field.
        required: raise when the field is missing, null or only whitespace.

    Returns:
        The field's value.

    Raises:
        ValueError: missing / null / empty required field, or a non-string value; the
            message starts with the record's ``_source`` (``file:line``) and names the field.
    """
    value = record.get(name)
    if value is None:
        if required and name in record:
            raise ValueError(f"{_where(record)}: required field {name!r} is null; give it a string value")
        if required:
            keys = sorted(k for k in record if k != "_source")
            raise ValueError(f"{_where(record)}: missing required field {name!r} (record has fields {keys})")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{_where(record)}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{_where(record)}: required field {name!r} is empty")
    return value


def alpaca_prompt(record: dict) -> str:
    """Renders the Alpaca prompt of one record (everything before the response).

    Args:
        record: with ``instruction`` (str), optional ``input`` (str; empty or absent
            selects the no-input template) and optional ``system`` (replaces the
            default "Below is an instruction ..." preamble).

    Returns:
        The prompt, ending in ``"### Response:\\n"``.

    Raises:
        ValueError: ``instruction`` missing, empty or not a string (the message
            names the record's ``_source`` and the field).
    """
    instruction = record_field(record, "instruction", required=True)
    inp = record_field(record, "input", required=False)
    system = record_field(record, "system", required=False)
    if inp:
        return ALPACA_PROMPT_INPUT.format(system=system or ALPACA_SYSTEM_INPUT, instruction=instruction, input=inp)
    return ALPACA_PROMPT.format(system=system or ALPACA_SYSTEM, instruction=instruction)


def _special_ids(tokenizer) -> tuple[list[int], int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one in tokenizer_config.json")
    bos = tokenizer.bos_token_id
    return ([] if bos is None else [int(bos)]), int(eos)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encodes a batch of strings without special tokens (user text is never parsed as one)."""
    if not texts:
        return []
    kwargs = dict(add_special_tokens=False, verbose=False)  # long documents are chunked later
    if _supports_split_special_tokens(tokenizer):
        kwargs["split_special_tokens"] = True
    return [list(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]]


def _supports_split_special_tokens(tokenizer) -> bool:
    if hasattr(tokenizer, "split_special_tokens"):
        return True
    try:
        return "split_special_tokens" in inspect.signature(tokenizer.__call__).parameters
    except (TypeError, ValueError):
        return False


def format_alpaca(records: Sequence[dict], tokenizer, train_on_inputs: bool = False,
                  stats: dict | None = None) -> list[dict]:
    """Tokenizes Alpaca records into examples with a response-only loss mask.

    ``ids = [bos] + tok(prompt + output) + [eos]``; ``loss_mask`` is 1 on the
    response tokens and the eos (or on every token but the first when
    ``train_on_inputs``). See the module docstring for the seam handling.

    Args:
        records: dicts with ``instruction``, ``output``, optional ``input``/``system``
            and ``_source``.
        tokenizer: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``).
        train_on_inputs: also train on the prompt tokens.
        stats: optional dict; ``seam_fallbacks`` (int) is added to it.

    Returns:
        One example per record: ``input_ids`` and ``loss_mask``, lists of int, length L.

    Raises:
        ValueError: a missing/empty ``instruction`` or ``output`` (names ``_source`` and
            the field), or a tokenizer without an eos token.
    """
    bos, eos = _special_ids(tokenizer)
    prompts, fulls = [], []
    for record in records:
        prompt = alpaca_prompt(record)
        prompts.append(prompt)
        fulls.append(prompt + record_field(record, "output", required=True))
    prompt_ids, full_ids = _encode(tokenizer, prompts), _encode(tokenizer, fulls)
    examples, fallbacks = [], 0
    for record, p_ids, f_ids in zip(records, prompt_ids, full_ids):
        if f_ids[:len(p_ids)] == p_ids and len(f_ids) > len(p_ids):
            r_ids = f_ids[len(p_ids):]
        else:
            fallbacks += 1
            r_ids = _encode(tokenizer, [record_field(record, "output", required=True)])[0]
        prompt_part = bos + p_ids
        ids = prompt_part + r_ids + [eos]
        mask = ([0] + [1] * (len(ids) - 1)) if train_on_inputs else ([0] * len(prompt_part) + [1] * (len(r_ids) + 1))
        examples.append({"input_ids": ids, "loss_mask": mask})
    if stats is not None:
        stats["seam_fallbacks"] = stats.get("seam_fallbacks", 0) + fallbacks
    return examples


def format_completion(records: Sequence[dict], tokenizer, text_field: str = "text") -> list[dict]:
    """Tokenizes completion records: ``[bos] + tok(text) + [eos]``, every token trained.

    Args:
        records: dicts with ``text_field`` and ``_source``.
        tokenizer: a ``transformers`` tokenizer.
        text_field: the field holding the text.

    Returns:
        One example per record; ``loss_mask`` is 1 everywhere except token 0.

    Raises:
        ValueError: a missing/empty text field (names ``_source`` and the field).
    """
    bos, eos = _special_ids(tokenizer)
    texts = [record_field(r, text_field, required=True) for r in records]
    examples = []
    for ids in _encode(tokenizer, texts):
        ids = bos + ids + [eos]
        examples.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    return examples


def format_text(texts: Iterable[str], tokenizer) -> list[int]:
    """Tokenizes documents into one stream: ``[bos] + tok(d1) + [eos] + tok(d2) + [eos] ...``.

    Documents are separated by eos (the model learns where a document ends); the
    stream is cut into training rows by ``pipeline.chunk_text``, so rows may span
    a document boundary (standard pretraining, as nanoGPT / llama2.c).

    Args:
        texts: documents (e.g. whole files); empty ones are skipped.
        tokenizer: a ``transformers`` tokenizer.

    Returns:
        The token stream, list of int.
    """
    bos, eos = _special_ids(tokenizer)
    stream = list(bos)
    for ids in _encode(tokenizer, [t for t in texts if t]):
        stream.extend(ids)
        stream.append(eos)
    return stream


def format_records(records: Sequence[dict], fmt: str, tokenizer, train_on_inputs: bool = False,
                   text_field: str = "text", stats: dict | None = None) -> list[dict]:
    """Formats and tokenizes records into examples (``alpaca`` or ``completion``).

    Args:
        records: dicts from ``sources.read_records`` (with ``_source``).
        fmt: ``"alpaca"`` or ``"completion"`` (``"text"`` goes through :func:`format_text`).
        tokenizer: a ``transformers`` tokenizer.
        train_on_inputs: alpaca only; also train on prompt tokens.
        text_field: completion only; the field holding the text.
        stats: optional dict collecting counters (``seam_fallbacks``).

    Returns:
        A list of ``{"input_ids": list[int], "loss_mask": list[int]}``, one per record.

    Raises:
        ValueError: an unknown format, or a record missing a required field.
    """
    if fmt == "alpaca":
        return format_alpaca(records, tokenizer, train_on_inputs=train_on_inputs, stats=stats)
    if fmt == "completion":
        return format_completion(records, tokenizer, text_field=text_field)
    if fmt == "text":
        raise ValueError("format 'text' makes one token stream: use format_text + pipeline.chunk_text")
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
