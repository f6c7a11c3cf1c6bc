"""Built-in named chat templates (``tokenizer.CHAT_TEMPLATES``: chatml, llama2, llama3, mistral, gemma, qwen), usable
as ``data.chat_template=NAME`` (easytune/data/formats.py ``load_chat_template``) and ``tokenizer train
--chat-template NAME`` (easytune/tokenizer.py ``resolve_chat_template``).

References: each name against its source, rendered by ``transformers``' ``apply_chat_template``: the template files
of ../shared/data/tokenizers/chat_templates (mistral.rs' chatml / llama2 / mistral, ollama's index for Llama 3.1's
tool template and Gemma's); Qwen2.5's, which has no file there, against the text its template is documented to
produce for a conversation without a system message (the default "You are Qwen, created by Alibaba Cloud." system
turn, then ChatML).
"""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from easytune import tokenizer as tok_lib  # noqa: E402
from easytune.data import formats  # noqa: E402

CONVERSATION = [{"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "I'm doing great. How can I help you today?"}]
SYSTEM = [{"role": "system", "content": "Be brief."}]
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>", "<start_of_turn>", "<end_of_turn>"]
# name -> (file in ../shared/data/tokenizers/chat_templates, ollama index name or None, takes a system message)
SOURCES = {"chatml": ("mistralrs_chatml.json", None, True), "llama2": ("mistralrs_llama2.json", None, True),
           "mistral": ("mistralrs_mistral.json", None, False),
           "llama3": ("ollama_template_index.json", "llama3-instruct", True),
           "gemma": ("ollama_template_index.json", "gemma-instruct", False)}
QWEN_EXPECTED = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\nHello, how are you?<|im_end|>\n"
                 "<|im_start|>assistant\nI'm doing great. How can I help you today?<|im_end|>\n")


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE holding every built-in template's markers as special tokens (bos <s>, eos </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CONVERSATION + SYSTEM] + ["system user assistant model [INST] [/INST]"]
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=t, clean_up_tokenization_spaces=False, bos_token="<s>",
                                 eos_token="</s>", unk_token="<unk>")
    hf.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    return hf


def _source_template(shared_data, name):
    file, index_name, _ = SOURCES[name]
    data = json.loads((shared_data / "tokenizers" / "chat_templates" / file).read_text())
    if index_name is None:
        return data["chat_template"]
    found = [e["template"] for e in data if e["name"] == index_name and e["template"] == tok_lib.CHAT_TEMPLATES[name]]
    assert len(found) == 1, name  # the index holds several variants: the built-in is one of them, verbatim
    return found[0]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_named_template_renders_as_its_source(shared_data, tok, name):
    source = _source_template(shared_data, name)
    template = formats.load_chat_template(name)
    convs = [CONVERSATION] + ([SYSTEM + CONVERSATION] if SOURCES[name][2] else [])
    for msgs in convs:
        for gen in (False, True):
            want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=source)
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                           chat_template=template) == want
        [ex] = formats.format_chat([{"messages": msgs, "_source": "c:1"}], tok, chat_template=template)
        assert ex["input_ids"] == list(tok.apply_chat_template(msgs, tokenize=True, return_dict=False,
                                                               chat_template=source))
        trained = tok.decode([t for t, m in zip(ex["input_ids"], ex["loss_mask"]) if m])
        assert trained.lstrip().startswith(CONVERSATION[1]["content"]) and "Hello" not in trained


def test_qwen_renders_qwen25s_documented_text(tok):
    template = formats.load_chat_template("qwen")
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, chat_template=template) == QWEN_EXPECTED
    with_system = tok.apply_chat_template(SYSTEM + CONVERSATION, tokenize=False, chat_template=template)
    assert with_system == QWEN_EXPECTED.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                                                "Be brief.")
    assert tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True,
                                   chat_template=template).endswith("<|im_start|>assistant\n")


def test_load_chat_template_names_files_strings_and_unknown(tmp_path):
    assert formats.load_chat_template("") is None
    assert formats.load_chat_template("gemma") == tok_lib.CHAT_TEMPLATES["gemma"]
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] }}")
    assert formats.load_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] }}"
    assert formats.load_chat_template("{{ x }}") == "{{ x }}"
    with pytest.raises(ValueError, match=r"data\.chat_template: 'llama4' is neither a built-in template "
                                         r"\(chatml, llama2, llama3, mistral, gemma, qwen\) nor a file"):
        formats.load_chat_template("llama4")


LLAMA3 = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]


@pytest.mark.parametrize("name, added, rendered", [("llama3", LLAMA3, LLAMA3[:3]),
                                                   ("gemma", ["<start_of_turn>", "<end_of_turn>"], None),
                                                   ("qwen", ["<|im_start|>", "<|im_end|>"], None), ("llama2", [], [])])
def test_tokenizer_train_with_a_named_template(tmp_path, name, added, rendered):
    (tmp_path / "a.txt").write_text("\n".join(m["content"] for m in CONVERSATION) * 20)
    r = tok_lib.train_and_save([str(tmp_path / "a.txt")], tmp_path / "tok", 300, chat_template=name)
    assert list(r["special_tokens"])[4:] == added  # after <unk> <s> </s> <pad>, in the registry's order
    tok = tok_lib.load_tokenizer(tmp_path / "tok")
    assert tok.chat_template == tok_lib.CHAT_TEMPLATES[name]
    ids = list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False))
    for marker in added if rendered is None else rendered:  # each marker the conversation uses is one token
        assert tok.convert_tokens_to_ids(marker) in ids
    with pytest.raises(ValueError, match=r"--chat-template: 'llama4' is not a file, a Jinja string, or a built-in "
                                         r"template \(chatml, llama2, llama3, mistral, gemma, qwen\)"):
        tok_lib.resolve_chat_template("llama4")
