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
    try:
        loop.train(config, resume=args.resume, dry_run=args.dry_run)
    except loop.Interrupted as e:  # the checkpoint is saved; exit as a signalled process would
        print(f"easytune: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum)


def _lr(args, overrides):
    from easytune import config as config_lib
    from easytune.train import lr
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    lr.learning_rate_report(config)


def _plot(args, _):
    from easytune.train import curves
    d = curves.plot_run(args.run_dir)
    print(curves.format_diagnosis(d))
    print(f"wrote {d['curves_png']}; diagnosis added to {pathlib.Path(args.run_dir) / 'summary.json'}")


def _prepare(args, overrides):
    from easytune import config as config_lib
    from easytune.data import report
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    config_lib.validate(config)
    report.prepare(config, debug=args.debug)


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
        if args.adapter:
            raise ValueError("--adapter applies to a Hugging Face model dir, not to a run dir (which has its own)")
        setup, trainable = loop.load_run(src)
        from easytune import quant  # a QLoRA run's NF4 base, dequantized
        variables = lora_lib.combine(trainable, quant.dequantize_tree(setup.frozen))
        model_cfg, params, lora, scale, tok = (setup.model_cfg, variables["params"], variables.get("lora"),
                                               setup.lora_scale, setup.tokenizer)
        model_dir = setup.config.model.path or None
    else:
        from easytune.models import hf
        model_cfg, params = hf.load_hf_model(src)
        lora, scale, model_dir = None, 1.0, str(src)
        tok = loop.load_tokenizer(src)
        if args.adapter:
            from easytune import adapter as adapter_lib
            lcfg, lora, saved = adapter_lib.load_peft_adapter(args.adapter, params, model_cfg)
            params, scale = adapter_lib.with_saved(params, saved), lcfg.scale
    if args.instruction is not None:
        if args.prompt:
            raise ValueError("give --prompt or --instruction, not both")
        from easytune.data.formats import alpaca_prompt
        prompts = [alpaca_prompt({"instruction": args.instruction, "input": args.input or "",
                                  "_source": "--instruction"})]
    elif args.prompt:
        prompts = args.prompt
    else:
        raise ValueError("give --prompt TEXT (repeatable; with --chat for the chat template), or "
                         "--instruction TEXT [--input TEXT] for the Alpaca template")
    import jax
    stops = [generate.unescape_stop(x) for x in (args.stop or ())]
    if any(not x for x in stops):
        raise ValueError("--stop: an empty stop string would end every text at once; give some text")
    texts = generate.generate_text(model_cfg, params, tok, prompts, args.max_new_tokens, chat=args.chat,
                                   system=args.system, stop=stops, model_dir=model_dir,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   rng=jax.random.PRNGKey(args.seed), lora=lora, lora_scale=scale)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"--- [{i}]")
        print(text if args.chat else prompt + text)


def _modules(args, _):
    import math

    import jax
    from easytune import lora as lora_lib
    from easytune.models import hf, llama
    src = pathlib.Path(args.model_dir)
    if (src / "checkpoints").is_dir():
        raise FileNotFoundError(f"{src} is an easytune run dir; `easytune modules` reads a Hugging Face model dir "
                                f"(the run's model.path)")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a Hugging Face model dir (no config.json)")
    config = hf.read_config(src)  # names and shapes only: no weights are read
    shapes = hf.parameter_shapes(config)
    tree = jax.eval_shape(lambda: llama.init_params(config, jax.random.key(0)))  # shapes only
    target = lora_lib.parse_target_modules(args.target_modules)
    chosen = set(lora_lib.select_targets(tree, target))
    width = max(len(n) for n in shapes)
    print(f"{config.model_type} model, {sum(math.prod(s) for _, s in shapes.values()):,} parameters "
          f"(HF names, torch shapes [out, in]); --target-modules {args.target_modules}")
    for name, (path, shape) in shapes.items():
        mark = "  <- LoRA target" if path[-1] == "kernel" and path[:-1] in chosen else ""
        print(f"{name:{width}s}  {list(shape)}{mark}")
    linear = lora_lib.linear_modules(tree)
    print(f"{len(chosen)} of {len(linear)} linear modules selected")


def _export(args, _):
    from easytune import export
    from easytune.train import loop
    if not args.merged and not args.adapter:
        raise ValueError("give --merged OUT_DIR and/or --adapter OUT_DIR")
    from easytune import adapter as adapter_lib
    if adapter_lib.is_adapter_dir(args.run_dir):  # a PEFT adapter trained elsewhere: merge onto --base
        if not args.base or not args.merged or args.adapter:
            raise ValueError(f"{args.run_dir} is a PEFT adapter: merge it with --base MODEL_DIR --merged OUT_DIR")
        out = export.export_merged_adapter(args.base, args.run_dir, args.merged)
        print(f"wrote merged Hugging Face model dir {out}")
        return
    if args.base:
        raise ValueError("--base is for merging a PEFT adapter dir; a run dir knows its base (model.path)")
    run = loop.load_run(args.run_dir, args.step)
    if args.adapter:  # first: a full run fails here before anything is written
        out = export.export_adapter(args.run_dir, args.adapter, run=run)
        print(f"wrote PEFT adapter {out}")
    if args.merged:
        out = export.export_merged(args.run_dir, args.merged, run=run)
        print(f"wrote merged Hugging Face model dir {out}")


def _estimate(args, overrides):
    from easytune import config as config_lib
    from easytune import estimate
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    if args.num_devices is not None and args.num_devices < 1:
        raise ValueError(f"--num-devices must be >= 1, got {args.num_devices}")
    for key in ("micro_batch_size", "gradient_accumulation_steps"):
        if config.train[key] < 1:
            raise config_lib.ConfigError(f"config key 'train.{key}': must be >= 1, got {config.train[key]}")
    if config.data.sequence_len < 2:
        raise config_lib.ConfigError(f"config key 'data.sequence_len': must be >= 2, got {config.data.sequence_len}")
    method = "full" if config.method in ("full", "pretrain") else config.method
    print(estimate.report(estimate.estimate_config(config, args.num_devices), args.device, method))


def _tokenizer_train(args, _):
    from easytune import tokenizer
    r = tokenizer.train_and_save(args.files, args.out, args.vocab_size, args.model, text_field=args.text_field,
                                 chat_template=args.chat_template, min_frequency=args.min_frequency,
                                 split_digits=not args.no_split_digits,
                                 extra_special_tokens=args.special_token or (),
                                 model_max_length=args.model_max_length, show_progress=sys.stderr.isatty())
    specials = ", ".join(f"{t}={i}" for t, i in r["special_tokens"].items())
    print(f"wrote {args.model} tokenizer {r['out_dir']}: vocab {r['vocab_size']} tokens; special tokens {specials}")


def _tokenizer_eval(args, _):
    from easytune import tokenizer
    from easytune.train import loop
    tok = loop.load_tokenizer(args.tokenizer_dir)
    paths = tokenizer.expand_files(args.files)
    r = tokenizer.bytes_per_token(tok, (t for batch in tokenizer.iter_corpus(paths, args.text_field) for t in batch))
    print(f"{args.tokenizer_dir}: {r['bytes']} bytes -> {r['tokens']} tokens: {r['bytes_per_token']:.3f} bytes/token")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``easytune`` console script."""
    parser = argparse.ArgumentParser(prog="easytune", description="Fine-tune Llama-family LLMs in JAX.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("train", help="train on a config: easytune train configs/quickstart.py [--config.KEY=VALUE]")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the mesh, every array's sharding and bytes per device and the compiled step's "
                        "memory, then stop without training")
    p.set_defaults(fn=_train)
    p = sub.add_parser("prepare", help="read, clean, format, tokenize, pack and cache the data; print a report")
    p.add_argument("config")
    p.add_argument("--debug", action="store_true", help="show the first sequences as (token, label) pairs")
    p.set_defaults(fn=_prepare)
    p = sub.add_parser("lr", help="the guide's learning rate for a config, measured on its prepared data")
    p.add_argument("config")
    p.set_defaults(fn=_lr)
    p = sub.add_parser("plot", help="curves.png and an underfit/overfit/well-fit diagnosis of a run dir")
    p.add_argument("run_dir")
    p.set_defaults(fn=_plot)
    p = sub.add_parser("convert", help="GGUF -> Hugging Face model dir")
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece tokenizer.model to ship with it")
    p.set_defaults(fn=_convert)
    p = sub.add_parser("generate",
                       help="continue a prompt (KV-cached; greedy or sampled) from an HF model dir or a run dir")
    p.add_argument("model_or_run")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (repeat for a batch); with --chat, the user message")
    p.add_argument("--chat", action="store_true", help="render --prompt with the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable; \\n and \\t are newline and tab); text ends before it")
    p.add_argument("--adapter", default=None, metavar="ADAPTER_DIR", help="apply a PEFT LoRA adapter")
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
    p.add_argument("--target-modules", default="all-linear",
                   help="as lora.target_modules: all-linear, name suffixes q_proj,v_proj, or a regex")
    p.set_defaults(fn=_modules)
    p = sub.add_parser("export", help="run dir -> merged HF model dir (--merged) and/or PEFT adapter (--adapter); "
                                      "or merge a PEFT adapter dir onto --base")
    p.add_argument("run_dir")
    p.add_argument("--merged", default=None, metavar="OUT_DIR", help="LoRA folded in; transformers loads it")
    p.add_argument("--adapter", default=None, metavar="OUT_DIR", help="PEFT LoRA adapter (LoRA runs only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--base", default=None, metavar="MODEL_DIR",
                   help="when RUN_DIR is a PEFT adapter dir: the HF base model to merge it onto")
    p.set_defaults(fn=_export)
    p = sub.add_parser("estimate", help="memory per device (weights, grads, optimizer, activations) and FLOPs "
                                        "per step from the model's config.json; does it fit --device?")
    p.add_argument("config")
    p.add_argument("--device", default="cpu",
                   help="tpu-v2/v3/v4/v5e/v5p/v6e, t4, v100, a10g, l4, rtx4090, a6000, l40s, a100-40, a100-80, "
                        "h100, h200, b200, or cpu (this machine's RAM; the default)")
    p.add_argument("--num-devices", type=int, default=1, help="devices the mesh spans (resolves a -1 axis)")
    p.set_defaults(fn=_estimate)
    p = sub.add_parser("tokenizer", help="train a byte-level BPE/unigram tokenizer for pretraining; measure it")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train on txt/jsonl files (streamed) and save a dir AutoTokenizer loads")
    t.add_argument("--files", nargs="+", required=True, help="paths, globs ('data/*.txt', '**/*.jsonl') or dirs")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens, special tokens included")
    t.add_argument("--model", default="bpe", help="bpe (byte-level BPE, the default) or unigram")
    t.add_argument("--out", required=True, metavar="OUT_DIR", help="tokenizer dir to write")
    t.add_argument("--text-field", default="text", help="jsonl: the field holding the text")
    t.add_argument("--chat-template", default=None,
                   help="'chatml' (built in; adds <|im_start|> <|im_end|>), a .jinja file or a Jinja string")
    t.add_argument("--special-token", action="append", default=None,
                   help="extra special token after <unk>=0 <s>=1 </s>=2 <pad>=3 (repeatable)")
    t.add_argument("--min-frequency", type=int, default=2, help="bpe: least count of a pair to merge")
    t.add_argument("--no-split-digits", action="store_true", help="keep digit runs together (GPT-2) instead of "
                                                                  "one token per digit (Llama)")
    t.add_argument("--model-max-length", type=int, default=2048, help="tokens; written to tokenizer_config.json")
    t.set_defaults(fn=_tokenizer_train)
    t = tsub.add_parser("eval", help="compression of a tokenizer dir on text files: UTF-8 bytes per token")
    t.add_argument("tokenizer_dir")
    t.add_argument("--files", nargs="+", required=True, help="paths, globs or dirs (held-out text)")
    t.add_argument("--text-field", default="text", help="jsonl: the field holding the text")
    t.set_defaults(fn=_tokenizer_eval)

    args, rest = parser.parse_known_args(argv)
    import logging
    logging.basicConfig(format="easytune: %(levelname)s: %(message)s")  # warnings as one readable line
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's timing notes ("Waiting for previous save ...")
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest and args.verb not in ("train", "prepare", "lr", "estimate"):
        parser.error("--config.KEY=VALUE overrides apply only to `easytune train`, `prepare`, `lr` and `estimate`")
    from easytune.config import ConfigError
    if args.verb in ("train", "generate", "export", "estimate"):  # the verbs that compile: reuse compilations
        from easytune.train.compile_cache import enable_compilation_cache
        try:
            enable_compilation_cache()
        except OSError as e:  # a read-only home: run without the cache
            logging.getLogger("easytune").warning("compilation cache disabled (%s)", e)
    try:
        args.fn(args, rest)
    except (ConfigError, OSError, ValueError, ImportError) as e:  # bad input / a missing extra: a message
        if os.environ.get("EASYTUNE_DEBUG"):
            raise
        print(f"easytune: error: {e}", file=sys.stderr)
        print("(set EASYTUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
