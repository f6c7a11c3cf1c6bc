#!/usr/bin/env bash
# Prepare one TPU VM worker for easytune; launch/tpu.py setup runs this on every worker (--worker=all).
# Run from the repository root on the TPU VM:  bash tpu_setup/setup.sh
#  1. JAX with the TPU backend (libtpu), as the JAX install guide documents for Cloud TPU VMs:
#       pip install -U "jax[tpu]"
#  2. easytune itself, editable, from this copied repository.
#  3. tpu_setup/check.py: every chip of every host visible, and a psum across all of them works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --upgrade pip
# One pip call, so pip picks a JAX that both easytune (pyproject's bounds) and libtpu support;
# [gcs] adds gcsfs for train.output_dir=gs://bucket/run.
"$PY" -m pip install -U "jax[tpu]" -e ".[gcs]"
# pip installs the `easytune` script to ~/.local/bin outside a venv; launch/tpu.py train puts it on PATH.
"$PY" tpu_setup/check.py
