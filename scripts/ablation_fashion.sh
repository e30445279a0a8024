#!/usr/bin/env bash
# Routing ablation on Fashion-MNIST at a fixed budget, like the paper's Table 1:
# routing iterations 1/2/3, coordinate addition on/off, spread loss vs cross-entropy,
# cross-position vs per-patch normalisation. Every variant is CONFIG (default
# configs/small.yaml) with one change, trained for STEPS optimiser steps (default: one
# epoch of the config, with 6,000 images held out) with the spread-loss margin and the
# learning rate following the schedules of the config's whole run, and scored on the
# full 10,000-image test set.
#
#   bash scripts/ablation_fashion.sh            # writes docs/ablation_fashion.md
#   STEPS=100 bash scripts/ablation_fashion.sh  # a quicker, noisier table
#   CONFIG=configs/small_batch32.yaml OUT=table.md bash scripts/ablation_fashion.sh
#                                               # (OUT: relative to the repository)
#                                               # the earlier default (1,688 steps of batch 32)
#   OVERRIDES="train.compile_routing=true" bash scripts/ablation_fashion.sh
#                                               # extra overrides for every variant (space-separated)
#
# Runs go to <logging.out_dir>/ablation-<variant>/ (weights/em_capsules by default; replaced
# when the script reruns).
# On a 2-core CPU each one-epoch variant of configs/small.yaml takes roughly 4-7 minutes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
if (($#)); then
    echo "error: ablation_fashion.sh takes no arguments (got: $*); it is set by CONFIG, STEPS, OVERRIDES and OUT" >&2
    exit 2
fi
cd "$here/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
read -r -a extra <<< "${OVERRIDES:-}"
out="${OUT:-docs/ablation_fashion.md}"
capsnet=".venv/bin/capsnet"
python=".venv/bin/python"
config="${CONFIG:-configs/small.yaml}"
if [[ ! -f "$config" ]]; then
    echo "error: CONFIG=$config: no such file (give a config path relative to the repository)" >&2
    exit 2
fi

variants=(
    "baseline|the config unchanged: 2 iterations, coordinate addition, spread loss, cross-position|"
    "iterations-1|1 routing iteration|model.iterations=1"
    "iterations-3|3 routing iterations (the paper's smallNORB setting)|model.iterations=3"
    "no-coord-add|no coordinate addition|model.coord_add=false"
    "cross-entropy|cross-entropy loss instead of spread loss|loss.kind=cross_entropy"
    "per-patch|per-patch normalisation of the assignments|model.normalisation=per_patch"
)

overrides=()  # OVERRIDES as capsnet train options, for every variant
for override in ${extra[@]+"${extra[@]}"}; do overrides+=(-o "$override"); done
# the config's setting $1 with 6,000 images held out and OVERRIDES
setting() { config_setting "$python" "$config" "$1" -o data.val_split=0.1 ${overrides[@]+"${overrides[@]}"}; }
# the folder of runs and the length of the config's run, as the config and OVERRIDES set them
out_dir="$(setting logging.out_dir)"
batch="$(setting train.batch_size)"
accumulate="$(setting train.accumulate)"
train_images="$("$python" -c "import sys; print(60000 - round(float(sys.argv[1]) * 60000))" "$(setting data.val_split)")"
per_epoch=$(( ( (train_images + batch - 1) / batch + accumulate - 1 ) / accumulate ))
run_steps=$(( per_epoch * $(setting train.epochs) ))
steps="${STEPS:-$per_epoch}"
if [[ ! "$steps" =~ ^[0-9]+$ ]] || ((10#$steps < 1)); then
    echo "error: STEPS=$steps: give a number of optimiser steps, 1 or more" >&2
    exit 2
fi
steps=$((10#$steps))
# the schedules that span the whole run (null) keep the pace of the config's run, not of STEPS
margin_steps="$(setting loss.margin_steps)"
decay_steps="$(setting optim.decay_steps)"
[[ "$margin_steps" == None ]] && margin_steps=$run_steps
[[ "$decay_steps" == None ]] && decay_steps=$run_steps
schedule=(-o "loss.margin_steps=$margin_steps" -o "optim.decay_steps=$decay_steps")
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
for entry in "${variants[@]}"; do
    IFS='|' read -r name what change <<< "$entry"
    args=(-o "train.max_steps=$steps" -o data.val_split=0.1 "${schedule[@]}" ${overrides[@]+"${overrides[@]}"})
    [[ -n "$change" ]] && args+=(-o "$change")  # last, so the variant's own change wins
    echo "== $name: $what"
    start=$(date +%s)
    "$capsnet" train --config "$config" --run-name "ablation-$name" --overwrite "${args[@]}"
    seconds=$(( $(date +%s) - start ))
    json="$("$capsnet" eval --ckpt "$out_dir/ablation-$name" --split test --json)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$what" "$change" "$seconds" "$json" >> "$results"
done

"$python" - "$results" "$out" "$steps" "$config" "$batch" "${schedule[*]} ${extra[*]+${extra[*]}}" <<'PY'
import json
import sys

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps, config, batch = int(sys.argv[3]), sys.argv[4], sys.argv[5]
common = " ".join(f"-o {a}" for a in sys.argv[6].split() if a != "-o")
BEGIN = "<!-- from here to the end marker, written by scripts/ablation_fashion.sh -->"
END = "<!-- end of the part written by scripts/ablation_fashion.sh -->"
lines = [
    BEGIN,
    f"# Routing ablation on Fashion-MNIST ({steps} steps of batch {batch} each)",
    "",
    f"Every row is `{config}` with one change (`-o train.max_steps={steps} -o data.val_split=0.1 {common}`,",
    "so the spread-loss margin and the learning rate follow the schedules of the config's whole run),",
    "scored on the 10,000 test images by",
    "`capsnet eval --split test`. Written by `scripts/ablation_fashion.sh`.",
    "",
    "| variant | change | test accuracy | wall time (s) |",
    "|---|---|---|---|",
]
for name, what, change, seconds, payload in rows:
    result = json.loads(payload)
    acc = result.get("acc", result.get("accuracy"))
    lines.append(f"| {what} | `{change or '-'}` | {acc:.4f} | {seconds} |")
lines.append(END)
block = "\n".join(lines)
try:  # the text around the written part (notes on the runs) is kept
    before = open(sys.argv[2]).read()
except FileNotFoundError:
    before = ""
if BEGIN in before and END in before:
    head, rest = before.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
else:
    text = block + "\n"
open(sys.argv[2], "w").write(text)
print(block)
PY
