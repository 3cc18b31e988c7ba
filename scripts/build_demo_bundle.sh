#!/usr/bin/env bash
# The demo recipe: the real PromptKD pipeline on real Fashion-MNIST photos with tiny towers, on a CPU.
#   bash scripts/build_demo_bundle.sh [WORKDIR]      (default: demo/)
# No pretrained CLIP can be downloaded here, so the first step makes stand-in CLIP weights for the tiny
# teacher and student (pretrain-tiny); everything after it is exactly what a real run does.
# Sizes can be overridden from the environment (the end-to-end test uses smaller ones).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-demo}
PY=${PY:-.venv/bin/python}
TRAIN_PER_CLASS=${TRAIN_PER_CLASS:-400}
TEST_PER_CLASS=${TEST_PER_CLASS:-50}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-4}
DISTILL_EPOCHS=${DISTILL_EPOCHS:-10}
WORKERS=${WORKERS:-2}
mkdir -p "$W"

echo "== 1/6 Fashion-MNIST photos -> $W/data"
[ -d "$W/data/train" ] || $PY -m training prepare-fashion-mnist --out "$W/data" \
    --train-per-class "$TRAIN_PER_CLASS" --test-per-class "$TEST_PER_CLASS"

echo "== 2/6 stand-in CLIP weights for the tiny teacher and student"
[ -f "$W/weights/teacher.pt" ] || $PY -m training pretrain-tiny --model PKD-Tiny-Teacher \
    --image-folder "$W/data" --out "$W/weights/teacher.pt" --epochs "$TEACHER_EPOCHS" --lr 2e-3
[ -f "$W/weights/student.pt" ] || $PY -m training pretrain-tiny --model PKD-Tiny-Student \
    --image-folder "$W/data" --out "$W/weights/student.pt" --epochs "$STUDENT_EPOCHS" --lr 2e-3

echo "== 3/6 class vectors: the teacher text tower runs once over the class names"
$PY -m training class-vectors --teacher-model PKD-Tiny-Teacher --teacher-pretrained "$W/weights/teacher.pt" \
    --image-folder "$W/data" --out "$W/class_vectors.npz"

echo "== 4/6 distillation on the unlabelled training photos"
$PY -m training distill \
    --teacher-model PKD-Tiny-Teacher --teacher-pretrained "$W/weights/teacher.pt" \
    --student-model PKD-Tiny-Student --student-pretrained "$W/weights/student.pt" \
    --images "$W/data/train" --image-folder "$W/data" --class-vectors "$W/class_vectors.npz" \
    --out "$W/run" --epochs "$DISTILL_EPOCHS" --batch-size 32 --lr 0.05 --kd-weight 1 --workers "$WORKERS"

echo "== 5/6 export: ONNX student, parity with PyTorch, bundle"
$PY -m export --checkpoint "$W/run/student.pt" --parity-images "$W/data/test" --out "$W/bundle" --name fashion-mnist-demo --overwrite

echo "== 6/6 bundle ready: $W/bundle"
