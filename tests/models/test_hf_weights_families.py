"""easytune.models.hf_weights for the families beyond Llama (Qwen3, Gemma 2/3, Phi-3, Mixtral, Qwen3-MoE): tiny
random transformers models saved with ``save_pretrained`` load here, ``params_to_state_dict`` gives back exactly the
tensors on disk (names, shapes, values; experts one tensor per expert), ``save_hf_model`` writes a dir transformers
loads with the same state dict, the fused expert tensors of transformers v5's module tree load too, a missing
expert is named, QLoRA quantizes the experts (each on its own, as ``quant.quantize`` of that expert) and keeps the
routers in float, and ``easytune modules`` lists the experts with total and active parameter counts.

Reference: ``transformers.AutoModelForCausalLM`` v5 (``save_pretrained`` / ``from_pretrained``, CPU, float32);
``conversion_mapping.py`` for the fused layout. Parameter round trips are exact; NF4 bounds as
``tests/test_quant.py``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easytune import quant  # noqa: E402
from easytune.models import hf_weights  # noqa: E402
from easytune.models.hf_weights import (  # noqa: E402
    load_hf_model,
    load_hf_quantized,
    parameter_shapes,
    params_to_state_dict,
    save_hf_model,
)

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    # layer 1 is dense (mlp_only_layers), layer 0 sparse
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=16, mlp_only_layers=[1]),
}
MOE = ("mixtral", "qwen3_moe")


def _hf_model(family):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``family -> (model dir, transformers model)``, each saved once with ``save_pretrained``."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            model = _hf_model(family)
            model.save_pretrained(path)
            cache[family] = path, model
        return cache[family]
    return get


def _on_disk(path):
    return safetensors.numpy.load_file(path / "model.safetensors")


def _flat(tree):
    """``{flax path: leaf}``, QTensors (of arrays or of logical-axes tuples) as leaves."""
    return {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: quant.is_qtensor(x) or isinstance(x, tuple))[0]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_then_state_dict_is_the_checkpoint(saved, family):
    """load_hf_model of a save_pretrained dir, then params_to_state_dict: the same names, shapes and values as
    the safetensors file; parameter_shapes lists exactly those names and shapes (per expert for MoE)."""
    path, _ = saved(family)
    config, params = load_hf_model(path)
    assert config.model_type == family and config.is_moe == (family in MOE)
    disk = _on_disk(path)
    sd = params_to_state_dict(params, config)
    assert set(sd) == set(disk)
    for name, array in disk.items():
        assert sd[name].dtype == array.dtype and sd[name].shape == array.shape, name
        np.testing.assert_array_equal(sd[name], array, err_msg=name)
    assert {n: s for n, (_, s) in parameter_shapes(config).items()} == {n: a.shape for n, a in disk.items()}
    if family.startswith("gemma"):
        assert "lm_head.weight" not in disk and "lm_head" not in params
    if family in MOE:
        x, d = config.num_experts, config.hidden_size
        f = config.moe_intermediate_size
        mlp = params["model"]["layers_0"]["mlp"]
        assert mlp["experts"]["gate_proj"].shape == mlp["experts"]["up_proj"].shape == (x, d, f)
        assert mlp["experts"]["down_proj"].shape == (x, f, d)
        block, w_gate = ("block_sparse_moe", "w1") if family == "mixtral" else ("mlp", "gate_proj")
        np.testing.assert_array_equal(mlp["experts"]["gate_proj"][3],
                                      disk[f"model.layers.0.{block}.experts.3.{w_gate}.weight"].T)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_dir_loads_in_transformers_with_the_same_state_dict(saved, family, tmp_path):
    """save_hf_model writes what AutoModelForCausalLM.from_pretrained loads with no missing/unexpected keys and a
    state dict equal to the original model's (v5 merges the per-expert tensors into its fused params itself)."""
    path, model = saved(family)
    config, params = load_hf_model(path)
    save_hf_model(params, config, tmp_path)
    assert set(_on_disk(tmp_path)) == set(_on_disk(path))
    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                                   dtype=torch.float32)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info[key])
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", MOE)
def test_fused_v5_expert_tensors_load(saved, family, tmp_path):
    """A checkpoint holding transformers v5's module-tree tensors (``mlp.experts.gate_up_proj [X, 2F, D]``,
    ``mlp.experts.down_proj [X, D, F]``, Mixtral's router as ``mlp.gate.weight``) loads to the same params."""
    path, model = saved(family)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd and "model.layers.0.mlp.gate.weight" in sd
    hf_weights.write_safetensors(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    _, fused = load_hf_model(tmp_path)
    _, ref = load_hf_model(path)
    jax.tree.map(np.testing.assert_array_equal, fused, ref)
    # the same parameter twice (fused next to per-expert tensors; the router under both names) is refused
    disk = _on_disk(path)
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for extra in ({"model.layers.0.mlp.experts.gate_up_proj": sd["model.layers.0.mlp.experts.gate_up_proj"]},
                  {"model.layers.0.mlp.gate.weight": sd["model.layers.0.mlp.gate.weight"]} if block != "mlp" else {}):
        if extra:
            hf_weights.write_safetensors({**disk, **extra}, tmp_path / "model.safetensors")
            with pytest.raises(ValueError, match="a second time"):
                load_hf_model(tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_missing_or_misshapen_expert_is_named(saved, family, tmp_path):
    path, _ = saved(family)
    disk = _on_disk(path)
    block, w_up = ("block_sparse_moe", "w3") if family == "mixtral" else ("mlp", "up_proj")
    victim = f"model.layers.0.{block}.experts.2.{w_up}.weight"
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    hf_weights.write_safetensors({k: v for k, v in disk.items() if k != victim}, tmp_path / "model.safetensors")
    shape = list(disk[victim].shape)
    with pytest.raises(ValueError, match=re.escape(f"missing tensors in checkpoint (name [expected shape]): "
                                                   f"{victim} {shape}")):
        load_hf_model(tmp_path)
    bad = {**disk, victim: np.zeros((shape[0] + 1, shape[1]), np.float32)}
    hf_weights.write_safetensors(bad, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"shape mismatch for tensor {victim!r}")):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("family", MOE)
def test_qlora_loader_quantizes_experts_one_by_one_and_keeps_routers_float(saved, family):
    """load_hf_quantized: each stacked expert param is one QTensor of shape (X, in, out) whose expert e is
    ``quant.quantize`` of that expert's tensor (bit for bit, the same as quantize_params of the float params);
    dequantize gives [X, in, out] within NF4 error; the router stays a float array; the export side
    (dequantize_tree, then params_to_state_dict) gives per-expert tensors of the checkpoint's shapes."""
    path, _ = saved(family)
    config, params = load_hf_model(path)
    _, qparams = load_hf_quantized(path)
    flat, qflat = _flat(params), _flat(qparams)
    ref = _flat(quant.quantize_params(params))
    for key, q in qflat.items():
        if quant.is_qtensor(q):
            for field in ("codes", "absmax", "absmax_scale", "offset"):
                np.testing.assert_array_equal(getattr(q, field), getattr(ref[key], field), err_msg=str(key))
        else:
            np.testing.assert_array_equal(q, ref[key], err_msg=str(key))
    router = ("model", "layers_0", "mlp", "gate", "weight")
    assert not quant.is_qtensor(qflat[router]) and qflat[router].dtype == np.float32
    x = config.num_experts
    for proj in quant.EXPERT_KERNELS:
        key = ("model", "layers_0", "mlp", "experts", proj)
        q, w = qflat[key], flat[key]
        assert quant.is_qtensor(q) and q.shape == w.shape and q.codes.shape[0] == x and q.offset.shape == (x,)
        dequantize = jax.jit(quant.dequantize, static_argnums=1)  # (jit may fuse a multiply-add: compare jit to jit)
        deq = np.asarray(dequantize(q, jnp.float32))
        assert deq.shape == w.shape
        for e in range(x):
            one = quant.quantize(w[e], hf_layout=False)
            np.testing.assert_array_equal(deq[e], np.asarray(dequantize(one, jnp.float32)))
            # NF4: at most half the widest code gap (-1 to -0.696: 0.152) times the 64-block's absmax (blocks over
            # the HF layout [out, in] flattened), plus the double quantization's rounding of that absmax
            err, ref_w = (np.swapaxes(a, 0, 1).reshape(-1, quant.BLOCKSIZE) for a in (deq[e] - w[e], w[e]))
            assert np.all(np.abs(err).max(1) <= 0.16 * np.abs(ref_w).max(1))
        np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize_hf)(q)), np.swapaxes(deq, 1, 2))
    sd = params_to_state_dict(quant.dequantize_tree(qparams), config)
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in _on_disk(path).items()}


def test_expert_qtensor_logical_axes_keep_the_expert_axis(saved):
    path, _ = saved("qwen3_moe")
    config, qparams = load_hf_quantized(path)
    from easytune.models import llama
    axes = _flat(quant.logical_axes(qparams, llama.param_logical_axes(config)))
    q = axes[("model", "layers_0", "mlp", "experts", "down_proj")]
    assert (q.codes, q.absmax, q.absmax_scale, q.offset) == (("expert", "nf4_codes"), ("expert", "nf4_blocks"),
                                                             ("expert", None), ("expert",))
    assert axes[("model", "layers_1", "mlp", "down_proj", "kernel")].codes == ("nf4_codes",)


@pytest.mark.parametrize("family", MOE)
def test_modules_report_lists_experts_and_active_parameters(saved, family):
    """``easytune modules``: every tensor on disk (per expert) with its shape, only attention/dense projections
    marked for all-linear (routers and experts are not linear modules), total and per-token active counts."""
    from easytune.models.modules import modules_report
    path, model = saved(family)
    lines = modules_report(path).splitlines()
    disk = _on_disk(path)
    rows = {line.split()[0]: line for line in lines if line.startswith(("model.", "lm_head"))}
    assert set(rows) == set(disk)
    for name, array in disk.items():
        assert str(list(array.shape)) in rows[name]
        linear = re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", name) and ".experts." not in name
        assert rows[name].endswith("<- LoRA target") == bool(linear), rows[name]
    total = sum(p.numel() for p in model.parameters())
    hf = model.config
    x, k = (hf.num_local_experts, hf.num_experts_per_tok) if family == "mixtral" else (hf.num_experts,
                                                                                       hf.num_experts_per_tok)
    experts = sum(a.size for n, a in disk.items() if ".experts." in n)
    active = total - experts + experts * k // x
    sparse = 2 if family == "mixtral" else 1
    assert lines[0].startswith(f"{family} model, {total:,} parameters, {active:,} active per token ({k} of {x} "
                               f"experts in {sparse} sparse layers)"), lines[0]
    n_linear = 4 * 2 + (0 if family == "mixtral" else 3) + 1  # attention, qwen3_moe's dense layer 1, lm_head
    assert f"{n_linear - 1} of {n_linear} linear modules selected" in lines[-1]
    assert "routers (mlp.gate) and experts (mlp.experts) are not linear modules: target_modules never" in lines[-1]


def test_dense_report_has_no_active_count(saved):
    """A dense model's first line gives one parameter count (no per-token active count); Phi-3's fused
    projections are listed and marked as the linear modules they are."""
    from easytune.models.modules import modules_report
    path, model = saved("phi3")
    lines = modules_report(path).splitlines()
    assert lines[0].startswith(f"phi3 model, {sum(p.numel() for p in model.parameters()):,} parameters (HF names")
    rows = {line.split()[0]: line for line in lines if line.startswith("model.")}
    assert rows["model.layers.0.self_attn.qkv_proj.weight"].endswith("<- LoRA target")
    assert rows["model.layers.1.mlp.gate_up_proj.weight"].endswith("<- LoRA target")
    assert lines[-1] == "8 of 9 linear modules selected"


def test_qapply_on_stacked_experts_equals_the_dequantized_computation():
    """quant.qapply (dequantize inside, recompute in the backward pass) over a tuple of stacked expert QTensors:
    the same value and input gradient as computing with the dequantized [X, in, out] kernels; set_expert refuses
    a kernel of another shape."""
    rng = np.random.default_rng(0)
    up = rng.standard_normal((4, 32, 16)).astype(np.float32) * 0.05
    down = rng.standard_normal((4, 16, 32)).astype(np.float32) * 0.05
    q = (quant.quantize(up, hf_layout=False), quant.quantize(down, hf_layout=False))
    assert q[0].shape == (4, 32, 16) and q[0].size == up.size
    x = jnp.asarray(rng.standard_normal((4, 3, 32)).astype(np.float32))

    def mlp(x, k):
        return jnp.einsum("xnf,xfd->xnd", jnp.tanh(jnp.einsum("xnd,xdf->xnf", x, k[0])), k[1])

    got = jax.value_and_grad(lambda x: quant.qapply(mlp, x, q, jnp.float32).sum())(x)
    want = jax.value_and_grad(lambda x: mlp(x, tuple(quant.dequantize(k) for k in q)).sum())(x)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="does not fit the stack"):
        quant.set_expert(quant.empty_experts(quant.quantize(up[0]), 4), 0, quant.quantize(down[0]))
