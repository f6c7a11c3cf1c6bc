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
    assert cli.main(args + ["--config.train.micro_batch_size=-1"]) == 2
    assert "'train.micro_batch_size': must be >= 1" in capsys.readouterr().err
