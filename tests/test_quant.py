"""NF4 + double quantization (easytune/quant.py) against the QLoRA paper, bitsandbytes and a NumPy transcription.

References: Dettmers et al. 2023 (QLoRA), section 3 and appendix E; bitsandbytes 0.50 ``quantize_4bit`` /
``dequantize_4bit`` / ``create_dynamic_map`` (compared element for element when bitsandbytes imports).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easytune import quant

REPO = pathlib.Path(__file__).resolve().parents[1]

# QLoRA appendix E, "NF4 data type": the 16 values as printed in the paper.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def _normal_map(offset=0.9677083):
    """QLoRA section 3 / bitsandbytes ``create_normal_map``: 8 positive and 7 negative N(0,1) quantiles
    between ``offset`` and 0.5, an exact zero, normalised by the largest."""
    ppf = statistics.NormalDist().inv_cdf
    pos = [ppf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-ppf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    v = np.sort(np.array(pos + [0.0] + neg))
    return v / v.max()


def _ref_quant_dequant(w_hf, double_quant=True):
    """NumPy transcription of the paper's formulas: blocks of 64 along the flattened [out, in] weight, fp32
    absmax, nearest NF4 value; absmax - mean in blocks of 256 with the nearest dynamic-code value (argmin,
    written independently of easytune's searchsorted)."""
    flat = w_hf.reshape(-1).astype(np.float64)
    n = flat.size
    blocks = np.pad(flat, (0, -n % 64)).reshape(-1, 64)
    c = np.abs(blocks).max(1).astype(np.float32)
    nf4 = np.asarray(PAPER_NF4, np.float32)
    q = np.argmin(np.abs((blocks / c[:, None])[..., None] - nf4), axis=-1)
    if double_quant:
        dyn = quant.DYNAMIC_CODE
        mean = c.mean(dtype=np.float64)
        cc = np.pad(c - mean, (0, -c.size % 256)).reshape(-1, 256)
        s = np.abs(cc).max(1)
        r = np.argmin(np.abs((cc / s[:, None])[..., None] - dyn), axis=-1)
        c = (dyn[r] * s[:, None] + np.float32(mean)).reshape(-1)[:c.size]
    return (nf4[q] * c[:, None]).reshape(-1)[:n].reshape(w_hf.shape)


def test_nf4_code_is_the_papers_table():
    np.testing.assert_array_equal(quant.NF4_CODE, np.asarray(PAPER_NF4, np.float32))
    np.testing.assert_allclose(quant.NF4_CODE, _normal_map(), atol=1e-6)  # and the formula behind it
    assert quant.NF4_CODE[7] == 0.0 and len(set(quant.NF4_CODE.tolist())) == 16


def test_dynamic_code_matches_bitsandbytes():
    code = quant.DYNAMIC_CODE
    assert code.shape == (256,) and code.dtype == np.float32 and np.all(np.diff(code) >= 0)
    assert code[-1] == 1.0 and 0.0 in code and np.isclose(code[0], -0.99296875)
    F = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes rounds a float32 linspace, we round the exact value once: within 1 ulp
    np.testing.assert_allclose(code, F.create_dynamic_map(signed=True).numpy(), rtol=2.4e-7, atol=1e-12)


def test_round_trip_error_and_bits_per_param():
    """N(0,1) 1024 x 1024: round trip equals the NumPy transcription; mean |error| is the figure below;
    storage is 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter."""
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)   # HF layout [out, in]
    q = quant.quantize(w)
    back = np.asarray(quant.dequantize(q)).T          # dequantize gives the model's [in, out]
    np.testing.assert_allclose(back, _ref_quant_dequant(w), atol=1e-6, rtol=0)
    err = np.abs(back - w).mean()
    assert 0.0725 < err < 0.0733, err                 # measured 0.07288 (bitsandbytes: 0.07288, below)
    assert abs(q.bits_per_param - 4.127) < 0.01, q.bits_per_param
    n = w.size
    assert q.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    q_plain = quant.quantize(w, double_quant=False)   # without double quantization: 4 + 32/64
    assert abs(q_plain.bits_per_param - 4.5) < 0.01
    np.testing.assert_allclose(np.asarray(quant.dequantize(q_plain)).T, _ref_quant_dequant(w, False), atol=1e-6)


def test_element_for_element_against_bitsandbytes():
    """bitsandbytes' CPU backend: identical packed NF4 codes and fp32 absmax; with double quantization the
    same mean and per-256 scales, and the same dequantized weights wherever the 8-bit absmax code agrees.

    bitsandbytes' native CPU ``quantize_blockwise`` walks a binary search over the dynamic code that can
    step past the nearest value near a midpoint (CUDA ``dQuantize``); easytune rounds to nearest as the
    paper (and bitsandbytes' pure-torch backend, ``bucketize`` on midpoints) does. That moves 0.14 % of
    the absmax constants by one code step; the overall error is the same to 0.1 %.
    """
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    t = torch.from_numpy(w)
    ref_codes, ref_state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quant.quantize(w, double_quant=False)
    np.testing.assert_array_equal(q.codes, ref_codes.numpy().reshape(-1))
    np.testing.assert_array_equal(q.absmax, ref_state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).T, F.dequantize_4bit(ref_codes, ref_state).numpy())

    ref_codes, ref_state = F.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quant.quantize(w)
    np.testing.assert_array_equal(q.codes, ref_codes.numpy().reshape(-1))
    np.testing.assert_allclose(q.offset, float(ref_state.offset), rtol=1e-6)
    np.testing.assert_allclose(q.absmax_scale, ref_state.state2.absmax.numpy(), rtol=1e-6)
    same = q.absmax == ref_state.absmax.numpy()
    assert same.mean() > 0.995, same.mean()
    ours, theirs = np.asarray(quant.dequantize(q)).T, F.dequantize_4bit(ref_codes, ref_state).numpy()
    rows = np.repeat(same, 64).reshape(w.shape)
    np.testing.assert_allclose(ours[rows], theirs[rows], atol=2e-6, rtol=0)
    e_ours, e_bnb = np.abs(ours - w).mean(), np.abs(theirs - w).mean()
    assert abs(e_ours - e_bnb) < 1e-3 * e_bnb, (e_ours, e_bnb)


def test_odd_shapes_jit_and_dtype():
    """A kernel whose size is not a multiple of 64 (stories260K's 64 x 172 MLP), dequantized under jit in
    bfloat16, equals the NumPy transcription rounded to bfloat16."""
    w = np.random.default_rng(1).standard_normal((172, 64)).astype(np.float32) * 0.02   # [in, out]
    q = quant.quantize(w, hf_layout=False)
    assert q.shape == (172, 64) and q.codes.size == math.ceil(w.size / 64) * 32
    out = jax.jit(quant.dequantize, static_argnums=1)(q, jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (172, 64)
    ref = _ref_quant_dequant(w.T).T.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(ValueError, match="2-D kernel"):
        quant.quantize(np.zeros(8))
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.quantize(np.full((2, 64), np.nan))


def _dequantize_before(q, dtype):
    """quant.dequantize as it was before the per-nibble restructure (all n codes looked up first, then scaled
    per block and transposed): the reference that ``dequantize_hf`` / ``dequantize`` must equal bit for bit."""
    in_f, out_f = q.shape
    nb = q.absmax.shape[0]
    codes = jnp.asarray(q.codes)
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1).astype(jnp.int32)
    if q.double_quant:
        scale = jnp.repeat(q.absmax_scale, quant.BLOCKSIZE2,
                           total_repeat_length=q.absmax_scale.shape[0] * quant.BLOCKSIZE2)
        absmax = jnp.asarray(quant.DYNAMIC_CODE)[q.absmax.astype(jnp.int32)] * scale[:nb] + q.offset
    else:
        absmax = jnp.asarray(q.absmax, jnp.float32)
    values = jnp.asarray(quant.NF4_CODE)[idx].reshape(nb, quant.BLOCKSIZE) * absmax[:, None]
    return values.reshape(-1)[:in_f * out_f].reshape(out_f, in_f).T.astype(dtype)


@pytest.mark.parametrize("shape", [(172, 64), (64, 172), (3, 5), (300, 700)])
def test_dequantize_is_bit_identical_to_the_lookup_of_all_codes(shape):
    """``dequantize`` (and ``dequantize_hf``, its ``[out, in]`` transpose) equal the previous formulation bit
    for bit, with and without double quantization, in float32 and bfloat16, jitted and eager (each against
    the reference run the same way: XLA:CPU may fuse ``DYN * scale + offset`` into one FMA under jit, so jitted
    and eager float32 results may differ by 1 ulp, before as now)."""
    w = np.random.default_rng(2).standard_normal(shape).astype(np.float32) * 0.02   # [in, out]
    for double_quant in (True, False):
        q = quant.quantize(w, hf_layout=False, double_quant=double_quant)
        for dtype in (jnp.float32, jnp.bfloat16):
            for run in (lambda f: f(q, dtype), lambda f: jax.jit(f, static_argnums=1)(q, dtype)):
                ref = np.asarray(run(_dequantize_before).astype(jnp.float32))
                got = run(quant.dequantize)
                assert got.dtype == dtype and got.shape == shape
                assert np.asarray(got.astype(jnp.float32)).tobytes() == ref.tobytes(), (double_quant, dtype)
                hf = np.asarray(run(quant.dequantize_hf).astype(jnp.float32))
                assert hf.tobytes() == np.ascontiguousarray(ref.T).tobytes()


def test_qmatmul_and_its_gradient_equal_the_dequantized_matmul():
    """``qmatmul`` (the ``[out, in]`` kernel contracted on its last axis, dequantized again in the backward
    pass) gives ``x @ dequantize(q)`` and ``dx = dy @ dequantize(q).T`` within float32 rounding, under jit."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((172, 64)).astype(np.float32) * 0.02
    q = quant.quantize(w, hf_layout=False)
    x = rng.standard_normal((2, 5, 172)).astype(np.float32)
    dy = rng.standard_normal((2, 5, 64)).astype(np.float32)
    kernel = np.asarray(quant.dequantize(q), np.float64)

    @jax.jit
    def f(x, q, dy):
        y, pull = jax.vjp(lambda x: quant.qmatmul(x, q, jnp.float32), x)
        return y, pull(dy)[0]
    y, dx = f(x, q, dy)
    assert y.dtype == jnp.float32 and y.shape == (2, 5, 64) and dx.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), x @ kernel, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), dy @ kernel.T, rtol=0, atol=1e-6)

@pytest.mark.slow
def test_sharded_over_fsdp_equals_one_device():
    """A tiny Llama with NF4 kernels + LoRA: the codes split over fsdp=8 like the float kernels (each device
    holds 1/8), and the loss and LoRA gradients on 8 simulated devices equal one device's within 1e-5."""
    from flax import traverse_util
    from ml_collections import ConfigDict

    from easytune import lora as lora_lib
    from easytune import sharding as sharding_lib
    from easytune.models import llama
    from easytune.models.model_config import ModelConfig
    from easytune.train import step as step_lib

    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    params = quant.quantize_params(llama.init_params(cfg, jax.random.PRNGKey(0)))
    lcfg = lora_lib.LoraConfig(r=4, lora_alpha=8)
    lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
    lora = jax.tree_util.tree_map(lambda x: x + 0.01, lora)  # B != 0, so the base and LoRA both matter
    trainable, frozen = lora_lib.split(params, lora)
    axes = llama.param_logical_axes(cfg)
    t_axes, f_axes = lora_lib.split(axes, sharding_lib.lora_logical_axes(lora, axes))
    f_axes = quant.logical_axes(frozen, f_axes)
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (8, 17)).astype(np.int32)
    batch = dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:], loss_mask=np.ones((8, 16), np.float32),
                 segment_ids=np.ones((8, 16), np.int32), positions=np.tile(np.arange(16, dtype=np.int32), (8, 1)))

    def loss(tr, fr, b):
        out = step_lib.eval_step(tr, fr, b, spec=step_lib.StepSpec(model))
        return out["loss_sum"] / out["tokens"]

    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding_lib.make_mesh(ConfigDict(dict(data=1, fsdp=-1, tensor=1)), devices)
        t_sh = sharding_lib.tree_shardings(trainable, t_axes, mesh)
        f_sh = sharding_lib.tree_shardings(frozen, f_axes, mesh)
        tr, fr = jax.device_put(trainable, t_sh), jax.device_put(frozen, f_sh)
        b = sharding_lib.put_batch(batch, mesh)
        value, grads = jax.jit(jax.value_and_grad(loss))(tr, fr, b)
        results.append((float(value), jax.device_get(grads)))
        q = traverse_util.flatten_dict(fr["params"])[("model", "layers_0", "self_attn", "q_proj", "kernel")]
        assert quant.is_qtensor(q)
        shard = q.codes.addressable_shards[0].data.shape[0]
        assert shard == q.codes.shape[0] // len(devices), (shard, q.codes.shape)
        assert q.absmax.addressable_shards[0].data.shape[0] == q.absmax.shape[0] // len(devices)
    (v1, g1), (v8, g8) = results
    np.testing.assert_allclose(v8, v1, atol=1e-5, rtol=0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), g8, g1)


@pytest.mark.slow
def test_stories260k_qlora_trains_and_merged_export_is_dequant_plus_adapter(shared_data, tmp_path):
    """The real stories260K (GGUF -> HF dir), QLoRA on a slice of Tiny Shakespeare: validation loss falls, the
    NF4 kernels hold 4.127 bits/param, and the merged export equals dequant(quant(W)) + scale * B @ A built
    from the HF weights and the exported PEFT adapter (NumPy transcription above)."""
    import safetensors.numpy

    from easytune import cli
    model_dir = tmp_path / "stories260K"
    assert cli.main(["convert", str(shared_data / "models" / "stories260K" / "stories260K.gguf"), str(model_dir)]) == 0
    text = (shared_data / "corpus" / "tinyshakespeare" / "input.txt").read_text()[:60_000]
    (tmp_path / "shakespeare.txt").write_text(text)
    out = tmp_path / "run"
    assert cli.main(["train", str(REPO / "configs" / "stories260k_qlora.py"), f"--config.model.path={model_dir}",
                     f"--config.data.train_files={tmp_path / 'shakespeare.txt'}", f"--config.train.output_dir={out}",
                     "--config.train.max_steps=10", "--config.train.micro_batch_size=1",
                     "--config.train.gradient_accumulation_steps=2", "--config.data.sequence_len=64",
                     "--config.data.val_set_size=16", "--config.train.eval_steps=0", "--config.train.save_steps=0",
                     "--config.train.sample_max_new_tokens=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.3, summary
    assert cli.main(["export", str(out), "--merged", str(tmp_path / "merged"), "--adapter", str(tmp_path / "ad")]) == 0

    base = safetensors.numpy.load_file(model_dir / "model.safetensors")
    merged = safetensors.numpy.load_file(tmp_path / "merged" / "model.safetensors")
    adapter = safetensors.numpy.load_file(tmp_path / "ad" / "adapter_model.safetensors")
    acfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    scale = acfg["lora_alpha"] / acfg["r"]
    checked = 0
    for name, w in base.items():
        module = name[:-len(".weight")]
        key = f"base_model.model.{module}.lora_A.weight"
        if key in adapter:           # an NF4 kernel with LoRA: W' = dequant(quant(W)) + scale * B @ A
            ref = _ref_quant_dequant(w) + scale * adapter[key.replace("lora_A", "lora_B")] @ adapter[key]
            np.testing.assert_allclose(merged[name], ref, atol=1e-5, rtol=0, err_msg=name)
            assert not np.allclose(merged[name], w, atol=1e-4)   # it really went through NF4
            checked += 1
        else:                        # embeddings, norms (and lm_head, kept in float) unchanged
            np.testing.assert_array_equal(merged[name], w, err_msg=name)
    assert checked == 5 * 7
