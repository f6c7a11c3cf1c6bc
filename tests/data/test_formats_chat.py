"""Chat and pre-tokenized formats (easytune/data/formats.py) on the real Llama 2 tokenizer and real templates.

References: ``transformers``' ``apply_chat_template(tokenize=True)`` for the ids; axolotl's golden
Llama-2-chat tokenization of the same conversation (../shared/data/instruct/axolotl) for ids and labels.
"""

import json

import pytest

from easytune.data import formats

TEMPLATES = ("mistralrs_llama2", "mistralrs_mistral", "mistralrs_chatml", "mistralrs_llama3")
LLAMA2_SYSTEM = (
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
        "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
        "content. Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question "
        "does not make any sense, or is not factually coherent, explain why instead of answering something not "
        "correct. If you don't know the answer to a question, please don't share false information.")


@pytest.fixture(scope="module")
def tok(llama2_tok):
    return llama2_tok


def _template(shared_data, name):
    return formats.load_chat_template(str(shared_data / "tokenizers" / "chat_templates" / f"{name}.json"))


@pytest.fixture(scope="module")
def conversation(shared_data):
    return dict(json.loads((shared_data / "instruct" / "axolotl" / "conversation.json").read_text()),
                _source="conversation.json:0")


def _ref_ids(tok, msgs, template):
    out = tok.apply_chat_template(msgs, tokenize=True, chat_template=template)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_axolotl_golden_llama2_chat_ids_and_labels(shared_data, tok, conversation):
    gold = json.loads((shared_data / "instruct" / "axolotl" / "conversation.tokenized_llama2chat.json").read_text())
    n = sum(gold["attention_mask"])
    rec = dict(conversation, conversations=[{"from": "system", "value": LLAMA2_SYSTEM}] + conversation["conversations"])
    [ex] = formats.format_chat([rec], tok, chat_template=_template(shared_data, "mistralrs_llama2"))
    # axolotl's fixture ends with a BOS opening a next turn that does not exist (a known artefact of its
    # llama2_chat strategy); everything before it is identical, token for token and label for label.
    assert gold["input_ids"][n - 1] == tok.bos_token_id
    assert ex["input_ids"] == gold["input_ids"][:n - 1]
    assert ex["loss_mask"] == [int(lab != -100) for lab in gold["labels"][:n - 1]]
    assert ex["loss_mask"].index(1) == 156  # "right after [/INST]" (SOURCES.md)


@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_equal_transformers_and_eos_trained_once_per_turn(shared_data, tok, conversation, name):
    template = _template(shared_data, name)
    [ex] = formats.format_chat([conversation], tok, chat_template=template)
    msgs = formats.chat_messages(conversation)
    assert ex["input_ids"] == _ref_ids(tok, msgs, template)
    ids, mask = ex["input_ids"], ex["loss_mask"]
    n_assistant = sum(m["role"] == "assistant" for m in msgs)
    assert ids.count(tok.bos_token_id) == _ref_ids(tok, msgs, template).count(tok.bos_token_id)
    assert ids[:2] != [tok.bos_token_id] * 2  # BOS never doubled
    if name in ("mistralrs_llama2", "mistralrs_mistral"):  # these templates end assistant turns with eos
        trained_eos = sum(1 for t, m in zip(ids, mask) if t == tok.eos_token_id and m)
        assert trained_eos == n_assistant == ids.count(tok.eos_token_id)
        # and the EOS ends each trained run: the token after it (Mistral's trailing space) is not trained
        assert all(not mask[i + 1] for i, t in enumerate(ids[:-1]) if t == tok.eos_token_id)
    # every assistant reply's text is trained, no user text is
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    for m in msgs:
        snippet = m["content"].strip()[:40]
        assert (snippet in trained) == (m["role"] == "assistant"), (m["role"], snippet)


def test_roles_to_train_and_train_on_inputs(shared_data, tok, conversation):
    template = _template(shared_data, "mistralrs_mistral")
    [user] = formats.format_chat([conversation], tok, roles_to_train=["user"], chat_template=template)
    [both] = formats.format_chat([conversation], tok, roles_to_train=["user", "assistant"], chat_template=template)
    [asst] = formats.format_chat([conversation], tok, chat_template=template)
    assert [u or a for u, a in zip(user["loss_mask"], asst["loss_mask"])] == both["loss_mask"]
    # only a token that straddles a turn boundary (e.g. "]" + "It" merged by SentencePiece) can be in both
    overlap = [i for i, (u, a) in enumerate(zip(user["loss_mask"], asst["loss_mask"])) if u and a]
    assert len(overlap) < len(conversation["conversations"])
    [all_] = formats.format_chat([conversation], tok, train_on_inputs=True, chat_template=template)
    assert all_["loss_mask"] == [0] + [1] * (len(all_["input_ids"]) - 1)


def test_openai_messages_and_role_map(shared_data, tok):
    template = _template(shared_data, "mistralrs_chatml")
    rec = {"messages": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "Hello!"}], "_source": "m:1"}
    sharegpt = {"conversations": [{"from": "customer", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
                "_source": "s:1"}
    [a] = formats.format_chat([rec], tok, chat_template=template)
    [b] = formats.format_chat([sharegpt], tok, chat_template=template, role_map={"customer": "user"})
    assert a == b
    assert tok.decode([t for t, m in zip(a["input_ids"], a["loss_mask"]) if m]) == "Hello!<|im_end|>\n"


@pytest.mark.parametrize("record, match", [
        ({"text": "x"}, r"r:1: missing required field 'messages' or 'conversations'"),
        ({"messages": []}, r"r:1: field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user"}]}, r"r:1: messages\[0\] needs 'role'/'content'"),
        ({"messages": [{"role": "user", "content": 3}]}, r"r:1: messages\[0\]\.content must be a string"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"r:1: conversations\[0\]\.from = 'alien' is not a "
                                                               r"known role.*data\.role_map"),
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
         r"r:1: chat template failed: Conversation roles must alternate"),
])
def test_bad_chat_records_name_source_and_field(shared_data, tok, record, match):
    with pytest.raises(ValueError, match=match):
        formats.format_chat([dict(record, _source="r:1")], tok,
                            chat_template=_template(shared_data, "mistralrs_llama2"))


def test_tokenizer_without_template_is_an_error(tok):
    with pytest.raises(ValueError, match=r"has no chat template; set data\.chat_template"):
        formats.format_chat([{"messages": [{"role": "user", "content": "x"}], "_source": "r:1"}], tok)


def test_pretokenized_labels_and_attention_mask(shared_data):
    gold = json.loads((shared_data / "instruct" / "axolotl" / "conversation.tokenized_llama2chat.json").read_text())
    [ex] = formats.format_pretokenized([dict(gold, _source="g:1")])
    n = sum(gold["attention_mask"])
    assert ex["input_ids"] == gold["input_ids"][:n] and sum(ex["loss_mask"]) == 1793  # SOURCES.md
    with pytest.raises(ValueError, match=r"p:1: field 'labels' must be a list of 3 values"):
        formats.format_pretokenized([{"input_ids": [1, 2, 3], "labels": [1], "_source": "p:1"}])
    with pytest.raises(ValueError, match=r"p:2: field 'input_ids' must be a list of token ids"):
        formats.format_pretokenized([{"text": "x", "_source": "p:2"}])


def test_template_that_rerenders_earlier_turns_falls_back_to_content_search(tok):
    # the header depends on the number of messages, so no rendered prefix is a prefix of the full text
    template = ("{{ bos_token }}[{{ messages|length }} messages]{% for m in messages %}{% if m['role'] == 'user' %}"
                "User: {{ m['content'] }}\n{% else %}Bot: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
    rec = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
           "_source": "r:1"}
    stats = {}
    [ex] = formats.format_chat([rec], tok, chat_template=template, stats=stats)
    assert stats["chat_fallbacks"] == 2
    assert ex["input_ids"] == _ref_ids(tok, formats.chat_messages(rec), template)
    trained = [t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert trained.count(tok.eos_token_id) == 2
    assert tok.decode(trained, skip_special_tokens=True).split() == ["Blue.", "Green."]
