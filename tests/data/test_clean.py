"""Cleaning steps (easytune/data/clean.py): each changes what it should and reports how many records.

References: ftfy's documented mojibake example; Python's ``unicodedata``; exact Jaccard similarity of
the shingle sets (computed with Python sets) for the MinHash near-duplicate threshold; the real phrase
lists in ../shared/data/filters parsed with ``json`` / ``yaml`` directly.
"""

import json
import unicodedata

import pytest
import yaml

from easytune.data import clean


def _r(text, i=0, **extra):
    return {"text": text, "_source": f"f.jsonl:{i + 1}", **extra}


def _step(steps, name):
    [s] = [s for s in steps if s["step"] == name]
    return s


def test_unicode_steps_change_and_count():
    records = [_r("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", 0), _r("cafe\u0301\u200b\r\nok\x07", 1),
               _r("plain", 2)]
    out, steps = clean.clean_records(records, dict(fix_mojibake=True, unicode_normalization="NFC",
                                                   remove_control_chars=True, normalize_whitespace=True))
    assert out[0]["text"] == "The Mona Lisa doesn\u2019t have eyebrows."  # ftfy's README example
    assert out[1]["text"] == unicodedata.normalize("NFC", "cafe\u0301") + "\nok"
    assert out[2]["text"] == "plain"
    assert records[0]["text"].startswith("The Mona Lisa doesnÃ")  # inputs are not modified
    assert [(s["step"], s["changed"], s["dropped"]) for s in steps] == [
            ("fix_mojibake", 1, 0), ("unicode_NFC", 1, 0), ("remove_control_chars", 1, 0),
            ("normalize_whitespace", 0, 0)]


def test_whitespace_keeps_indentation():
    code = "def f():\n    return 1   \n\n\n\n\u00a0x"
    assert clean.normalize_whitespace(code) == "def f():\n    return 1\n\n x"


def test_default_phrases_drop_english_and_chinese_refusals():
    records = [_r("As an AI language model, I cannot do that.", 0), _r("作为一个人工智能语言模型，我不能回答。", 1),
               _r("Paris is the capital of France.", 2)]
    out, steps = clean.clean_records(records, dict(phrases="default"))
    assert [r["_source"] for r in out] == ["f.jsonl:3"]
    s = _step(steps, "phrases(drop)")
    assert (s["dropped"], s["examples"]) == (2, ["f.jsonl:1", "f.jsonl:2"])


def test_cut_sentence_removes_only_the_sentence_and_fields_restrict():
    records = [{"instruction": "I hope this helps you.", "output": "Water boils at 100 C. I hope this helps! Bye.",
                "_source": "a:1"}, {"instruction": "q", "output": "I hope this helps.", "_source": "a:2"}]
    out, steps = clean.clean_records(records, dict(phrases="default", phrase_action="cut_sentence",
                                                   fields="output"))
    assert out == [{"instruction": "I hope this helps you.", "output": "Water boils at 100 C. Bye.",
                    "_source": "a:1"}]
    cut = _step(steps, "phrases(cut_sentence)")
    assert (cut["changed"], cut["dropped"]) == (2, 1)
    # chinese sentence ends
    pattern = clean.phrase_pattern(["希望这对你有帮助"])
    assert clean.cut_sentences("天很蓝。希望这对你有帮助！再见。", pattern) == "天很蓝。再见。"


def test_chat_messages_are_cleaned_too():
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "As an AI assistant, no."}],
           "_source": "c:1"}
    out, _ = clean.clean_records([rec], dict(phrases="default"))
    assert out == []


def test_real_phrase_lists_load(shared_data, tmp_path):
    anti = shared_data / "filters" / "antislop" / "slop_phrases_2025-04-07.json"
    gpt = shared_data / "filters" / "gptslop" / "claudeslop.yaml"
    ref_anti = {p.lower() for p, _ in json.loads(anti.read_text())}
    ref_gpt = {p.lower() for v in yaml.safe_load(gpt.read_text()).values() for p in v}
    phrases = clean.load_phrases("", f"{anti},{gpt}")
    assert set(phrases) == ref_anti | ref_gpt and len(ref_anti) > 1000
    records = [_r("She took a deep breath and left.", 0), _r("A bruising kiss.", 1), _r("Fine text.", 2)]
    out, _ = clean.clean_records(records, dict(phrase_files=f"{anti},{gpt}"))
    assert [r["text"] for r in out] == ["Fine text."]
    txt = tmp_path / "mine.txt"
    txt.write_text("# comment\nForbidden Word\n")
    assert clean.load_phrases("", str(txt)) == ["forbidden word"]
    with pytest.raises(ValueError, match=r"nope\.txt: cannot read the phrase list"):
        clean.load_phrases("", str(tmp_path / "nope.txt"))


def test_length_bounds_in_characters():
    records = [_r("x" * n, i) for i, n in enumerate((3, 10, 50))]
    out, steps = clean.clean_records(records, dict(min_length=5, max_length=20))
    assert [len(r["text"]) for r in out] == [10] and _step(steps, "length")["dropped"] == 2


def test_exact_duplicates_ignore_case_space_and_punctuation():
    records = [_r("Hello, World!", 0), _r("hello world", 1), _r("Hello  World.", 2), _r("Hello there", 3)]
    out, steps = clean.clean_records(records, dict(dedup_exact=True))
    assert [r["_source"] for r in out] == ["f.jsonl:1", "f.jsonl:4"]
    assert _step(steps, "dedup_exact")["examples"] == ["f.jsonl:2", "f.jsonl:3"]


def test_near_duplicates_follow_the_jaccard_threshold():
    base = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door "
            "and the bird sings a song in the tall green tree behind the old red house").split()
    near = list(base)
    near[-1] = "barn"                      # one word changed at the end: Jaccard of 5-grams stays high
    far = list(base)
    far[5::4] = ["zebra"] * len(far[5::4])  # many words changed: low Jaccard
    texts = [" ".join(base), " ".join(near), " ".join(far)]
    jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
    s = [clean.shingles(t) for t in texts]
    assert jac(s[0], s[1]) > 0.9 and jac(s[0], s[2]) < 0.3
    out, steps = clean.clean_records([_r(t, i) for i, t in enumerate(texts)], dict(dedup_near=True,
                                                                                  near_dup_threshold=0.8))
    assert [r["_source"] for r in out] == ["f.jsonl:1", "f.jsonl:3"]
    assert _step(steps, "dedup_near")["dropped"] == 1
    # chinese text (no spaces) is shingled by characters
    zh = "今天天气很好我们一起去公园散步然后回家吃饭"
    assert clean.near_duplicates([zh, zh + "了"], 0.8) == [1]


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="unicode_normalization"):
        clean.clean_records([_r("x")], dict(unicode_normalization="NFX"))
    with pytest.raises(ValueError, match="phrase_action"):
        clean.clean_records([_r("x")], dict(phrases="default", phrase_action="delete"))
