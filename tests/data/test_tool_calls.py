"""Tool-calling chat records (easytune/data/formats.py ``chat_messages``, ``chat_tools``, ``format_chat``).

OpenAI layout (top-level ``tools``, assistant ``tool_calls``, ``role: tool`` results) and LLaMA-Factory's ShareGPT
layout (``function_call`` / ``observation`` turns, ``tools`` as a JSON string of bare function specs, as its
``glaive_toolcall_en_demo.json``) rendered through two real tool-capable templates: Qwen2.5's and Llama 3.1's (the
built-in ``qwen`` / ``llama3``; Llama 3.1's text is ollama's index copy in ../shared/data, compared there), each
with a tiny byte-level BPE tokenizer holding that family's special tokens.

References: ``transformers``' ``apply_chat_template(messages, tools=tools, tokenize=True)`` on the messages written
the way transformers' chat-templating guide ("Tool use") writes them (arguments a dict) for the ids; the trained
tokens are each assistant turn as the template writes it (the tool call in the model's own call syntax, Qwen's
``<tool_call>`` JSON or Llama 3.1's ``{"name", "parameters"}``) plus its end-of-turn token, nothing of the tools
preamble, the user turns or the tool results.
"""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from easytune.data import formats  # noqa: E402
from easytune.tokenizer import CHAT_TEMPLATES  # noqa: E402
from tests.helpers import bpe_chat_tokenizer  # noqa: E402

WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                          "required": ["city"]}}
TIME = {"name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION, RESULT, ANSWER = "What is the weather in Paris?", '{"temp_c": 21, "sky": "clear"}', "It is 21 C and clear."

OPENAI = {"messages": [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": ANSWER}],
        "tools": [{"type": "function", "function": WEATHER}], "_source": "openai.jsonl:1"}
SHAREGPT = {"conversations": [
        {"from": "human", "value": QUESTION},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": ANSWER}],
        "tools": json.dumps([WEATHER]), "_source": "glaive.json:1"}
# the conversation as transformers' tool-use guide writes it: arguments a dict
REFERENCE = [{"role": "user", "content": QUESTION},
             {"role": "assistant", "tool_calls": [{"type": "function",
                                                   "function": {"name": "get_weather",
                                                                "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "content": RESULT},
             {"role": "assistant", "content": ANSWER}]
REFERENCE_TOOLS = [{"type": "function", "function": WEATHER}]

FAMILIES = {  # special tokens, bos, eos, pad, added non-special tokens (as the family's tokenizer.json has them)
        "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                 ["<tool_call>", "</tool_call>"]),
        "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                    "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", None, []),
}
CORPUS = [QUESTION, RESULT, ANSWER, json.dumps(WEATHER), json.dumps(TIME), "system user assistant ipython tool"]


def chat_tokenizer(specials, bos, eos, pad, plain, template):
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on ``CORPUS`` to 400 tokens, ``specials`` first."""
    return bpe_chat_tokenizer(CORPUS, specials, template, bos=bos, eos=eos, pad=pad, plain=plain)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, chat_tokenizer(*FAMILIES[request.param], CHAT_TEMPLATES[request.param])


def _ref_ids(tok, msgs, tools):
    return list(tok.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=False))


def _runs(tok, ex):
    """The trained tokens decoded, one string per run of consecutive trained positions."""
    runs, cur = [], []
    for t, m in zip(ex["input_ids"], ex["loss_mask"]):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


# the assistant turns as each template writes them (Qwen2.5: <tool_call> JSON with "arguments"; Llama 3.1: a bare
# JSON object with "parameters"), each with the family's end-of-turn token
EXPECTED_RUNS = {
        "qwen": ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                 ANSWER + "<|im_end|>"],
        "llama3": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', ANSWER + "<|eot_id|>"],
}


def test_llama3_is_the_llama_3_1_tool_template_of_the_shared_index(shared_data):
    index = json.loads((shared_data / "tokenizers" / "chat_templates" / "ollama_template_index.json").read_text())
    assert CHAT_TEMPLATES["llama3"] in [e["template"] for e in index if e["name"] == "llama3-instruct"]


def test_openai_and_sharegpt_tool_records_equal_transformers_ids_and_train_only_assistant_turns(family):
    name, tok = family
    a, b = formats.format_records([OPENAI, SHAREGPT], "chat", tok)
    assert a == b  # the two layouts are the same conversation
    assert a["input_ids"] == _ref_ids(tok, REFERENCE, REFERENCE_TOOLS)
    assert _runs(tok, a) == EXPECTED_RUNS[name]
    text = tok.decode(a["input_ids"])
    assert "Current weather in a city" in text and "temp_c" in text  # the preamble and the result are rendered...
    trained = "".join(_runs(tok, a))
    assert "Current weather" not in trained and "temp_c" not in trained and QUESTION not in trained  # ...not trained


def test_parallel_calls_and_consecutive_tool_results_qwen():
    # Qwen2.5's template writes two calls in one assistant turn and both results in one user turn
    tok = chat_tokenizer(*FAMILIES["qwen"], CHAT_TEMPLATES["qwen"])
    rec = {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather and time in Paris?"},
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"name": "get_time", "arguments": '{"city": "Paris"}'}]},  # bare call, JSON-string arguments
            {"role": "tool", "name": "get_weather", "content": RESULT},
            {"role": "tool", "name": "get_time", "content": "14:05"},
            {"role": "assistant", "content": "21 C, 14:05."}],
           "tools": [WEATHER, {"type": "function", "function": TIME}], "_source": "par.jsonl:1"}
    ref = [rec["messages"][0], rec["messages"][1],
           {"role": "assistant", "content": "Checking both.", "tool_calls": [
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                   {"type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "name": "get_weather", "content": RESULT},
           {"role": "tool", "name": "get_time", "content": "14:05"}, rec["messages"][5]]
    [ex] = formats.format_records([rec], "chat", tok)
    ref_tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
    assert ex["input_ids"] == _ref_ids(tok, ref, ref_tools)
    assert "<tool_response>\n14:05\n</tool_response><|im_end|>" in tok.decode(ex["input_ids"])
    assert _runs(tok, ex) == [
            'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
            "21 C, 14:05.<|im_end|>"]


def test_tool_results_trained_when_asked(family):
    name, tok = family
    [ex] = formats.format_records([OPENAI], "chat", tok, roles_to_train=["assistant", "tool"])
    assert ex["input_ids"] == _ref_ids(tok, REFERENCE, REFERENCE_TOOLS)
    trained = "".join(_runs(tok, ex))
    assert "temp_c" in trained and "Current weather" not in trained


def _no_tools_tokenizer(template):
    return chat_tokenizer(["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"],
                          "<s>", "</s>", None, [], template)


@pytest.mark.parametrize("name, record, match", [
        # Llama 2's template never reads `tools`: the record renders the same without them
        ("llama2", {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
                    "tools": [WEATHER]}, r"cannot express the record's 'tools'"),
        # ChatML prints the content only: the call and the tools vanish, the tool result (a role like any) is kept
        ("chatml", OPENAI, r"cannot express the record's 'tools' and assistant 'tool_calls'"),
        # Llama 2 drops a role it does not know after checking alternation: the template's own error, named
        ("llama2", SHAREGPT, r"failed on a record with tools / tool calls: Conversation roles must alternate"),
        ("mistral", {"messages": OPENAI["messages"][:2] + [{"role": "tool", "content": RESULT}]},
         r"failed on a record with tools / tool calls: Conversation roles must alternate"),
        ("mistral", {"messages": [{"role": "user", "content": QUESTION}, {"role": "tool", "content": RESULT}]},
         r"failed on a record with tools / tool calls: Only user and assistant roles are supported!"),
])
def test_template_without_tools_is_an_error_naming_template_and_record(name, record, match):
    tok = _no_tools_tokenizer(None)
    with pytest.raises(ValueError, match=rf"^r:7: chat template '{name}' \(built in\) {match}") as err:
        formats.format_chat([dict(record, _source="r:7")], tok, chat_template=formats.load_chat_template(name))
    assert "qwen, llama3" in str(err.value)


def test_template_without_tools_named_by_file_or_tokenizer(tmp_path):
    path = tmp_path / "gemma.jinja"
    path.write_text(CHAT_TEMPLATES["gemma"] + "\n")  # a file's text: named by its path
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
              "tools": [WEATHER], "_source": "r:8"}
    tok = _no_tools_tokenizer(None)
    with pytest.raises(ValueError, match=rf"^r:8: chat template {path} cannot express the record's 'tools'"):
        formats.format_chat([record], tok, chat_template=formats.load_chat_template(str(path)))
    tok = _no_tools_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tok.name_or_path = "my-tokenizer"
    with pytest.raises(ValueError, match=r"^r:8: chat template of tokenizer 'my-tokenizer' cannot express"):
        formats.format_chat([record], tok)


@pytest.mark.parametrize("record, match", [
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{name: f}"}]},
         r"r:1: conversations\[1\]\.value is not valid JSON \(a call"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": '{"arguments": {}}'}]},
         r"r:1: conversations\[1\]\.value must be a call \{'name': str"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "[]"}]},
         r"r:1: conversations\[1\]\.value holds no call \(an empty list\)"),
        ({"conversations": [{"from": "human", "value": "x"},
                            {"from": "function_call", "value": '[{"name": "f"}, {"x": 1}]'}]},
         r"r:1: conversations\[1\]\.value\[1\] must be a call"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}]},
         r"r:1: messages\[1\]\.tool_calls is an empty list"),
        ({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "y"}]},
         r"r:1: messages\[0\]\.content is an empty list of parts"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}]}]},
         r"r:1: messages\[0\]\.tool_calls\[0\]\.arguments must be an object"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{oops"}]}]},
         r"r:1: messages\[0\]\.tool_calls\[0\]\.arguments is not valid JSON"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}]},
         r"r:1: messages\[0\]\.tool_calls must be a list on an assistant message"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": '{"name": "f"}'},
         r"r:1: field 'tools' must be a list of function specs, got dict"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"description": "no name"}]},
         r"r:1: tools\[0\] must be a function spec"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": "[{"},
         r"r:1: field 'tools' is not valid JSON"),
])
def test_bad_tool_records_name_source_and_field(record, match):
    tok = chat_tokenizer(*FAMILIES["qwen"], CHAT_TEMPLATES["qwen"])
    with pytest.raises(ValueError, match=match):
        formats.format_chat([dict(record, _source="r:1")], tok)


def test_function_call_and_observation_are_known_roles():
    msgs = formats.chat_messages(SHAREGPT)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert formats.chat_tools(SHAREGPT) == REFERENCE_TOOLS
    assert formats.chat_tools({"tools": "", "_source": "x"}) is None and formats.chat_tools({"tools": "[]"}) is None
    # mapped elsewhere by data.role_map, a function_call turn is text of that role
    [_, user] = formats.chat_messages({"conversations": SHAREGPT["conversations"][:2], "_source": "x"},
                                      role_map={"function_call": "user"})
    assert user == {"role": "user", "content": SHAREGPT["conversations"][1]["value"]}


def test_prepare_reads_tool_records_with_a_named_template(tmp_path):
    # easytune prepare end to end: a ShareGPT tool file, data.chat_template=qwen (a built-in name, not a file)
    from easytune.config import defaults
    from easytune.data import prepare

    tok = chat_tokenizer(*FAMILIES["qwen"], None)
    f = tmp_path / "glaive.jsonl"
    f.write_text(json.dumps({k: v for k, v in SHAREGPT.items() if k != "_source"}) + "\n")
    d = defaults().data
    d.train_files, d.format, d.sequence_len, d.val_set_size, d.chat_template = [str(f)], "chat", 512, 0, "qwen"
    train, _, report = prepare.prepare_dataset(d, tok)
    assert report["examples"] == 1
    tok.chat_template = CHAT_TEMPLATES["qwen"]
    ids = _ref_ids(tok, REFERENCE, REFERENCE_TOOLS)
    n = len(ids) - 1
    assert train["input_ids"][0, :n].tolist() == ids[:-1]
    trained = [t for t, m in zip(train["target_ids"][0, :n].tolist(), train["loss_mask"][0, :n].tolist()) if m]
    assert tok.decode(trained) == "".join(EXPECTED_RUNS["qwen"])


def test_call_turn_of_a_template_that_rerenders_the_last_turn_is_found_in_the_full_text():
    # as Qwen3's template: the last assistant turn gets an empty think block, so a call turn renders differently
    # once later turns follow; the call is then located by its rendered text and still trained
    template = ("{% if tools %}tools: {{ tools | tojson }}\n{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}"
                "\n{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}"
                "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
                "</tool_call>{% endfor %}<|im_end|>\n{%- endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = chat_tokenizer(*FAMILIES["qwen"], template)
    stats = {}
    [ex] = formats.format_records([OPENAI], "chat", tok, stats=stats)
    assert stats["chat_fallbacks"] == 1
    assert ex["input_ids"] == _ref_ids(tok, REFERENCE, REFERENCE_TOOLS)
    assert _runs(tok, ex) == ['<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>',
                              "<think>\n\n</think>\n\n" + ANSWER + "<|im_end|>"]
