#!/usr/bin/env bash
# Trains the teacher and then the student of configs/small_taught.yaml, each as
# reproduce_fashion.sh does (full schedule, best.pt scored on the 10,000 test images,
# learning curves in docs/figures/): first configs/small_deep.yaml under the run name
# TEACHER (default small-deep-teacher), then the paper's small model taught by that run's
# best.pt under the run name RUN (default small-taught).
#
#   bash scripts/distill_fashion.sh
#   bash scripts/distill_fashion.sh -o loss.teacher_temperature=2   # options for the student
#   TEACHER=t RUN=s bash scripts/distill_fashion.sh
#
# Long on a CPU (the teacher alone takes hours on 2 cores), minutes on a GPU. Rerun the same
# command after a stop: a finished run is not trained again, a stopped one continues.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
configs="$(cd "$here/../configs" && pwd)"
teacher="${TEACHER:-small-deep-teacher}"
student="${RUN:-small-taught}"
RUN="$teacher" bash "$here/reproduce_fashion.sh" "$configs/small_deep.yaml"
RUN="$student" bash "$here/reproduce_fashion.sh" "$configs/small_taught.yaml" \
    -o "loss.teacher=$teacher/best.pt" "$@"
