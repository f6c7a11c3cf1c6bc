"""``easytune <verb>``: the command line. Thin: each verb parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys


def _train(args, overrides):
    from easytune import config as config_lib
    from easytune.train import loop
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    loop.train(config, resume=args.resume)


def _convert(args, _):
    from easytune.models import gguf
    out = gguf.convert_gguf(args.src, args.out_dir, tokenizer_model=args.tokenizer_model)
    print(f"wrote Hugging Face model dir {out}")


def _generate(args, _):
    from easytune import generate
    from easytune import lora as lora_lib
    from easytune.train import loop
    src = pathlib.Path(args.model_or_run)
    if (src / "checkpoints").is_dir():
        setup, trainable = loop.load_run(src)
        variables = lora_lib.combine(trainable, setup.frozen)
        model_cfg, params, lora, scale, tok = (setup.model_cfg, variables["params"], variables.get("lora"),
                                                                                      setup.lora_scale, setup.tokenizer)
    else:
        from easytune.models import hf
        model_cfg, params = hf.load_hf_model(src)
        lora, scale, tok = None, 1.0, loop.load_tokenizer(src)
    ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    out = generate.greedy_generate(model_cfg, params, ids, args.max_new_tokens,
                                                                  eos_token_id=model_cfg.eos_token_id, lora=lora, lora_scale=scale)
    print(args.prompt + tok.decode(out, skip_special_tokens=True))


def _modules(args, _):
    from easytune import lora as lora_lib
    from easytune.models import hf
    from flax import traverse_util
    _, params = hf.load_hf_model(args.model_dir)
    target = lora_lib.parse_target_modules(args.target_modules)
    chosen = set(lora_lib.select_targets(params, target))
    sd_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    for path, shape in sd_shapes.items():
        name = lora_lib.hf_module_name(path[:-1])
        leaf = "weight" if path[-1] in ("kernel", "embedding") else path[-1]
        hf_shape = tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)
        mark = "  <- LoRA target" if path[:-1] in chosen and path[-1] == "kernel" else ""
        print(f"{name}.{leaf:8s} {list(hf_shape)}{mark}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``easytune`` console script."""
    parser = argparse.ArgumentParser(prog="easytune", description="Fine-tune Llama-family LLMs in JAX.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train on a config: easytune train configs/quickstart.py [--config.KEY=VALUE]")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.set_defaults(fn=_train)
    p = sub.add_parser("convert", help="GGUF -> Hugging Face model dir")
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece tokenizer.model to ship with it")
    p.set_defaults(fn=_convert)
    p = sub.add_parser("generate", help="greedy continuation from an HF model dir or a run dir")
    p.add_argument("model_or_run")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(fn=_generate)
    p = sub.add_parser("modules", help="parameter names/shapes (HF names) and which are LoRA targets")
    p.add_argument("model_dir")
    p.add_argument("--target-modules", default="all-linear")
    p.set_defaults(fn=_modules)

    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest and args.verb != "train":
        parser.error("--config.KEY=VALUE overrides apply only to `easytune train`")
    from easytune.config import ConfigError
    try:
        args.fn(args, rest)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if os.environ.get("EASYTUNE_DEBUG"):
            raise
        print(f"easytune: error: {e}", file=sys.stderr)
        print("(set EASYTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
