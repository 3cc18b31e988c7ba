#!/usr/bin/env bash
# The GPU check. Stage 2: ViT-L/14 teacher and ViT-B/16 student at real size (random weights, synthetic images),
# images/s with the teacher live and cached, fp32 and bf16, peak GPU memory; then the serving engines on the GPU
# (ENGINES=1 bash scripts/gpu_check.sh: onnxruntime CUDA/TensorRT providers). Each under 10 minutes on one GPU.
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: $OUT, else bench/results)
# Needs torch with CUDA and open_clip. On a machine that cannot download, bring open_clip's wheels in .whl/:
#   pip download --no-deps -d .whl open_clip_torch ftfy wcwidth
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUT_DIR"
if ! python3 -c "import open_clip" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/promptkd-site .whl/*.whl
    export PYTHONPATH=/tmp/promptkd-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
[ "${ENGINES:-0}" = 1 ] || timeout 560 python3 bench/stage2_gpu.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/stage2.txt"
# Serving engines on the same GPU (ENGINES=1; a second call, as one call may run 10 minutes): onnxruntime's CUDA
# and TensorRT providers (with onnxruntime-gpu installed; CPU providers only otherwise) beside fp32 and int8 on
# CPU, ViT-B/16 student, batches 1/8/32.
[ "${ENGINES:-0}" = 1 ] || exit 0
timeout 300 python3 bench/engines.py --skip-teacher --out "$OUT_DIR" 2>&1 | tail -n 20 | tee "$OUT_DIR/engines.txt" \
    || echo "engine benchmark failed or timed out (see above)"
