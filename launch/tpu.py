"""Create, prepare and drive a Cloud TPU VM or pod slice for easytune, through gcloud.

Usage (run from the repository root; every sub-command accepts --dry-run, --project, --zone):

    python -m launch.tpu create NAME --zone us-central2-b --accelerator-type v4-8 [--spot] [--queued]
    python -m launch.tpu copy NAME --zone Z [--git URL]        # repo -> every worker
    python -m launch.tpu setup NAME --zone Z                   # tpu_setup/setup.sh on every worker
    python -m launch.tpu train NAME CONFIG --zone Z [--config.K=V ...] [--resume]
    python -m launch.tpu logs NAME --zone Z                    # tail -f worker 0's log
    python -m launch.tpu stop NAME --zone Z
    python -m launch.tpu delete NAME --zone Z [--queued]

Each gcloud invocation follows the Cloud SDK reference:
`gcloud compute tpus tpu-vm create|scp|ssh|stop|delete` and
`gcloud compute tpus queued-resources create|delete` (https://cloud.google.com/sdk/gcloud/reference/compute/tpus).
On a pod slice every host must run the same program, so copy/setup/train use `--worker=all`;
JAX then discovers the other hosts itself (jax.distributed.initialize() needs no arguments on TPU VMs).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "easytune"   # repository folder in the home directory of each worker
LOG_FILE = "easytune-train.log"   # per-worker log file in the home directory

# Default TPU software (runtime) version per accelerator generation, from
# https://cloud.google.com/tpu/docs/runtimes ("TPU software versions" for JAX).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCEL_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$")
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class LaunchError(ValueError):
    """Bad command-line input for launch/tpu.py (printed as one line, exit status 2)."""


def runtime_version(accelerator_type: str) -> str:
    """Default runtime (software) version for an accelerator type such as 'v4-8' or 'v6e-8'.

    Raises LaunchError for a type outside v2/v3/v4/v5p/v5litepod/v6e-<cores or chips>.
    """
    m = _ACCEL_RE.match(accelerator_type)
    if not m:
        raise LaunchError(
            f"--accelerator-type: unknown TPU accelerator type {accelerator_type!r}; expected "
            "<generation>-<count> with generation one of " + ", ".join(RUNTIME_VERSIONS)
            + " (e.g. v4-8, v5litepod-8, v5p-8, v6e-8)")
    return RUNTIME_VERSIONS[m.group(1)]


def _check_name(name: str) -> str:
    if not name:
        raise LaunchError("NAME: a TPU name is required")
    if not _NAME_RE.match(name) or len(name) > 63:
        raise LaunchError(f"NAME: {name!r} is not a valid TPU name (lowercase letters, digits and "
                          "hyphens, starting with a letter, at most 63 characters)")
    return name


def _location(args: argparse.Namespace) -> list[str]:
    flags = [f"--zone={args.zone}"]
    if args.project:
        flags.append(f"--project={args.project}")
    return flags


def _ssh(args: argparse.Namespace, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
            f"--worker={worker}", f"--command={command}"]


def build_commands(args: argparse.Namespace) -> list[list[str]]:
    """The gcloud argument lists (list of list of str) that the parsed sub-command runs, in order.

    Raises LaunchError on bad input (unknown accelerator type, bad name, bad --config override).
    """
    _check_name(args.name)
    loc = _location(args)
    cmd = args.command
    if cmd == "create":
        version = args.version or runtime_version(args.accelerator_type)
        runtime_version(args.accelerator_type)   # validate even when --version is given
        spot = ["--spot"] if args.spot else []
        if args.queued:
            return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
                     f"--node-id={args.name}", *loc, f"--accelerator-type={args.accelerator_type}",
                     f"--runtime-version={version}", *spot]]
        return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *loc,
                 f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot]]
    if cmd == "copy":
        if args.git:
            clone = (f"rm -rf {REMOTE_DIR} && git clone --depth=1 {shlex.quote(args.git)} {REMOTE_DIR}")
            return [_ssh(args, clone)]
        return [_ssh(args, f"rm -rf {REMOTE_DIR}"),
                ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(args.src),
                 f"{args.name}:~/{REMOTE_DIR}", *loc, "--worker=all"]]
    if cmd == "setup":
        return [_ssh(args, f"cd {REMOTE_DIR} && bash tpu_setup/setup.sh")]
    if cmd == "train":
        for extra in args.overrides:
            if extra != "--resume" and not re.match(r"^--config\.[A-Za-z_][\w.]*=", extra):
                raise LaunchError(f"train: unexpected argument {extra!r}; overrides look like "
                                  "--config.KEY=VALUE (or --resume)")
        train = shlex.join(["easytune", "train", args.config, *args.overrides])
        remote = (f"cd {REMOTE_DIR} && PATH=\"$HOME/.local/bin:$PATH\" nohup {train} > ~/{LOG_FILE} 2>&1 < /dev/null &")
        return [_ssh(args, remote)]
    if cmd == "logs":
        return [_ssh(args, f"tail -n 200 -f ~/{LOG_FILE}", worker="0")]
    if cmd == "stop":
        return [["gcloud", "compute", "tpus", "tpu-vm", "stop", args.name, *loc]]
    if cmd == "delete":
        if args.queued:
            return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *loc,
                     "--force", "--quiet"]]
        return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *loc, "--quiet"]]
    raise LaunchError(f"unknown sub-command {cmd!r}")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line: `launch/tpu.py: error: ...` (exit status 2)."""

    def error(self, message: str):
        where = f"{self.prog.split(' ', 1)[1]}: " if " " in self.prog else ""
        self.exit(2, f"launch/tpu.py: error: {where}{message}\n")


def make_parser() -> argparse.ArgumentParser:
    """argparse parser with the sub-commands create/copy/setup/train/logs/stop/delete."""
    parser = _Parser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", metavar="NAME", help="TPU VM (node) name")
    common.add_argument("--zone", required=True, help="zone, e.g. us-central2-b (v4), us-east5-a (v5p)")
    common.add_argument("--project", default=None, help="Google Cloud project (default: gcloud config)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    p = sub.add_parser("create", parents=[common], help="create a TPU VM / pod slice")
    p.add_argument("--accelerator-type", required=True, help="v4-8, v5litepod-8, v5p-8, v6e-8, v4-32, ...")
    p.add_argument("--version", default=None, help="runtime version (default per generation)")
    p.add_argument("--spot", action="store_true", help="Spot VM (cheaper, can be preempted)")
    p.add_argument("--queued", action="store_true", help="request through queued-resources")
    p = sub.add_parser("copy", parents=[common], help="copy this repository to every worker")
    p.add_argument("--git", default=None, help="clone this git URL on each worker instead")
    p.add_argument("--src", default=str(REPO), help="local folder to copy (default: this repository)")
    sub.add_parser("setup", parents=[common], help="run tpu_setup/setup.sh on every worker")
    p = sub.add_parser("train", parents=[common], help="start `easytune train` on every worker")
    p.add_argument("config", metavar="CONFIG", help="config file path inside the repository")
    sub.add_parser("logs", parents=[common], help="follow worker 0's training log")
    sub.add_parser("stop", parents=[common], help="stop the TPU VM")
    p = sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    p.add_argument("--queued", action="store_true", help="delete the queued resource (and its node)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse argv, then print (--dry-run) or run each gcloud command; returns the exit status."""
    parser = make_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `train` forwards unknown --config.K=V overrides to easytune train.
    args, extra = parser.parse_known_args(argv)
    args.overrides = extra if args.command == "train" else []
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        commands = build_commands(args)
    except LaunchError as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        return 2
    for command in commands:
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            try:
                rc = subprocess.run(command).returncode
            except FileNotFoundError:
                print("launch/tpu.py: error: gcloud not found; install the Google Cloud CLI", file=sys.stderr)
                return 127
            if rc != 0:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
