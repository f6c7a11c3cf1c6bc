"""Generation on a device mesh (the 8 simulated CPU devices of tests/conftest.py), NF4 kept quantized.

References:
  * the same ``generate`` without a mesh, on host (numpy) params: sharded decoding (fsdp x tensor, data x fsdp
    x tensor) must give the same tokens, token for token;
  * for an NF4 base, greedy decoding of the dequantized tree (``quant.dequantize_tree``, unsharded): the
    quantized tree on the mesh gives the same tokens, while the decode program's arguments are the NF4 bytes
    (per device), not the float kernels;
  * a QLoRA run's end-of-run sample (``setup.sample``) against the same sample from its dequantized base on one
    device; the run's eval step compiled with the run's shardings.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from easytune import quant
from easytune import sharding as sharding_lib
from easytune.generate import generate, greedy_generate, lower_generate
from easytune.models import llama
from easytune.models.model_config import ModelConfig

PROMPTS = [[1, 5, 9, 33, 7], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [3, 60]]
NEW = 12


def _mesh(data, fsdp, tensor):
    """A (data, fsdp, tensor) mesh over the first ``data * fsdp * tensor`` devices."""
    devices = jax.devices()[:data * fsdp * tensor]
    return sharding_lib.make_mesh(type("M", (), dict(data=data, fsdp=fsdp, tensor=tensor))(), devices)


@pytest.fixture(scope="module")
def tiny():
    """A random Llama (GQA 4/2, untied lm_head) whose kernels every mesh axis divides; host (numpy) params."""
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=None)
    return cfg, jax.device_get(llama.init_params(cfg, jax.random.key(0)))


def _placed(tree, axes, mesh):
    return jax.device_put(tree, sharding_lib.tree_shardings(tree, axes, mesh))


@pytest.mark.parametrize("shape", [(1, 4, 1), (1, 2, 2), (2, 2, 2)])
def test_sharded_generation_equals_unsharded(tiny, shape):
    cfg, params = tiny
    ref = generate(cfg, params, PROMPTS, NEW)
    assert len({tuple(r) for r in ref}) == len(ref) and all(len(r) == NEW for r in ref)  # not degenerate
    mesh = _mesh(*shape)
    placed = _placed(params, llama.param_logical_axes(cfg), mesh)
    assert generate(cfg, placed, PROMPTS, NEW, mesh=mesh) == ref
    # the decode program takes the kernels where they are: split over (fsdp, tensor), not gathered first
    compiled = lower_generate(cfg, placed, PROMPTS, NEW, mesh=mesh).compile()
    gate = compiled.input_shardings[0][0]["params"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert gate.spec == P("fsdp", "tensor" if shape[2] > 1 else None)
    kernels = sum(sharding_lib.per_device_bytes(x, x.sharding) for x in jax.tree_util.tree_leaves(placed))
    assert kernels < sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 3  # sharded, not replicated
    assert abs(compiled.memory_analysis().argument_size_in_bytes - kernels) < 2048  # + prompts [4, 64], eos, settings


def test_sampling_on_a_mesh_equals_unsharded(tiny):
    cfg, params = tiny
    mesh = _mesh(1, 4, 2)
    placed = _placed(params, llama.param_logical_axes(cfg), mesh)
    kw = dict(temperature=0.8, top_k=20, top_p=0.9, rng=jax.random.key(3))
    assert generate(cfg, placed, PROMPTS, NEW, mesh=mesh, **kw) == generate(cfg, params, PROMPTS, NEW, **kw)


@pytest.mark.slow
def test_nf4_base_decodes_quantized_on_the_mesh(tiny):
    """NF4 kernels go into the decode program as they are stored (uint8 codes), split over the mesh; the tokens
    equal greedy decoding of the dequantized float tree without a mesh."""
    cfg, params = tiny
    q = quant.quantize_params(params)
    ref = generate(cfg, jax.device_get(quant.dequantize_tree(q)), PROMPTS, NEW)
    assert generate(cfg, q, PROMPTS, NEW) == ref  # one device, quantized
    mesh = _mesh(1, 4, 2)
    placed = _placed(q, quant.logical_axes(q, llama.param_logical_axes(cfg)), mesh)
    assert generate(cfg, placed, PROMPTS, NEW, mesh=mesh) == ref

    lowered = lower_generate(cfg, placed, PROMPTS, NEW, mesh=mesh)
    args = traverse_util.flatten_dict(lowered.args_info[0][0]["params"])
    gate = args[("model", "layers_0", "mlp", "gate_proj", "kernel")]
    assert isinstance(gate, quant.QTensor) and gate.codes.dtype == np.uint8 and gate.codes.shape == (64 * 128 // 2,)
    float_kernels = [k for k, v in args.items() if k[-1] == "kernel" and not isinstance(v, quant.QTensor)]
    assert float_kernels == [("lm_head", "kernel")]  # quant's default skip list

    def per_device(tree):
        return sum(sharding_lib.per_device_bytes(x, x.sharding) for x in jax.tree_util.tree_leaves(tree))

    deq = _placed(quant.dequantize_tree(q), llama.param_logical_axes(cfg), mesh)
    got = lowered.compile().memory_analysis().argument_size_in_bytes
    full = lower_generate(cfg, deq, PROMPTS, NEW, mesh=mesh).compile().memory_analysis().argument_size_in_bytes
    assert abs(got - per_device(placed)) < 2048 and abs(full - per_device(deq)) < 2048
    assert got < 0.45 * full, (got, full)  # NF4 kernels (4.1 bits) + the float lm_head / embeddings / norms


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.helpers import quickstart_base
    return quickstart_base(tmp_path_factory.mktemp("gen_mesh_base"))


def _qlora_config(base, out, **overrides):
    from tests.helpers import tiny_run_config
    c = tiny_run_config(out, **{
            "method": "qlora", "model.preset": "", "model.path": str(base["model"]),
            "tokenizer.path": str(base["tokenizer"]), "data.builtin": "", "data.train_files": str(base["train"]),
            "data.format": "alpaca",
            "lora.target_modules": "all-linear", "lora.lora_dropout": 0.0, **overrides})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    return c


@pytest.fixture(scope="module")
def qlora_run(base, tmp_path_factory):
    """A QLoRA setup on a (1, 4, 2) mesh over the quickstart base, its LoRA B made non-zero, and its validation
    sequences."""
    from easytune.data import prepare
    from easytune.tokenizer import load_tokenizer
    from easytune.train import setup as setup_lib

    c = _qlora_config(base, tmp_path_factory.mktemp("gen_mesh_run"))
    tokenizer = load_tokenizer(c.tokenizer.path)
    _, val_seqs, _ = prepare.prepare_dataset(c.data, tokenizer)
    setup = setup_lib.build(c, tokenizer, sharding_lib.make_mesh(c.mesh))
    rng = np.random.default_rng(0)
    trainable = jax.tree_util.tree_map_with_path(  # a trained-looking adapter: B != 0
        lambda path, x: jax.device_put(rng.normal(0, 0.05, x.shape).astype(x.dtype), x.sharding)
        if "lora_B" in jax.tree_util.keystr(path) else x, setup.trainable)
    return setup, trainable, val_seqs


@pytest.mark.slow
def test_qlora_sample_on_the_mesh_equals_the_dequantized_reference(qlora_run):
    from easytune import lora as lora_lib
    from easytune.train import setup as setup_lib
    setup, trainable, val_seqs = qlora_run
    assert setup.mesh.shape == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    cfg, variables = setup_lib.decode_variables(setup, trainable)
    codes = variables["params"]["model"]["layers_0"]["mlp"]["gate_proj"]["kernel"].codes
    assert codes.sharding.spec == P(("fsdp", "tensor")) and codes.addressable_shards[0].data.size == codes.size // 8

    host = jax.device_get(lora_lib.combine(trainable, quant.dequantize_tree(setup.frozen)))
    prompt = [1, 17, 42, 5, 99, 63, 8]
    ref = greedy_generate(cfg, host["params"], prompt, 16, eos_token_id=[], lora=host["lora"],
                          lora_scale=setup.lora_scale)
    assert len(set(ref)) > 2  # not degenerate
    assert greedy_generate(cfg, variables["params"], prompt, 16, eos_token_id=[], lora=variables["lora"],
                           lora_scale=setup.lora_scale, mesh=setup.mesh) == ref

    # the end-of-run sample: the run's mesh and NF4 base vs the dequantized base on one device
    got = setup_lib.sample(setup, trainable, val_seqs, 16)
    one = _mesh(1, 1, 1)
    reference_setup = dataclasses.replace(setup, frozen={"params": host["params"]}, mesh=one)
    want = setup_lib.sample(reference_setup, {"lora": host["lora"]}, val_seqs, 16)
    assert got is not None and got["generated"] and got == want


def test_eval_step_runs_with_the_runs_shardings(qlora_run):
    """The train loop's eval step (``jit_steps``) takes the NF4 base and the adapter where ``build`` put them."""
    from easytune.train import optim as optim_lib
    from easytune.train import setup as setup_lib
    from easytune.train.batches import SEQ_KEYS
    setup, trainable, _ = qlora_run
    tx, _ = optim_lib.make_optimizer(setup.config.optim, 10, 1)
    state = setup_lib.init_state(setup, tx, 0)
    _, eval_fn = setup_lib.jit_steps(setup, state, setup_lib.step_spec(setup, tx))
    batch = {k: jax.ShapeDtypeStruct((8, 32), np.float32 if k == "loss_mask" else np.int32) for k in SEQ_KEYS}
    compiled = eval_fn.lower(trainable, setup.frozen, batch).compile()
    t_sh, f_sh, b_sh = compiled.input_shardings[0]
    want = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x.sharding, setup.frozen))
    assert [s.spec for s in jax.tree_util.tree_leaves(f_sh)] == [s.spec for s in want]
    assert b_sh["input_ids"].spec == P(("data", "fsdp", "expert"), None)


@pytest.mark.slow
def test_scanned_qlora_run_samples_and_generates_on_its_mesh(base, tmp_path):
    """A QLoRA run with ``model.scan_layers`` trained on a (1, 4, 2) mesh: its end-of-run sample and
    ``easytune generate RUN_DIR`` (``generate_from_dir``: reload on every device, per-layer trees placed with
    their shardings, NF4 kept) equal decoding the reloaded, dequantized tree on one device."""
    from easytune import generate as generate_lib
    from easytune import lora as lora_lib
    from easytune.train import loop
    from easytune.train import setup as setup_lib
    c = _qlora_config(base, tmp_path / "run", **{"model.scan_layers": True, "train.max_steps": 2,
                                                "train.eval_steps": 0, "train.sample_max_new_tokens": 8,
                                                "optim.learning_rate": 3e-3, "optim.warmup_steps": 0})
    summary = loop.train(c, devices=jax.devices())
    assert summary["sample"] is not None and summary["sample"]["generated"]

    prompt = "### Instruction:\nSort the digits.\n\n### Response:\n"
    got = setup_lib.generate_from_dir(tmp_path / "run", [prompt], max_new_tokens=8)
    setup, trainable = setup_lib.load_run(tmp_path / "run")
    assert setup.mesh.size == 8 and not setup.model_cfg.scan_layers
    kernel = setup.frozen["params"]["model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, quant.QTensor) and kernel.codes.sharding.spec == P("fsdp")  # per layer, still split
    host = jax.device_get(lora_lib.combine(trainable, quant.dequantize_tree(setup.frozen)))
    want = generate_lib.generate_text(setup.model_cfg, host["params"], setup.tokenizer, [prompt], 8,
                                      model_dir=str(base["model"]), lora=host["lora"], lora_scale=setup.lora_scale)
    assert got == [prompt + want[0]]
