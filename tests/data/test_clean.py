"""Cleaning steps (easytune/data/clean.py): each changes what it should and reports how many records.

References: ftfy's documented mojibake example; Python's ``unicodedata``; exact Jaccard similarity of
the shingle sets (computed with Python sets) for the MinHash near-duplicate threshold; the real phrase
lists in ../shared/data/filters parsed with ``json`` / ``yaml`` directly; one ``clean_records`` call over the
whole list for the streaming ``Cleaner`` fed in batches; ``datasketch`` MinHash built afresh per text for the
near-duplicate index.
"""

import json
import random
import tracemalloc
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


# ---- streaming: Cleaner fed in batches == one clean_records call over the whole list ----

ALL_STEPS = dict(fix_mojibake=True, unicode_normalization="NFKC", remove_control_chars=True, normalize_whitespace=True,
                 phrases="default", min_length=20, max_length=4000, dedup_exact=True, dedup_near=True)
STREAM_CONFIGS = {"all_steps": ALL_STEPS, "dedup_exact": dict(dedup_exact=True),
                  "dedup_near": dict(dedup_near=True, near_dup_threshold=0.8),
                  "cut_sentence": dict(phrases="default", phrase_action="cut_sentence", fields=["output"])}


def _in_batches(records, cfg, size):
    cleaner = clean.Cleaner(cfg)
    kept = []
    for i in range(0, len(records), size):
        kept += cleaner.clean(records[i:i + size])
    return kept, cleaner.steps


def _alpaca_stream(shared_data, n=120):
    """Real alpaca records, then copies of earlier ones (exact up to case/punctuation, one word changed,
    a slop sentence added, mojibake / control characters), most of them far from (in another batch than)
    their original and a few right after it."""
    data = json.loads((shared_data / "instruct" / "llama_factory" / "alpaca_en_demo.json").read_text())[:n]
    base = [dict(r, _source=f"alpaca:{i + 1}") for i, r in enumerate(data)]
    long = [i for i, r in enumerate(base) if len(r["output"].split()) > 40]
    extra = []
    for k, i in enumerate(long[:24]):
        r, words = base[i], base[i]["output"].split()
        kind = k % 4
        if kind == 0:    # exact duplicate once normalized
            out = r["output"].upper() + " !!"
        elif kind == 1:  # near duplicate: the last word changed
            out = " ".join(words[:-1] + ["zebra"])
        elif kind == 2:  # slop sentence: dropped or cut
            out = r["output"] + " I hope this helps!"
        else:            # mojibake and control characters
            out = r["output"] + "\r\nThe Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.\x07"
        extra.append(dict(r, output=out, _source=f"extra:{k + 1}"))
    records = base + extra
    for j, r in enumerate(extra[:4]):  # also a few duplicates within a batch, next to the original
        records.insert(long[j] + 1 + j, dict(r, _source=f"adjacent:{j + 1}"))
    return records


@pytest.mark.parametrize("name", list(STREAM_CONFIGS))
def test_cleaner_in_batches_matches_one_call(shared_data, name):
    records = _alpaca_stream(shared_data)
    cfg = STREAM_CONFIGS[name]
    ref_kept, ref_steps = clean.clean_records(records, cfg)
    dropped = {s["step"]: s["dropped"] for s in ref_steps}
    changed = {s["step"]: s["changed"] for s in ref_steps}
    # the reference exercises what it should: duplicates across batches are found, sentences cut
    assert {"all_steps": dropped.get("dedup_exact", 0) >= 6 and changed.get("fix_mojibake", 0) >= 6,
            "dedup_exact": dropped.get("dedup_exact", 0) >= 6,
            "dedup_near": dropped.get("dedup_near", 0) >= 12,
            "cut_sentence": changed.get("phrases(cut_sentence)", 0) >= 6}[name]
    for size in (1, 3, 7):
        kept, steps = _in_batches(records, cfg, size)
        assert kept == ref_kept, (name, size)
        assert steps == ref_steps, (name, size)


def test_near_duplicates_in_different_batches_are_dropped():
    words = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door "
             "and the bird sings a song in the tall green tree behind the old red house").split()
    texts = [" ".join(words), "an unrelated short note about the weather today in town",
             " ".join(words[:-1] + ["barn"]), "another text entirely, about cooking rice and beans slowly",
             " ".join(["a"] + words[1:])]
    records = [_r(t, i) for i, t in enumerate(texts)]
    ref_kept, ref_steps = clean.clean_records(records, dict(dedup_near=True))
    assert [r["_source"] for r in ref_kept] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:4"]
    assert ref_steps == [{"step": "dedup_near", "changed": 0, "dropped": 2, "examples": ["f.jsonl:3", "f.jsonl:5"]}]
    for size in (1, 2, 3):
        assert _in_batches(records, dict(dedup_near=True), size) == (ref_kept, ref_steps)


def test_cleaner_reports_before_and_between_batches():
    cfg = dict(dedup_exact=True, min_length=2)
    cleaner = clean.Cleaner(cfg)
    assert cleaner.steps == clean.clean_records([], cfg)[1] == [
        {"step": "length", "changed": 0, "dropped": 0, "examples": []},
        {"step": "dedup_exact", "changed": 0, "dropped": 0, "examples": []}]
    assert cleaner.clean([]) == []
    first = [_r("Hello, World!", 0), _r("x", 1)]
    assert cleaner.clean(first) == [first[0]]  # unchanged records are passed through
    cleaner.steps[1]["examples"].append("not kept")  # steps is a copy
    assert cleaner.clean([_r("hello world", i) for i in range(2, 7)]) == []
    assert cleaner.steps[1] == {"step": "dedup_exact", "changed": 0, "dropped": 5,
                                "examples": ["f.jsonl:3", "f.jsonl:4", "f.jsonl:5"]}  # first 3 of the stream


def test_cleaner_rejects_bad_settings_before_any_record():
    with pytest.raises(ValueError, match="unicode_normalization"):
        clean.Cleaner(dict(unicode_normalization="NFX"))
    with pytest.raises(ValueError, match="phrase_action"):
        clean.Cleaner(dict(phrases="default", phrase_action="delete"))
    with pytest.raises(ValueError, match="near_dup_threshold"):
        clean.Cleaner(dict(dedup_near=True, near_dup_threshold=1.5))
    with pytest.raises(ValueError, match="near_dup_threshold"):
        clean.clean_records([], dict(dedup_near=True, near_dup_threshold=0))
    with pytest.raises(ValueError, match="near_dup_threshold"):
        clean.near_duplicates(["a"], threshold=0)


def test_near_duplicates_match_fresh_minhashes(shared_data):
    from datasketch import MinHash, MinHashLSH
    data = json.loads((shared_data / "instruct" / "llama_factory" / "alpaca_en_demo.json").read_text())[:150]
    texts = [r["output"] for r in data]
    texts += [" ".join(t.split()[:-1] + ["zebra"]) for t in texts[::5]] + texts[::7]
    for threshold, num_perm in ((0.8, 128), (0.5, 64)):
        lsh, ref = MinHashLSH(threshold=threshold, num_perm=num_perm), []
        for i, t in enumerate(texts):
            m = MinHash(num_perm=num_perm, seed=1)
            m.update_batch([s.encode("utf-8") for s in clean.shingles(t)])
            if lsh.query(m):
                ref.append(i)
            else:
                lsh.insert(str(i), m)
        assert clean.near_duplicates(texts, threshold, num_perm) == ref and len(ref) >= 40


def test_normalized_key_matches_the_per_character_definition(shared_data):
    def reference(text):
        text = unicodedata.normalize("NFKC", text).casefold()
        return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))
    texts = [(shared_data / "corpus" / "tinyshakespeare" / "input.txt").read_text()[:100_000],
             "作为一个人工智能语言模型，我不能回答。", "Hello,\u00a0World!\u3000ｆｕｌｌ\u2028ß", ""]
    rng = random.Random(0)
    texts += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(80)) for _ in range(300)]
    for t in texts:
        assert clean.normalized_key(t) == reference(t)


def test_cleaner_state_is_hashes_not_texts():
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    body = " ".join(rng.choice(vocab) for _ in range(400))[:2000]
    n, batch_size, text_bytes = 20_000, 1_000, 0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cleaner, kept = clean.Cleaner(dict(dedup_exact=True)), 0
        for start in range(0, n, batch_size):
            batch = [_r(f"record {i}: {body}", i) for i in range(start, start + batch_size)]
            text_bytes += sum(len(r["text"]) for r in batch)
            kept += len(cleaner.clean(batch))
            kept += len(cleaner.clean(batch[:10]))  # repeats: dropped, nothing retained
            del batch
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept == n and cleaner.steps[0]["dropped"] == 10 * n // batch_size
    assert text_bytes >= 40_000_000
    # a 16-byte digest (49 B object) and its share of the set's table per kept record: ~155 B, not ~2 KB
    assert retained < 200 * n and retained < text_bytes / 10, (retained, text_bytes)


def test_near_dedup_state_is_band_digests_not_texts():
    rng = random.Random(1)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    n = 1_000
    texts = [" ".join(rng.choice(vocab) for _ in range(330))[:2000] for _ in range(n)]  # made before measuring
    text_bytes = sum(map(len, texts))
    cleaner = clean.Cleaner(dict(dedup_near=True))  # datasketch imported outside the measurement
    tracemalloc.start()
    try:
        before, kept = tracemalloc.get_traced_memory()[0], 0
        for start in range(0, n, 500):
            batch = [_r(texts[i], i) for i in range(start, start + 500)]
            kept += len(cleaner.clean(batch))
            del batch
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept == n
    # ~9 bands x (a band digest + its set slot) per kept record: well under 1.5 KB, against 2 KB of text
    assert retained < 1_500 * n and retained < text_bytes * 3 / 4, (retained, text_bytes)
