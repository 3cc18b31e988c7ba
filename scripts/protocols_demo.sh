#!/usr/bin/env bash
# Both paper protocols end to end on a CPU, small: real Fashion-MNIST photos laid out like four CoOp datasets
# (ImageNet, Caltech101, DTD, EuroSAT; each its own draw of photos), tiny towers with stand-in CLIP weights,
# 3 seeds, then the results tables beside the paper's numbers.
#   bash scripts/protocols_demo.sh [WORKDIR]      (default: protocols-demo/)
# The numbers say nothing about the paper (10 clothing classes under four names, tiny towers); the run shows
# the commands a researcher uses on the real datasets with --teacher-model ViT-L-14 and the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-protocols-demo}
PY=${PY:-.venv/bin/python}
mkdir -p "$W"

echo "== 1/5 Fashion-MNIST photos in CoOp layouts -> $W/data"
seed=0
for dataset in imagenet caltech101 dtd eurosat; do
    seed=$((seed + 1))
    $PY -m training prepare-fashion-mnist --out "$W/data" --coop "$dataset" --seed "$seed" \
        --train-per-class 100 --val-per-class 10 --test-per-class 50 >/dev/null
done
$PY -m training check-data --data-root "$W/data" --datasets imagenet caltech101 dtd eurosat

echo "== 2/5 stand-in CLIP weights for the tiny towers (no pretrained CLIP can be downloaded here)"
[ -d "$W/pretrain/train" ] || $PY -m training prepare-fashion-mnist --out "$W/pretrain" --train-per-class 400 \
    --test-per-class 1 --seed 100 >/dev/null
for role in teacher student; do
    model=PKD-Tiny-$([ $role = teacher ] && echo Teacher || echo Student)
    [ -f "$W/weights/$role.pt" ] || $PY -m training pretrain-tiny --model "$model" --image-folder "$W/pretrain" \
        --out "$W/weights/$role.pt" --epochs 10 --lr 2e-3
done

# Tiny towers learn at a larger lr with KD weight 10 (the published 1000/200 suit ViT-B/16 at lr 0.005).
COMMON="--data-root $W/data --out $W/runs --seeds 1 2 3
  --teacher-model PKD-Tiny-Teacher --teacher-pretrained $W/weights/teacher.pt
  --student-model PKD-Tiny-Student --student-pretrained $W/weights/student.pt
  --teacher-epochs 10 --teacher-lr 0.05 --student-epochs 6 --student-lr 0.05 --student-batch-size 32
  --kd-weight 10 --crop-min 0.5 --teacher-cache-views 3 --workers 2"

echo "== 3/5 base-to-novel"
$PY -m training base2novel $COMMON --datasets caltech101 dtd eurosat

echo "== 4/5 cross-dataset (teacher on ImageNet)"
$PY -m training cross-dataset $COMMON --datasets caltech101 dtd eurosat

echo "== 5/5 tables and charts"
$PY -m training results --runs "$W/runs"
