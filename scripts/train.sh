#!/usr/bin/env bash
# Sets up everything and trains the default config end to end:
#   scripts/train.sh                         configs/small.yaml on Fashion-MNIST
#   scripts/train.sh -o train.max_steps=200  any `capsnet train` option passes through
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
exec .venv/bin/capsnet train --config configs/small.yaml "$@"
