"""easytune.models.hf_weights against transformers: checkpoints written here load in transformers with no
missing/unexpected keys and the same logits; transformers' own (sharded, safetensors or .bin) checkpoints load
here; broken checkpoints are refused naming the file or tensor.

Reference: ``transformers.AutoModelForCausalLM`` (eager attention, CPU, float32). Tolerance: 1e-4 max
abs on float32 logits (whole model); parameter round trips are exact.
"""

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune.models.hf_weights import (  # noqa: E402
    load_hf_model,
    params_to_state_dict,
    save_hf_model,
    state_dict_to_params,
)
from easytune.models.llama import LlamaForCausalLM, init_params  # noqa: E402
from easytune.models.model_config import ModelConfig  # noqa: E402

TOL = 1e-4
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
IDS = np.random.default_rng(0).integers(0, 128, (2, 16)).astype(np.int32)


def random_params(config, seed=0):
    """Numpy params with O(1) activations (std 0.15; norms around 1), in config.dtype."""
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        norm = path[-1].key == "weight"
        x = (1.0 if norm else 0.0) + (0.1 if norm else 0.15) * rng.standard_normal(s.shape)
        return x.astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def et_logits(config, params, ids=IDS):
    apply = jax.jit(lambda p, x: LlamaForCausalLM(config).apply({"params": p}, x))
    return np.asarray(apply(params, jnp.asarray(ids)))


def hf_load(path, **kw):
    """transformers model from ``path`` (eager attention) and its loading info."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, **kw)
    return model.eval(), info


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def assert_clean(info):
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_model_loads_in_transformers(tmp_path, tied):
    config = ModelConfig(**TINY, tie_word_embeddings=tied, attention_bias=True)
    params = random_params(config)
    save_hf_model(params, config, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    assert hf_config["dtype"] == hf_config["torch_dtype"] == "float32"
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    model, info = hf_load(tmp_path, dtype=torch.float32)
    assert_clean(info)
    assert model.config.tie_word_embeddings == tied
    np.testing.assert_allclose(et_logits(config, params), hf_logits(model), atol=TOL, rtol=0)


def test_sharded_save_loads_in_transformers_and_back(tmp_path):
    config = ModelConfig(**TINY)
    params = random_params(config, seed=1)
    save_hf_model(params, config, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    sd = params_to_state_dict(params, config)
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in sd.values())
    for shard in shards:  # a shard only exceeds the limit when it holds one tensor
        with safetensors.safe_open(tmp_path / shard, framework="np") as f:
            nbytes = sum(f.get_tensor(k).nbytes for k in f.keys())
            assert nbytes <= 40_000 or len(list(f.keys())) == 1
    model, info = hf_load(tmp_path, dtype=torch.float32)
    assert_clean(info)
    np.testing.assert_allclose(et_logits(config, params), hf_logits(model), atol=TOL, rtol=0)
    config2, params2 = load_hf_model(tmp_path)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bfloat16_round_trip(tmp_path):
    """bfloat16 params are written as BF16 safetensors that transformers and easytune read exactly."""
    config = ModelConfig(**TINY, dtype="bfloat16")
    params = random_params(config, seed=2)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
    save_hf_model(params, config, tmp_path)
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, info = hf_load(tmp_path)  # dtype from config.json
    assert_clean(info)
    assert model.dtype == torch.bfloat16
    q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(q.T, params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
                                  .astype(np.float32))
    config2, params2 = load_hf_model(tmp_path)
    assert config2.dtype == "bfloat16"
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    _, params32 = load_hf_model(tmp_path, dtype=jnp.float32)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params32))


def test_loads_transformers_sharded_checkpoint(tmp_path):
    """A checkpoint written by transformers' save_pretrained in shards loads shard by shard here."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, rope_theta=500.0)).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    config, params = load_hf_model(tmp_path)
    assert config.rope_theta == 500.0
    np.testing.assert_allclose(et_logits(config, params), hf_logits(model), atol=TOL, rtol=0)


def test_mistral_without_sliding_window_matches_transformers(tmp_path):
    torch.manual_seed(0)
    mistral = transformers.MistralConfig(**TINY, sliding_window=None, head_dim=32)
    model = transformers.MistralForCausalLM(mistral).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    config, params = load_hf_model(tmp_path)
    assert config.model_type == "mistral" and config.head_dim == 32
    np.testing.assert_allclose(et_logits(config, params), hf_logits(model), atol=TOL, rtol=0)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    config = ModelConfig(**TINY)
    save_hf_model(random_params(config), config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*\(64, 96\)"
                                         r".*\(64, 80\)"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_file(tmp_path, damage):
    config = ModelConfig(**TINY)
    save_hf_model(random_params(config), config, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt") as info:
        load_hf_model(tmp_path)
    assert isinstance(info.value.__cause__, safetensors.SafetensorError)


def test_corrupt_shard_names_shard(tmp_path):
    config = ModelConfig(**TINY)
    save_hf_model(random_params(config), config, tmp_path, max_shard_bytes=40_000)
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(shard.name) + ".*truncated or corrupt"):
        load_hf_model(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard.name) + ".*not found"):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_file_and_error(tmp_path, name):
    config = ModelConfig(**TINY)
    save_hf_model(random_params(config), config, tmp_path, max_shard_bytes=40_000)
    (tmp_path / name).write_text('{"model_type": "llama",\n')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + r": not valid JSON: "
                                         r"Expecting property name.*line 2 column 1"):
        load_hf_model(tmp_path)
    (tmp_path / name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(name) + ".*expected a JSON object, got list"):
        load_hf_model(tmp_path)

def test_state_dict_key_errors_and_ignored_keys():
    config = ModelConfig(**TINY, tie_word_embeddings=True)
    params = random_params(config)
    sd = params_to_state_dict(params, config)
    assert "lm_head.weight" not in sd
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # torch [out, in]
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32),
             "lm_head.weight": sd["model.embed_tokens.weight"]}  # ignored: buffer, tied head
    jax.tree.map(np.testing.assert_array_equal, state_dict_to_params({**sd, **extra}, config),
                 params)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        state_dict_to_params(missing, config)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj"):
        state_dict_to_params({**sd, "model.layers.2.mlp.up_proj.weight": np.zeros((96, 64))},
                             config)
    bad = {**sd, "model.norm.weight": np.ones(65, np.float32)}
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*\(65,\).*\(64,\)"):
        state_dict_to_params(bad, config)


def _hf_llama(tmp_path, **kw):
    """A tiny random transformers Llama (std 0.15 weights, fp32) -- not saved."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **kw)).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _save_bin(model, path, shards=1):
    """``model`` as transformers 4 ``save_pretrained(safe_serialization=False)`` wrote it (v5 writes only
    safetensors): ``pytorch_model.bin``, or ``pytorch_model-0000i-of-0000n.bin`` shards plus
    ``pytorch_model.bin.index.json``, each shard a ``torch.save``d dict of tensors."""
    model.config.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    names, weight_map = list(sd), {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({names[j]: sd[names[j]] for j in part}, path / file)
        weight_map.update({names[j]: file for j in part})
    (path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin_checkpoints_load(tmp_path, shards):
    """``pytorch_model.bin`` and sharded ``.bin`` + ``pytorch_model.bin.index.json`` give transformers'
    logits (tied embeddings: the saved ``lm_head.weight`` is ignored)."""
    model = _hf_llama(tmp_path, tie_word_embeddings=True)
    _save_bin(model, tmp_path, shards)
    config, params = load_hf_model(tmp_path)
    np.testing.assert_allclose(et_logits(config, params), hf_logits(model), atol=TOL, rtol=0)


def test_bin_bf16_is_bit_exact_and_cast_to_requested_dtype(tmp_path):
    model = _hf_llama(tmp_path).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16  # config.json records "dtype": "bfloat16"
    _save_bin(model, tmp_path)
    _, params = load_hf_model(tmp_path)
    got = params["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    want = model.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want)
    config, params32 = load_hf_model(tmp_path, dtype="float32")
    assert config.dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(params32)} == {np.dtype(np.float32)}


class _Payload:
    """Any class: a pickle naming it runs code on load unless the unpickler is restricted."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_with_custom_object_is_refused(tmp_path, capsys):
    model = _hf_llama(tmp_path)
    model.config.save_pretrained(tmp_path)
    sd = dict(model.state_dict())
    sd["extra"] = _Payload()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: refused to unpickle: it references print.*"
                                         r"weights_only=True"):
        load_hf_model(tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_tensor_names_it_and_its_shape(tmp_path):
    config = ModelConfig(**TINY)
    sd = params_to_state_dict(random_params(config), config)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.weight "
                                         r"\[32, 64\]"):
        state_dict_to_params(sd, config)


def test_cli_modules_lists_hf_names_shapes_and_targets(tmp_path, capsys):
    """``easytune modules``: every tensor of the checkpoint with its HF shape, the selected linear
    modules marked, read from config.json without loading weights (the same names transformers'
    ``named_parameters`` gives)."""
    from easytune import cli
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # not needed: names and shapes come from the config
    assert cli.main(["modules", str(tmp_path), "--target-modules", "q_proj,o_proj"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith(("model.", "lm_head"))}
    want = {n: list(p.shape) for n, p in model.named_parameters()}
    assert set(rows) == set(want)
    for name, shape in want.items():
        assert str(shape) in rows[name]
        is_target = name.endswith(("q_proj.weight", "o_proj.weight"))
        assert rows[name].endswith("<- LoRA target") == is_target, rows[name]
    assert "model.layers.0.self_attn.q_proj.bias" in rows and "o_proj.bias" not in "".join(rows)
    assert any("4 of 15 linear modules selected" in line for line in lines), lines[-3:]


