"""Record formats -> token ids + loss mask (alpaca, completion, text).

An *example* is ``{"input_ids": list[int], "loss_mask": list[int]}`` of equal
length ``L``: ``loss_mask[t] = 1`` means token ``t`` is a training target (it is
predicted from tokens ``< t``). Token 0 is never a target (nothing precedes it),
so its mask is always 0. ``sequences.build_sequences`` shifts examples into the
``input_ids``/``target_ids`` arrays the trainer reads.

Formats:

* ``alpaca``: ``{"instruction", "input"?, "output", "system"?}`` rendered with the
    Stanford Alpaca prompt::

            ids  = [bos] + tok(prompt + output) + [eos]
            mask =   0   +  0 ... 0 | 1 ... 1   +   1      (train_on_inputs: 0, 1 ... 1)

* ``completion``: ``{"text"}`` (``text_field``): ``[bos] + tok(text) + [eos]``, all trained.
    ``data.text_template`` (``"{Name} by {Composer}"``) renders the text from other fields
    (rows of a CSV or SQL table).
* ``chat``: ShareGPT ``{"conversations": [{"from", "value"}]}`` or OpenAI ``{"messages":
    [{"role", "content"}]}``, roles mapped by ``DEFAULT_ROLE_MAP`` + ``data.role_map``, rendered
    with the tokenizer's chat template (or ``data.chat_template``) by
    ``tokenizer.apply_chat_template``; the ids are exactly what transformers'
    ``apply_chat_template(messages, tokenize=True)`` returns (so BOS appears where the
    template writes it, never added twice). Loss on the turns whose role is in
    ``data.roles_to_train`` (default ``assistant``): each turn's span is the text the
    template adds for it (``render(msgs[:i+1])`` minus ``render(msgs[:i], add_generation_prompt=True)``),
    so the turn terminator the template writes (``</s>``, ``<|eot_id|>``, ``<|im_end|>``,
    ``<end_of_turn>``, ``<|end|>``) is trained once per turn, as axolotl's ``train_on_eos: turn``; text a
    template writes after the tokenizer's EOS inside a turn (Mistral's trailing space), and whitespace after
    the turn's last special token (the newline after Gemma's ``<end_of_turn>`` or Phi-3's ``<|end|>``), is not
    trained. A turn the template renders differently once later turns follow (Phi-3's and Qwen3's templates)
    is found by its content, then takes the special token written right after it. A template's own system
    handling applies (Gemma 2's raises "System role not supported": a ``ValueError`` naming the record and
    its roles). Tokens are mapped to spans by their character offsets. ``train_on_inputs`` trains every token.

    ``data.chat_template`` may name a built-in template (``chatml``, ``llama2``, ``llama3`` = Llama 3.1's,
    ``mistral``, ``gemma``, ``qwen`` = Qwen2.5's; ``tokenizer.CHAT_TEMPLATES``, sources there).
    Tool calling: a top-level ``tools`` (a list of JSON-schema function specs, or a JSON string of one; bare
    ``{"name", "description", "parameters"}`` specs are wrapped as ``{"type": "function", "function": spec}``) is
    passed as ``apply_chat_template(tools=...)``; OpenAI's assistant ``tool_calls`` (``arguments`` a dict or a
    JSON string, decoded to the dict transformers' templates expect) and ``role: tool`` messages are passed as
    given; ShareGPT's (LLaMA-Factory's) ``function_call`` turn (JSON ``{"name", "arguments"}`` or a list) becomes
    an assistant message with ``tool_calls``, ``observation`` a ``tool`` message. Assistant turns, also those that
    only call a tool, are trained; tool results and the tools preamble are not. A template that renders the
    record the same without its tools / calls / results (Llama 2's, Mistral's, Gemma's, ChatML) is an error
    naming the template and the record, never a silent drop.
    Content may be a list of text parts ``[{"type": "text", "text": ...}]``: passed as a list to a template
    that renders lists (Gemma 3's), else joined with ``"\n"`` as vLLM's OpenAI server does for string templates
    (``vllm/entrypoints/chat_utils.py``, content format ``"string"``), so training sees what serving will;
    transformers passes content to the template as given, and Qwen2.5's and Llama 3's templates take strings
    only. Other part types are an error.
* ``pretokenized``: ``{"input_ids", "labels"?, "loss_mask"?, "attention_mask"?}``: ``labels``
    = -100 marks untrained tokens (Hugging Face convention), ``attention_mask`` 0 marks padding
    (removed); without labels / loss_mask every token but the first is trained.
* ``text``: whole documents (plain-text files, or records' ``text_field``), each
    ``tok(doc) + [eos]``, concatenated into one stream after a single ``[bos]``;
    ``sequences.chunk_text`` cuts the stream into training rows.

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
import re
from collections.abc import Iterable, Sequence

from easytune.tokenizer import CHAT_TEMPLATES, chat_template_name, resolve_chat_template

FORMATS = ("alpaca", "chat", "completion", "text", "pretokenized")
# ShareGPT / OpenAI role names -> chat-template roles (``data.role_map`` adds to / overrides these).
DEFAULT_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                    "model": "assistant", "system": "system", "tool": "tool", "function": "tool",
                    "function_call": "assistant", "observation": "tool"}  # the last two: LLaMA-Factory's ShareGPT

ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.")
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
    backend = _plain_backend(tokenizer)
    if backend is not None:  # what tokenizer(texts, add_special_tokens=False, split_special_tokens=True) runs
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = saved
    kwargs = dict(add_special_tokens=False, verbose=False)  # long documents are chunked later
    if _supports_split_special_tokens(tokenizer):
        kwargs["split_special_tokens"] = True
    return [list(ids) for ids in tokenizer(texts, **kwargs)["input_ids"]]


def _plain_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` of a fast tokenizer with no truncation or padding configured (then its
    ``encode_batch`` is all that ``tokenizer(texts)`` does, without building a ``BatchEncoding``), else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (backend is None or not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_special_tokens")
            or backend.truncation is not None or backend.padding is not None):
        return None
    return backend


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
    """Tokenizes documents into one stream: ``[bos] + tok(d1) + [eos] + [bos] + tok(d2) + [eos] ...`` (each
    document framed as Llama's pretraining data is; no bos when the tokenizer has none).

    Documents are separated by eos (the model learns where a document ends); the
    stream is cut into training rows by ``sequences.chunk_text``, so rows may span
    a document boundary (standard pretraining, as nanoGPT / llama2.c).

    Args:
        texts: documents (e.g. whole files); empty ones are skipped.
        tokenizer: a ``transformers`` tokenizer.

    Returns:
        The token stream, list of int.
    """
    return [t for doc in format_documents(texts, tokenizer) for t in doc]


def format_documents(texts: Iterable[str], tokenizer,
                     frames: Sequence[tuple[bool, bool]] | None = None) -> list[list[int]]:
    """Each document's tokens as :func:`format_text` frames them, ``[bos] + tok(d) + [eos]``, one list per
    document (``[]`` for an empty one), in one batched tokenizer call.

    Args:
        texts: documents.
        tokenizer: a ``transformers`` tokenizer.
        frames: per text, ``(starts a document, ends it)``: a piece of a long document
            (``sources.iter_text``) gets the bos only on its first piece and the eos only on its last.
            None: every text is a whole document.

    Raises:
        ValueError: a tokenizer without an eos token.
    """
    bos, eos = _special_ids(tokenizer)
    texts = list(texts)
    frames = list(frames) if frames is not None else [(True, True)] * len(texts)
    encoded = iter(_encode(tokenizer, [t for t in texts if t]))
    return [(bos if first else []) + next(encoded) + ([eos] if last else []) if t else []
            for t, (first, last) in zip(texts, frames)]


_TEMPLATE_FILES: dict[str, str] = {}  # template text -> the file it was read from (names it in error messages)


def load_chat_template(spec: str) -> str | None:
    """``data.chat_template``: ``""`` (None: the tokenizer's own), a built-in name (``chatml``, ``llama2``,
    ``llama3``, ``mistral``, ``gemma``, ``qwen``: ``tokenizer.CHAT_TEMPLATES``, the same ones ``tokenizer train
    --chat-template`` writes), a Jinja string, or a path to a ``.jinja`` file or a ``.json`` file holding
    ``{"chat_template": ...}`` (tokenizer_config.json style).

    Returns:
        The Jinja template text, or None.

    Raises:
        ValueError: a spec that is no built-in name and no file (the built-in names listed), an unreadable
            file, or JSON without a ``chat_template`` string (:func:`easytune.tokenizer.resolve_chat_template`).
    """
    if not spec:
        return None
    import pathlib
    is_file = not (spec in CHAT_TEMPLATES or "{%" in spec or "{{" in spec)  # else a name or a Jinja string
    if is_file and not pathlib.Path(spec).is_file():
        raise ValueError(f"data.chat_template: {spec!r} is neither a built-in template ({', '.join(CHAT_TEMPLATES)}) "
                         f"nor a file (.jinja, or .json with a 'chat_template' key)")
    try:  # the one reader of names, Jinja strings and .jinja / .json files (also tokenizer train's)
        text = resolve_chat_template(spec)[0]
    except ValueError as e:
        raise ValueError(f"data.chat_template: {e}") from None
    if is_file:
        _TEMPLATE_FILES[text] = spec
    return text


def _text_parts(record: dict, where: str, parts: list) -> list[dict]:
    """Validated copies of a content list's parts; only ``{"type": "text", "text": str}`` is accepted."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise ValueError(f"{_where(record)}: {where}[{j}] has type {kind!r}: only text parts "
                             f"({{'type': 'text', 'text': ...}}) can be trained in format 'chat'")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{_where(record)}: {where}[{j}].text must be a string")
        out.append({"type": "text", "text": part["text"]})
    return out


def _json_field(record: dict, where: str, value, what: str):
    """``value`` decoded when it is a JSON string (ShareGPT writes calls, arguments and tools as JSON text)."""
    if not isinstance(value, str):
        return value
    import json
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{_where(record)}: {where} is not valid JSON ({what}): {e}") from None


def _tool_call(record: dict, where: str, call) -> dict:
    """One call in transformers' layout ``{"type": "function", "function": {"name", "arguments": dict}}``."""
    call = _json_field(record, where, call, 'a call {"name": ..., "arguments": {...}}')
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{_where(record)}: {where} must be a call {{'name': str, 'arguments': {{...}}}} (or "
                         f"OpenAI's {{'type': 'function', 'function': {{...}}}}), got {call!r:.120}")
    args = _json_field(record, f"{where}.arguments", fn.get("arguments", {}), "the call's arguments object")
    if not isinstance(args, dict):
        raise ValueError(f"{_where(record)}: {where}.arguments must be an object (a dict, or a JSON string of "
                         f"one), got {type(args).__name__}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def chat_tools(record: dict) -> list[dict] | None:
    """The record's ``tools`` as transformers' ``apply_chat_template(tools=...)`` takes them: JSON-schema
    function specs ``{"type": "function", "function": {"name", "description", "parameters"}}``.

    Accepts a list or a JSON string of one (ShareGPT / LLaMA-Factory writes a string); bare specs
    ``{"name", "description", "parameters"}`` are wrapped in ``{"type": "function", "function": spec}``.

    Returns:
        The specs, or None when the record has no (or an empty) ``tools``.

    Raises:
        ValueError: invalid JSON, not a list, or a spec without a name (``_source`` and the index named).
    """
    tools = record.get("tools")
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return None
    tools = _json_field(record, "field 'tools'", tools, "a list of function specs")
    if not isinstance(tools, list):
        raise ValueError(f"{_where(record)}: field 'tools' must be a list of function specs, got "
                         f"{type(tools).__name__}")
    out = []
    for k, tool in enumerate(tools):
        spec = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"{_where(record)}: tools[{k}] must be a function spec {{'name', 'description', "
                             f"'parameters'}} (or {{'type': 'function', 'function': {{...}}}}), got {tool!r:.120}")
        out.append({"type": "function", "function": spec})
    return out or None


def chat_messages(record: dict, role_map: dict[str, str] | None = None) -> list[dict]:
    """The record's conversation as transformers' chat messages (ShareGPT or OpenAI layout).

    Each message is ``{"role", "content"}``; ``content`` is a string or a list of text parts
    ``[{"type": "text", "text": str}]`` (:func:`format_chat` joins them unless the template reads parts). An
    assistant message may carry ``tool_calls`` (``[{"type": "function", "function": {"name", "arguments":
    dict}}]``, its content then ``""`` when absent or null); a ``tool`` message keeps ``tool_call_id`` / ``name``.
    ShareGPT's ``function_call`` turn (value: JSON ``{"name", "arguments"}`` or a list of them) becomes an
    assistant message with ``tool_calls``; ``observation`` becomes a ``tool`` message (LLaMA-Factory's layout).

    Args:
        record: with ``messages`` (role/content) or ``conversations`` (from/value; role/content
            also accepted) and ``_source``.
        role_map: extra / overriding role names (merged over ``DEFAULT_ROLE_MAP``).

    Raises:
        ValueError: no ``messages``/``conversations`` field, an empty or non-list one, a message missing its
            role or content, a content that is no string or list of text parts (a non-text part: its type
            named), an unknown role, or a malformed tool call (message index and ``_source`` named).
    """
    roles = {**DEFAULT_ROLE_MAP, **(role_map or {})}
    key = "messages" if "messages" in record else "conversations" if "conversations" in record else None
    if key is None:
        keys = sorted(k for k in record if k != "_source")
        raise ValueError(f"{_where(record)}: missing required field 'messages' or 'conversations' (record has "
                         f"fields {keys})")
    msgs = record[key]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{_where(record)}: field {key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{_where(record)}: {key}[{i}] is not an object")
        rk = "role" if "role" in m else "from"
        ck = "content" if "content" in m else "value"
        calls, calls_at = m.get("tool_calls"), f"{key}[{i}].tool_calls"
        if calls == []:
            raise ValueError(f"{_where(record)}: {calls_at} is an empty list: give the calls, or leave the field out")
        if rk not in m or (ck not in m and not calls):
            raise ValueError(f"{_where(record)}: {key}[{i}] needs 'role'/'content' (or 'from'/'value'), "
                             f"has {sorted(m)}")
        raw, content = str(m[rk]), m.get(ck)
        role = roles.get(raw)
        if role is None:
            raise ValueError(f"{_where(record)}: {key}[{i}].{rk} = {m[rk]!r} is not a known role ({sorted(roles)}); "
                             f"map it with data.role_map, e.g. '{m[rk]}=user'")
        if raw == "function_call" and role == "assistant":  # ShareGPT: the value is the call itself
            value = _json_field(record, f"{key}[{i}].{ck}", content, 'a call {"name": ..., "arguments": {...}}')
            calls, content = (value if isinstance(value, list) else [value]), ""
            calls_at = f"{key}[{i}].{ck}"
            if not calls:
                raise ValueError(f"{_where(record)}: {calls_at} holds no call (an empty list); a function_call turn "
                                 f"needs at least one {{'name': ..., 'arguments': {{...}}}}")
        msg = {"role": role}
        if isinstance(content, list):
            if not content:
                raise ValueError(f"{_where(record)}: {key}[{i}].{ck} is an empty list of parts; give at least one "
                                 f"{{'type': 'text', 'text': ...}} part, or a string")
            msg["content"] = _text_parts(record, f"{key}[{i}].{ck}", content)
        elif isinstance(content, str) or (content is None and calls):
            msg["content"] = content or ""
        else:
            raise ValueError(f"{_where(record)}: {key}[{i}].{ck} must be a string (or a list of text parts), got "
                             f"{type(content).__name__}")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f"{_where(record)}: {calls_at} must be a list on an assistant message")
            one = calls_at if calls_at.endswith(ck) and len(calls) == 1 else None  # ShareGPT: the turn's value
            msg["tool_calls"] = [_tool_call(record, one or f"{calls_at}[{j}]", c) for j, c in enumerate(calls)]
        if role == "tool":
            msg.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(msg)
    return out


def _render(tokenizer, msgs, template, generation_prompt=False, tools=None) -> str:
    return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


TOOL_TEMPLATES = ("qwen", "llama3")  # the built-in templates that render tools, tool calls and tool results
_PART_REPR = re.compile(r"""['"]type['"]\s*:\s*['"]text['"]""")  # a content list printed as Python / JSON


def _message_text(m: dict) -> str:
    content = m.get("content", "")
    return "\n".join(p["text"] for p in content) if isinstance(content, list) else content


def _join_text_parts(msgs: list[dict]) -> list[dict]:
    return [dict(m, content=_message_text(m)) if isinstance(m.get("content"), list) else m for m in msgs]


def _template_reads_parts(tokenizer, msgs, template, tools) -> bool:
    """Whether the template renders list contents itself (Gemma 3's, Llama 4's iterate the parts): the list renders
    without error, every part's text appears, and no part is printed as a dict."""
    try:
        text = _render(tokenizer, msgs, template, tools=tools)
    except Exception:  # noqa: BLE001 - e.g. '\n' + list in Qwen2.5's template: it takes strings only
        return False
    parts = [p["text"].strip() for m in msgs if isinstance(m.get("content"), list) for p in m["content"]]
    return not _PART_REPR.search(text) and all(p in text for p in parts)


def _template_label(tokenizer, template) -> str:
    """How an error names the template: its built-in name, its file, or the tokenizer it came with."""
    text = template if template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(text, str):
        if chat_template_name(text):
            return f"{chat_template_name(text)!r} (built in)"
        if text in _TEMPLATE_FILES:
            return _TEMPLATE_FILES[text]
    if template is None:
        return f"of tokenizer {getattr(tokenizer, 'name_or_path', '')!r}"
    return "data.chat_template (a Jinja string)"


def _renders_differently(tokenizer, msgs, template, tools, full) -> bool:
    try:
        return _render(tokenizer, msgs, template, tools=tools) != full
    except Exception:  # noqa: BLE001 - the template reacts to the change: it reads what was changed
        return True


def _find_rendered_calls(full: str, turn: str, calls: list[dict], cursor: int) -> tuple[int, int]:
    """The character span in ``full`` (from ``cursor``) of the longest tail of ``turn`` (the assistant turn as the
    template rendered it when last) that still names every call; leading whitespace is left out. ``(-1, -1)``:
    not found."""
    names = [c["function"]["name"] for c in calls]
    for k in range(len(turn)):
        piece = turn[k:]
        if not all(n in piece for n in names):
            break
        pos = full.find(piece, cursor)
        if pos >= 0:
            lead = len(piece) - len(piece.lstrip())
            return pos + lead, pos + len(piece)
    return -1, -1


def _tool_features_ignored(tokenizer, msgs, tools, template, full) -> list[str]:
    """What of the record's tools / tool calls / tool results the template drops: each is changed in turn (removed,
    or a tool result's content altered) and the rendering compared with ``full``; an unchanged text means the
    template never reads it (Llama 2's template skips unknown roles and the ``tool_calls`` key)."""
    lacks = []
    if tools and not _renders_differently(tokenizer, msgs, template, None, full):
        lacks.append("'tools'")
    if any("tool_calls" in m for m in msgs):
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in msgs]
        if not _renders_differently(tokenizer, bare, template, tools, full):
            lacks.append("assistant 'tool_calls'")
    if any(m["role"] == "tool" for m in msgs):
        changed = [dict(m, content=_message_text(m) + " [changed]") if m["role"] == "tool" else m for m in msgs]
        if not _renders_differently(tokenizer, changed, template, tools, full):
            lacks.append("'tool' messages (tool results)")
    return lacks


def _special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: bos/eos/pad/unk and every added token marked special (chat markers
    such as ``<end_of_turn>``, ``<|im_end|>``, ``<|end|>``, ``[/INST]``)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_ids) | {int(i) for i, t in decoder.items() if getattr(t, "special", False)}


def _end_turns_at_special_tokens(full: str, spans, ids, offsets, special_ids: set[int]) -> list[tuple[int, int]]:
    """Character spans of the trained turns, each ending at its end-of-turn token.

    ``spans`` are ``(start, end, found_by_content)``. A turn located by content search (``found_by_content``)
    takes the special token written right after its content (Phi-3's ``<|end|>``, ChatML's ``<|im_end|>``)
    when the tokenizer's eos did not already end it. Whitespace a template writes after a turn's last special
    token (the newline after Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, ChatML's ``<|im_end|>`` when it is
    not the eos) belongs to the separator between turns and is not trained.
    """
    starts = {s: e for (s, e), t in zip(offsets, ids) if t in special_ids and e > s}
    ends = {e for (s, e), t in zip(offsets, ids) if t in special_ids and e > s}
    out = []
    for start, end, found_by_content in spans:
        if found_by_content and end not in ends and end in starts:
            end = starts[end]
        trimmed = start + len(full[start:end].rstrip())
        if start < trimmed < end and trimmed in ends:
            end = trimmed
        out.append((start, end))
    return out


def format_chat(records: Sequence[dict], tokenizer, roles_to_train: Sequence[str] = ("assistant",),
                train_on_inputs: bool = False, role_map: dict[str, str] | None = None,
                chat_template: str | None = None, stats: dict | None = None) -> list[dict]:
    """Renders conversations with the chat template and masks all but the trained roles' turns.

    Tools: the record's ``tools`` (:func:`chat_tools`) are passed as ``apply_chat_template(tools=...)``, and
    assistant ``tool_calls`` / ``tool`` messages (:func:`chat_messages`) as transformers takes them; an assistant
    turn that only calls a tool is trained like any assistant turn, tool results and the tools preamble are not
    (their roles are not in ``roles_to_train``). Content given as text parts is passed as a list when the template
    renders lists (Gemma 3's), else each message's parts are joined with ``"\n"`` (vLLM's string content format).

    Args:
        records: chat records (see :func:`chat_messages`).
        tokenizer: a fast ``transformers`` tokenizer (character offsets are needed).
        roles_to_train: roles whose turns are supervised (after mapping), axolotl's name.
        train_on_inputs: supervise every token but the first.
        role_map: extra role names.
        chat_template: a Jinja template replacing the tokenizer's (``load_chat_template``).
        stats: optional counters: ``chat_fallbacks`` (turns located by content search because
            the template re-renders earlier turns differently) is added.

    Returns:
        One example per record; ``input_ids`` equal ``tokenizer.apply_chat_template(msgs, tools=tools,
        tokenize=True, chat_template=...)`` (``msgs`` with text parts joined where the template takes strings).

    Raises:
        ValueError: malformed records (see :func:`chat_messages`, :func:`chat_tools`), a tokenizer without a
            chat template and no ``data.chat_template``, a template error (e.g. roles that do not alternate;
            ``_source`` named), a record with tools / tool calls / tool results that the template does not
            render (the template and the record named), a slow tokenizer.
    """
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set "
                         f"data.chat_template to a built-in name ({', '.join(CHAT_TEMPLATES)}) or a template file "
                         f"(.jinja, or .json with a 'chat_template' key)")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("format 'chat' needs a fast tokenizer (tokenizer.json) for character offsets")
    train_roles = set(roles_to_train)
    eos = tokenizer.eos_token or ""
    special_ids = _special_token_ids(tokenizer)
    examples, fallbacks = [], 0
    for record in records:
        msgs, tools = chat_messages(record, role_map), chat_tools(record)
        uses_tools = bool(tools) or any("tool_calls" in m or m["role"] == "tool" for m in msgs)
        try:
            if (any(isinstance(m["content"], list) for m in msgs)
                    and not _template_reads_parts(tokenizer, msgs, chat_template, tools)):
                msgs = _join_text_parts(msgs)
            full = _render(tokenizer, msgs, chat_template, tools=tools)
            if uses_tools:
                lacks = _tool_features_ignored(tokenizer, msgs, tools, chat_template, full)
                if lacks:
                    raise ValueError(
                        f"{_where(record)}: chat template {_template_label(tokenizer, chat_template)} cannot express "
                        f"the record's {' and '.join(lacks)}: it renders the same text without them; use a template "
                        f"that renders tools (built in: {', '.join(TOOL_TEMPLATES)}) or remove them from the record")
            spans, cursor = [], 0
            for i, m in enumerate(msgs):
                if m["role"] not in train_roles:
                    continue
                before = (_render(tokenizer, msgs[:i], chat_template, m["role"] == "assistant", tools) if i else "")
                upto = _render(tokenizer, msgs[:i + 1], chat_template, tools=tools)
                if full.startswith(upto) and upto.startswith(before) and len(upto) > len(before) >= cursor:
                    end = len(upto)
                    cut = full.rfind(eos, len(before), end) if eos else -1
                    if cut >= 0:  # nothing after the turn's EOS is trained (Mistral's template adds a space)
                        end = cut + len(eos)
                    spans.append((len(before), end, False))
                    cursor = len(upto)
                    continue
                fallbacks += 1  # the template renders a prefix differently: find the content itself
                if "tool_calls" in m:  # the calls as rendered when the turn was last (Qwen3 adds a think block)
                    start, end = _find_rendered_calls(full, upto[len(before):] if upto.startswith(before) else "",
                                                      m["tool_calls"], cursor)
                else:
                    text = _message_text(m).strip()
                    start = full.find(text, cursor) if text else -1
                    end = start + len(text)
                if start < 0:
                    continue
                after = full[end:]
                if eos and after.lstrip().startswith(eos):
                    end += len(after) - len(after.lstrip()) + len(eos)
                spans.append((start, end, True))
                cursor = end
        except Exception as e:  # jinja2 TemplateError / raise_exception: name the record
            if isinstance(e, ValueError) and str(e).startswith(_where(record)):
                raise
            roles = [m["role"] for m in msgs]
            if uses_tools:
                raise ValueError(f"{_where(record)}: chat template {_template_label(tokenizer, chat_template)} failed "
                                 f"on a record with tools / tool calls: {e} (message roles {roles}); built-in "
                                 f"templates that render tools: {', '.join(TOOL_TEMPLATES)}") from None
            raise ValueError(f"{_where(record)}: chat template failed: {e} (message roles {roles})") from None
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        spans = _end_turns_at_special_tokens(full, spans, ids, enc["offset_mapping"], special_ids)
        if train_on_inputs:
            mask = [0] + [1] * (len(ids) - 1)
        else:
            mask = [int(any(s < e2 and e > s2 for s2, e2 in spans) if e > s else
                        any(s2 <= s < e2 for s2, e2 in spans)) for s, e in enc["offset_mapping"]]
            if mask:
                mask[0] = 0
        examples.append({"input_ids": ids, "loss_mask": mask})
    if stats is not None:
        stats["chat_fallbacks"] = stats.get("chat_fallbacks", 0) + fallbacks
    return examples


def format_pretokenized(records: Sequence[dict]) -> list[dict]:
    """Examples from records that already hold token ids (see the module docstring).

    Raises:
        ValueError: ``input_ids`` missing or not a list of ints, or ``labels`` / ``loss_mask``
            / ``attention_mask`` of another length (``_source`` and field named).
    """
    examples = []
    for r in records:
        ids = r.get("input_ids")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            keys = sorted(k for k in r if k != "_source")
            raise ValueError(f"{_where(r)}: field 'input_ids' must be a list of token ids (ints)"
                             + ("" if "input_ids" in r else f"; record has fields {keys}"))
        n = len(ids)
        for key in ("labels", "loss_mask", "attention_mask"):
            if key in r and (not isinstance(r[key], list) or len(r[key]) != n):
                raise ValueError(f"{_where(r)}: field {key!r} must be a list of {n} values like input_ids")
        if "labels" in r:
            mask = [int(lab != -100) for lab in r["labels"]]
        elif "loss_mask" in r:
            mask = [int(bool(v)) for v in r["loss_mask"]]
        else:
            mask = [1] * n
        if "attention_mask" in r:
            keep = [i for i, a in enumerate(r["attention_mask"]) if a]
            ids, mask = [ids[i] for i in keep], [mask[i] for i in keep]
        if mask:
            mask[0] = 0
        examples.append({"input_ids": list(ids), "loss_mask": mask})
    return examples


def render_text_template(records: Sequence[dict], template: str, text_field: str = "text") -> list[dict]:
    """Sets ``record[text_field] = template.format(**record)`` (``data.text_template``).

    ``None`` values render as ``""``.

    Raises:
        ValueError: the template names a field the record lacks (``_source`` and the field named).
    """
    out = []
    for r in records:
        values = {k: ("" if v is None else v) for k, v in r.items()}
        try:
            text = template.format(**values)
        except KeyError as e:
            keys = sorted(k for k in r if k != "_source")
            raise ValueError(f"{_where(r)}: data.text_template names field {e.args[0]!r}, which the record lacks "
                             f"(record has fields {keys})") from None
        except (IndexError, ValueError) as e:
            raise ValueError(f"data.text_template {template!r} is not a valid str.format template ({e})") from None
        out.append({**r, text_field: text})
    return out


def format_records(records: Sequence[dict], fmt: str, tokenizer, train_on_inputs: bool = False,
                   text_field: str = "text", stats: dict | None = None, **chat_kwargs) -> list[dict]:
    """Formats and tokenizes records into examples (``alpaca``, ``chat``, ``completion``, ``pretokenized``).

    Args:
        records: dicts from ``sources.read_records`` (with ``_source``).
        fmt: the format (``"text"`` goes through :func:`format_text`).
        tokenizer: a ``transformers`` tokenizer.
        train_on_inputs: alpaca / chat; also train on prompt tokens.
        text_field: completion only; the field holding the text.
        stats: optional dict collecting counters (``seam_fallbacks``, ``chat_fallbacks``).
        **chat_kwargs: chat only: ``roles_to_train``, ``role_map``, ``chat_template``.

    Returns:
        A list of ``{"input_ids": list[int], "loss_mask": list[int]}``, one per record.

    Raises:
        ValueError: an unknown format, or a record missing a required field.
    """
    if fmt == "alpaca":
        return format_alpaca(records, tokenizer, train_on_inputs=train_on_inputs, stats=stats)
    if fmt == "chat":
        return format_chat(records, tokenizer, train_on_inputs=train_on_inputs, stats=stats, **chat_kwargs)
    if fmt == "completion":
        return format_completion(records, tokenizer, text_field=text_field)
    if fmt == "pretokenized":
        return format_pretokenized(records)
    if fmt == "text":
        raise ValueError("format 'text' makes one token stream: use format_text + sequences.chunk_text")
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
