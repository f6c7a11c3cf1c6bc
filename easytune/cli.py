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
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a directory: give a Hugging Face model dir or an easytune run dir")
    is_run = (src / "checkpoints").is_dir() or (src / "metrics.jsonl").is_file()
    if not is_run and not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is neither an easytune run dir (with checkpoints/) nor a Hugging Face "
                                f"model dir (with config.json)")
    if is_run:
        setup, trainable = loop.load_run(src)
        variables = lora_lib.combine(trainable, setup.frozen)
        model_cfg, params, lora, scale, tok = (setup.model_cfg, variables["params"], variables.get("lora"),
                                               setup.lora_scale, setup.tokenizer)
    else:
        from easytune.models import hf
        model_cfg, params = hf.load_hf_model(src)
        lora, scale, tok = None, 1.0, loop.load_tokenizer(src)
    if args.instruction is not None:
        from easytune.data.formats import alpaca_prompt
        prompt = alpaca_prompt({"instruction": args.instruction, "input": args.input or "", "_source": "--instruction"})
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ValueError("give --prompt TEXT, or --instruction TEXT [--input TEXT] for the Alpaca template")
    # as the data pipeline does: BOS once, then the text without special tokens
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(
        prompt, add_special_tokens=False)["input_ids"]
    room = model_cfg.max_position_embeddings - len(ids)
    if args.max_new_tokens > room:
        print(f"note: --max-new-tokens {args.max_new_tokens} cut to {max(room, 0)} (the model's "
              f"max_position_embeddings is {model_cfg.max_position_embeddings})", file=sys.stderr)
    import jax
    out = generate.generate(model_cfg, params, [ids], max(0, min(args.max_new_tokens, room)),
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            eos_token_id=model_cfg.eos_token_id, rng=jax.random.PRNGKey(args.seed),
                            lora=lora, lora_scale=scale)[0]
    # decode prompt and answer together: SentencePiece drops the leading space of a piece decoded alone
    print(tok.decode(ids + out, skip_special_tokens=True))


def _modules(args, _):
    from easytune import lora as lora_lib
    from easytune.models import hf
    from flax import traverse_util
    src = pathlib.Path(args.model_dir)
    if (src / "checkpoints").is_dir():
        raise FileNotFoundError(f"{src} is an easytune run dir; `easytune modules` reads a Hugging Face model dir "
                                f"(the run's model.path)")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model dir (no config.json)")
    _, params = hf.load_hf_model(src)
    target = lora_lib.parse_target_modules(args.target_modules)
    chosen = set(lora_lib.select_targets(params, target))
    sd_shapes = {k: v.shape for k, v in traverse_util.flatten_dict(params).items()}
    for path, shape in sd_shapes.items():
        name = lora_lib.hf_module_name(path[:-1])
        leaf = "weight" if path[-1] in ("kernel", "embedding") else path[-1]
        hf_shape = tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)
        mark = "  <- LoRA target" if path[:-1] in chosen and path[-1] == "kernel" else ""
        print(f"{name}.{leaf:8s} {list(hf_shape)}{mark}")


def _export(args, _):
    from easytune import export
    from easytune.train import loop
    if not args.merged and not args.adapter:
        raise ValueError("give --merged OUT_DIR and/or --adapter OUT_DIR")
    run = loop.load_run(args.run_dir, args.step)
    if args.adapter:  # first: a full run fails here before anything is written
        out = export.export_adapter(args.run_dir, args.adapter, run=run)
        print(f"wrote PEFT adapter {out}")
    if args.merged:
        out = export.export_merged(args.run_dir, args.merged, run=run)
        print(f"wrote merged Hugging Face model dir {out}")


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
    p = sub.add_parser("generate",
                       help="continue a prompt (KV-cached; greedy or sampled) from an HF model dir or a run dir")
    p.add_argument("model_or_run")
    p.add_argument("--prompt", default=None, help="raw text to continue")
    p.add_argument("--instruction", default=None, help="render --instruction/--input with the Alpaca template")
    p.add_argument("--input", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_generate)
    p = sub.add_parser("modules", help="parameter names/shapes (HF names) and which are LoRA targets")
    p.add_argument("model_dir")
    p.add_argument("--target-modules", default="all-linear")
    p.set_defaults(fn=_modules)
    p = sub.add_parser("export", help="run dir -> merged HF model dir (--merged) and/or PEFT adapter (--adapter)")
    p.add_argument("run_dir")
    p.add_argument("--merged", default=None, metavar="OUT_DIR", help="LoRA folded in; transformers loads it")
    p.add_argument("--adapter", default=None, metavar="OUT_DIR", help="PEFT LoRA adapter (LoRA runs only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(fn=_export)

    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest and args.verb != "train":
        parser.error("--config.KEY=VALUE overrides apply only to `easytune train`")
    from easytune.config import ConfigError
    try:
        args.fn(args, rest)
    except (ConfigError, OSError, ValueError) as e:  # bad input: a message, not a traceback
        if os.environ.get("EASYTUNE_DEBUG"):
            raise
        print(f"easytune: error: {e}", file=sys.stderr)
        print("(set EASYTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
