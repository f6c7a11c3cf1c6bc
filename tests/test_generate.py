"""greedy_generate against outside references.

References:
  * ../shared/data/SOURCES.md: the 40 greedy ids of stories260K from BOS (fp64 NumPy with KV cache,
    equal to llama2.c's ``-t 0.0`` sample);
  * transformers ``generate(do_sample=False)`` on tiny random Llama models (GQA, untied, eos stop);
  * peft ``LoraModel`` (random non-zero A and B) + transformers ``generate`` for the LoRA path.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.generate import greedy_generate  # noqa: E402
from easytune.models.hf import load_hf_model  # noqa: E402

GOLDEN_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401,
              396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432,
              358, 394, 261, 370, 432, 352]
PROMPT = [1, 17, 42, 5, 99, 63, 8]


@pytest.fixture(scope="module")
def stories260k(shared_data, tmp_path_factory):
    from easytune.models.gguf import convert_gguf

    src = shared_data / "models" / "stories260K" / "stories260K.gguf"
    if not src.is_file():
        pytest.skip(f"{src} not found")
    return load_hf_model(convert_gguf(src, tmp_path_factory.mktemp("stories260K")))


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
