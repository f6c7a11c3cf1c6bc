"""The memory/FLOP estimator (easytune/estimate.py) against published figures and XLA's compiled step.

References: EleutherAI "Transformer Math 101" (16 bytes/param mixed-precision AdamW: Llama-2-7B full
fine-tuning 112-192 GB with activations); Dettmers et al. 2023 (QLoRA: a 65B model fine-tuned on one 48 GB
GPU); Hugging Face's Llama-2-7b-hf (6,738,415,616 parameters) and LLaMA-65B config.json values; XLA's own
``compiled.memory_analysis()`` of the real train step.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from easytune import cli
from easytune import estimate as est_lib
from easytune.models import hf_config

REPO = pathlib.Path(__file__).resolve().parents[1]

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16"}
LLAMA_65B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 64, "vocab_size": 32000, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float16"}


def _bench():
    spec = importlib.util.spec_from_file_location("estimate_vs_compiled", REPO / "bench" / "estimate_vs_compiled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["full-fp32-b8x64", "lora-fp32-b8x64", "qlora-fp32-b4x128"])
@pytest.mark.slow
def test_within_25_percent_of_xla_compiled_step(name):
    estimate, compiled = _bench().compare(name)
    assert abs(estimate / compiled - 1) < 0.25, (name, estimate, compiled)


def test_llama2_7b_full_fine_tuning_in_the_quoted_range():
    cfg = hf_config.config_from_hf(LLAMA2_7B)
    est = est_lib.estimate(cfg, method="full", micro_batch_size=1, sequence_len=2048, dtype="float32",
                           compute_dtype="bfloat16", remat=True)
    assert est.params == 6_738_415_616                       # Llama-2-7b-hf's parameter count
    assert est.reference_16_bytes / 1e9 == pytest.approx(107.8, abs=0.1)
    assert 112e9 <= est.total <= 192e9, est.total / 1e9       # Transformer Math's quoted range
    assert est.weights + est.gradients + est.optimizer == 20 * est.params   # fp32 w, g, mu, nu, acc
    assert est.flops_per_step == 6 * est.params * 2048
    # on 8 devices with fsdp=8 the per-device states are 1/8
    est8 = est_lib.estimate(cfg, method="full", micro_batch_size=1, sequence_len=2048, mesh=(1, 8, 1),
                            dtype="float32", compute_dtype="bfloat16", remat=True)
    assert est8.optimizer * 8 == pytest.approx(est.optimizer)
    assert est8.flops_per_step == 8 * est.flops_per_step


def test_qlora_65b_fits_48gb_at_batch_1():
    cfg = hf_config.config_from_hf(LLAMA_65B)
    est = est_lib.estimate(cfg, method="qlora", micro_batch_size=1, sequence_len=512, dtype="bfloat16",
                           compute_dtype="bfloat16", remat=True, lora_r=16)
    assert est.params / 1e9 == pytest.approx(65.29, abs=0.01)
    bits = 8 * (est.weights - 2 * (cfg.vocab_size * cfg.hidden_size * 2 + cfg.hidden_size * 161)
                - 4 * est.trainable_params) / est.quantized_params
    assert bits == pytest.approx(4.127, abs=0.01)
    assert est.total < 48 * 2**30, est.total / 2**30
    assert est.flops_per_step == 4 * est.params * 512 + 6 * est.trainable_params * 512
    # per-layer dequantization (as bitsandbytes): one decoder layer's kernels in bf16 are live at a time
    h, f = cfg.hidden_size, cfg.intermediate_size
    assert est.dequantized == 2 * (4 * h * h + 3 * h * f)


def test_cli_reports_fit_and_what_to_change(tmp_path, capsys):
    model = tmp_path / "llama2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    cfg = REPO / "configs" / "stories260k_lora.py"
    args = ["estimate", str(cfg), f"--config.model.path={model}", "--config.method=full",
            "--config.data.sequence_len=2048", "--config.train.micro_batch_size=1", "--device", "a100-80"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "params 6,738,415,616" in out and "does NOT fit" in out
    assert "--config.method=qlora" in out and "more fsdp" in out
    assert cli.main(args[:-2] + ["--device", "h100", "--num-devices", "8", "--config.mesh.fsdp=-1",
                                 "--config.model.remat=full"]) == 0
    assert "-> fits" in capsys.readouterr().out
    assert cli.main(args[:-2] + ["--device", "tpu-v9"]) == 2
    assert "unknown device 'tpu-v9'" in capsys.readouterr().err
    assert cli.main(args + ["--num-devices", "0"]) == 2
    assert "--num-devices must be >= 1" in capsys.readouterr().err
    # the model.* keys train refuses are refused here too, naming the key
    assert cli.main(args + ["--config.model.attention=flash"]) == 2
    assert "config key 'model.attention': must be one of" in capsys.readouterr().err
    assert cli.main(args + ["--config.model.attention_block=8"]) == 2
    assert "config key 'model.attention_block': must be an integer >= 16" in capsys.readouterr().err
    assert cli.main(args + ["--config.train.micro_batch_size=-1"]) == 2
    assert "'train.micro_batch_size': must be >= 1" in capsys.readouterr().err


LLAMA_3_2_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": True,
                "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                "torch_dtype": "bfloat16"}


def _est(cfg, seq, **kw):
    kw = {"method": "lora", "micro_batch_size": 1, "lora_r": 16, "dtype": "bfloat16",
          "compute_dtype": "bfloat16", **kw}
    return est_lib.estimate(cfg, sequence_len=seq, **kw)


def test_blockwise_attention_drops_the_quadratic_term():
    cfg = hf_config.config_from_hf(LLAMA_3_2_1B)
    a, L, s, block = 32, 16, 4096, 512
    xla, auto = _est(cfg, s, attention="xla"), _est(cfg, s)     # "auto" beyond one block: blockwise
    assert (xla.attention, auto.attention) == ("xla", "linear")
    per_layer = 8 * a * s * s - 4 * a * s                          # [T, S] probabilities -> row log-sum-exp
    assert xla.activations_no_remat - auto.activations_no_remat == pytest.approx(
        (L + 1) * per_layer - 4 * a * block * block)
    # one block or less: "auto" is the unblocked attention, as easytune.models.attend.resolve
    assert _est(cfg, 512).attention == "xla" and _est(cfg, 513).attention == "linear"
    assert _est(cfg, 4096, attention="blockwise").activations == auto.activations
    # issue 17's bound: at most 4.5x the memory for 4x the length (with or without remat)
    for remat in (False, True):
        short, long = _est(cfg, 1024, remat=remat), _est(cfg, 4096, remat=remat)
        assert long.activations <= 4.5 * short.activations
        assert _est(cfg, 4096, remat=remat, attention="xla").activations > 4.5 * _est(
            cfg, 1024, remat=remat, attention="xla").activations


def test_chunked_loss_holds_one_chunk_of_logits():
    cfg = hf_config.config_from_hf(LLAMA_3_2_1B)
    whole, chunked = _est(cfg, 2048), _est(cfg, 2048, loss_chunk_tokens=1024)
    assert whole.activations - chunked.activations == pytest.approx(3 * 4 * (2048 - 1024) * cfg.vocab_size)
    assert _est(cfg, 512, loss_chunk_tokens=1024).activations == _est(cfg, 512).activations


def test_host_activations_ignore_remat():
    cfg = hf_config.config_from_hf(LLAMA_3_2_1B)
    host = _est(cfg, 2048, remat=True, host=True, loss_chunk_tokens=1024)
    assert host.activations == host.activations_no_remat == _est(
        cfg, 2048, remat=False, host=True, loss_chunk_tokens=1024).activations
    h, f, ke, v = 2048, 8192, 512, cfg.vocab_size
    per_layer = 4 * 2048 * (10 * h + 3 * ke + 5 * f) + 4 * 32 * 2048
    assert host.activations == pytest.approx(17 * per_layer + 2 * 4 * 1024 * v + 4 * v * h + 4 * 32 * 512 * 512)


@pytest.mark.slow
def test_host_activations_within_20_percent_of_xla_cpu():
    """The host count against XLA:CPU's compiled LoRA step (``memory_analysis`` temp) of Llama-3.2-1B's shape
    with 2 layers (the shape bench/billion.py runs with 16), bfloat16, remat, blockwise, loss chunks."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from easytune import lora as lora_lib
    from easytune.models import llama
    from easytune.train import step as step_lib
    cfg = dataclasses.replace(hf_config.config_from_hf(LLAMA_3_2_1B), num_hidden_layers=2, dtype="bfloat16",
                              compute_dtype="bfloat16", remat="full")
    lcfg = lora_lib.LoraConfig(r=16, lora_alpha=32)

    def make():
        p = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), llama.init_params(cfg, jax.random.PRNGKey(0)))
        return lora_lib.split(p, lora_lib.init_lora(p, lcfg, jax.random.PRNGKey(1)))

    trainable, frozen = jax.eval_shape(make)  # abstract: nothing is allocated
    model = llama.LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    batch = {"input_ids": ids, "target_ids": ids, "segment_ids": ids, "positions": ids,
             "loss_mask": jax.ShapeDtypeStruct((1, 2048), jnp.float32)}

    def grad(t, f, b):
        return jax.grad(lambda t: step_lib.token_loss_sum(model, lora_lib.combine(t, f), b, chunk_tokens=1024)[0])(t)

    temp = jax.jit(grad).lower(trainable, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    est = _est(cfg, 2048, remat=True, host=True, loss_chunk_tokens=1024)
    assert abs(est.activations / temp - 1) < 0.2, (est.activations, temp)


def test_stage_peaks_from_the_code_that_runs(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_3_2_1B))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)  # only its size is read
    cfg_file = REPO / "configs" / "stories260k_lora.py"
    over = [f"--config.model.path={model}", "--config.model.dtype=bfloat16", "--config.data.sequence_len=2048",
            "--config.train.micro_batch_size=1"]
    from easytune import config as config_lib
    peaks = {}
    for method in ("lora", "qlora"):
        config = config_lib.apply_overrides(config_lib.load_config(cfg_file), over + [f"--config.method={method}"])
        est = est_lib.estimate_config(config, host=True)
        p = peaks[method] = est_lib.stage_peaks(config)
        rt = est_lib.HOST_RUNTIME
        assert p["load"] == rt["load"] + est.weights + 1000
        assert p["train"] == max(p["load"], rt["train"] + est.total)
        kernels = est.params - 128256 * 2048 - 2048 * 33   # every linear kernel: params - embedding - norms
        assert kernels == 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
        float_bytes = 4 * est.quantized_params + 2 * (kernels - est.quantized_params)  # NF4 -> float32
        assert p["export"] == rt["export"] + est.weights + 4 * est.quantized_params + 2 * float_bytes
    h, v, n = 2048, 128256, peaks["lora"]
    kernels = 16 * (2 * h * h + 2 * h * 512 + 3 * h * 8192)   # q, o; k, v; gate, up, down
    assert n["sample"] == pytest.approx(rt["sample"] + est_lib.estimate_config(
        config_lib.apply_overrides(config_lib.load_config(cfg_file), over), host=True).weights
        + 3 * 45_090_816 + 4 * kernels + 3 * 4 * v * h, rel=1e-3)
    # QLoRA decodes with the kernels dequantized to float32 (dequantize_tree): those, and no copies of them
    q = est_lib.estimate_config(config, host=True)
    assert q.quantized_params == kernels
    assert peaks["qlora"]["sample"] == rt["sample"] + q.weights + q.optimizer + 4 * kernels + 3 * 4 * v * h
    assert cli.main(["estimate", str(cfg_file), *over]) == 0                 # --device cpu is the default
    out = capsys.readouterr().out
    assert "activations (XLA:CPU: remat changes nothing)" in out
    assert "peak memory by stage on this CPU" in out and "train step" in out
