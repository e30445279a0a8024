#!/usr/bin/env bash
# Reproduces the README's Fashion-MNIST results from scratch: trains a config for its
# full schedule, scores best.pt (chosen on the validation split) on the 10,000 test
# images (also with the mirrored test when the run trained with horizontal flips), and
# draws the learning curves into the run's folder (curves.png beside its metrics.jsonl).
#
#   bash scripts/reproduce_fashion.sh                              # configs/small.yaml
#   bash scripts/reproduce_fashion.sh configs/fashion_paper.yaml   # the paper-size model
#   RUN=small-3ep bash scripts/reproduce_fashion.sh configs/small.yaml -o train.epochs=3  # shorter
#   RUN=small-seed1 bash scripts/reproduce_fashion.sh -o train.seed=1  # small.yaml, another seed
#   RUN=my-run bash scripts/reproduce_fashion.sh configs/small_long.yaml -o optim.name=adam
#                                           # a run name of your own (default: reproduce-<config>)
#   AVERAGE=3 bash scripts/reproduce_fashion.sh configs/small_long.yaml
#                                           # also the mean of the weights of the last 3 epoch-end
#                                           # checkpoints (capsnet average; the run must keep that
#                                           # many: logging.keep), scored on val and test
#   FIGURES=docs/figures RUN=mine bash scripts/reproduce_fashion.sh
#                                           # the curves as docs/figures/curves_mine.png instead
#                                           # (FIGURES: a folder, relative to the caller's)
#
# Long: an epoch of configs/small.yaml takes roughly 4-7 minutes on a 2-core CPU, and the
# configs of 18 epochs take one to three hours there.
# Interrupted runs continue where they stopped: rerun the same command (the run name
# is derived from the config, or RUN, and training resumes from its latest checkpoint);
# give a variant with different overrides its own RUN (under the default name it would
# resume, or be refused by, the run of the plain command).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
config="$(cd "$here/.." && pwd -P)/configs/small.yaml"  # without one, or with options alone
if (($#)) && [[ "$1" != -* ]]; then
    config="$(absolute_if_path "$1")"  # a path relative to the caller's folder
    shift
fi
for arg in "$@"; do
    case "$arg" in
        --run-name|--run-name=*|--config|--config=*|-c|--resume|--resume=*)
            echo "error: reproduce_fashion.sh sets $arg itself: give the config as its first argument and the run name as RUN=..." >&2
            exit 2 ;;
    esac
done
absolute_path_options "$@"
figures="${FIGURES:-}"
if [[ -n "$figures" && "$figures" != /* ]]; then
    figures="$(pwd -P)/$figures"  # still the caller's folder after the change to the repository
fi
cd "$here/.."
name="${RUN:-reproduce-$(basename "$config" .yaml)}"
average="${AVERAGE:-}"
if [[ -n "$average" ]]; then
    if [[ ! "$average" =~ ^[0-9]+$ ]] || ((10#$average < 2)); then
        echo "error: AVERAGE=$average: give the number of epoch-end checkpoints to average, 2 or more" >&2
        exit 2
    fi
    average=$((10#$average))  # 08 is eight
fi
bash scripts/setup_env.sh
if [[ -n "$average" ]]; then
    keep="$(config_setting .venv/bin/python "$config" logging.keep ${ABS_ARGS[@]+"${ABS_ARGS[@]}"})"
    if ((average > keep)); then
        echo "error: AVERAGE=$average needs the run to keep that many checkpoints, but logging.keep is $keep: add -o logging.keep=$average" >&2
        exit 2
    fi
fi
bash scripts/fetch_fashion_mnist.sh
start=$(date +%s)
.venv/bin/capsnet train --config "$config" --run-name "$name" --resume latest ${ABS_ARGS[@]+"${ABS_ARGS[@]}"}
echo "training wall time (this invocation): $(( $(date +%s) - start )) s"
# the run's folder under logging.out_dir, as the config and its -o overrides set it
out_dir="$(config_out_dir .venv/bin/python "$config" ${ABS_ARGS[@]+"${ABS_ARGS[@]}"})"
run_dir="$out_dir/$name"
# A run trained with horizontal flips is also scored with the mirrored test (eval --mirror).
mirror=()
if .venv/bin/python -c 'import sys
from capsnet.config import load_config
from capsnet.data import trains_with_flips
sys.exit(0 if trains_with_flips(load_config(sys.argv[1]).data) else 1)' "$run_dir/config.yaml"; then
    mirror=(--mirror)
fi
.venv/bin/capsnet eval --ckpt "$run_dir/best.pt" --split test ${mirror[@]+"${mirror[@]}"}
if [[ -n "$average" ]]; then
    averaged="$(.venv/bin/capsnet average --ckpt "$run_dir" --last "$average" --overwrite --json |
        .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["checkpoint"])')"
    echo "averaged the weights of the last $average epoch-end checkpoints: $averaged"
    .venv/bin/capsnet eval --ckpt "$averaged" --split val
    .venv/bin/capsnet eval --ckpt "$averaged" --split test ${mirror[@]+"${mirror[@]}"}
fi
# Into the run's folder unless FIGURES names a folder: a default in docs/figures would draw over
# the committed figure of an earlier run of the same name.
if [[ -n "$figures" ]]; then
    mkdir -p "$figures"
    curves="$figures/curves_$name.png"
else
    curves="$run_dir/curves.png"
fi
.venv/bin/python scripts/plot_curves.py "$run_dir" --out "$curves"
echo "learning curves: $curves"
