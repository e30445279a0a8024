#!/usr/bin/env bash
# Sets up everything and trains the default config end to end:
#   scripts/train.sh                         configs/small.yaml on Fashion-MNIST
#   scripts/train.sh -o train.max_steps=200  any `capsnet train` option passes through
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
absolute_path_options "$@"  # --resume/--config paths given relative to the caller's folder
cd "$here/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
exec .venv/bin/capsnet train --config configs/small.yaml ${ABS_ARGS[@]+"${ABS_ARGS[@]}"}
