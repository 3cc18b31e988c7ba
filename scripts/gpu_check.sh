#!/usr/bin/env bash
# The GPU check: every GPU path of the project, one step after another, each step's output in OUT_DIR/<step>.txt
# and one PASS / FAIL / SKIP line per step at the end (OUT_DIR/summary.txt). Made for the GPU machines this project
# can be lent (one H100 or H200, an image whose python3 has torch with CUDA, onnx and onnxruntime for CPU, and NO
# TensorRT and NO onnxruntime-gpu, no network, 15 minutes in all): there it takes at most 7.5 minutes, and the steps
# that need TensorRT or onnxruntime-gpu say SKIP with the reason. On a machine that has them they run too.
#   bash scripts/gpu_check.sh --fetch-wheels           here, with a network: the wheels that image lacks into .whl/
#   bash scripts/gpu_check.sh [OUT_DIR]                 there (default: $OUT, else bench/results/gpu)
#   STEPS="student ddp" bash scripts/gpu_check.sh       a subset (bundle first where a step needs it)
#   DRY_RUN=1 bash scripts/gpu_check.sh                 on a machine without a GPU: says what each step needs and
#                                                       what is missing here, runs nothing heavy (tested in CI)
# Steps:
#   stage2      stage-2 images/s with the teacher live and cached, fp32, bf16 and fp16 autocast, peak GPU memory
#               (ViT-L/14 teacher, ViT-B/16 student, 224 px, bench/stage2_gpu.py)
#   student     the ViT-B/16 student: eager fp16 and bf16 features against fp32 (min cosine), images/s at batch
#               1, 8 and 64 eager, with CUDA graphs and with torch.compile; the exported ONNX graph on
#               onnxruntime's CPU provider against eager CUDA fp32 on the same photos (bench/student_gpu.py)
#   ddp         torchrun: two processes, one GPU, NCCL, one DDP stage-2 step (bench/ddp_gpu.py), or why not
#   bundle      a ViT-B/16 bundle at 224 px whose fp16 variant is measured on CUDA (needs onnxruntime-gpu)
#   trt         python export/to_trt.py: fp16 TensorRT engine for that bundle, parity against onnxruntime fp32
#   serve-cuda  the server on that bundle with onnxruntime's CUDA provider (fp16 variant): one real photo over HTTP
#   serve-trt   the server on that bundle with the TensorRT engine: one real photo over HTTP
#   engines     bench/engines.py --gpu: onnxruntime CUDA fp32/fp16 and TensorRT fp16 beside eager (needs them)
# Pure-Python packages that image lacks (scripts/gpu_wheels.txt) travel as wheels in .whl/ (git-ignored; carry it)
# and are installed into a temporary target at the start.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu}}
STEPS=${STEPS:-stage2 student ddp bundle trt serve-cuda serve-trt engines}
WHEELS=${WHEELS:-.whl}
# The lent machines' python: CPython 3.12 on x86-64 (manylinux); pure-Python wheels fit any.
WHEEL_PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if [ "${1:-}" = --fetch-wheels ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    ${PY:-python3} -m pip download -q --no-deps "${WHEEL_PLATFORM[@]}" -d "$WHEELS" -r scripts/gpu_wheels.txt \
        || exit 2
    echo "$WHEELS: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) (a device call carries 64 MiB)"
    exit 0
fi
DRY_RUN=${DRY_RUN:-0}
PY=${PY:-python3}
BUNDLE=$OUT_DIR/bundle
export PY BUNDLE OUT_DIR
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/summary.txt"

SITE=${SITE:-/tmp/promptkd-site}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || echo "could not install $WHEELS into $SITE"
    export PYTHONPATH=$SITE
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi: no NVIDIA driver here"

# Python probes: each prints nothing and exits 0 when the requirement holds, or says what is missing.
CUDA_TORCH='import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"'
ORT_CUDA='import onnxruntime as o; assert "CUDAExecutionProvider" in o.get_available_providers(), "onnxruntime has no CUDA provider (onnxruntime-gpu)"'
TRT='import tensorrt, cuda.bindings.runtime'
SERVER='import fastapi, uvicorn, multipart, prometheus_client, pydantic_settings, PIL'
PHOTOS='import importlib.util as u; assert u.find_spec("foolbox"), "foolbox (its 20 JPEGs) is not installed"'

report() {  # step status detail
    printf '%-10s %-4s %s\n' "$1" "$2" "$3" | tee -a "$OUT_DIR/summary.txt"
}

missing() {  # the first unmet requirement among the probes given, or nothing
    local probe
    for probe in "$@"; do
        if ! out=$($PY -c "$probe" 2>&1); then
            echo "${out##*$'\n'}"
            return
        fi
    done
}

step() {  # name seconds "probes..." command...
    local name=$1 seconds=$2 probes=$3 why
    shift 3
    [[ " $STEPS " == *" $name "* ]] || return 0
    local -a checks=()
    local probe
    for probe in $probes; do checks+=("${!probe}"); done
    why=$(missing "${checks[@]}")
    if [ "$DRY_RUN" = 1 ]; then
        report "$name" SKIP "dry run: needs $probes${why:+; missing here: $why}"
        return 0
    fi
    if [ -n "$why" ]; then
        report "$name" SKIP "missing here: $why"
        return 0
    fi
    echo "== $name"
    if timeout "$seconds" "$@" > "$OUT_DIR/$name.txt" 2>&1; then
        report "$name" PASS "$(tail -n 1 "$OUT_DIR/$name.txt")"
    else
        report "$name" FAIL "exit $? (see $OUT_DIR/$name.txt): $(tail -n 1 "$OUT_DIR/$name.txt")"
    fi
    tail -n 25 "$OUT_DIR/$name.txt"
}

serve_one_photo() {  # env assignments for the server...; posts one real photo and prints the answer
    local port=8765
    env "$@" PROMPTKD_BUNDLE="$BUNDLE" PROMPTKD_GRPC_PORT=0 $PY -m uvicorn server.main:app --host 127.0.0.1 --port $port &
    local pid=$!
    trap 'kill $pid 2>/dev/null' RETURN
    for _ in $(seq 60); do
        curl -sf "http://127.0.0.1:$port/readyz" > /dev/null && break
        sleep 1
    done
    curl -sf "http://127.0.0.1:$port/" | $PY -c 'import json,sys; d=json.load(sys.stdin); print("serving", d["variant"], "on", d["runtime"], "-", d["variant_reason"])'
    curl -sf -F "file=@$(photo_dir)/$(ls "$(photo_dir)" | head -n 1)" "http://127.0.0.1:$port/classify?top_k=1"
    echo
}

photo_dir() {
    $PY -c 'import os; from bench.engines import photo_paths; print(os.path.dirname(photo_paths()[0]))'
}
export -f serve_one_photo photo_dir

step stage2 150 "CUDA_TORCH" \
    $PY bench/stage2_gpu.py --out "$OUT_DIR" --steps 10 --precisions fp32 bf16 fp16
step student 240 "CUDA_TORCH PHOTOS" \
    $PY bench/student_gpu.py --out "$OUT_DIR" --batches 1 8 64
step ddp 60 "CUDA_TORCH" \
    $PY -m torch.distributed.run --standalone --nproc_per_node 2 bench/ddp_gpu.py
step bundle 90 "CUDA_TORCH ORT_CUDA PHOTOS" \
    $PY bench/real_size_bundle.py --out "$BUNDLE" --variants fp16 --force-variants
step trt 150 "CUDA_TORCH TRT PHOTOS" \
    bash -c '$PY export/to_trt.py --bundle "$BUNDLE" --parity-images "$(photo_dir)" --max-batch 64'
step serve-cuda 60 "ORT_CUDA SERVER PHOTOS" \
    bash -c 'serve_one_photo "$@"' _ PROMPTKD_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    PROMPTKD_BACKEND=onnxruntime
step serve-trt 60 "TRT SERVER PHOTOS" \
    bash -c 'serve_one_photo "$@"' _ PROMPTKD_BACKEND=tensorrt
step engines 150 "CUDA_TORCH PHOTOS ORT_CUDA" \
    $PY bench/engines.py --gpu --no-cpu --skip-teacher --batches 1 8 64 --out "$OUT_DIR"

echo "== summary ($OUT_DIR/summary.txt)"
cat "$OUT_DIR/summary.txt"
! grep -q " FAIL " "$OUT_DIR/summary.txt"
