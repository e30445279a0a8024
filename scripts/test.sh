#!/usr/bin/env bash
# Sets up everything (venv, packages, dataset) and runs the test suite.
#   scripts/test.sh            the default suite (a few minutes)
#   scripts/test.sh --runslow  also the slow tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
exec .venv/bin/python -m pytest -q "$@"
