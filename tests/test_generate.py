"""generate / greedy_generate (KV-cached decoding) against outside references.

References:
  * ../shared/data/SOURCES.md: the 40 greedy ids of stories260K from BOS (fp64 NumPy with KV cache,
    equal to llama2.c's ``-t 0.0`` sample);
  * transformers ``generate(do_sample=False)`` on the converted stories260K and on tiny random Llama
    models (GQA, untied, eos stop), 64 new tokens;
  * peft ``LoraModel`` (random non-zero A and B) + transformers ``generate`` for the LoRA path;
  * the model's own full forward pass (no cache) for the cached logits;
  * ``softmax(logits / T)`` of the transformers model for the sampling distribution.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from easytune.generate import generate, greedy_generate  # noqa: E402
from easytune.models.hf_weights import load_hf_model  # noqa: E402
from easytune.models.llama import LlamaForCausalLM, init_cache  # noqa: E402

GOLDEN_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401,
              396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432,
              358, 394, 261, 370, 432, 352]
PROMPT = [1, 17, 42, 5, 99, 63, 8]


@pytest.fixture(scope="module")
def stories260k_dir(shared_data, tmp_path_factory):
    from easytune.models.gguf import convert_gguf

    src = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    return convert_gguf(src, tmp_path_factory.mktemp("stories260K"))


@pytest.fixture(scope="module")
def stories260k(stories260k_dir):
    return load_hf_model(stories260k_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random transformers Llama (GQA 4/2, untied lm_head) saved and loaded into easytune."""
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    config, params = load_hf_model(out)
    return model, config, params


def _hf_greedy(model, prompt, max_new_tokens, eos_token_id):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, pad_token_id=0, attention_mask=None)
    return out[0, len(prompt):].tolist()


def test_stories260k_golden(stories260k):
    config, params = stories260k
    assert greedy_generate(config, params, [1], 40) == GOLDEN_IDS


def test_stories260k_continues_a_prompt(stories260k):
    """Greedy decoding is prefix-consistent: prompting with BOS + the first 15 golden ids continues."""
    config, params = stories260k
    assert greedy_generate(config, params, [1] + GOLDEN_IDS[:15], 25) == GOLDEN_IDS[15:]


def test_tiny_random_matches_transformers(tiny):
    model, config, params = tiny
    expected = _hf_greedy(model, PROMPT, 30, eos_token_id=None)
    assert len(expected) == 30
    assert greedy_generate(config, params, PROMPT, 30, eos_token_id=()) == expected


def test_stops_after_eos_like_transformers(tiny):
    model, config, params = tiny
    free = _hf_greedy(model, PROMPT, 30, eos_token_id=None)
    eos = free[6]  # a token the model does produce: both must stop right after its first occurrence
    expected = _hf_greedy(model, PROMPT, 30, eos_token_id=eos)
    assert expected[-1] == eos and len(expected) == free.index(eos) + 1
    assert greedy_generate(config, params, PROMPT, 30, eos_token_id=eos) == expected
    assert greedy_generate(config, params, PROMPT, 30, eos_token_id=[127, eos]) == expected


def test_lora_matches_peft(tiny):
    peft = pytest.importorskip("peft")
    model, config, params = tiny
    r, alpha = 4, 8
    targets = ["q_proj", "v_proj", "down_proj"]
    lora_config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                  init_lora_weights=False)  # random non-zero A and B
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(model), lora_config).eval()
    with torch.no_grad():  # make the adapters matter at this weight scale
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(4.0)

    lora: dict = {}
    for name, p in peft_model.named_parameters():
        if "lora_A" not in name:
            continue
        path = name.split("base_model.model.")[1].split(".lora_A")[0]  # model.layers.0.self_attn.q_proj
        b = dict(peft_model.named_parameters())[name.replace("lora_A", "lora_B")]
        node = lora
        for key in path.replace("layers.", "layers_").split("."):
            node = node.setdefault(key, {})
        node["lora_A"] = p.detach().numpy().T  # peft [r, in] -> [in, r]
        node["lora_B"] = b.detach().numpy().T  # peft [out, r] -> [r, out]
    assert len(lora["model"]) == config.num_hidden_layers

    expected = _hf_greedy(peft_model, PROMPT, 20, eos_token_id=None)
    assert expected != _hf_greedy(model, PROMPT, 20, eos_token_id=None)  # the adapters change the text
    got = greedy_generate(config, params, PROMPT, 20, eos_token_id=(), lora=lora, lora_scale=alpha / r)
    assert got == expected


def test_edge_cases(tiny):
    _, config, params = tiny
    assert greedy_generate(config, params, PROMPT, 0) == []
    with pytest.raises(ValueError, match="empty"):
        greedy_generate(config, params, [], 5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        greedy_generate(config, params, [1, config.vocab_size], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(config, params, PROMPT, -1)


# ---------------------------------------------------------------------------------------------------
# generate: KV cache, batches, sampling


def test_stories260k_64_tokens_match_transformers(stories260k_dir, stories260k):
    config, params = stories260k
    model = transformers.LlamaForCausalLM.from_pretrained(stories260k_dir).eval()
    for prompt in ([1], [1] + GOLDEN_IDS[:9]):
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=64,
                             min_new_tokens=64, pad_token_id=0, attention_mask=None)
        expected = out[0, len(prompt):].tolist()
        assert len(expected) == 64
        assert generate(config, params, [prompt], 64, eos_token_id=())[0] == expected
    assert expected[:31] == GOLDEN_IDS[9:]


def test_tiny_gqa_64_tokens_match_transformers(tiny):
    model, config, params = tiny
    assert config.num_key_value_heads < config.num_attention_heads
    expected = _hf_greedy(model, PROMPT, 64, eos_token_id=None)
    assert len(expected) == 64
    assert generate(config, params, [PROMPT], 64, eos_token_id=())[0] == expected


def test_cached_logits_equal_full_forward(tiny):
    """Prefill 5 tokens, then feed 1 token at a time through the cache: same logits as no cache."""
    _, config, params = tiny
    ids = jnp.asarray([PROMPT + [3, 4, 5]], jnp.int32)  # [1, 10]
    model = LlamaForCausalLM(config)
    full = model.apply({"params": params}, ids)
    cache = init_cache(config, 1, 16)
    pos = jnp.arange(10, dtype=jnp.int32)[None]
    seg = jnp.ones((1, 10), jnp.int32)
    logits, cache = model.apply({"params": params}, ids[:, :5], pos[:, :5], seg[:, :5],
                                cache=cache, cache_index=0)
    chunks = [logits]
    for t in range(5, 10):
        logits, cache = model.apply({"params": params}, ids[:, t:t + 1], pos[:, t:t + 1],
                                    seg[:, t:t + 1], cache=cache, cache_index=t)
        chunks.append(logits)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_equals_each_alone(tiny):
    model, config, params = tiny
    prompts = [PROMPT, [1], list(range(3, 73))]  # 7, 1 and 70 tokens (crosses the 64 bucket)
    alone = [generate(config, params, [p], 40, eos_token_id=())[0] for p in prompts]
    assert alone[0] == _hf_greedy(model, prompts[0], 40, eos_token_id=None)
    assert alone[2] == _hf_greedy(model, prompts[2], 40, eos_token_id=None)
    assert generate(config, params, prompts, 40, eos_token_id=()) == alone
    # per-row eos: the row that produces eos stops there, the others run on
    eos = alone[0][5]
    stopped = generate(config, params, prompts, 40, eos_token_id=eos)
    for got, free, p in zip(stopped, alone, prompts):
        assert got == (free[:free.index(eos) + 1] if eos in free else free)
        assert got == _hf_greedy(model, p, 40, eos_token_id=eos)


def test_stories260k_batch_equals_each_alone(stories260k):
    config, params = stories260k
    prompts = [[1], [1] + GOLDEN_IDS[:15], [1, 403, 407]]
    alone = [generate(config, params, [p], 30, eos_token_id=())[0] for p in prompts]
    assert alone[0] == GOLDEN_IDS[:30]
    assert generate(config, params, prompts, 30, eos_token_id=()) == alone


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny):
    _, config, params = tiny
    prompts = [PROMPT, [1, 9]]
    greedy = generate(config, params, prompts, 32, eos_token_id=())
    key = jax.random.key(3)
    assert generate(config, params, prompts, 32, temperature=1.5, top_k=1, rng=key,
                    eos_token_id=()) == greedy
    assert generate(config, params, prompts, 32, temperature=1.5, top_p=1e-6, rng=key,
                    eos_token_id=()) == greedy


def test_sampling_is_reproducible_and_seed_dependent(tiny):
    _, config, params = tiny
    kw = dict(temperature=1.0, eos_token_id=(), top_k=50, top_p=0.95)
    a = generate(config, params, [PROMPT, [1]], 32, rng=jax.random.key(7), **kw)
    assert a == generate(config, params, [PROMPT, [1]], 32, rng=jax.random.key(7), **kw)
    assert a != generate(config, params, [PROMPT, [1]], 32, rng=jax.random.key(8), **kw)
    assert a != generate(config, params, [PROMPT, [1]], 32, eos_token_id=())  # not greedy


_N_SAMPLES = 5000


def _first_token_frequencies(config, params, temperature, **kw):
    n = _N_SAMPLES
    got = generate(config, params, [PROMPT] * n, 1, temperature=temperature,
                   rng=jax.random.key(11), eos_token_id=(), **kw)
    return np.bincount([g[0] for g in got], minlength=config.vocab_size) / n


def _hf_probs(model, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits[0, -1].double() / temperature
    return torch.softmax(logits, -1).numpy()


def _assert_close_in_tv(freq, probs):
    """Total variation within 1.5x its expectation under multinomial noise (+ 0.005)."""
    expected = 0.5 * np.sqrt(2 / np.pi) * np.sqrt(probs * (1 - probs) / _N_SAMPLES).sum()
    tv = 0.5 * np.abs(freq - probs).sum()
    assert tv < 1.5 * expected + 0.005, (tv, expected)


@pytest.mark.slow
def test_sampling_distribution_matches_softmax(tiny):
    """5000 first tokens: total variation to softmax(logits / T) within sampling noise."""
    model, config, params = tiny
    t = 2.0
    probs = _hf_probs(model, t)
    assert probs.max() < 0.5  # a spread-out distribution, so the check means something
    freq = _first_token_frequencies(config, params, t)
    _assert_close_in_tv(freq, probs)

    # top-k: only the k most likely tokens, renormalized
    k = 5
    top = np.argsort(-probs)[:k]
    kept = np.zeros_like(probs)
    kept[top] = probs[top] / probs[top].sum()
    freq = _first_token_frequencies(config, params, t, top_k=k)
    assert set(np.flatnonzero(freq)) <= set(top)
    _assert_close_in_tv(freq, kept)

    # top-p: the smallest most-likely set reaching p (transformers TopPLogitsWarper), renormalized
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[before < 0.5]
    kept = np.zeros_like(probs)
    kept[nucleus] = probs[nucleus] / probs[nucleus].sum()
    freq = _first_token_frequencies(config, params, t, top_p=0.5)
    assert set(np.flatnonzero(freq)) <= set(nucleus)
    _assert_close_in_tv(freq, kept)


def test_generate_validation(tiny):
    _, config, params = tiny
    assert generate(config, params, [PROMPT, [1]], 0) == [[], []]
    cases = [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=PROMPT), "list of token-id lists"),
        (dict(prompts=[PROMPT, []]), "prompt 1 is empty"),
        (dict(prompts=[[1, config.vocab_size]]), "outside the vocabulary"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=1.0, top_k=-1, rng=jax.random.key(0)), "top_k"),
        (dict(temperature=1.0, top_p=0.0, rng=jax.random.key(0)), "top_p"),
        (dict(temperature=1.0, top_p=1.5, rng=jax.random.key(0)), "top_p"),
        (dict(temperature=1.0), "rng"),
    ]
    for override, match in cases:
        kw = dict(prompts=[PROMPT], max_new_tokens=4) | override
        with pytest.raises(ValueError, match=match):
            generate(config, params, kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)


# ------------------------------------------------------------------------ text level: chat, stop strings

TEMPLATES = ("llama2", "llama3", "chatml", "mistral")


def _tokenizer_with_template(shared_data, model_dir, name):
    import json

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    path = shared_data / "tokenizers" / "chat_templates" / f"mistralrs_{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    tok.chat_template = json.loads(path.read_text())["chat_template"]
    return tok


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_prompt_ids_equal_apply_chat_template(shared_data, stories260k_dir, name):
    from easytune.generate import encode_prompt
    tok = _tokenizer_with_template(shared_data, stories260k_dir, name)
    system = None if name == "mistral" else "Answer in one line."
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": "Tell me about the cat."}]
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    got = encode_prompt(tok, "Tell me about the cat.", chat=True, system=system)
    assert got == list(want)
    assert got[:2] != [tok.bos_token_id, tok.bos_token_id]  # BOS never doubled


def test_chat_generation_equals_transformers(shared_data, stories260k_dir, stories260k):
    from easytune.generate import generate_text
    tok = _tokenizer_with_template(shared_data, stories260k_dir, "llama2")
    model = transformers.LlamaForCausalLM.from_pretrained(str(stories260k_dir)).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Once upon a time"}], add_generation_prompt=True,
                                  tokenize=True)["input_ids"]
    new = _hf_greedy(model, list(ids), 48, tok.eos_token_id)
    config, params = stories260k
    got = generate_text(config, params, tok, ["Once upon a time"], 48, chat=True)
    # transformers' tokens, as text following the prompt (decoded with it: SentencePiece drops the leading
    # space of a continuation decoded alone)
    head = tok.decode(ids, skip_special_tokens=True)
    assert got == [tok.decode(list(ids) + new, skip_special_tokens=True)[len(head):]]
    assert got[0].startswith(" ") and len(new) == 48


def _greedy_without_eos(stories260k_dir, stories260k, prompt: str, n: int):
    """stories260K's tokenizer and transformers model, and easytune's ``n`` greedy tokens after ``prompt`` with no
    stop id: ``(tok, model, ids, full)``."""
    from transformers import AutoTokenizer

    from easytune.generate import encode_prompt, generate
    tok = AutoTokenizer.from_pretrained(str(stories260k_dir))
    model = transformers.LlamaForCausalLM.from_pretrained(str(stories260k_dir)).eval()
    ids = encode_prompt(tok, prompt)
    config, params = stories260k
    return tok, model, ids, generate(config, params, [ids], n, eos_token_id=[])[0]


def test_stop_strings_cut_like_transformers(stories260k_dir, stories260k):
    from easytune.generate import cut_at_stop, generate_text
    config, params = stories260k
    prompt = "Once upon a time"
    tok, model, ids, full = _greedy_without_eos(stories260k_dir, stories260k, prompt, 64)
    text = tok.decode(ids + full, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    stop = text[len(text) // 2: len(text) // 2 + 4]  # a string that first appears mid-way
    first = text.find(stop)
    assert 0 < first
    # transformers' StopStringCriteria stops after the token that completes the stop string
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64, stop_strings=[stop],
                         tokenizer=tok, eos_token_id=None, pad_token_id=0)
    hf_kept = out[0, len(ids):].tolist()
    kept, cut = cut_at_stop(tok, ids, full, [stop])
    assert kept == hf_kept
    assert cut == text[:first]
    assert generate_text(config, params, tok, [prompt], 64, stop=[stop, "no such string"]) == [text[:first]]


def test_a_special_token_stop_string_stops_at_its_id(stories260k_dir, stories260k):
    """``stop=["<marker>"]`` for a special token (a chat marker added with tokenizer.added_special_tokens): the text
    is decoded without special tokens, so the marker is matched by id, as transformers stops at an
    ``eos_token_id`` (the reference) and vLLM at ``stop_token_ids``."""
    from easytune.generate import generate_text
    config, params = stories260k
    prompt = "Once upon a time"
    tok, model, ids, full = _greedy_without_eos(stories260k_dir, stories260k, prompt, 48)
    marker_id = next(t for t in full[len(full) // 2:] if tok.convert_ids_to_tokens(t).isalpha())  # a word piece
    marker = tok.convert_ids_to_tokens(marker_id)
    tok.add_special_tokens({"additional_special_tokens": [marker]})  # the piece, now special, keeps its id
    assert tok.convert_tokens_to_ids(marker) == marker_id and marker_id in tok.all_special_ids
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=48, eos_token_id=marker_id,
                         pad_token_id=0)[0, len(ids):].tolist()
    assert out[-1] == marker_id and marker_id not in out[:-1]
    head = tok.decode(ids, skip_special_tokens=True)
    want = tok.decode(ids + out, skip_special_tokens=True)[len(head):]
    assert generate_text(config, params, tok, [prompt], 48, stop=[marker]) == [want]
    assert generate_text(config, params, tok, [prompt], 48) != [want]  # without the stop it runs on


def test_stop_token_ids_and_cli_chat(shared_data, stories260k_dir, tmp_path, capsys):
    import json
    import shutil

    from easytune import cli
    from easytune.generate import generate_text, stop_token_ids
    model_dir = tmp_path / "chat"
    shutil.copytree(stories260k_dir, model_dir)
    tok = _tokenizer_with_template(shared_data, model_dir, "chatml")
    tok.save_pretrained(str(model_dir))
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 410]}))
    config, params = load_hf_model(model_dir)
    assert stop_token_ids(config, tok, str(model_dir)) == [2, 410]
    want = generate_text(config, params, tok, ["Hi", "Once upon a time there"], 40, chat=True,
                         system="Be kind.", stop=["."], model_dir=str(model_dir))
    assert all("." not in w for w in want)
    assert cli.main(["generate", str(model_dir), "--chat", "--system", "Be kind.", "--prompt", "Hi",
                     "--prompt", "Once upon a time there", "--max-new-tokens", "40", "--stop", "."]) == 0
    assert capsys.readouterr().out == f"--- [0]\n{want[0]}\n--- [1]\n{want[1]}\n"
    assert cli.main(["generate", str(stories260k_dir), "--chat", "--prompt", "Hi"]) == 2
    assert "has no chat_template" in capsys.readouterr().err
    assert cli.main(["generate", str(stories260k_dir), "--system", "x", "--prompt", "Hi"]) == 2
    assert "--system needs --chat" in capsys.readouterr().err
    assert cli.main(["generate", str(model_dir), "--prompt", "Hi", "--stop", ""]) == 2
    assert "empty stop string" in capsys.readouterr().err
    # a template that raises (Mistral's: no system role) is a one-line error, not a jinja traceback
    tok = _tokenizer_with_template(shared_data, model_dir, "mistral")
    tok.save_pretrained(str(model_dir))
    assert cli.main(["generate", str(model_dir), "--chat", "--system", "x", "--prompt", "Hi"]) == 2
    assert "chat template" in capsys.readouterr().err


def test_unescape_stop():
    from easytune.generate import unescape_stop
    assert unescape_stop("\\n\\n") == "\n\n"
    assert unescape_stop("a\\tb") == "a\tb"
    assert unescape_stop("C:\\\\path") == "C:\\path"
    assert unescape_stop("Ünïcode \\x") == "Ünïcode \\x"  # other escapes and non-ASCII kept as typed
