#!/usr/bin/env bash
# Creates .venv (if missing) and installs capsnet with its test extras into it.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.capsnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch and torchvision are pinned to a matching pair; pip picks the CPU or CUDA
    # build that the platform offers.
    .venv/bin/python -m pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
