"""The billion-parameter check on CPU: a Llama-3.2-1B-shaped model loads, takes a LoRA and a QLoRA step at
sequence_len 2048, samples and exports, each stage's peak host memory next to ``easytune estimate``'s figure.

    python bench/billion.py [--tiny] [--work DIR] [--stages load,lora,qlora,sample-lora,sample-qlora,export]
                            [--layers N] [--seq N] [--check]

Setup (this process): ``WORK/model`` gets Llama 3.2 1B's published ``config.json`` (hidden 2048, 16 layers, 32
heads, 8 kv heads, head_dim 64, intermediate 8192, vocab 128256, tied embeddings, ``llama3`` RoPE scaling
factor 32 / low 1 / high 4 / original 8192, rope_theta 500000, rms_norm_eps 1e-5, bfloat16) with random
weights (normal, std 0.02; norms 1) written tensor by tensor into one ``model.safetensors`` (this process
never holds more than one chunk of 16 M values), and the real Llama 2 tokenizer of the shared test data
(32000 tokens, so its ``bos_token_id`` 1 / ``eos_token_id`` 2 replace the published 128000 / 128001);
``WORK/data.txt`` is the start of Tiny Shakespeare (a few training sequences); ``WORK/lora.py`` and
``WORK/qlora.py`` are run configs as a user writes them.

What it takes to fit this machine (24 GiB shared, 2 cores): ``model.dtype = compute_dtype = "bfloat16"``
(the checkpoint's own dtype; float32 params would be 5 GB, and the merged export holds the params more than
once), ``model.remat = "full"`` and ``train.micro_batch_size = 1``; ``train.loss_chunk_tokens`` stays at its
default (no ``[T, V]`` logits of a 128k vocabulary).

Stages, each in a fresh interpreter (``python bench/billion.py --stage NAME``) so that its peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

- ``load``: what ``easytune train`` builds before compiling (``easytune.train.setup.build``: the checkpoint
  read tensor by tensor, LoRA initialised, arrays placed on the device);
- ``lora`` / ``qlora``: ``easytune train WORK/{lora,qlora}.py --config.train.max_steps=1`` (one optimizer
  step of one 2048-token sequence; no evaluation set, no end-of-run sample; the checkpoint is saved);
- ``sample-lora`` / ``sample-qlora``: ``easytune generate RUN_DIR --prompt ... --max-new-tokens 8``;
- ``export``: ``easytune export RUN_DIR --merged ... --adapter ...`` of the LoRA run.

Then a table: stage, peak RSS (GB = 1e9 bytes), :func:`easytune.estimate.stage_peaks`' figure for the stage
(what ``easytune estimate WORK/lora.py`` prints under "peak memory by stage") and their ratio. ``--check``
exits 1 when a ratio is outside 0.8 .. 1.2. The measurements are kept in ``WORK/billion.json``; ``--table-only``
prints them again against the current estimate without running anything. ``--tiny``: the same stages on a
2-layer, hidden-64 model at sequence_len 256 (2-4 minutes here, mostly starting six interpreters;
tests/test_bench_billion.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.model"
TEXT = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
STAGES = ("load", "lora", "qlora", "sample-lora", "sample-qlora", "export")
PROMPT = "To be, or not to be"
CHUNK = 1 << 24  # values generated at a time while writing the checkpoint

# Llama 3.2 1B's config.json (meta-llama/Llama-3.2-1B), except the special ids, which are the tokenizer's
LLAMA_3_2_1B = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
}
# --tiny: the same family at a size whose stages take seconds each (vocab = the tokenizer's)
TINY = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 32000}

CONFIG_PY = '''"""{title} of the Llama-3.2-1B-shaped model of bench/billion.py (written by it)."""

from easytune.config import defaults


def get_config():
    c = defaults()
    c.method = "{method}"
    c.model.path = "{model}"
    c.model.dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.r = 16
    c.lora.lora_alpha = 32
    c.lora.target_modules = "all-linear"
    c.data.train_files = ["{data}"]
    c.data.format = "text"
    c.data.sequence_len = {seq}
    c.data.val_set_size = 0
    c.data.dataset_prepared_path = "{prepared}"
    c.train.micro_batch_size = 1
    c.train.max_steps = 1
    c.train.sample_max_new_tokens = 0
    c.train.output_dir = "{run}"
    return c
'''


# ----------------------------------------------------------------------------------------------- setup


def hf_config(tiny: bool, layers: int | None) -> dict:
    """The model's ``config.json`` dict: Llama 3.2 1B's, or :data:`TINY`'s dims over it; ``layers`` overrides
    ``num_hidden_layers``."""
    cfg = dict(LLAMA_3_2_1B, **(TINY if tiny else {}))
    if layers:
        cfg["num_hidden_layers"] = int(layers)
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> torch shape ``[out, in]`` of every parameter of a Llama ``config.json``."""
    h, f, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * e, cfg["num_key_value_heads"] * e
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    out["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (cfg["vocab_size"], h)
    return out


def write_safetensors(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> int:
    """Streams random bfloat16 tensors into one safetensors file; returns its size in bytes.

    The format (huggingface/safetensors README): an 8-byte little-endian header length, the JSON header
    (``dtype``, ``shape``, ``data_offsets`` per tensor, padded with spaces to 8 bytes), then the raw
    little-endian data in header order. Weights are normal with std 0.02 (``initializer_range``), norm
    weights 1, generated :data:`CHUNK` values at a time.
    """
    import ml_dtypes
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, shape in shapes.items():
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                f.write(np.ones(n, ml_dtypes.bfloat16).tobytes())
                continue
            for start in range(0, n, CHUNK):
                x = rng.standard_normal(min(CHUNK, n - start), dtype=np.float32) * np.float32(0.02)
                f.write(x.astype(ml_dtypes.bfloat16).tobytes())
    return path.stat().st_size


def write_tokenizer(out: pathlib.Path) -> None:
    """The Llama 2 SentencePiece tokenizer (shared test data) as a dir ``AutoTokenizer`` loads, with the
    ``tokenizer.json`` transformers converts from it (fast loading)."""
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(TOKENIZER, pathlib.Path(tmp) / "tokenizer.model")
        (pathlib.Path(tmp) / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": False,
                "clean_up_tokenization_spaces": False, "model_max_length": 131072}))
        transformers.LlamaTokenizerFast.from_pretrained(tmp).save_pretrained(str(out))


def work_paths(work: pathlib.Path) -> dict[str, pathlib.Path]:
    """The model dir, run configs and run dirs under ``work``."""
    return {"model": work / "model", "lora": work / "lora.py", "qlora": work / "qlora.py",
            "lora_run": work / "runs" / "lora", "qlora_run": work / "runs" / "qlora"}


def set_up(work: pathlib.Path, cfg: dict, seq: int) -> dict:
    """Writes the model dir, the training text and the two run configs under ``work``; returns their paths.

    Reuses a model dir whose ``config.json`` equals ``cfg`` (and whose weights are complete). Earlier runs'
    outputs (run dirs, exports, the prepared data) are removed.
    """
    for need in (TOKENIZER, TEXT):
        if not need.is_file():
            raise SystemExit(f"bench/billion.py needs the shared test data: {need} is missing")
    model = work / "model"
    shapes = tensor_shapes(cfg)
    size = 8 + sum(2 * int(np.prod(s)) for s in shapes.values())
    weights = model / "model.safetensors"
    same = (model / "config.json").is_file() and json.loads((model / "config.json").read_text()) == cfg
    if not (same and weights.is_file() and weights.stat().st_size > size):
        shutil.rmtree(model, ignore_errors=True)
        model.mkdir(parents=True)
        t0 = time.time()
        write_safetensors(weights, shapes)
        (model / "config.json").write_text(json.dumps(cfg, indent=2))
        write_tokenizer(model)
        print(f"wrote {model}: {sum(int(np.prod(s)) for s in shapes.values()):,} params, "
              f"{weights.stat().st_size / 1e9:.2f} GB bfloat16 safetensors ({time.time() - t0:.0f} s)", flush=True)
    for old in ("runs", "out", "prepared"):
        shutil.rmtree(work / old, ignore_errors=True)
    text = TEXT.read_text()[: 16 * seq]  # ~4 characters per token: about 4 sequences
    (work / "data.txt").write_text(text[: text.rfind("\n") + 1])
    paths = work_paths(work)
    for method in ("lora", "qlora"):
        paths[method].write_text(CONFIG_PY.format(
                title="QLoRA" if method == "qlora" else "LoRA", method=method, model=model, data=work / "data.txt",
                seq=seq, prepared=work / "prepared" / method, run=paths[f"{method}_run"]))
    return paths


# ----------------------------------------------------------------------------------------------- stages


def _cli(args: list[str]) -> None:
    from easytune import cli
    print("$ easytune " + " ".join(args), flush=True)
    rc = cli.main(args)
    if rc:
        raise SystemExit(f"easytune {args[0]} exited with {rc}")


def run_stage(name: str, work: pathlib.Path) -> dict:
    """Runs one stage in this process (see the module docstring); returns what it checked."""
    cfg = {"lora": work / "lora.py", "qlora": work / "qlora.py"}
    runs = {"lora": work / "runs" / "lora", "qlora": work / "runs" / "qlora"}
    if name == "load":
        import jax

        from easytune import config as config_lib
        from easytune.tokenizer import load_tokenizer
        from easytune.train import setup as setup_lib
        config = config_lib.load_config(cfg["lora"])
        setup = setup_lib.build(config, load_tokenizer(config.model.path))
        jax.block_until_ready((setup.trainable, setup.frozen))
        return {"params": int(sum(x.size for x in jax.tree_util.tree_leaves(setup.frozen)))}
    if name in ("lora", "qlora"):
        _cli(["train", str(cfg[name]), "--config.train.max_steps=1"])
        summary = json.loads((runs[name] / "summary.json").read_text())
        if summary["optimizer_steps"] != 1 or not np.isfinite(summary["final_train_loss"]):
            raise SystemExit(f"{name}: expected one finite step, got {summary}")
        return {"loss": summary["final_train_loss"]}
    if name.startswith("sample-"):
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            _cli(["generate", str(runs[name[7:]]), "--prompt", PROMPT, "--max-new-tokens", "8"])
        print(buf.getvalue(), end="")
        text = buf.getvalue().split("\n", 1)[1]  # after the "$ easytune ..." line
        if not text.startswith(PROMPT):
            raise SystemExit(f"{name}: unexpected output {text!r}")
        return {"text": text.rstrip("\n")}
    if name == "export":
        out = work / "out"
        _cli(["export", str(runs["lora"]), "--merged", str(out / "merged"), "--adapter", str(out / "adapter")])
        merged = sorted(p.name for p in (out / "merged").glob("*.safetensors"))
        if not merged or not (out / "adapter" / "adapter_model.safetensors").is_file():
            raise SystemExit(f"export: missing files in {out}")
        return {"merged_files": merged}
    raise SystemExit(f"unknown stage {name!r}; one of {', '.join(STAGES)}")


def measure(name: str, work: pathlib.Path) -> dict:
    """Runs ``name`` in a fresh interpreter; its peak RSS (bytes), wall seconds and checks."""
    # every stage compiles (as a first run does): no persistent compilation cache
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), EASYTUNE_COMPILATION_CACHE="off")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run (the tests simulate 8)
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--stage", name, "--work", str(work)], capture_output=True,
                       text=True, env=env, cwd=REPO)
    lines = [line for line in p.stdout.splitlines() if line.startswith("BILLION_STAGE ")]
    if p.returncode or not lines:
        raise SystemExit(f"stage {name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return dict(json.loads(lines[-1][len("BILLION_STAGE "):]), seconds=time.time() - t0)


def estimates(paths: dict) -> dict[str, float]:
    """:func:`easytune.estimate.stage_peaks` of the two run configs, by stage name, bytes."""
    from easytune import config as config_lib
    from easytune import estimate as est_lib
    out = {}
    for method in ("lora", "qlora"):
        peaks = est_lib.stage_peaks(config_lib.load_config(paths[method]))
        out[method] = peaks["train"]
        out[f"sample-{method}"] = peaks["sample"]
        if method == "lora":
            out["load"], out["export"] = peaks["load"], peaks["export"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 model at sequence_len 256")
    ap.add_argument("--work", default="", help="folder for the model, data and runs (default: a temporary one; "
                                               "a model there with the same config.json is reused)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--layers", type=int, default=0, help="num_hidden_layers instead of the config's")
    ap.add_argument("--seq", type=int, default=0, help="sequence_len (default 2048; 256 with --tiny)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a stage is not within 20%% of its estimate")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: the table of WORK/billion.json (an earlier run's measurements) against the "
                         "current estimate")
    ap.add_argument("--stage", default="", help=argparse.SUPPRESS)  # the child: run one stage
    args = ap.parse_args(argv)
    if args.stage:
        info = run_stage(args.stage, pathlib.Path(args.work))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
        print("BILLION_STAGE " + json.dumps(dict(info, peak=peak)), flush=True)
        return 0
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    seq = args.seq or (256 if args.tiny else 2048)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="billion-")
    work = pathlib.Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.table_only:
            cfg = json.loads((work / "model" / "config.json").read_text())
            saved = json.loads((work / "billion.json").read_text())
            stages, paths = [s for s in stages if s in saved], work_paths(work)
        else:
            cfg = hf_config(args.tiny, args.layers)
            paths = set_up(work, cfg, seq)
        est = estimates(paths)
        print(f"# {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}; "
              f"bfloat16, remat full, micro-batch 1 x sequence_len {seq}; {os.cpu_count()} CPUs, "
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM", flush=True)
        print(f"{'stage':14s}{'peak RSS GB':>12s}{'estimate GB':>13s}{'ratio':>7s}{'wall s':>8s}", flush=True)
        worst, results = 0.0, {}
        for name in stages:
            r = results[name] = saved[name] if args.table_only else measure(name, work)
            if not args.table_only:
                (work / "billion.json").write_text(json.dumps(results, indent=1))  # the measurements so far
            ratio = r["peak"] / est[name]
            worst = max(worst, abs(ratio - 1))
            print(f"{name:14s}{r['peak'] / 1e9:12.2f}{est[name] / 1e9:13.2f}{ratio:7.2f}{r['seconds']:8.0f}",
                  flush=True)
        print(f"largest deviation from the estimate: {100 * worst:.0f}%")
        return 1 if args.check and worst > 0.2 else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
