"""easytune.tokenizer and the model.preset ladder.

References: ``tokenizers``' own file trainer (``Tokenizer.train(files)``) for the streamed reader,
``transformers.AutoTokenizer`` / ``apply_chat_template`` for the saved dir, ChatML's published format, and
``transformers.LlamaForCausalLM`` (built on the meta device) plus Llama-2-7B's config.json for parameter counts.
"""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from easytune import cli
from easytune import tokenizer as tok_lib

SAMPLE = "Héllo wörld! 🌍 tabs\tand  double  spaces\n\n  indented 12345 中文 <s> </s>\r\nend"


def _corpus(path, lines=400, seed=0):
    rng = random.Random(seed)
    words = ["the", "king", "queen", "speak", "lord", "good", "night", "sweet", "prince", "my", "thou", "art"]
    text = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + ".\n" for _ in range(lines))
    path.write_text(text, encoding="utf-8")
    return text


def _auto(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_train_save_load_roundtrip(tmp_path, model):
    _corpus(tmp_path / "a.txt")
    r = tok_lib.train_and_save([str(tmp_path / "*.txt")], tmp_path / "tok", 300, model)
    tok = _auto(tmp_path / "tok")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert r["special_tokens"] == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert len(tok) == r["vocab_size"] <= 300
    ids = tok.encode(SAMPLE, add_special_tokens=False, split_special_tokens=True)
    assert tok.decode(ids) == SAMPLE  # byte level: exact, also for text never seen in training
    assert tok.unk_token_id not in ids
    assert tok.encode("the king")[0] == 1  # <s> prepended, as Llama's tokenizer


def test_learned_tokens_compress(tmp_path):
    text = _corpus(tmp_path / "a.txt")
    tok_lib.train_and_save([str(tmp_path / "a.txt")], tmp_path / "tok", 320)
    tok = _auto(tmp_path / "tok")
    r = tok_lib.bytes_per_token(tok, [text])
    assert r["bytes"] == len(text.encode())
    assert r["tokens"] == len(tok.encode(text, add_special_tokens=False))
    assert r["bytes_per_token"] > 3.0  # whole words of a 12-word vocabulary became single tokens


def test_chat_template_chatml(tmp_path):
    _corpus(tmp_path / "a.txt")
    r = tok_lib.train_and_save([str(tmp_path / "a.txt")], tmp_path / "tok", 300, chat_template="chatml")
    assert r["special_tokens"]["<|im_start|>"] == 4 and r["special_tokens"]["<|im_end|>"] == 5
    tok = _auto(tmp_path / "tok")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # ChatML as OpenAI / Qwen publish it
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == 4 and ids.count(5) == 2


def test_custom_template_file_and_extra_special(tmp_path):
    _corpus(tmp_path / "a.txt")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    r = tok_lib.train_and_save([str(tmp_path / "a.txt")], tmp_path / "tok", 300, chat_template=str(tpl),
                               extra_special_tokens=["<|sep|>"])
    assert r["special_tokens"]["<|sep|>"] == 4
    tok = _auto(tmp_path / "tok")
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"
    assert tok.convert_tokens_to_ids("<|sep|>") == 4


def test_streaming_reader_sees_whole_file(tmp_path):
    """A file many chunks long is read piecewise and completely; training on the stream gives exactly the
    tokenizer that ``tokenizers``' own line-by-line file trainer gives (the non-streamed reference)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    path = tmp_path / "big.txt"
    text = _corpus(path, lines=2000) + "x" * 700 + "\n"  # ~80 kB, and one line longer than a chunk
    path.write_text(text, encoding="utf-8")
    batches = list(tok_lib.iter_corpus([str(path)], chunk_chars=512))
    assert len(batches) > 100 and max(sum(map(len, b)) for b in batches) < 2 * 512
    assert "".join(t for b in batches for t in b) == text
    assert max(len(t) for b in batches for t in b) == 512  # the long line was cut, not held whole
    streamed = tok_lib.train_tokenizer([str(path)], 400, chunk_chars=4096)

    ref = Tokenizer(models.BPE(unk_token="<unk>"))
    ref.pre_tokenizer, ref.decoder = streamed.pre_tokenizer, streamed.decoder
    ref.train([str(path)], trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                               special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert streamed.get_vocab() == ref.get_vocab()
    assert len(streamed.encode(text).ids) - 1 == len(ref.encode(text).ids)  # the streamed one adds <s>


def test_jsonl_text_field_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    recs = [{"body": f"record number {i} says hello"} for i in range(50)] + [{"body": ""}]
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    texts = [t for b in tok_lib.iter_corpus(tok_lib.expand_files([str(tmp_path / "d" / "*.jsonl")]), "body")
             for t in b]
    assert texts == [r["body"] for r in recs[:50]]
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no field 'text'"):
        list(tok_lib.iter_corpus([str(tmp_path / "d" / "a.jsonl")]))
    (tmp_path / "d" / "b.jsonl").write_text('{"body": "ok"}\n{"body": oops}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: invalid JSON"):
        list(tok_lib.iter_corpus([str(tmp_path / "d" / "b.jsonl")], "body"))
    (tmp_path / "d" / "c.json").write_text('[{"text": "a"}]\n')
    with pytest.raises(ValueError, match=r"c\.json:1: a JSON array"):
        list(tok_lib.iter_corpus([str(tmp_path / "d" / "c.json")]))


@pytest.mark.parametrize("argv, message", [
        (["--files", "{tmp}/missing.txt"], "--files: no file matches '{tmp}/missing.txt'"),
        (["--files", "{tmp}/empty.txt"], "--files: the corpus holds no text ({tmp}/empty.txt)"),
        (["--files", "{tmp}/a.txt", "--vocab-size", "200"], "--vocab-size: 200 leaves no room"),
        (["--files", "{tmp}/a.txt", "--model", "wordpiece"], "--model: unknown tokenizer model 'wordpiece'"),
        (["--files", "{tmp}/a.txt", "--chat-template", "nosuch"], "--chat-template: 'nosuch' is not a file"),
        (["--files", "{tmp}/a.txt", "--vocab-size", "1000000000"], "--vocab-size: 1000000000 is beyond"),
        (["--files", "{tmp}/a.txt", "--special-token", ""], "--special-token: an empty special token"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--vocab-size" not in argv:
        argv += ["--vocab-size", "300"]
    rc = cli.main(["tokenizer", "train", *argv, "--out", str(tmp_path / "tok")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err[0].startswith("easytune: error: " + message.format(tmp=tmp_path)), err
    assert not (tmp_path / "tok").exists()


def test_cli_train_and_eval(tmp_path, capsys):
    _corpus(tmp_path / "a.txt")
    assert cli.main(["tokenizer", "train", "--files", str(tmp_path / "a.txt"), "--vocab-size", "300",
                     "--model", "unigram", "--out", str(tmp_path / "tok")]) == 0
    assert "wrote unigram tokenizer" in capsys.readouterr().out
    assert cli.main(["tokenizer", "eval", str(tmp_path / "tok"), "--files", str(tmp_path / "a.txt")]) == 0
    assert "bytes/token" in capsys.readouterr().out


def test_tinyshakespeare_heldout(shared_data, tmp_path):
    """Trained on the first 90% of tinyshakespeare, measured on the last 10%: exact round trip, and more
    vocabulary compresses more (README "Pretrain your own small model" has the full table)."""
    src = shared_data / "corpus" / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = len(lines) * 9 // 10
    (tmp_path / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    held = "".join(lines[cut:])
    bpt = {}
    for v in (300, 512):
        tok_lib.train_and_save([str(tmp_path / "train.txt")], tmp_path / f"tok{v}", v)
        tok = _auto(tmp_path / f"tok{v}")
        ids = tok.encode(held[:20000], add_special_tokens=False)
        assert tok.decode(ids) == held[:20000]
        bpt[v] = tok_lib.bytes_per_token(tok, held.splitlines(keepends=True))["bytes_per_token"]
    assert 1.0 < bpt[300] < bpt[512]


# ------------------------------------------------------------------------------------------ model.preset

LADDER = {"1m": 1e6, "10m": 10e6, "25m": 25e6, "50m": 50e6, "125m": 125e6, "350m": 350e6, "1b": 1e9,
          "3b": 3e9, "7b": 7e9}


def _llama_param_count(p, vocab=32000):
    """Parameters of a Llama decoder from its shapes (embed, per layer q/k/v/o + SwiGLU + 2 RMSNorms, final
    norm, lm_head unless tied)."""
    D, F, L, H, K = (p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"], p["num_attention_heads"],
                     p["num_key_value_heads"])
    E = p.get("head_dim") or D // H
    per_layer = 2 * D * H * E + 2 * D * K * E + 3 * D * F + 2 * D
    return vocab * D * (1 if p["tie_word_embeddings"] else 2) + L * per_layer + D


@pytest.mark.parametrize("name", sorted(LADDER))
def test_preset_ladder_sizes(name):
    import torch
    import transformers

    from easytune.presets import PRESETS
    p = PRESETS[name]
    n = _llama_param_count(p)
    assert abs(n / LADDER[name] - 1) < 0.15, (name, n)
    assert p["num_attention_heads"] % p["num_key_value_heads"] == 0
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "tie_word_embeddings")
    cfg = transformers.LlamaConfig(vocab_size=32000, **{k: p[k] for k in keys})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert sum(t.numel() for t in model.parameters()) == n


def test_preset_7b_is_llama2_7b():
    from easytune.presets import PRESETS
    p = PRESETS["7b"]
    # meta-llama/Llama-2-7b-hf config.json
    llama2 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False)
    assert {k: p[k] for k in llama2} == llama2
    assert _llama_param_count(p) == 6_738_415_616  # Llama 2 paper's "7B" (HF model card: 6.74B)


@pytest.mark.parametrize("name", ["1m", "10m", "1b", "7b"])
def test_preset_builds_easytune_model(name):
    """The easytune Llama built from a preset has the formula's parameter count (abstract init, no memory)."""
    import jax

    from easytune.models import llama
    from easytune.models.model_config import ModelConfig
    from easytune.presets import PRESETS
    cfg = ModelConfig(vocab_size=32000, **PRESETS[name])
    shapes = jax.eval_shape(lambda k: llama.init_params(cfg, k), jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == _llama_param_count(PRESETS[name])


@pytest.mark.slow
def test_pretrain_shakespeare_recipe_short(shared_data, tmp_path, capsys):
    """The shipped recipe end to end at toy scale: train a tokenizer with the CLI, then two optimizer steps
    of a from-scratch preset on Tiny Shakespeare (the tokenizer and the text stream load, the loss is finite
    and starts near ln(vocab), as an untrained model's must)."""
    import math
    src = shared_data / "corpus" / "tinyshakespeare" / "input.txt"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    (tmp_path / "small.txt").write_text(src.read_text(encoding="utf-8")[:60000], encoding="utf-8")
    tok_dir = tmp_path / "shakespeare-tok"
    assert cli.main(["tokenizer", "train", "--files", str(tmp_path / "small.txt"), "--vocab-size", "300",
                     "--out", str(tok_dir)]) == 0
    out = tmp_path / "run"
    recipe = pathlib.Path(__file__).resolve().parents[1] / "configs" / "pretrain_shakespeare.py"
    rc = cli.main(["train", str(recipe),
                   f"--config.tokenizer.path={tok_dir}", f"--config.data.train_files={tmp_path / 'small.txt'}",
                   "--config.model.preset=1m", "--config.train.max_steps=2", "--config.data.sequence_len=32",
                   "--config.train.micro_batch_size=1", "--config.train.eval_steps=0",
                   "--config.train.sample_max_new_tokens=0", f"--config.train.output_dir={out}",
                   "--config.train.log_steps=1"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(300)) < 0.5  # random init: about uniform over the vocabulary
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "pretrain"
    # bits per byte = nats per token * tokens / ln 2 / bytes (The Pile's definition), over the validation tail
    d = s["data"]
    want = s["final_eval_loss"] * d["val_supervised_tokens"] / math.log(2) / d["val_bytes"]
    assert s["final_eval_bits_per_byte"] == pytest.approx(want, rel=1e-6)
    assert d["val_bytes"] > d["val_supervised_tokens"]  # a BPE token holds more than one byte on average


@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_token_byte_lengths_sum_to_utf8_bytes(tmp_path, model):
    """Bits-per-byte denominator: byte lengths of a text's tokens add up to ``len(text.encode('utf-8'))``."""
    _corpus(tmp_path / "a.txt")
    tok_lib.train_and_save([str(tmp_path / "a.txt")], tmp_path / "tok", 300, model, chat_template="chatml")
    tok = _auto(tmp_path / "tok")
    lengths = tok_lib.token_byte_lengths(tok)
    assert lengths.shape == (len(tok),) and lengths[:6].tolist() == [0] * 6  # specials and chat markers
    ids = tok.encode(SAMPLE, add_special_tokens=False, split_special_tokens=True)
    assert int(lengths[ids].sum()) == len(SAMPLE.encode("utf-8"))


def test_token_byte_lengths_llama2_sentencepiece(shared_data, tmp_path):
    """The same identity for Meta's Llama 2 tokenizer (SentencePiece BPE with byte fallback)."""
    import shutil
    path = shared_data / "tokenizers" / "llama2" / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    (tmp_path / "llama2").mkdir()
    shutil.copy(path, tmp_path / "llama2" / "tokenizer.model")
    tok = _auto(tmp_path / "llama2")
    assert len(tok) == 32000
    lengths = tok_lib.token_byte_lengths(tok)
    assert lengths[:3].tolist() == [0, 0, 0]  # <unk> <s> </s>
    text = "Hello world, 1234!\nNew line \u4e2d\u6587 \U0001f30d"
    ids = tok.encode(text, add_special_tokens=False)
    # SentencePiece's add_dummy_prefix turns the text into " " + text before splitting
    assert int(lengths[ids].sum()) == len((" " + text).encode("utf-8"))
