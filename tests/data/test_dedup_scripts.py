"""Near-dedup by characters for scripts written without spaces, decided per record (easytune/data/clean.py
``shingles``), and the near-dedup result per script-based language label (``Cleaner.languages``, the prepare
report).

References: the exact Jaccard similarity of the shingle sets (Python sets) decides which pairs are near
duplicates; the word 5-gram rule of the English shingles is written out here as it was before (whitespace words,
``" ".join`` of 5 consecutive ones); the language labels are known by construction of the records.
"""

import json
import random
import unicodedata

from easytune.data import clean

# everyday Chinese words, to build distinct records that share vocabulary (and so character bigrams) but not text
ZH_WORDS = ("我们 今天 明天 学习 工作 老师 学生 朋友 家人 城市 公园 天气 下雨 晴朗 早上 晚上 中午 吃饭 喝茶 咖啡 "
            "图书馆 电脑 手机 网络 问题 答案 方法 时间 地方 东西 事情 开始 结束 继续 认为 觉得 知道 希望 需要 "
            "可以 应该 已经 正在 非常 比较 特别 一起 一直 经常 有时 然后 因为 所以 但是 虽然 如果 或者 而且 "
            "研究 发展 经济 社会 文化 历史 科学 技术 教育 健康 医院 医生 病人 药物 运动 比赛 音乐 电影 小说 "
            "报纸 新闻 政府 公司 市场 价格 产品 服务 客户 银行 交通 汽车 火车 飞机 旅行 酒店 房间 厨房 花园 "
            "山上 河边 海边 森林 动物 植物 春天 夏天 秋天 冬天 生活 幸福 快乐 困难 简单 复杂 重要 安全").split()
LATIN_BITS = ["AI", "GPU", "Python 3", "2024 年", "HTTP", "API", "CPU 100%"]


def _zh_record(rng: random.Random) -> str:
    """A Chinese record of 20-60 words with Chinese punctuation, a few spaces and Latin words inside."""
    parts = []
    for i in range(rng.randint(20, 60)):
        if i and i % rng.randint(5, 9) == 0:
            parts.append(rng.choice("，。；"))
        if rng.random() < 0.06:
            parts.append(f" {rng.choice(LATIN_BITS)} ")
        parts.append(rng.choice(ZH_WORDS))
    return "".join(parts) + "。"


def _one_char_variant(text: str, rng: random.Random) -> str:
    hans = [i for i, ch in enumerate(text) if "\u4e00" <= ch <= "\u9fff"]
    i = rng.choice(hans)
    kind = rng.random()
    if kind < 0.7:  # a character replaced
        new = rng.choice([ch for ch in "的了是在有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动"
                          if ch != text[i]])
        return text[:i] + new + text[i + 1:]
    if kind < 0.85:  # a character deleted
        return text[:i] + text[i + 1:]
    return text[:i] + "很" + text[i:]  # a character inserted


def _jaccard(a, b):
    return len(a & b) / len(a | b)


def _old_word_shingles(text, n=5):
    """The shingles before this change for text with whitespace: word n-grams whatever the script."""
    words = " ".join(unicodedata.normalize("NFKC", text).casefold().split()).split(" ")
    return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}


def _planted(seed=0, distinct=300, planted=50):
    rng = random.Random(seed)
    texts = list(dict.fromkeys(_zh_record(rng) for _ in range(distinct)))
    variants = [_one_char_variant(texts[j], rng) for j in rng.sample(range(len(texts)), planted)]
    order = texts + variants  # each variant after its original
    return order, len(texts)


def test_chinese_with_spaces_is_shingled_by_characters():
    text = "您好，我是 {{name}}，一个由 {{author}} 开发的 AI 助手，很高兴认识您。"  # LLaMA-Factory identity.json style
    counts = clean.script_counts(text)
    assert counts["han"] > counts["latin"] and clean.char_ngram(counts) == clean.HAN_KANA_NGRAM == 3
    assert len(_old_word_shingles(text)) == 2  # the old rule: 6 "words" -> 2 shingles of nearly the whole record
    s = clean.shingles(text)
    squeezed = "".join(unicodedata.normalize("NFKC", text).casefold().split())
    assert s == {squeezed[i:i + 3] for i in range(len(squeezed) - 2)}
    # the decision is by share of units (a Han character, a Latin word), not by the presence of whitespace
    assert clean.char_ngram(clean.script_counts("Python 的 API 文档说明")) == 3  # 5 Han of 7 units
    assert clean.char_ngram(clean.script_counts("Python 3 的 API 文档")) == 3  # 3 of 5
    assert clean.char_ngram(clean.script_counts("Install the Python package from PyPI 文档")) == 0  # 2 of 8: words
    assert clean.char_ngram(clean.script_counts("ภาษาไทยไม่มีการเว้นวรรค ระหว่างคำ")) == clean.CHAR_NGRAM == 5
    assert clean.char_ngram(clean.script_counts("한국어는 띄어쓰기를 합니다")) == 0  # Hangul uses spaces


def test_planted_one_character_variants_are_all_found_and_nothing_else():
    texts, n_distinct = _planted()
    sh = [clean.shingles(t) for t in texts]
    # the reference: exact Jaccard of the character shingles; the planted variants are true near duplicates
    assert min(_jaccard(sh[i], sh[j]) for i, j in _pairs(texts, n_distinct)) >= 0.8
    dropped = clean.near_duplicates(texts, threshold=0.8)
    assert dropped == list(range(n_distinct, len(texts)))  # all 50 variants, no distinct record
    # the distinct records are far apart (what a false positive would need is far away)
    rng = random.Random(1)
    sample = [_jaccard(sh[a], sh[b]) for a, b in (rng.sample(range(n_distinct), 2) for _ in range(2000))]
    assert max(sample) < 0.3
    # the old rule (word 5-grams as soon as there is whitespace) missed most of them
    old = [_jaccard(_old_word_shingles(texts[i]), _old_word_shingles(texts[j])) for i, j in _pairs(texts, n_distinct)]
    assert sum(j >= 0.8 for j in old) <= 2  # (0 of 50 with this seed)


def _pairs(texts, n_distinct):
    """(original, variant) index pairs: each variant's original is the distinct record it differs from by one
    character."""
    out = []
    for v in range(n_distinct, len(texts)):
        best = max(range(n_distinct), key=lambda i: _jaccard(set(texts[i]), set(texts[v]))
                   if abs(len(texts[i]) - len(texts[v])) <= 1 else -1)
        out.append((best, v))
    return out


def test_real_short_chinese_records_and_the_ngram_size(shared_data):
    """LLaMA-Factory's identity.json (real, short Chinese with spaces): one-character variants stay >= 0.8 with
    character 3-grams, where 5-grams lose some; distinct records stay apart."""
    data = json.loads((shared_data / "instruct" / "llama_factory" / "identity.json").read_text(encoding="utf-8"))
    zh = [r["output"] for r in data if clean.language_label(clean.script_counts(r["output"])) == "zh"]
    assert len(zh) >= 60 and all(" " in t for t in zh[:10])
    rng = random.Random(0)
    variants = [_one_char_variant(t, rng) for t in zh]

    def chars(t, n):
        t = "".join(unicodedata.normalize("NFKC", t).casefold().split())
        return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))}
    assert all(clean.shingles(t) == chars(t, 3) for t in zh)
    j3 = [_jaccard(chars(a, 3), chars(b, 3)) for a, b in zip(zh, variants)]
    j5 = [_jaccard(chars(a, 5), chars(b, 5)) for a, b in zip(zh, variants)]
    assert sum(j >= 0.8 for j in j3) >= len(zh) - 1 and sum(j >= 0.8 for j in j5) < sum(j >= 0.8 for j in j3)
    # MinHash LSH finds a pair with the probability its bands give (datasketch's choice of b bands of r rows for
    # the threshold: 1 - (1 - J^r)^b); the variants found match that expectation
    from datasketch import MinHashLSH
    ranges = MinHashLSH(threshold=0.8, num_perm=128).hashranges
    b, r = len(ranges), ranges[0][1] - ranges[0][0]
    p = [1 - (1 - j ** r) ** b for j in j3]
    expected, sd = sum(p), sum(q * (1 - q) for q in p) ** 0.5
    found = sum(i >= len(zh) for i in clean.near_duplicates(zh + variants, 0.8))
    assert abs(found - expected) <= 3 * sd + 1 and found >= 0.8 * len(zh), (found, expected, sd)


def test_english_shingles_are_unchanged(shared_data):
    data = json.loads((shared_data / "instruct" / "llama_factory" / "alpaca_en_demo.json").read_text())
    texts = [r["output"] for r in data if len(r["output"].split()) > 1]
    assert len(texts) > 900
    for t in texts:
        assert clean.shingles(t) == _old_word_shingles(t)
    assert clean.shingles("hello") == {"hello"} and clean.shingles("abcdefg") == {"abcde", "bcdef", "cdefg"}


JA = ["今日はとても良い天気ですね。公園へ散歩に行きましょう。",
      "昨日は友達と一緒に映画を見に行きました。とても面白かったです。",
      "日本語の勉強は難しいですが、毎日少しずつ続けています。",
      "このレストランのラーメンは本当においしいと評判です。"]
TH = ["วันนี้อากาศดีมากเราจะไปเดินเล่นที่สวนสาธารณะด้วยกัน",
      "ฉันชอบอ่านหนังสือที่ห้องสมุดในตอนเย็นทุกวัน"]
EN = ["The quick brown fox jumps over the lazy dog near the river bank today.",
      "Students in the library read quietly while the rain falls outside the window."]
KO = ["오늘은 날씨가 아주 좋아서 공원에 산책을 갔습니다."]
RU = ["Сегодня хорошая погода, и мы пойдём гулять в парк."]


def test_language_labels_by_script():
    label = lambda t: clean.language_label(clean.script_counts(t))  # noqa: E731
    assert [label(t) for t in JA] == ["ja"] * 4
    assert label("中华人民共和国成立于一九四九年。") == "zh" and label("ＡＢＣ") == "latin"
    assert [label(t) for t in TH + EN + KO + RU] == ["th", "th", "latin", "latin", "ko", "cyrillic"]
    assert label("مرحبا بالعالم") == "arabic" and label("123 456 !!") == "none"


def test_cleaner_reports_near_dedup_per_language():
    rng = random.Random(3)
    zh = [_zh_record(rng) for _ in range(20)]
    records = [*zh, *JA, *TH, *EN, *KO, *RU]
    # copies the shingles cannot tell apart (a space inside CJK / Thai text, case and spacing in English) for the
    # short records; one-character variants of the longer Chinese ones
    planted = {"zh": [_one_char_variant(t, rng) for t in zh[:5]],
               "ja": [t[:5] + " " + t[5:] for t in JA[:3]], "th": [TH[0][:9] + " " + TH[0][9:]],
               "latin": [EN[0].upper().replace(" ", "  ")]}
    for label, copies in planted.items():
        for t in copies:
            best = max(_jaccard(clean.shingles(t), clean.shingles(o)) for o in records)
            assert best >= (0.9 if label == "zh" else 1), (label, t)
    records += [t for v in planted.values() for t in v]
    cleaner = clean.Cleaner(dict(dedup_near=True))
    kept = cleaner.clean([{"text": t, "_source": f"mix.jsonl:{i + 1}"} for i, t in enumerate(records)])
    langs = cleaner.languages
    expected_seen = {"zh": 25, "ja": 7, "th": 3, "latin": 3, "ko": 1, "cyrillic": 1}
    assert {k: v["records"] for k, v in langs.items()} == expected_seen
    assert {k: v["dropped"] for k, v in langs.items()} == {"zh": 5, "ja": 3, "th": 1, "latin": 1, "ko": 0,
                                                          "cyrillic": 0}
    assert {k: v["char_shingles"] for k, v in langs.items()} == {"zh": 25, "ja": 7, "th": 3, "latin": 0, "ko": 0,
                                                                "cyrillic": 0}
    assert list(langs) == ["zh", "ja", "latin", "th", "cyrillic", "ko"]  # most records first, then by label
    assert len(kept) == len(records) - 10 and cleaner.steps[0]["dropped"] == 10
    line = clean.describe_languages(langs)
    assert line.startswith("  dedup_near per language (by script): zh 25 records, 5 dropped (25 by characters); ")
    assert "latin 3 records, 1 dropped;" in line
    assert clean.Cleaner(dict(dedup_exact=True)).languages == {} and clean.describe_languages({}) == ""


def test_prepare_report_shows_the_languages(tmp_path, llama2_tok):
    from easytune.config import defaults
    from easytune.data import prepare
    from easytune.data import report as report_lib
    rng = random.Random(5)
    zh = [_zh_record(rng) for _ in range(12)]
    texts = zh + [_one_char_variant(t, rng) for t in zh[:4]] + EN + [EN[1].lower() + "  "]  # (same word 5-grams)
    f = tmp_path / "mix.jsonl"
    f.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    d = defaults().data
    d.train_files, d.format, d.val_set_size, d.sequence_len, d.batch_records = [str(f)], "text", 0, 256, 5
    d.dataset_prepared_path = str(tmp_path / "cache")
    d.clean.dedup_near = True
    _, _, report = prepare.prepare_dataset(d, llama2_tok)
    assert report["near_dedup_languages"] == {"zh": {"records": 16, "dropped": 4, "char_shingles": 16},
                                              "latin": {"records": 3, "dropped": 1, "char_shingles": 0}}
    assert report["records"] == len(texts) - 5
    assert "dedup_near per language (by script): zh 16 records, 4 dropped (16 by characters); latin 3 records, " \
           "1 dropped" in report_lib.describe(report)
    saved = json.loads(next((tmp_path / "cache").rglob("report.json")).read_text())
    assert saved["near_dedup_languages"] == report["near_dedup_languages"]


MIXED = ["在 React 中使用 useState hook 管理组件的 state，当 state 改变时 component 会重新 render 一次。",
         "使用pip install numpy安装NumPy库，然后import numpy as np即可在Python中使用数组功能。"]
EN_WITH_NAMES = ["Yesterday I met 王小明 and 李华 at the library to talk about the new project and the plan for May.",
                 "The paper by 张伟 was presented at the conference in Vienna last week to a large audience."]


def _units(text):
    """The reference count: Han characters one each (CJK Unified Ideographs), ASCII-letter words one each."""
    import re
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text), len(re.findall(r"[A-Za-z]+", text))


def test_mixed_text_counts_han_characters_and_latin_words_as_units():
    for text in MIXED + EN_WITH_NAMES:
        han, words = _units(text)
        assert clean.script_counts(text) == {"han": han, "latin": words}, text
    assert [_units(t) for t in MIXED] == [(18, 7), (17, 9)]  # 24% of the letters are Han in the second
    for text in MIXED:
        counts = clean.script_counts(text)
        assert clean.language_label(counts) == "zh" and clean.char_ngram(counts) == 3
        squeezed = "".join(unicodedata.normalize("NFKC", text).casefold().split())
        assert clean.shingles(text) == {squeezed[i:i + 3] for i in range(len(squeezed) - 2)}
    for text in EN_WITH_NAMES:  # a few Chinese names in English: still English, word 5-grams
        counts = clean.script_counts(text)
        assert clean.language_label(counts) == "latin" and clean.char_ngram(counts) == 0
        assert clean.shingles(text) == _old_word_shingles(text)
    # a word is a run of letters: combining marks stay inside it (Devanagari vowel signs), digits end it
    assert clean.script_counts("नमस्ते दुनिया") == {"devanagari": 2}
    assert clean.script_counts("Python3 x86_64 NumPy") == {"latin": 3}  # Python, x, NumPy


def _reference_near_duplicates(texts, threshold=0.8, num_perm=128):
    """datasketch's own pipeline: MinHashLSH.query for candidates among the kept texts, each confirmed with
    MinHash.jaccard >= threshold; the first copy kept."""
    from datasketch import MinHash, MinHashLSH
    lsh, kept, dropped = MinHashLSH(threshold=threshold, num_perm=num_perm), {}, []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode("utf-8") for s in clean.shingles(text)])
        if any(m.jaccard(kept[key]) >= threshold for key in lsh.query(m)):
            dropped.append(i)
            continue
        kept[str(i)] = m
        lsh.insert(str(i), m)
    return dropped


def test_short_template_records_are_confirmed_before_they_are_dropped():
    antonyms = "大高长快多冷黑新好美胖远早强深软干明真生开前左上里甜贵宽厚轻"
    common = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动"
              "同工也能下过子说产种面而方后多定行")
    sets = {"ja": [f"「{a}」の反対語は何ですか？" for a in antonyms],
            "zh": [f"请问汉字“{c}”的拼音是什么？" for c in dict.fromkeys(antonyms + common)]}
    for name, texts in sets.items():
        sh = [clean.shingles(t) for t in texts]
        top = max(_jaccard(sh[a], sh[b]) for a in range(len(texts)) for b in range(a))
        assert top < 0.75, (name, top)  # no pair is a near duplicate: the one-character slot is 2-3 of ~12 shingles
        dropped = clean.near_duplicates(texts, 0.8)
        assert dropped == _reference_near_duplicates(texts, 0.8), name
        assert len(dropped) <= 1, (name, dropped)  # (unconfirmed LSH candidates dropped 13 of 30 ja, 3 of 83 zh)
    texts, n_distinct = _planted()
    assert clean.near_duplicates(texts) == _reference_near_duplicates(texts) == list(range(n_distinct, len(texts)))
