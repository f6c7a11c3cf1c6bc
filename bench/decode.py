"""Decode speed: easytune's KV-cached ``generate`` vs transformers ``generate(do_sample=False)`` on the same model,
in one process, printing tokens/s and the ratio (not a test: numbers depend on the machine).

    python bench/decode.py [MODEL_DIR] [--new-tokens 256] [--batch 1]

MODEL_DIR defaults to models/stories260K (made by ``easytune convert``, see docs/guide/models.md). Both sides decode
greedily from the same prompt for exactly ``--new-tokens`` tokens (no eos stop); the first call of each side
(compilation / warm-up) is timed separately. The token ids of both sides are compared.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=str(REPO / "models" / "stories260K"))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import jax
    import torch
    import transformers

    from easytune.generate import generate
    from easytune.models.hf_weights import load_hf_model

    config, params = load_hf_model(args.model_dir)
    params = jax.device_put(params)
    prompt = [config.bos_token_id or 1, 403, 407, 261, 378, 432, 383]
    prompt = [i % config.vocab_size for i in prompt]
    n = min(args.new_tokens, config.max_position_embeddings - len(prompt))
    prompts = [prompt] * args.batch

    t = time.perf_counter()
    ours = generate(config, params, prompts, n, eos_token_id=[])
    first = time.perf_counter() - t
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        ours = generate(config, params, prompts, n, eos_token_id=[])
        times.append(time.perf_counter() - t)
    ours_tps = args.batch * n / min(times)

    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    x = torch.tensor(prompts)
    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    with torch.no_grad():
        model.generate(x, **kw)
        ttimes = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = model.generate(x, **kw)
            ttimes.append(time.perf_counter() - t)
    theirs_tps = args.batch * n / min(ttimes)
    same = out[0, len(prompt):].tolist() == ours[0]

    print(f"model {args.model_dir}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}; batch {args.batch}, {n} new tokens, best of {args.repeats}")
    print(f"easytune      {ours_tps:10,.0f} tokens/s   (first call incl. compile {first:.1f} s)")
    print(f"transformers  {theirs_tps:10,.0f} tokens/s")
    print(f"ratio         {ours_tps / theirs_tps:10.2f}x   same greedy tokens: {same}")


if __name__ == "__main__":
    main()
