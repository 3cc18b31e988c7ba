#!/usr/bin/env bash
# The demo recipe: the real PromptKD pipeline on real Fashion-MNIST photos with tiny towers, on a CPU.
#   bash scripts/build_demo_bundle.sh [WORKDIR]      (default: demo/)
# No pretrained CLIP can be downloaded here, so the first step makes stand-in CLIP weights for the tiny
# teacher and student (pretrain-tiny); everything after it is exactly what a real run does.
# Sizes can be overridden from the environment (the tests use smaller ones). Deviations from the published
# recipe, all for 28 px photos and tiny towers: a larger lr, KD weight 10 for lr 0.05, crops of at least half
# the image (--crop-min 0.5; the published 0.08 suits 224 px photos), fewer epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-demo}
PY=${PY:-.venv/bin/python}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-400}
TEST_PER_CLASS=${TEST_PER_CLASS:-50}
PRETRAIN_EPOCHS=${PRETRAIN_EPOCHS:-10}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
DISTILL_EPOCHS=${DISTILL_EPOCHS:-10}
WORKERS=${WORKERS:-2}
TEACHER="--teacher-model PKD-Tiny-Teacher --teacher-pretrained $W/weights/teacher.pt"
mkdir -p "$W"

echo "== 1/6 Fashion-MNIST photos -> $W/data"
[ -d "$W/data/train" ] || $PY -m training prepare-fashion-mnist --out "$W/data" \
    --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$TEST_PER_CLASS"

echo "== 2/6 stand-in CLIP weights for the tiny teacher and student (captions: bare class names)"
[ -f "$W/weights/teacher.pt" ] || $PY -m training pretrain-tiny --model PKD-Tiny-Teacher \
    --image-folder "$W/data" --out "$W/weights/teacher.pt" --epochs "$PRETRAIN_EPOCHS" --lr 2e-3
[ -f "$W/weights/student.pt" ] || $PY -m training pretrain-tiny --model PKD-Tiny-Student \
    --image-folder "$W/data" --out "$W/weights/student.pt" --epochs "$PRETRAIN_EPOCHS" --lr 2e-3

echo "== 3/6 stage 1: PromptSRC teacher on 16 labelled photos per class, then class vectors for every class"
$PY -m training train-teacher $TEACHER --image-folder "$W/data" --subset all --shots 16 \
    --out "$W/teacher" --epochs "$TEACHER_EPOCHS" --lr 0.05 --gpa-mean $((TEACHER_EPOCHS * 4 / 5)) \
    --crop-min 0.5 --workers "$WORKERS"

echo "== 4/6 stage 2: distillation on the unlabelled training photos, teacher outputs cached"
$PY -m training distill $TEACHER --teacher-checkpoint "$W/teacher/teacher.pt" \
    --student-model PKD-Tiny-Student --student-pretrained "$W/weights/student.pt" \
    --images "$W/data/train" --image-folder "$W/data" --class-vectors "$W/teacher/class_vectors.npz" \
    --teacher-cache "$W/teacher_cache" --cache-views 4 \
    --out "$W/run" --epochs "$DISTILL_EPOCHS" --batch-size 32 --lr 0.05 --kd-weight 10 --crop-min 0.5 \
    --workers "$WORKERS"

echo "== 5/6 export: ONNX student, parity with PyTorch, int8 variants for CPUs, bundle"
# int8 (7-bit weights, any CPU) and int8_vnni (8-bit, CPUs with VNNI/AMX or ARM dot products), each kept only
# where it reaches its floors here; the server picks the fastest that passes its start-up check where it runs.
$PY -m export bundle --checkpoint "$W/run/student.pt" --parity-images "$W/data/test" --out "$W/bundle" \
    --name fashion-mnist-demo --overwrite --variants int8 int8_vnni optimized \
    --calibration-images "$W/data/train" --skip-failing-variants

echo "== 6/6 bundle ready: $W/bundle"
