#!/usr/bin/env bash
# Regenerates the README figures of the experiment commands (docs/figures/) from checkpoints.
#
#   bash scripts/experiment_figures.sh [CKPT] [SMALLNORB_VIEWPOINT_CKPT]
#
# CKPT (default: latest) is any checkpoint capsnet eval accepts, e.g. a Fashion-MNIST run;
# the second, optional one is a smallNORB run trained with data.split=azimuth or elevation.
# LIMIT (default 1000) test images are used; extra arguments for every command can be given
# in CAPSNET_ARGS (e.g. "--device cpu"). The PNGs are reduced to 128 colours to stay small.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
ckpt="$(absolute_if_path "${1:-latest}")"  # paths relative to the caller's folder
norb="${2:-}"
[[ -z "$norb" ]] || norb="$(absolute_if_path "$norb")"
cd "$here/.."
bash scripts/setup_env.sh
PATH="$PWD/.venv/bin:$PATH"  # capsnet and python: the project's own

limit="${LIMIT:-1000}"
figures="docs/figures"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
read -r -a args <<< "${CAPSNET_ARGS:-}"
mkdir -p "$figures"

capsnet eval --ckpt "$ckpt" --limit "$limit" --crops 5 --plot "$work/eval_multicrop.png" ${args[@]+"${args[@]}"}
capsnet attack --ckpt "$ckpt" --method fgsm --eps 0.01,0.02,0.05,0.1,0.2 --limit "$limit" \
    --out "$work" --no-tensorboard ${args[@]+"${args[@]}"}
cp "$work/attack-fgsm.png" "$work/attack_fgsm.png"
capsnet inspect --ckpt "$ckpt" --index 1 --out "$work/inspect" ${args[@]+"${args[@]}"}
cp "$work/inspect/c_routing.png" "$work/inspect_routing.png"
cp "$work/inspect/e_pose_perturbation.png" "$work/inspect_pose_perturbation.png"
names=(eval_multicrop attack_fgsm inspect_routing inspect_pose_perturbation)
if [[ -n "$norb" ]]; then
    capsnet eval --ckpt "$norb" --limit "$limit" --crops 5 --plot "$work/eval_viewpoints.png" ${args[@]+"${args[@]}"}
    names+=(eval_viewpoints)
fi
for name in "${names[@]}"; do
    python - "$work/$name.png" "$figures/$name.png" <<'PY'
import sys
from PIL import Image

image = Image.open(sys.argv[1]).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
image.save(sys.argv[2], optimize=True)
PY
done
ls -l "$figures"
