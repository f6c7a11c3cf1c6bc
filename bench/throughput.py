"""Training throughput: easytune vs transformers + peft (PyTorch CPU) on identical configs, in one invocation.

    python bench/throughput.py [--cases A,B,C] [--steps 3] [--rounds 2] [--lever default,qlora,chunk=0,bf16]
                               [--baseline DIR]

Cases (issue 9): A = dim 256, 4 layers, 8 heads, vocab 32000, seq 256, micro-batch 8, LoRA r=8 on all linear
layers; B = A with full fine-tuning; C = dim 1024, 8 layers, 16 heads, seq 512, LoRA. Both sides train the
same architecture (intermediate = 8/3 dim rounded up to 8, fp32, AdamW lr 1e-4, random token ids, every
token supervised). Each (case, side) runs in its own subprocess so peak RSS is its own; easytune's tracing and
compilation (``jit(...).lower(...).compile()``) is timed apart, then ``--steps`` steps are timed one by one
after a warm-up step and the fastest counts (robust to other work on a shared machine; the mean is in the
child's RESULT line). ``--rounds`` repeats this, alternating peer and easytune processes, and the fastest
step of all rounds counts for each side: this machine's speed drifts by 10-30% over minutes (other tenants),
and alternating keeps one slow spell from landing on one side only.

``--lever`` runs easytune once per listed variant against the same peer run: ``default`` (the config
defaults, e.g. ``train.loss_chunk_tokens``) or a ``+``-joined list of ``chunk=N`` (loss chunk tokens, 0 =
full logits), ``bf16`` (``model.compute_dtype="bfloat16"``, fp32 parameters and AdamW), ``qlora`` (the same
init with every linear kernel but ``lm_head`` stored in NF4, as ``method = "qlora"``: easytune/quant.py; LoRA
cases only, skipped for B). The default, ``default,qlora``, prints a LoRA case's QLoRA row next to its LoRA row,
then the ratio of their step times (the peer columns stay PyTorch + PEFT LoRA on the float base).

``--baseline DIR`` also times the ``default`` variant of easytune imported from another checkout (e.g. ``git
worktree add /tmp/base <commit>``) in every round, just before this checkout's variants, and prints each
variant's step time as a ratio of the baseline's: a before/after check of a change on the same machine load.

Printed per case and variant: tokens/s of both sides and their ratio, model FLOPs utilization (MFU) of both
against this CPU's fp32 matmul peak (a jitted 4096x4096 matmul, best of 5, measured in easytune's process
right after its timed steps, so under the same load), that peak, peak RSS of both, easytune's compile time,
and the last step's loss of both (same batch; the sides' random inits differ, the variants' do not).

Model FLOPs per token: forward ``2 N + 4 L T d`` (N = matmul parameters incl. ``lm_head``, attention scores
and values over T positions), full training 3x forward, LoRA 2x forward (no weight gradients for the frozen
base) -- the usual accounting (PaLM appendix B; Transformer Math 101).
Numbers depend on the machine and its load: not a test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get("EASYTUNE_BENCH_TREE"):  # a --baseline child: import easytune from that checkout
    sys.path.insert(0, os.environ["EASYTUNE_BENCH_TREE"])

CASES = {
    "A": dict(dim=256, layers=4, heads=8, vocab=32000, seq=256, batch=8, method="lora"),
    "B": dict(dim=256, layers=4, heads=8, vocab=32000, seq=256, batch=8, method="full"),
    "C": dict(dim=1024, layers=8, heads=16, vocab=32000, seq=512, batch=8, method="lora"),
}
R, ALPHA, LR = 8, 16, 1e-4


def _inter(dim: int) -> int:
    return -(-int(8 * dim / 3) // 8) * 8


def model_flops_per_token(c: dict) -> float:
    """Model FLOPs of one training token (see the module docstring)."""
    d, layers, inter = c["dim"], c["layers"], _inter(c["dim"])
    n = layers * (4 * d * d + 3 * d * inter) + c["vocab"] * d
    fwd = 2 * n + 4 * layers * c["seq"] * d
    return fwd * (3 if c["method"] == "full" else 2)


def _batch(c: dict, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, c["vocab"], size=(c["batch"], c["seq"] + 1)).astype(np.int32)
    return ids


def train_state(trainable):
    """``(tx, TrainState)``: easytune's AdamW (lr ``LR``, constant, clip 1.0, no accumulation) on ``trainable``."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from easytune.train import optim as optim_lib
    from easytune.train import step as step_lib
    o = ml_collections.ConfigDict(dict(learning_rate=LR, lr_scheduler="constant", warmup_steps=0, warmup_ratio=0.0,
                                       cosine_min_lr_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                                       adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8))
    tx, _ = optim_lib.make_optimizer(o, 1000, 1)
    return tx, step_lib.TrainState(trainable=trainable, opt_state=tx.init(trainable), rng=jax.random.PRNGKey(2),
                                   micro_step=jnp.zeros([], jnp.int32))


def run_easytune(c: dict, steps: int, variant: str = "default") -> dict:
    """One easytune case under ``variant``: ``default`` (the config defaults) or a ``+``-joined list of
    ``chunk=N`` (``train.loss_chunk_tokens = N``, 0 = full logits), ``bf16`` (``model.compute_dtype =
    "bfloat16"``, fp32 parameters and optimizer)."""
    from easytune import config as config_lib
    chunk = int(config_lib.defaults().train.loss_chunk_tokens)
    levers = set()
    for part in filter(None, variant.split("+")):
        if part.startswith("chunk="):
            chunk = int(part[len("chunk="):])
        elif part in ("bf16", "qlora"):
            levers.add(part)
        elif part != "default":
            raise SystemExit(f"unknown lever {part!r}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from easytune import lora as lora_lib
    from easytune.models.llama import LlamaForCausalLM, init_params
    from easytune.models.model_config import ModelConfig
    from easytune.train import step as step_lib

    cfg = ModelConfig(vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=_inter(c["dim"]),
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["heads"], max_position_embeddings=c["seq"], tie_word_embeddings=False,
                      compute_dtype="bfloat16" if "bf16" in levers else "float32")
    params = init_params(cfg, jax.random.PRNGKey(0))
    if "qlora" in levers:  # the same init, its linear kernels (not lm_head) stored in NF4 as method = "qlora"
        if c["method"] != "lora":
            raise SystemExit("the qlora lever applies to LoRA cases only")
        from easytune import quant
        params = quant.quantize_params(jax.device_get(params))
    if c["method"] == "lora":
        lcfg = lora_lib.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear")
        lora = lora_lib.init_lora(params, lcfg, jax.random.PRNGKey(1))
        trainable, frozen = lora_lib.split(params, lora)
        frozen = jax.device_put(frozen)  # the NF4 codes are host arrays: put them on the device once, as a run does
        model = LlamaForCausalLM(cfg, lora_scale=lcfg.scale)
    else:
        trainable, frozen = lora_lib.split(params, None)
        model = LlamaForCausalLM(cfg)
    tx, state = train_state(trainable)
    spec = step_lib.StepSpec(model, tx, use_dropout=False, loss_chunk_tokens=chunk)
    step = jax.jit(functools.partial(step_lib.train_step, spec=spec), donate_argnums=(0,))
    ids = _batch(c)
    B, T = c["batch"], c["seq"]
    batch = dict(input_ids=ids[:, :-1], target_ids=ids[:, 1:], loss_mask=np.ones((B, T), np.float32),
                 segment_ids=np.ones((B, T), np.int32),
                 positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy())
    batch = jax.device_put(batch)
    window = jnp.float32(B * T)
    t = time.perf_counter()
    step = step.lower(state, frozen, batch, window).compile()  # tracing + XLA compilation (or a cache load)
    compile_s = time.perf_counter() - t
    state, m = step(state, frozen, batch, window)  # warm-up
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, frozen, batch, window)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    return dict(step_s=min(times), mean_s=sum(times) / steps, compile_s=compile_s, loss=float(m["loss"]))


def run_peer(c: dict, steps: int) -> dict:
    import numpy as np
    import torch
    import transformers
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=_inter(c["dim"]),
                                  num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                  num_key_value_heads=c["heads"], max_position_embeddings=c["seq"],
                                  tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf)
    if c["method"] == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    ids = torch.from_numpy(_batch(c).astype(np.int64))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def one():
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    one()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = one()
        times.append(time.perf_counter() - t)
    return dict(step_s=min(times), mean_s=sum(times) / steps, loss=loss, threads=torch.get_num_threads())


def matmul_peak_flops() -> float:
    """fp32 FLOP/s of a jitted 4096 x 4096 matmul on this CPU (best of 5)."""
    import jax
    import jax.numpy as jnp
    n = 4096
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _child(args) -> None:
    c = CASES[args.case]
    if args.side == "easytune":
        out = run_easytune(c, args.steps, args.variant)
        import easytune
        out["easytune"] = str(pathlib.Path(easytune.__file__).parents[1])  # the checkout timed
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_flops"] = matmul_peak_flops()  # right after the timed steps: under the same machine load
    else:
        out = run_peer(c, args.steps)
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _spawn(side: str, case: str, steps: int, variant: str = "default", tree: str = "") -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", EASYTUNE_BENCH_TREE=tree)
    p = subprocess.run([sys.executable, __file__, "--child", "--side", side, "--case", case, "--steps", str(steps),
                        "--variant", variant], capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{side} {case} {variant} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="A,B,C")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up; the fastest counts")
    ap.add_argument("--rounds", type=int, default=2,
                    help="processes per side, alternating peer and easytune; the fastest step of all counts")
    ap.add_argument("--lever", default="default,qlora",
                    help="comma list of easytune variants to compare, each 'default' or a '+'-joined list of "
                         "chunk=N (loss chunk tokens, 0 = full logits), bf16, qlora (NF4 base, LoRA cases "
                         "only); e.g. default,qlora,chunk=0,bf16")
    ap.add_argument("--baseline", default="",
                    help="a checkout of easytune (e.g. `git worktree add /tmp/base main`) whose 'default' is also "
                         "timed in every round, printed as variant 'baseline' with each variant's ratio to it")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", default="", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="A", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds and --steps must be at least 1 (got --rounds {args.rounds}, --steps {args.steps})")
    if args.child:
        return _child(args)
    print(f"step times: the fastest of {args.steps} after a warm-up step in each of {args.rounds} alternating "
          f"rounds per side; MFU against the fastest fp32 matmul peak (jitted 4096^3) measured right after "
          f"easytune's steps")
    variants = [v.strip() for v in args.lever.split(",") if v.strip()]
    print(f"{'case':4s} {'method':6s} {'variant':14s} {'easytune tok/s':>15s} {'peer tok/s':>11s} {'ratio':>6s} "
          f"{'MFU ours':>9s} {'MFU peer':>9s} {'peak GF/s':>9s} {'RSS ours':>9s} {'RSS peer':>9s} {'compile':>8s} "
          f"{'loss ours':>10s} {'loss peer':>10s}")
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        c = CASES[name]
        case_variants = [v for v in variants if c["method"] == "lora" or "qlora" not in v.split("+")]
        tokens = c["batch"] * c["seq"]
        f = model_flops_per_token(c) * tokens
        peer, ours = None, {}
        for _ in range(args.rounds):  # alternate the sides, so a slow spell of the machine hits both
            peer = _best(peer, _spawn("peer", name, args.steps))
            if args.baseline:
                ours["baseline"] = _best(ours.get("baseline"),
                                         _spawn("easytune", name, args.steps, "default", args.baseline))
            for variant in case_variants:
                ours[variant] = _best(ours.get(variant), _spawn("easytune", name, args.steps, variant))
        for variant in (["baseline"] if args.baseline else []) + case_variants:
            o = ours[variant]
            peak = o["peak_flops"]
            method = "qlora" if "qlora" in variant.split("+") else c["method"]  # "baseline": the default
            print(f"{name:4s} {method:6s} {variant:14s} {tokens / o['step_s']:15,.0f} "
                  f"{tokens / peer['step_s']:11,.0f} {peer['step_s'] / o['step_s']:5.2f}x "
                  f"{f / o['step_s'] / peak:9.1%} {f / peer['step_s'] / peak:9.1%} {peak / 1e9:9.1f} "
                  f"{o['rss_mb']:7,.0f}MB "
                  f"{peer['rss_mb']:7,.0f}MB {o['compile_s']:7.1f}s {o['loss']:10.4f} {peer['loss']:10.4f}",
                  flush=True)
        for variant in case_variants if args.baseline else []:
            q, b = ours[variant]["step_s"], ours["baseline"]["step_s"]
            print(f"{name:4s} {variant} step {q:.3f} s = {q / b:.2f}x the baseline's {b:.3f} s "
                  f"(tokens/s {b / q - 1:+.1%})", flush=True)
        for variant in case_variants:  # QLoRA against LoRA with the same other levers, from this invocation
            base = "+".join(p for p in variant.split("+") if p != "qlora") or "default"
            if variant != base and base in ours:
                q, b = ours[variant]["step_s"], ours[base]["step_s"]
                # the same ratio with each step time in units of the matmul time measured with it (load drift)
                norm = q * ours[variant]["peak_flops"] / (b * ours[base]["peak_flops"])
                print(f"{name:4s} {variant} step {q:.3f} s = {q / b:.2f}x {base}'s {b:.3f} s "
                      f"({norm:.2f}x scaled by the rows' matmul peaks)", flush=True)


def _best(old: dict | None, new: dict) -> dict:
    """The faster of two runs of one side (RSS and compile time of that run), with the highest matmul peak
    measured in either (so MFU is never flattered by a slow spell), or ``new`` when there is no ``old``."""
    best = dict(new if old is None or new["step_s"] < old["step_s"] else old)
    if "peak_flops" in new:
        best["peak_flops"] = max(new["peak_flops"], (old or {}).get("peak_flops", 0.0))
    return best


if __name__ == "__main__":
    main()
