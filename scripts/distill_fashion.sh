#!/usr/bin/env bash
# Trains the paper's small model by the recipe that brought it to 90% on Fashion-MNIST, each
# stage as reproduce_fashion.sh does (full schedule, best.pt scored on the 10,000 test images,
# learning curves in the run's folder, or in FIGURES as there): first the teacher,
# configs/small_deep.yaml with its schedules compressed into TEACHER_EPOCHS epochs (default 12,
# as in the measured recipe), under the run name TEACHER (default small-deep-teacher12); then
# the small model taught by that run's best.pt, configs/small_taught.yaml, under the run name RUN
# (default small-taught); then that run's best.pt trained on with a lower learning rate,
# configs/small_taught_tail.yaml, under the run name TAIL (default RUN-tail), whose best.pt is
# the recipe's model.
#
#   bash scripts/distill_fashion.sh
#   bash scripts/distill_fashion.sh -o loss.teacher_temperature=2   # options for both student stages
#   TEACHER=t RUN=s TAIL=s2 bash scripts/distill_fashion.sh
#   TEACHER=small-deep-teacher TEACHER_EPOCHS=18 bash scripts/distill_fashion.sh  # the full teacher
# Options reach the student stages alone: one that draws the validation split (train.seed,
# data.val_split) must be the teacher's too, so give such a recipe a teacher of its own,
# trained with it (reproduce_fashion.sh, as above), named by TEACHER.
#
# Long on a CPU (on 2 cores the teacher takes about 72 min, the student about 2 h 30 min, the
# last stage 40 min), minutes on a GPU. Rerun the same command after a stop: a finished run is not
# trained again, a stopped one continues.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
configs="$(cd "$here/../configs" && pwd)"
teacher="${TEACHER:-small-deep-teacher12}"
teacher_epochs="${TEACHER_EPOCHS:-12}"
student="${RUN:-small-taught}"
tail="${TAIL:-$student-tail}"
RUN="$teacher" bash "$here/reproduce_fashion.sh" "$configs/small_deep.yaml" -o "train.epochs=$teacher_epochs"
RUN="$student" bash "$here/reproduce_fashion.sh" "$configs/small_taught.yaml" \
    -o "loss.teacher=$teacher/best.pt" "$@"
RUN="$tail" bash "$here/reproduce_fashion.sh" "$configs/small_taught_tail.yaml" \
    -o "loss.teacher=$teacher/best.pt" -o "train.init_from=$student/best.pt" "$@"
