"""Train a byte-level BPE or unigram tokenizer for pretraining, streaming the corpus from disk.

``easytune tokenizer train --files 'corpus/*.txt' --vocab-size 4096 --out models/my-tok`` reads the corpus
lazily (:func:`iter_corpus`: batches of lines from ``.txt`` files, the ``text`` field of ``.jsonl``
records), trains with ``tokenizers.Tokenizer.train_from_iterator`` and saves a directory that
``transformers.AutoTokenizer.from_pretrained`` loads (``tokenizer.json`` + ``tokenizer_config.json``).

The tokenizer (both models):

* byte level: text is mapped to GPT-2's 256-symbol byte alphabet (``pre_tokenizers.ByteLevel``), every
  symbol is in the vocabulary, so any UTF-8 text encodes without ``<unk>`` and decodes back byte for byte;
* pre-tokenization: GPT-2's regex split (words with their leading space, punctuation runs, whitespace
  runs), and by default each digit a token of its own (``Digits(individual_digits=True)``, as Llama 1/2);
* special tokens: ``<unk>`` = 0, ``<s>`` (bos) = 1, ``</s>`` (eos) = 2, ``<pad>`` = 3 (Llama's ids for the
  first three), then any extra ones (e.g. ChatML's ``<|im_start|>``, ``<|im_end|>``) in the order given;
* encoding adds bos in front, as Llama's tokenizer does (``add_special_tokens=True``);
* an optional chat template (Jinja, ``tokenizer_config.json["chat_template"]``) for
  ``apply_chat_template``; the built-in ones (:data:`CHAT_TEMPLATES`: ``chatml``, ``llama2``, ``llama3``,
  ``mistral``, ``gemma``, ``qwen``) add the special tokens their markers need (ChatML's two, Llama 3's headers).

``model="bpe"`` is byte-pair encoding (Sennrich et al. 2016, GPT-2's byte-level variant);
``model="unigram"`` is the unigram language model (Kudo 2018) trained by EM with pruning, as SentencePiece,
here over the same byte alphabet.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np

MODELS = ("bpe", "unigram")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
BYTE_ALPHABET_SIZE = 256
CHUNK_CHARS = 1 << 20  # characters per batch handed to the trainer (about 1 MB of text)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # .json: JSON Lines only (an array cannot be streamed)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Built-in named chat templates (``data.chat_template=qwen``, ``tokenizer train --chat-template llama3``): each
# Jinja text is copied verbatim from the source named in CHAT_TEMPLATE_SOURCES (tests/data/test_named_templates.py
# renders each one against that source). The templates live here, in the lowest layer, so that both
# ``tokenizer train`` and ``data.formats`` read the same registry.
_LLAMA3_1 = "\n".join([
        '{{- bos_token }}',
        '{%- if custom_tools is defined %}',
        '    {%- set tools = custom_tools %}',
        '{%- endif %}',
        '{%- if not tools_in_user_message is defined %}',
        '    {%- set tools_in_user_message = true %}',
        '{%- endif %}',
        '{%- if not date_string is defined %}',
        '    {%- set date_string = "26 Jul 2024" %}',
        '{%- endif %}',
        '{%- if not tools is defined %}',
        '    {%- set tools = none %}',
        '{%- endif %}',
        '',
        '{#- This block extracts the system message, so we can slot it into the right place. #}',
        "{%- if messages[0]['role'] == 'system' %}",
        "    {%- set system_message = messages[0]['content']|trim %}",
        '    {%- set messages = messages[1:] %}',
        '{%- else %}',
        '    {%- set system_message = "" %}',
        '{%- endif %}',
        '',
        '{#- System message + builtin tools #}',
        '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}',
        '{%- if builtin_tools is defined or tools is not none %}',
        '    {{- "Environment: ipython\\n" }}',
        '{%- endif %}',
        '{%- if builtin_tools is defined %}',
        '    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}',
        '{%- endif %}',
        '{{- "Cutting Knowledge Date: December 2023\\n" }}',
        '{{- "Today Date: " + date_string + "\\n\\n" }}',
        '{%- if tools is not none and not tools_in_user_message %}',
        '    {{- "You have access to the following functions. To call a function, please respond with JSON '
        'for a function call." }}',
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name a'
        "nd its value}.' }}",
        '    {{- "Do not use variables.\\n\\n" }}',
        '    {%- for t in tools %}',
        '        {{- t | tojson(indent=4) }}',
        '        {{- "\\n\\n" }}',
        '    {%- endfor %}',
        '{%- endif %}',
        '{{- system_message }}',
        '{{- "<|eot_id|>" }}',
        '',
        '{#- Custom tools are passed in a user message with some extra guidance #}',
        '{%- if tools_in_user_message and not tools is none %}',
        '    {#- Extract the first user message so we can plug it in here #}',
        '    {%- if messages | length != 0 %}',
        "        {%- set first_user_message = messages[0]['content']|trim %}",
        '        {%- set messages = messages[1:] %}',
        '    {%- else %}',
        '        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user'
        ' message!") }}',
        '{%- endif %}',
        "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}",
        '    {{- "Given the following functions, please respond with a JSON for a function call " }}',
        '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}',
        '    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name a'
        "nd its value}.' }}",
        '    {{- "Do not use variables.\\n\\n" }}',
        '    {%- for t in tools %}',
        '        {{- t | tojson(indent=4) }}',
        '        {{- "\\n\\n" }}',
        '    {%- endfor %}',
        '    {{- first_user_message + "<|eot_id|>"}}',
        '{%- endif %}',
        '',
        '{%- for message in messages %}',
        "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}",
        "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
        "| trim + '<|eot_id|>' }}",
        "    {%- elif 'tool_calls' in message %}",
        '        {%- if not message.tool_calls|length == 1 %}',
        '            {{- raise_exception("This model only supports single tool-calls at once!") }}',
        '        {%- endif %}',
        '        {%- set tool_call = message.tool_calls[0].function %}',
        '        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}',
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
        '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}',
        '            {%- for arg_name, arg_val in tool_call.arguments | items %}',
        '                {{- arg_name + \'="\' + arg_val + \'"\' }}',
        '                {%- if not loop.last %}',
        '                    {{- ", " }}',
        '                {%- endif %}',
        '                {%- endfor %}',
        '            {{- ")" }}',
        '        {%- else  %}',
        "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
        '            {{- \'{"name": "\' + tool_call.name + \'", \' }}',
        '            {{- \'"parameters": \' }}',
        '            {{- tool_call.arguments | tojson }}',
        '            {{- "}" }}',
        '        {%- endif %}',
        '        {%- if builtin_tools is defined %}',
        "            {#- This means we're in ipython mode #}",
        '            {{- "<|eom_id|>" }}',
        '        {%- else %}',
        '            {{- "<|eot_id|>" }}',
        '        {%- endif %}',
        '    {%- elif message.role == "tool" or message.role == "ipython" %}',
        '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}',
        '        {%- if message.content is mapping or message.content is iterable %}',
        '            {{- message.content | tojson }}',
        '        {%- else %}',
        '            {{- message.content }}',
        '        {%- endif %}',
        '        {{- "<|eot_id|>" }}',
        '    {%- endif %}',
        '{%- endfor %}',
        '{%- if add_generation_prompt %}',
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
        '{%- endif %}',
        '',
])

_QWEN2_5 = "\n".join([
        '{%- if tools %}',
        "    {{- '<|im_start|>system\\n' }}",
        "    {%- if messages[0]['role'] == 'system' %}",
        "        {{- messages[0]['content'] }}",
        '    {%- else %}',
        "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}",
        '    {%- endif %}',
        '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou a'
        're provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}',
        '    {%- for tool in tools %}',
        '        {{- "\\n" }}',
        '        {{- tool | tojson }}',
        '    {%- endfor %}',
        '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and argumen'
        'ts within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments'
        '\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}',
        '{%- else %}',
        "    {%- if messages[0]['role'] == 'system' %}",
        "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}",
        '    {%- else %}',
        "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assista"
        "nt.<|im_end|>\\n' }}",
        '    {%- endif %}',
        '{%- endif %}',
        '{%- for message in messages %}',
        '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.r'
        'ole == "assistant" and not message.tool_calls) %}',
        "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
        '    {%- elif message.role == "assistant" %}',
        "        {{- '<|im_start|>' + message.role }}",
        '        {%- if message.content %}',
        "            {{- '\\n' + message.content }}",
        '        {%- endif %}',
        '        {%- for tool_call in message.tool_calls %}',
        '            {%- if tool_call.function is defined %}',
        '                {%- set tool_call = tool_call.function %}',
        '            {%- endif %}',
        '            {{- \'\\n<tool_call>\\n{"name": "\' }}',
        '            {{- tool_call.name }}',
        '            {{- \'", "arguments": \' }}',
        '            {{- tool_call.arguments | tojson }}',
        "            {{- '}\\n</tool_call>' }}",
        '        {%- endfor %}',
        "        {{- '<|im_end|>\\n' }}",
        '    {%- elif message.role == "tool" %}',
        '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}',
        "            {{- '<|im_start|>user' }}",
        '        {%- endif %}',
        "        {{- '\\n<tool_response>\\n' }}",
        '        {{- message.content }}',
        "        {{- '\\n</tool_response>' }}",
        '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}',
        "            {{- '<|im_end|>\\n' }}",
        '        {%- endif %}',
        '    {%- endif %}',
        '{%- endfor %}',
        '{%- if add_generation_prompt %}',
        "    {{- '<|im_start|>assistant\\n' }}",
        '{%- endif %}',
        '',
])

CHAT_TEMPLATES = {
        # ChatML (OpenAI; Qwen2's and many small models' template); the assistant turn is left open when
        # add_generation_prompt is set.
        "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
        # Llama 2 chat: [INST] <<SYS>> ... <</SYS>> ... [/INST] answer </s>; roles must alternate.
        "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
                   "system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
                   "system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == "
                   "'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                   "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != "
                   "false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
                   "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if "
                   "message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
                   "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
                   "{% endfor %}"),
        # Llama 3.1 instruct (tool calling: tools in the first user turn, calls as {"name", "parameters"} JSON,
        # results as ipython turns).
        "llama3": _LLAMA3_1,
        # Mistral-7B-Instruct v0.1: [INST] ... [/INST] answer</s> (a space after each eos); user/assistant only.
        "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' "
                    "+ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
                    "message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant "
                    "roles are supported!') }}{% endif %}{% endfor %}"),
        # Gemma (1 and 2) instruct: <start_of_turn>user / model ... <end_of_turn>; no system role.
        "gemma": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                  "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
                  "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                  "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set "
                  "role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role "
                  "+ '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if "
                  "add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"),
        # Qwen2.5 instruct: ChatML with a default system turn, tools in the system turn, calls in <tool_call> tags,
        # results in <tool_response> tags inside a user turn.
        "qwen": _QWEN2_5,
}
# The special tokens ``tokenizer train --chat-template NAME`` adds so the template's markers are single tokens
# (the Llama 2 / Mistral v0.1 markers "[INST]", "<<SYS>>" are plain text in their own tokenizers).
CHAT_TEMPLATE_TOKENS = {
        "chatml": CHATML_TOKENS, "qwen": CHATML_TOKENS, "llama2": (), "mistral": (),
        "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
        "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
CHAT_TEMPLATE_SOURCES = {
        "chatml": "EricLBuehler/mistral.rs chat_templates/chatml.json (ChatML; the same text, spacing aside)",
        "llama2": "EricLBuehler/mistral.rs chat_templates/llama2.json (meta-llama/Llama-2-7b-chat-hf's template)",
        "llama3": "ollama/ollama template/index.json, llama3-instruct with tools (meta-llama/Llama-3.1-8B-Instruct's "
                  "tokenizer_config.json chat_template)",
        "mistral": "EricLBuehler/mistral.rs chat_templates/mistral.json (mistralai/Mistral-7B-Instruct-v0.1's)",
        "gemma": "ollama/ollama template/index.json, gemma-instruct (google/gemma-2-*-it's tokenizer_config.json)",
        "qwen": "Qwen/Qwen2.5-*-Instruct tokenizer_config.json chat_template (as llama.cpp's convert_hf_to_gguf "
                "prints it for Qwen2.5-0.5B-Instruct; identical in two other public copies)",
}


def chat_template_name(template: str | None) -> str | None:
    """The built-in name (``"qwen"``) whose text is ``template``, or None."""
    return next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)


def expand_files(patterns: Sequence[str], flag: str = "--files") -> list[str]:
    """Paths, globs (``**`` recursive) and directories (every file below, sorted) -> sorted unique file paths.

    Raises:
        ValueError: no pattern given, or a pattern matches no file (the message names ``flag`` and it).
    """
    if not patterns:
        raise ValueError(f"{flag}: no training files given")
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) or ([pattern] if os.path.exists(pattern) else [])
        files = []
        for m in matches:
            if os.path.isdir(m):
                files += sorted(str(p) for p in pathlib.Path(m).rglob("*") if p.is_file())
            elif os.path.isfile(m):
                files.append(m)
        if not files:
            raise ValueError(f"{flag}: no file matches {pattern!r}")
        out += [f for f in files if f not in out]
    return out


def iter_corpus(files: Sequence[str], text_field: str = "text",
                chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Streams the corpus as batches of texts, never holding a whole file in memory.

    ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON Lines): one text per record, the string at ``text_field``
    (records whose field is an empty string are skipped). Any other file is read as UTF-8 text, one text
    per line with its ``\\n`` kept (what ``tokenizers.Tokenizer.train(files)`` does); a line longer than
    ``chunk_chars`` is cut into pieces of ``chunk_chars`` characters. Texts are grouped into batches of
    about ``chunk_chars`` characters, the unit ``Tokenizer.train_from_iterator`` consumes.

    Args:
        files: file paths (see :func:`expand_files` for globs).
        text_field: jsonl field holding the text.
        chunk_chars: batch size and longest piece, in characters (>= 1).

    Yields:
        ``list[str]``, each list about ``chunk_chars`` characters in total.

    Raises:
        ValueError: ``path:line`` of an invalid JSON line, a JSON array file, a record that is not an object,
            or a record whose ``text_field`` is missing or not a string; a file that is not UTF-8 (with the
            byte offset).
    """
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    batch: list[str] = []
    size = 0
    for path in files:
        for text in (_jsonl_texts(path, text_field) if path.lower().endswith(JSONL_SUFFIXES)
                     else _text_lines(path, chunk_chars)):
            batch.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _text_lines(path: str, chunk_chars: int) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            yield from iter(lambda: f.readline(chunk_chars), "")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e


def _jsonl_texts(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if lineno == 1 and line.lstrip().startswith("["):
                raise ValueError(f"{path}:1: a JSON array; the tokenizer trainer streams JSON Lines (one object "
                                 f"per line): convert it, e.g. with jq -c '.[]'")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
            if text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} (--text-field); the record has "
                                 f"{sorted(record)}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} must be a string, got "
                                 f"{type(text).__name__}")
            if text:
                yield text


def resolve_chat_template(spec: str | None) -> tuple[str | None, tuple[str, ...]]:
    """``--chat-template``: ``None``/``""`` (none), a built-in name (:data:`CHAT_TEMPLATES`: chatml, llama2, llama3,
    mistral, gemma, qwen), a ``.jinja`` file, a ``.json`` file holding ``{"chat_template": ...}``, or a Jinja string.

    Returns:
        ``(template or None, special tokens the template needs)``: a built-in's
        :data:`CHAT_TEMPLATE_TOKENS` (ChatML's ``<|im_start|>``, ``<|im_end|>``), none for a file or string.

    Raises:
        ValueError: a name that is neither a built-in, a file, nor a Jinja string (the built-in names listed); a
            ``.json`` file without a ``chat_template`` string.
    """
    if not spec:
        return None, ()
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec], CHAT_TEMPLATE_TOKENS[spec]
    if "{{" in spec or "{%" in spec:
        return spec, ()
    if os.path.isfile(spec):
        text = pathlib.Path(spec).read_text(encoding="utf-8")
        if spec.endswith(".json"):  # tokenizer_config.json style: {"chat_template": "..."}
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
                raise ValueError(f"{spec}: no 'chat_template' string in this JSON file")
            text = data["chat_template"]
        return text, ()
    raise ValueError(f"--chat-template: {spec!r} is not a file, a Jinja string, or a built-in template "
                     f"({', '.join(CHAT_TEMPLATES)})")


MAX_VOCAB = 1_048_576  # ids above 2**20: far past any LLM vocabulary (Gemma's 256k is the largest common one)


def train_tokenizer(files: Sequence[str], vocab_size: int, model: str = "bpe", *, text_field: str = "text",
                    min_frequency: int = 2, split_digits: bool = True, extra_special_tokens: Sequence[str] = (),
                    chunk_chars: int = CHUNK_CHARS, show_progress: bool = False):
    """Trains a byte-level BPE or unigram ``tokenizers.Tokenizer`` on files, streamed (:func:`iter_corpus`).

    Args:
        files: paths, globs or directories (``.txt``-like or ``.jsonl``).
        vocab_size: target vocabulary size in tokens, special tokens included. BPE stops earlier when no
            pair occurs ``min_frequency`` times; unigram prunes down to it.
        model: ``"bpe"`` or ``"unigram"``.
        text_field: jsonl field holding the text.
        min_frequency: BPE: least count of a pair to be merged.
        split_digits: each digit its own pre-token (Llama 1/2); False keeps GPT-2's digit runs.
        extra_special_tokens: added after ``<unk> <s> </s> <pad>`` (ids 4, 5, ...).
        chunk_chars: characters per batch read (memory bound of the reader).
        show_progress: the ``tokenizers`` progress bar on stderr.

    Returns:
        ``tokenizers.Tokenizer`` with ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3, a ``<s>``-adding
        post-processor and a ByteLevel decoder.

    Raises:
        ValueError: unknown ``model`` (names ``--model``); ``vocab_size`` not above 256 + special tokens
            (names ``--vocab-size``); a file pattern matching nothing; a corpus with no text (names the files);
            bad records (see :func:`iter_corpus`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if model not in MODELS:
        raise ValueError(f"--model: unknown tokenizer model {model!r}; choose one of {', '.join(MODELS)}")
    if any(not t or not t.strip() for t in extra_special_tokens):
        raise ValueError("--special-token: an empty special token cannot be matched in text; give its text")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"--vocab-size: {vocab_size} is beyond {MAX_VOCAB:,} (the largest LLM vocabularies are "
                         f"~256k); the trainer would try to allocate memory for that many merges")
    specials = [UNK, BOS, EOS, PAD] + [t for t in extra_special_tokens if t not in (UNK, BOS, EOS, PAD)]
    specials = list(dict.fromkeys(specials))
    least = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size <= least:
        raise ValueError(f"--vocab-size: {vocab_size} leaves no room to learn tokens; the byte alphabet "
                         f"({BYTE_ALPHABET_SIZE}) and {len(specials)} special tokens already take {least}; "
                         f"use more than {least}")
    paths = expand_files(files)
    batches = iter_corpus(paths, text_field, chunk_chars)
    first = next((b for b in batches if any(b)), None)
    if first is None:
        raise ValueError(f"--files: the corpus holds no text ({', '.join(paths[:3])}"
                         f"{', ...' if len(paths) > 3 else ''})")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=UNK))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=alphabet, show_progress=show_progress)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=UNK,
                                          initial_alphabet=alphabet, show_progress=show_progress)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(itertools.chain([first], batches), trainer)
    for i, t in enumerate(specials):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"tokenizers placed special token {t!r} at id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 1)])
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike, chat_template: str | None = None,
                   model_max_length: int = 2048) -> pathlib.Path:
    """Saves ``tok`` as a ``PreTrainedTokenizerFast`` dir that ``AutoTokenizer.from_pretrained`` loads offline.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (bos/eos/unk/pad names, ``chat_template``,
    ``model_max_length`` in tokens, ``tokenizer_class="PreTrainedTokenizerFast"``, which transformers 4
    and 5 both resolve) and ``special_tokens_map.json`` where transformers writes one.

    Returns:
        The directory.
    """
    from transformers import PreTrainedTokenizerFast

    out = pathlib.Path(out_dir)
    extra = [t.content for i, t in sorted(tok.get_added_tokens_decoder().items()) if i >= 4 and t.special]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
                                 model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra})
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(os.fspath(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        cfg["chat_template"] = chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def bytes_per_token(tokenizer, texts: Iterable[str]) -> dict:
    """Compression of ``tokenizer`` on ``texts``: UTF-8 bytes per token (higher = fewer tokens per text).

    Tokens are counted without special tokens (``add_special_tokens=False``), so the figure compares
    across tokenizers; the bits-per-byte of a model is ``loss_nats_per_token / ln(2) / bytes_per_token``.

    Args:
        tokenizer: a ``transformers`` tokenizer (or anything with ``encode(text, add_special_tokens=False)``).
        texts: the evaluation texts (e.g. :func:`iter_corpus` batches flattened).

    Returns:
        ``dict(bytes=int, tokens=int, bytes_per_token=float)``.

    Raises:
        ValueError: the texts hold no bytes.
    """
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text, add_special_tokens=False))
    if not n_bytes:
        raise ValueError("no text to measure compression on")
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}


def evaluate_files(tokenizer_dir: str | os.PathLike, patterns: Sequence[str], text_field: str = "text") -> dict:
    """``easytune tokenizer eval``: :func:`bytes_per_token` of the tokenizer in ``tokenizer_dir`` over the corpus
    files ``patterns`` (globs; ``.txt`` lines, the ``text_field`` of ``.jsonl`` records, read lazily).

    Returns:
        ``dict(bytes=int, tokens=int, bytes_per_token=float)``.

    Raises:
        ValueError: no tokenizer loads from ``tokenizer_dir`` (named), the files hold no text;
        FileNotFoundError: a pattern matches no file.
    """
    tok = load_tokenizer(tokenizer_dir)
    files = expand_files(patterns)
    return bytes_per_token(tok, (text for batch in iter_corpus(files, text_field) for text in batch))


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (``bytes_to_unicode`` in openai/gpt-2 ``encoder.py``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: the denominator of bits per byte.

    ``bits/byte = sum(nll of target tokens, nats) / ln 2 / sum(lengths[target ids])``, a loss that compares
    across tokenizers (The Pile paper, Gao et al. 2020, section 4; llm.c / nanoGPT report it likewise).
    Byte-level tokenizers (a ``ByteLevel`` decoder, as ours and GPT-2's) map each symbol back to its byte;
    SentencePiece-style ones (Llama 1/2) count ``<0xHH>`` byte-fallback pieces as 1 byte and ``▁`` as a
    space. Special tokens (bos, eos, pad, unk, chat markers) are 0 bytes: they are not text.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.

    Returns:
        ``int32`` array of shape ``[len(tokenizer)]``, bytes per token id.
    """
    import re

    byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    decoder = _gpt2_byte_decoder()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    lengths = np.zeros(len(tokenizer), np.int32)
    for piece, i in tokenizer.get_vocab().items():
        if i in special or i >= len(lengths):
            continue
        if byte_level:
            lengths[i] = sum(1 if c in decoder else len(c.encode("utf-8")) for c in piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return lengths


def train_and_save(files: Sequence[str], out_dir: str | os.PathLike, vocab_size: int, model: str = "bpe", *,
                   text_field: str = "text", chat_template: str | None = None, min_frequency: int = 2,
                   split_digits: bool = True, extra_special_tokens: Sequence[str] = (),
                   model_max_length: int = 2048, show_progress: bool = False) -> dict:
    """``easytune tokenizer train``: :func:`train_tokenizer` then :func:`save_tokenizer`.

    Returns:
        ``dict(out_dir=str, vocab_size=int, special_tokens={name: id})``.

    Raises:
        ValueError: as :func:`train_tokenizer` and :func:`resolve_chat_template`.
    """
    template, template_tokens = resolve_chat_template(chat_template)
    extra = list(dict.fromkeys(list(extra_special_tokens) + list(template_tokens)))
    tok = train_tokenizer(files, vocab_size, model, text_field=text_field, min_frequency=min_frequency,
                          split_digits=split_digits, extra_special_tokens=extra, show_progress=show_progress)
    out = save_tokenizer(tok, out_dir, template, model_max_length)
    specials = {t: tok.token_to_id(t) for t in [UNK, BOS, EOS, PAD] + extra}
    return {"out_dir": str(out), "vocab_size": tok.get_vocab_size(), "special_tokens": specials}


def load_tokenizer(path: str | pathlib.Path, added_tokens: Sequence[str] = (),
                   added_special_tokens: Sequence[str] = ()):
    """``transformers.AutoTokenizer`` from a local dir (never the hub), with ``added_tokens`` and
    ``added_special_tokens`` added (in that order).

    Each added token is a normal (not special) ``AddedToken(t, rstrip=False, lstrip=False, normalized=False)``, as
    axolotl's ``tokens``: the tokenizer matches it before the model's own pieces (it is never split, also not inside
    a word), ``decode`` keeps it (``skip_special_tokens`` does not drop it), and its id is ``len(tokenizer)`` at the
    time it is added (``tokenizer.add_tokens``). Each added special token (chat markers such as ``<|im_end|>``) is
    added as transformers' ``add_special_tokens({"extra_special_tokens": [...]}, replace_extra_special_tokens=False)``
    (v4's ``additional_special_tokens``): ``AddedToken(t, rstrip=False, lstrip=False, normalized=False,
    special=True)``, listed in ``extra_special_tokens``, so ``decode(skip_special_tokens=True)`` drops it and chat
    masking ends turns at it as at a real chat tokenizer's markers. A token the vocabulary already has is not added
    again: it keeps its id, its special flag, and the tokenization of text around it (transformers' ``add_tokens``
    would turn a piece such as ``"in"`` into an added token matched before the merges, changing how ``"raining"`` is
    split).

    Args:
        path: the tokenizer dir.
        added_tokens: tokens to add (``tokenizer.added_tokens``), in order.
        added_special_tokens: special tokens to add after them (``tokenizer.added_special_tokens``), in order.

    Raises:
        FileNotFoundError: ``path`` is not a directory.
        ValueError: transformers cannot load a tokenizer from it (its error, first line, with the dir named); an
            added token that is not a non-empty string (``tokenizer.added_tokens`` /
            ``tokenizer.added_special_tokens`` and the entry named); a token in both lists.
    """
    from transformers import AutoTokenizer
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer dir not found: {path}")
    for key, tokens in (("added_tokens", added_tokens), ("added_special_tokens", added_special_tokens)):
        bad = [t for t in tokens if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"tokenizer.{key}: entries must be non-empty strings, got {bad[0]!r} in "
                             f"{list(tokens)!r}")
    both = [t for t in added_special_tokens if t in set(added_tokens)]
    if both:
        raise ValueError(f"tokenizer.added_special_tokens: {both[0]!r} is also in tokenizer.added_tokens; list it in "
                         f"one of them (special for chat markers, normal otherwise)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/JSON errors with no path in them
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{path}: cannot load a Hugging Face tokenizer from it ({type(e).__name__}: {first})") from e
    vocab = tokenizer.get_vocab() if added_tokens else {}
    new = [t for t in dict.fromkeys(added_tokens) if t not in vocab]
    if new:  # a token the vocabulary already has is left alone: re-adding it would make the tokenizer match it
        # before its own merges ("in" inside "raining") and would drop a special token's special flag
        from tokenizers import AddedToken
        tokenizer.add_tokens([AddedToken(t, rstrip=False, lstrip=False, normalized=False, special=False) for t in new])
    vocab = tokenizer.get_vocab() if added_special_tokens else {}
    new = [t for t in dict.fromkeys(added_special_tokens) if t not in vocab]
    if new:  # transformers 5.25 tokenization_utils_base.add_special_tokens (its AddedToken settings for a str)
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return tokenizer
