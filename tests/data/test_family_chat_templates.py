"""Chat records of the new families (Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral) through easytune's chat format, each
rendered by its tokenizer's own real chat template (easytune/data/formats.py ``format_chat``).

The templates are the real Hugging Face ``chat_template`` strings in ollama's template index
(../shared/data/tokenizers/chat_templates/ollama_template_index.json, SOURCES.md): ``chatml`` (Qwen2's, with the
default "You are a helpful assistant." system turn; the index holds no Qwen3 template, whose ``<think>`` handling
is therefore not covered here), ``gemma-instruct`` (Gemma 2: no system role), ``gemma3-instruct`` (the system
message joins the first user turn), the three ``phi-3`` variants and both ``mistral-instruct`` (Mixtral) ones.
Each family gets a tiny byte-level BPE tokenizer (``tokenizers``, trained here on a few lines) holding that
family's special tokens with its bos/eos, ``chat_template`` set to the real template.

References: ``transformers``' ``apply_chat_template(messages, tokenize=True)`` for the ids (easytune adds no
token of its own); the supervised tokens are each assistant reply's own encoding followed by the family's
end-of-turn token (axolotl's ``train_on_eos: turn``), nothing of the user turns, headers or separators.
"""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from easytune.data import formats  # noqa: E402
from tests.helpers import bpe_chat_tokenizer  # noqa: E402

# family -> (special tokens, bos, eos, pad, non-special added tokens), as the family's tokenizer.json declares them
FAMILIES = {
        "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>",
                  ["<think>", "</think>"]),
        "gemma2": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                   "<pad>", []),
        "gemma3_text": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                        "<pad>", []),
        "phi3": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],
                 "<s>", "<|endoftext|>", "<|endoftext|>", []),
        "mixtral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, []),
}
# (family, index name, a substring picking the template (^: its start), end-of-turn token, text the template adds
# after the last turn's end-of-turn token that is trained too, turns located by content search)
CASES = [
        ("qwen3", "chatml", "You are a helpful assistant.<|im_end|>", "<|im_end|>", "", 0),
        ("gemma2", "gemma-instruct", "System role not supported", "<end_of_turn>", "", 0),
        ("gemma3_text", "gemma3-instruct", "first_user_prefix", "<end_of_turn>", "", 0),
        ("phi3", "phi-3", "^{% for message in messages %}{% if (message['role'] == 'user')", "<|end|>", "", 0),
        ("phi3", "phi-3", "{{ bos_token }}{% for message in messages %}{% if", "<|end|>", "", 0),
        # Phi-3-mini's: eos closes a conversation that ends without a generation prompt, so an earlier turn
        # re-renders differently once later turns follow (found by content); that final eos is trained once.
        ("phi3", "phi-3", "{% else %}{{ eos_token }}", "<|end|>", "\n<|endoftext|>", 1),
        ("mixtral", "mistral-instruct", "eos_token}}{% else", "</s>", "", 0),
        ("mixtral", "mistral-instruct", "eos_token + ' '", "</s>", "", 0),  # a space after each eos, untrained
]
IDS = [f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)]
CONVERSATION = [{"role": "user", "content": "Hi there, who are you?"},
                {"role": "assistant", "content": "I am a small model.\nHow can I help?"},
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue, like the sky."}]
CORPUS = [m["content"] for m in CONVERSATION] + ["user assistant model system", "Be brief, please."]


def _template(shared_data, name, contains):
    index = json.loads((shared_data / "tokenizers" / "chat_templates" / "ollama_template_index.json").read_text())
    picks = (lambda t: t.startswith(contains[1:])) if contains[0] == "^" else (lambda t: contains in t)
    found = [e["template"] for e in index if e["name"] == name and picks(e["template"])]
    assert len(found) == 1, (name, contains, len(found))
    return found[0]


def _family_tokenizer(family, template):
    """A ``PreTrainedTokenizerFast``: byte-level BPE (GPT-2 pre-tokenizer) trained on ``CORPUS`` to 320 tokens, the
    family's special tokens first, ``chat_template`` = ``template``."""
    specials, bos, eos, pad, plain = FAMILIES[family]
    return bpe_chat_tokenizer(CORPUS, specials, template, bos=bos, eos=eos, pad=pad, plain=plain, vocab_size=320,
                              unk="<unk>" if "<unk>" in specials else None)


def _ref_ids(tok, msgs):
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))


def _runs(ids, mask):
    """The trained tokens as maximal runs of consecutive positions."""
    runs, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family, name, contains, eot, final_tail, n_fallbacks", CASES, ids=IDS)
def test_ids_are_the_templates_and_only_assistant_replies_with_end_of_turn_are_trained(
        shared_data, family, name, contains, eot, final_tail, n_fallbacks):
    tok = _family_tokenizer(family, _template(shared_data, name, contains))
    sharegpt = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                                  for m in CONVERSATION], "_source": "chat.jsonl:2"}
    openai = {"messages": CONVERSATION, "_source": "chat.jsonl:1"}
    stats = {}
    a, b = formats.format_records([openai, sharegpt], "chat", tok, stats=stats)  # the tokenizer's own template
    assert a == b
    ids, mask = a["input_ids"], a["loss_mask"]
    assert ids == _ref_ids(tok, CONVERSATION)  # exactly transformers' ids: no bos or eos added or doubled
    assert len(mask) == len(ids) and mask[0] == 0
    eot_id = tok.convert_tokens_to_ids(eot)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    want = [_enc(tok, r) + [eot_id] for r in replies]
    want[-1] += _enc(tok, final_tail)
    assert _runs(ids, mask) == want, [tok.decode(r) for r in _runs(ids, mask)]
    assert stats["chat_fallbacks"] == 2 * n_fallbacks  # (two records)


@pytest.mark.parametrize("family, name, contains, eot", [c[:4] for c in CASES], ids=IDS)
def test_every_trained_turn_ends_at_its_end_of_turn_token(shared_data, family, name, contains, eot):
    # user turns trained too: each turn's run ends with the terminator; the separators between turns stay untrained
    tok = _family_tokenizer(family, _template(shared_data, name, contains))
    rec = {"messages": CONVERSATION, "_source": "chat.jsonl:1"}
    [ex] = formats.format_records([rec], "chat", tok, roles_to_train=["user", "assistant"])
    assert ex["input_ids"] == _ref_ids(tok, CONVERSATION)
    specials = set(tok.all_special_ids)
    runs = _runs(ex["input_ids"], ex["loss_mask"])
    assert all(r[-1] in specials for r in runs), [tok.decode(r) for r in runs]
    n_eot = ex["input_ids"].count(tok.convert_tokens_to_ids(eot))
    assert sum(t == tok.convert_tokens_to_ids(eot) for r in runs for t in r) == n_eot  # every terminator, once
    [all_] = formats.format_records([rec], "chat", tok, train_on_inputs=True)
    assert all_["input_ids"] == ex["input_ids"] and all_["loss_mask"] == [0] + [1] * (len(ex["input_ids"]) - 1)


def test_gemma2_system_message_is_a_one_line_error_naming_the_record(shared_data):
    tok = _family_tokenizer("gemma2", _template(shared_data, "gemma-instruct", "System role not supported"))
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                             {"from": "gpt", "value": "Hello!"}], "_source": "chat.jsonl:3"}
    with pytest.raises(ValueError, match=r"^chat\.jsonl:3: chat template failed: System role not supported "
                                         r"\(message roles \['system', 'user', 'assistant'\]\)$") as err:
        formats.format_records([rec], "chat", tok)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no jinja traceback chained


def test_gemma3_system_message_joins_the_first_user_turn(shared_data):
    tok = _family_tokenizer("gemma3_text", _template(shared_data, "gemma3-instruct", "first_user_prefix"))
    msgs = [{"role": "system", "content": "Be brief, please."}] + CONVERSATION
    [ex] = formats.format_records([{"messages": msgs, "_source": "chat.jsonl:1"}], "chat", tok)
    assert ex["input_ids"] == _ref_ids(tok, msgs)
    assert "<start_of_turn>user\nBe brief, please.\n\nHi there" in tok.decode(ex["input_ids"])
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert _runs(ex["input_ids"], ex["loss_mask"]) == [_enc(tok, r) + [eot] for r in replies]


@pytest.mark.parametrize("family, name, contains", [("gemma2", "gemma-instruct", "System role not supported"),
                                                    ("qwen3", "chatml", "You are a helpful assistant.<|im_end|>"),
                                                    ("phi3", "phi-3", "{% else %}{{ eos_token }}")])
def test_prepare_uses_the_saved_tokenizers_own_template(shared_data, tmp_path, family, name, contains):
    # easytune prepare end to end: the tokenizer dir's own template (no data.chat_template); a conversation with a
    # system message is an example where the template takes one, a skipped bad record naming its line for Gemma 2
    from easytune import tokenizer as tok_lib
    from easytune.config import defaults
    from easytune.data import prepare

    _family_tokenizer(family, _template(shared_data, name, contains)).save_pretrained(str(tmp_path / "tok"))
    tok = tok_lib.load_tokenizer(tmp_path / "tok")
    assert tok.chat_template == _template(shared_data, name, contains)
    f = tmp_path / "chat.jsonl"
    with_system = [{"role": "system", "content": "Be brief, please."}] + CONVERSATION
    f.write_text("\n".join(json.dumps({"messages": m}) for m in (CONVERSATION, with_system)) + "\n")
    d = defaults().data
    d.train_files, d.format, d.sequence_len, d.val_set_size = [str(f)], "chat", 256, 0
    d.bad_records, d.max_bad_fraction = "skip", 0.5
    train, _, report = prepare.prepare_dataset(d, tok)
    if family == "gemma2":
        assert report["examples"] == 1 and report["bad_records"] == 1
        assert report["bad_examples"] == [f"{f}:2: chat template failed: System role not supported (message roles "
                                          f"['system', 'user', 'assistant', 'user', 'assistant'])"]
    else:
        assert report["examples"] == 2 and report["bad_records"] == 0
    [ex] = formats.format_records([{"messages": CONVERSATION, "_source": f"{f}:1"}], "chat", tok)
    assert ex["input_ids"] == _ref_ids(tok, CONVERSATION)
    n = len(ex["input_ids"]) - 1
    row = next(i for i in range(len(train)) if train["input_ids"][i, :n].tolist() == ex["input_ids"][:-1])
    assert train["target_ids"][row, :n].tolist() == ex["input_ids"][1:]
    assert train["loss_mask"][row, :n].tolist() == ex["loss_mask"][1:] and not train["loss_mask"][row, n:].any()
