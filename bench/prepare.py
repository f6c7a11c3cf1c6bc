"""Data preparation speed and memory: ``easytune prepare`` vs a ``datasets.map`` baseline, at several input sizes.

    python bench/prepare.py [--sizes 10,100,500] [--num-proc N] [--workdir DIR] [--keep] [--seed 0]

Issue 16's measurement. For each size (MB = 10**6 bytes of JSONL) a deterministic alpaca file is generated,
streamed to disk: records ``{"instruction", "input", "output"}`` of about 500 bytes on average (lognormal
lengths, 40% with an ``input``), their instructions taken from the real alpaca sets in ../shared/data and
their inputs/outputs cut at word boundaries from its text corpora (Tiny Shakespeare, Wikipedia, C4, alpaca
answers); seeded pseudo-words when that folder is absent. The same seed gives the same stream, so a smaller
input is a prefix of a larger one. The tokenizer is stories260K's (``easytune convert`` of its GGUF, 512
tokens; tok512's ``tokenizer.model``, the same vocab, if the conversion fails).

Two runs per size, each a fresh subprocess so its memory is its own:

- ``easytune``: ``python -m easytune.cli prepare <config.py>`` with ``data.format = "alpaca"``,
  ``sequence_len = 512``, ``packing = True``, ``val_set_size = 0``, ``dataset_prepared_path`` in the work dir
  (emptied first, so nothing is reused) and ``--config.data.num_proc=N`` when the config has that key.
  It reads, formats, tokenizes, masks, packs and caches. Tokens are the report's ``tokens``.
- ``datasets``: ``datasets.load_dataset("json", split="train", cache_dir=<workdir>)`` then
  ``.map(batched=True, num_proc=N, remove_columns=...)`` with ``transformers.AutoTokenizer`` on the same
  tokenizer dir: the alpaca prompt and prompt+output tokenized as easytune does (``[bos] + ids + [eos]``,
  labels -100 on the prompt), int32 columns in Arrow cache files. No truncation and no packing. Tokens are
  the sum of the sequence lengths; the script says when the two counts differ.

Printed: the machine (CPUs, model name, RAM, library versions), then one row per (size, tool): input MB, records,
tokens, wall seconds of the whole command (interpreter start and imports included, a few seconds that weigh on the
small sizes: add a size of 0.01 to see them), records/s, tokens/s, peak RSS (``ru_maxrss`` of ``os.wait4`` on the
command: the largest single process among it and its waited-for workers), the peak of the
process tree's summed PSS (sampled every 0.2 s: what the workers hold together, shared pages counted once), and on
the easytune row the ratios easytune / datasets of records/s, peak RSS and tree PSS. A run whose tree passes
``--max-rss-gb`` (default 85% of RAM) is killed and its row says so, so an unbounded prepare cannot take the machine
down. Numbers depend on the machine and its load: not a test. ``--sizes 1,3`` finishes in about a minute on 2 cores;
the default sizes need ~5 GB of disk in the work dir.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import math
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
GB = 1e9

_BASELINE = r"""
import json, sys
import datasets, pyarrow.compute as pc, transformers
path, tok_dir, cache_dir, num_proc = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
datasets.disable_progress_bars()
tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
bos, eos = tok.bos_token_id, tok.eos_token_id
SYS = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.")
SYS_IN = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.")

def prompt(ins, inp):
    if inp:
        return f"{SYS_IN}\n\n### Instruction:\n{ins}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"{SYS}\n\n### Instruction:\n{ins}\n\n### Response:\n"

def tokenize(batch):
    prompts = [prompt(i, x) for i, x in zip(batch["instruction"], batch["input"])]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    f_ids = tok([p + o for p, o in zip(prompts, batch["output"])], add_special_tokens=False)["input_ids"]
    ids = [[bos] + f + [eos] for f in f_ids]
    labels = [[-100] * (1 + len(p)) + s[1 + len(p):] for p, s in zip(p_ids, ids)]
    return {"input_ids": ids, "labels": labels, "length": [len(s) for s in ids]}

ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache_dir)
features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "labels": datasets.Sequence(datasets.Value("int32")), "length": datasets.Value("int32")})
ds = ds.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names,
            features=features)
print("RESULT " + json.dumps({"records": len(ds), "tokens": pc.sum(ds.data.column("length")).as_py()}))
"""

_CONFIG = '''"""bench/prepare.py: alpaca at {mb} MB with the stories260K tokenizer (generated)."""
from easytune.config import defaults


def get_config():
    c = defaults()
    c.model.path = {tok!r}
    c.data.train_files = [{path!r}]
    c.data.format = "alpaca"
    c.data.sequence_len = 512
    c.data.packing = True
    c.data.val_set_size = 0
    c.data.dataset_prepared_path = {prepared!r}
    c.train.output_dir = {run!r}
    return c
'''


# ------------------------------------------------------------------------------------ inputs


def _corpus(rng: random.Random) -> tuple[list[str], str]:
    """(instructions, text) from ../shared/data, or seeded pseudo-words when it is absent."""
    instructions, texts = [], []
    for rel in ("instruct/llama_factory/alpaca_en_demo.json", "instruct/codealpaca/code_alpaca_2k.json",
                "instruct/torchtune/alpaca_tiny.json"):
        if (DATA / rel).is_file():
            for r in json.loads((DATA / rel).read_text()):
                instructions.append(r["instruction"])
                texts += [r.get("input") or "", r["output"]]
    for rel in ("corpus/tinyshakespeare/input.txt", "corpus/llama_factory_pretrain/wiki_demo.txt"):
        if (DATA / rel).is_file():
            texts.append((DATA / rel).read_text())
    c4 = DATA / "corpus/llama_factory_pretrain/c4_demo.jsonl"
    if c4.is_file():
        texts += [json.loads(line)["text"] for line in c4.read_text().splitlines() if line.strip()]
    text = "\n\n".join(t for t in texts if t)
    if instructions and len(text) > 100_000:
        return instructions, text
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(letters[:12 if k % 3 else 26]) for _ in range(rng.randint(1, 9))) for k in range(5000)]
    text = " ".join(rng.choice(words) + ("." if rng.random() < 0.07 else "") for _ in range(400_000))
    instructions = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + "."
                    for _ in range(3000)]
    return instructions, text


def _cut(text: str, n: int, rng: random.Random) -> str:
    """About ``n`` characters of ``text`` from a random offset, starting and ending at word boundaries."""
    n = max(1, min(n, len(text) // 2))
    start = text.find(" ", rng.randrange(len(text) - n)) + 1
    piece = text[start:start + n]
    end = piece.rfind(" ")
    return (piece[:end] if end > 0 else piece).strip()


def write_inputs(paths_mb: dict[pathlib.Path, float], seed: int) -> dict[pathlib.Path, int]:
    """Writes the alpaca JSONL files, each a prefix of one seeded record stream cut at about its size in MB
    (10**6 bytes); streams record by record. Returns the records per file."""
    rng = random.Random(seed)
    instructions, text = _corpus(random.Random(seed + 1))
    files = {p: open(p, "w", encoding="utf-8") for p in paths_mb}
    left = {p: int(mb * 1e6) for p, mb in paths_mb.items()}
    records = dict.fromkeys(paths_mb, 0)
    try:
        while any(v > 0 for v in left.values()):
            inp = _cut(text, int(rng.lognormvariate(math.log(60), 0.8)), rng) if rng.random() < 0.4 else ""
            out = _cut(text, min(int(rng.lognormvariate(math.log(250), 0.9)), 4000), rng) or "Yes."
            line = json.dumps({"instruction": rng.choice(instructions), "input": inp, "output": out},
                              ensure_ascii=False) + "\n"
            nbytes = len(line.encode("utf-8"))
            for p, f in files.items():
                if left[p] > 0:
                    f.write(line)
                    left[p] -= nbytes
                    records[p] += 1
    finally:
        for f in files.values():
            f.close()
    return records


# ------------------------------------------------------------------------------------ measuring


def _tree_pss(root: int) -> int:
    """Summed PSS (bytes; RSS where smaps_rollup is missing) of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                pass
    return total


def measure(cmd: list[str], log_path: pathlib.Path, env: dict, max_bytes: float) -> dict:
    """Runs ``cmd`` (its output to ``log_path``) and returns ``seconds``, ``rc``, ``peak_rss`` (bytes,
    ``ru_maxrss`` from ``os.wait4``), ``tree_pss`` (bytes, sampled peak) and ``killed`` (a reason or "")."""
    peak, killed, done = [0], [""], threading.Event()
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_path.parent,
                             start_new_session=True)

        def sample():
            while not done.wait(0.2):
                peak[0] = max(peak[0], _tree_pss(p.pid))
                if peak[0] > max_bytes and not killed[0]:
                    killed[0] = f"killed: tree over {max_bytes / GB:.1f} GB"
                    os.killpg(p.pid, signal.SIGKILL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "rc": p.returncode, "peak_rss": usage.ru_maxrss * 1024, "tree_pss": peak[0],
            "killed": killed[0]}


def _tail(path: pathlib.Path, lines: int = 6) -> str:
    return "\n".join("    " + s for s in path.read_text(errors="replace").splitlines()[-lines:] if s.strip())


def run_baseline(src: pathlib.Path, tok: pathlib.Path, work: pathlib.Path, num_proc: int, env: dict,
                 max_bytes: float) -> dict:
    """The ``datasets.map`` run on ``src``; its Arrow cache is removed afterwards."""
    cache = work / f"hf_cache_{src.stem}"
    r = measure([sys.executable, "-c", _BASELINE, str(src), str(tok), str(cache), str(num_proc)],
                work / f"datasets_{src.stem}.log", env, max_bytes)
    shutil.rmtree(cache, ignore_errors=True)
    log = (work / f"datasets_{src.stem}.log").read_text(errors="replace")
    found = re.findall(r"^RESULT (.*)$", log, re.M)
    if r["rc"] == 0 and found:
        r.update(json.loads(found[-1]))
    return r


def _has_num_proc() -> bool:
    try:
        from easytune import config as config_lib
        return "num_proc" in config_lib.defaults().data
    except Exception:  # easytune mid-edit: its run will say what is wrong
        return False


def run_easytune(src: pathlib.Path, mb: float, tok: pathlib.Path, work: pathlib.Path, num_proc: int, env: dict,
                 max_bytes: float, keep: bool) -> dict:
    """``easytune prepare`` of ``src`` into an empty ``prepared_<name>``; tokens from its report."""
    prepared = work / f"prepared_{src.stem}"
    shutil.rmtree(prepared, ignore_errors=True)
    cfg = work / f"config_{src.stem}.py"
    cfg.write_text(_CONFIG.format(mb=mb, tok=str(tok), path=str(src), prepared=str(prepared),
                                  run=str(work / "run")))
    cmd = [sys.executable, "-m", "easytune.cli", "prepare", str(cfg)]
    if _has_num_proc():
        cmd.append(f"--config.data.num_proc={num_proc}")
    log_path = work / f"easytune_{src.stem}.log"
    r = measure(cmd, log_path, env, max_bytes)
    if r["rc"] == 0:
        reports = sorted(glob.glob(str(prepared / "**" / "report.json"), recursive=True))
        if reports:
            rep = json.loads(pathlib.Path(reports[-1]).read_text())
            r.update(records=rep.get("records_read", rep.get("records")), tokens=rep.get("tokens"))
        else:  # the printed report: "format:  N records -> M alpaca examples, K tokens"
            m = re.search(r"format:\s+(\d+) records -> \d+ \w+ examples, (\d+) tokens", log_path.read_text())
            if m:
                r.update(records=int(m[1]), tokens=int(m[2]))
    if not keep:
        shutil.rmtree(prepared, ignore_errors=True)
    return r


# ------------------------------------------------------------------------------------ report


def machine() -> str:
    """One line: CPUs, CPU model, RAM, library versions."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "") or __import__("platform").processor() or "?"
    ram = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    versions = []
    for lib in ("datasets", "transformers", "tokenizers"):
        try:
            versions.append(f"{lib} {importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{lib} absent")
    return (f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"{ram / GB:.1f} GB RAM; Python {sys.version.split()[0]}; {', '.join(versions)}")


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def row(mb: float, tool: str, r: dict, peer: dict | None) -> str:
    """One table row; ``peer`` (the baseline's result) adds the ratio columns."""
    ok = r["rc"] == 0 and r.get("tokens") is not None
    recs = r.get("records")
    rps = recs / r["seconds"] if ok and recs else None
    tps = r["tokens"] / r["seconds"] if ok else None
    cells = [f"{mb:>7.2f}", f"{tool:9s}", f"{_si(recs):>7s}", f"{_si(r.get('tokens')):>7s}", f"{r['seconds']:8.1f}",
             f"{_si(rps):>8s}", f"{_si(tps):>8s}", f"{r['peak_rss'] / GB:8.2f}", f"{r['tree_pss'] / GB:8.2f}"]
    if peer is not None:
        p_ok = peer["rc"] == 0 and peer.get("records")
        speed = rps / (peer["records"] / peer["seconds"]) if rps and p_ok else None
        mem = (ok or r["killed"]) and p_ok  # a killed run's memory is a lower bound; a crashed one's means nothing
        cells += [f"{speed:7.2f}x" if speed else f"{'-':>8s}",
                  f"{r['peak_rss'] / peer['peak_rss']:7.2f}x" if mem else f"{'-':>8s}",
                  f"{r['tree_pss'] / max(peer['tree_pss'], 1):7.2f}x" if mem else f"{'-':>8s}"]
    if not ok:
        cells.append(f"  FAILED: {r['killed'] or 'rc ' + str(r['rc'])}")
    return " ".join(cells)


def make_tokenizer(work: pathlib.Path, env: dict) -> tuple[pathlib.Path, str]:
    """stories260K as an HF dir (``easytune convert``), else tok512's tokenizer.model alone."""
    out = work / "stories260K"
    gguf = DATA / "models/stories260K/stories260K.gguf"
    r = subprocess.run([sys.executable, "-m", "easytune.cli", "convert", str(gguf), str(out)], env=env,
                       capture_output=True, text=True)
    if r.returncode == 0:
        return out, "stories260K (easytune convert of stories260K.gguf)"
    fallback = work / "tok512"
    fallback.mkdir(exist_ok=True)
    shutil.copy(DATA / "tokenizers/tok512/tok512.model", fallback / "tokenizer.model")
    (fallback / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    why = (r.stderr.strip().splitlines() or ["?"])[-1]
    return fallback, f"tok512 tokenizer.model (easytune convert failed: {why})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500", help="input sizes in MB (10**6 bytes), comma-separated")
    parser.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for both tools (default: all usable cores)")
    parser.add_argument("--workdir", default=None, help="where inputs, caches and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (inputs, prepared data, logs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-max-mb", type=float, default=float("inf"),
                        help="run the datasets baseline only up to this size (larger sizes: easytune alone)")
    parser.add_argument("--max-rss-gb", type=float, default=None,
                        help="kill a run whose process tree passes this (default: 85%% of RAM)")
    args = parser.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    ram = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    max_bytes = (args.max_rss_gb or 0.85 * ram / GB) * GB
    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_prepare_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(work / "hf_home"))
    print(machine())
    try:
        tok, tok_note = make_tokenizer(work, env)
        inputs = {work / f"alpaca_{s:g}MB.jsonl": s for s in sizes}
        t0 = time.perf_counter()
        counts = write_inputs(inputs, args.seed)
        total = sum(p.stat().st_size for p in inputs)
        print(f"inputs: {len(inputs)} alpaca JSONL files, {total / 1e6:.1f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s (seed {args.seed}); tokenizer: {tok_note}")
        print(f"num_proc {args.num_proc} for both (easytune: "
              f"{'--config.data.num_proc' if _has_num_proc() else 'no data.num_proc key yet, its default'}); "
              f"work dir {work}")
        print()
        print(f"{'':61s}{'peak GB':^17s} {'easytune / datasets':^26s}".rstrip())
        print(f"{'MB':>7s} {'tool':9s} {'records':>7s} {'tokens':>7s} {'seconds':>8s} {'rec/s':>8s} "
              f"{'tok/s':>8s} {'RSS':>8s} {'treePSS':>8s} {'rec/s':>8s} {'RSS':>8s} {'treePSS':>8s}")
        for src, mb in inputs.items():
            actual = src.stat().st_size / 1e6
            base = {}
            if mb <= args.baseline_max_mb:
                base = run_baseline(src, tok, work, args.num_proc, env, max_bytes)
                print(row(actual, "datasets", base, None), flush=True)
                if base["rc"] and _tail(work / f"datasets_{src.stem}.log"):
                    print(_tail(work / f"datasets_{src.stem}.log"))
            ez = run_easytune(src, mb, tok, work, args.num_proc, env, max_bytes, args.keep)
            print(row(actual, "easytune", ez, base or None), flush=True)
            if ez["rc"] and _tail(work / f"easytune_{src.stem}.log"):
                print(_tail(work / f"easytune_{src.stem}.log"))
            notes = []
            read = [n for n in (base.get("records"), ez.get("records")) if n is not None]
            if any(n != counts[src] for n in read):
                notes.append(f"records written {counts[src]}, read: datasets {base.get('records')}, "
                             f"easytune {ez.get('records')}")
            if base.get("tokens") and ez.get("tokens") and base["tokens"] != ez["tokens"]:
                notes.append(f"token counts differ: easytune {ez['tokens']} vs datasets {base['tokens']}")
            for n in notes:
                print(" " * 8 + "note: " + n)
            if not args.keep:
                src.unlink()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
