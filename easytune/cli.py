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
    from easytune import config_check
    from easytune.data import report
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    config_check.validate(config)
    report.prepare(config, debug=args.debug)


def _convert(args, _):
    from easytune.models import gguf
    out = gguf.convert_gguf(args.src, args.out_dir, tokenizer_model=args.tokenizer_model)
    print(f"wrote Hugging Face model dir {out}")


def _generate(args, _):
    from easytune.train import setup
    texts = setup.generate_from_dir(args.model_or_run, args.prompt, instruction=args.instruction, input=args.input,
                                    adapter=args.adapter, max_new_tokens=args.max_new_tokens, chat=args.chat,
                                    system=args.system, stop=args.stop, temperature=args.temperature,
                                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- [{i}]")
        print(text)


def _modules(args, _):
    from easytune.models import modules
    print(modules.modules_report(args.model_dir, args.target_modules))


def _export(args, _):
    from easytune import export
    export.export_dir(args.run_dir, merged=args.merged, adapter=args.adapter, step=args.step, base=args.base)


def _estimate(args, overrides):
    from easytune import config as config_lib
    from easytune import estimate
    config = config_lib.load_config(args.config)
    config_lib.apply_overrides(config, overrides)
    print(estimate.config_report(config, args.device, args.num_devices))


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
    r = tokenizer.evaluate_files(args.tokenizer_dir, args.files, args.text_field)
    print(f"{args.tokenizer_dir}: {r['bytes']} bytes -> {r['tokens']} tokens: {r['bytes_per_token']:.3f} bytes/token")


def _add_run_verbs(sub) -> None:
    """``train``, ``prepare``, ``lr``, ``plot``: the verbs that take a config or a run dir."""
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


def _add_model_verbs(sub) -> None:
    """``convert``, ``generate``, ``modules``, ``export``, ``estimate``: the verbs about a model."""
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


def _add_tokenizer_verbs(sub) -> None:
    """``tokenizer train`` and ``tokenizer eval``."""
    p = sub.add_parser("tokenizer", help="train a byte-level BPE/unigram tokenizer for pretraining; measure it")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train on txt/jsonl files (streamed) and save a dir AutoTokenizer loads")
    t.add_argument("--files", nargs="+", required=True, help="paths, globs ('data/*.txt', '**/*.jsonl') or dirs")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens, special tokens included")
    t.add_argument("--model", default="bpe", help="bpe (byte-level BPE, the default) or unigram")
    t.add_argument("--out", required=True, metavar="OUT_DIR", help="tokenizer dir to write")
    t.add_argument("--text-field", default="text", help="jsonl: the field holding the text")
    t.add_argument("--chat-template", default=None,
                   help="a built-in name (chatml, llama2, llama3, mistral, gemma, qwen; adds the special tokens its "
                        "markers need), a .jinja file or a Jinja string")
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


OVERRIDES_HELP = ("config overrides: --config.KEY=VALUE (any key of docs/reference/config.md, e.g. "
                  "--config.train.max_steps=20; list keys take a,b or ['a', 'b'])")


def build_parser() -> argparse.ArgumentParser:
    """The ``easytune`` argument parser: one sub-command per verb, each with its handler as ``fn``."""
    parser = argparse.ArgumentParser(prog="easytune", description="Fine-tune Llama-family LLMs in JAX.")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_run_verbs(sub)
    _add_model_verbs(sub)
    _add_tokenizer_verbs(sub)
    for verb in ("train", "prepare", "lr", "estimate"):  # the verbs that take a config and its overrides
        sub.choices[verb].epilog = OVERRIDES_HELP
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``easytune`` console script."""
    parser = build_parser()
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
