#!/usr/bin/env bash
# Sets up everything and trains the default config end to end:
#   scripts/train.sh                         configs/small.yaml on Fashion-MNIST
#   scripts/train.sh -o train.max_steps=200  any `capsnet train` option passes through
#   scripts/train.sh --help                  this text, and the options of `capsnet train` once set up
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
if usage_if_asked "$0" "$@"; then
    # the options themselves come from capsnet, which exists only after the set-up has run once
    if [[ -x "$here/../.venv/bin/capsnet" ]]; then
        echo
        "$here/../.venv/bin/capsnet" train --help
    else
        echo "The options of capsnet train are listed by '.venv/bin/capsnet train --help' after a first run of this script has set up .venv."
    fi
    exit 0
fi
absolute_path_options "$@"  # --resume/--config paths given relative to the caller's folder
cd "$here/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
exec .venv/bin/capsnet train --config configs/small.yaml ${ABS_ARGS[@]+"${ABS_ARGS[@]}"}
