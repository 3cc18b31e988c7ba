"""The deployable student on a GPU in PyTorch: features and speed of eager fp32, fp16 and bf16, with CUDA graphs and
torch.compile beside eager, and the exported ONNX graph on onnxruntime's CPU provider against eager fp32 on the GPU
(parity across machines), on the same real photos; one table, in one process.

    python bench/student_gpu.py [--student-model ViT-B-16] [--batches 1 8 64] [--iters 20] [--out bench/results]

Random weights (they cost the same as trained ones). Agreement: min cosine of each precision's features against
eager fp32 on foolbox's 20 ImageNet JPEGs, and top-1 agreement over 1000 random class vectors. Speed: images/s on
a synthetic batch. CUDA graphs replay a captured fp16 forward; torch.compile compiles the fp16 forward, measured at
the largest batch only (each batch size is a compile of its own; its time is reported). On a CPU (--device cpu,
the tests) the GPU-only rows say so instead of running.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import real_photos  # noqa: E402  (a sibling script)

from bundle.parity import compare  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from training.checkpoint import build_student  # noqa: E402
from training.runtime import PRECISIONS  # noqa: E402


def eager(student, precision: str, device: torch.device):
    """The student's forward under the precision's autocast (fp32: none)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=PRECISIONS[precision] or torch.float32,
                                             enabled=precision != "fp32"):
            return student(x).float()
    return run


def cuda_graph(run, example: torch.Tensor):
    """`run` captured once for `example`'s shape and replayed: no per-kernel launch cost."""
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_in)

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out
    return replay


def images_per_s(run, batch: int, size: int, iters: int, device: torch.device) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(3):
        run(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(iters):
        run(x)
    sync()
    return batch * iters / (time.perf_counter() - started)


def engines(student, device: torch.device) -> dict:
    """name -> (how to build its forward for an example batch, or why it cannot run here)."""
    gpu = device.type == "cuda"
    built = {f"eager {p}": (lambda x, p=p: eager(student, p, device)) for p in ("fp32", "bf16", "fp16")}
    if not gpu:
        built["eager fp16"] = "fp16 autocast is for GPUs here"
    built["cuda graph fp16"] = (lambda x: cuda_graph(eager(student, "fp16", device), x)) if gpu else "needs CUDA"
    if gpu:
        built["compile fp16"] = lambda x: eager(torch.compile(student), "fp16", device)
    else:
        built["compile fp16"] = "measured on GPUs only (its compile time on a CPU says nothing)"
    return built


def agreement(student, photos: np.ndarray, vectors: np.ndarray, device: torch.device, folder: Path) -> dict:
    """Each precision, and the exported graph on onnxruntime CPU, against eager fp32 on this device."""
    x = torch.from_numpy(photos).to(device)
    reference = eager(student, "fp32", device)(x).cpu().numpy()
    rows = {}
    for precision in ("bf16", "fp16") if device.type == "cuda" else ("bf16",):
        rows[f"eager {precision}"] = compare(reference, eager(student, precision, device)(x).cpu().numpy(), vectors)
    path = folder / "student.onnx"
    export_onnx(student.cpu(), photos.shape[-1], path)
    student.to(device)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_features = session.run(None, {session.get_inputs()[0].name: photos})[0]
    rows["onnxruntime CPU fp32 (exported graph)"] = compare(reference, onnx_features, vectors)
    return {name: parity.model_dump() for name, parity in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--feature-dim", type=int, default=768, help="projector output width (the teacher's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    parser.add_argument("--iters", type=int, default=20, help="timed runs per engine and batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for student_gpu.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; the lower precisions are measured as such
    student, pre = build_student(args.student_model, None, args.feature_dim, 4, 9)
    student = student.eval().to(device)
    photos = real_photos(pre)
    vectors = torch.nn.functional.normalize(torch.randn(1000, args.feature_dim), dim=-1).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        parity = agreement(student, photos, vectors, device, Path(tmp))
    speed, notes = measure_speed(student, pre.image_size, args, device)
    report(parity, speed, notes, args, device)


def measure_speed(student, size: int, args, device: torch.device) -> tuple[dict, dict]:
    speed: dict[str, dict[int, float]] = {}
    notes: dict[str, str] = {}
    for name, make in engines(student, device).items():
        if isinstance(make, str):
            notes[name] = make
            continue
        speed[name] = {}
        # torch.compile recompiles for each new batch size (a minute or more each at this size): largest only.
        for batch in [max(args.batches)] if name.startswith("compile") else args.batches:
            started = time.perf_counter()
            try:
                run = make(torch.randn(batch, 3, size, size, device=device))
                speed[name][batch] = images_per_s(run, batch, size, args.iters, device)
            except Exception as err:  # a mode this machine's stack cannot run is reported, not fatal
                notes[name] = f"failed: {type(err).__name__}: {str(err)[:200]}"
                break
            if name.startswith("compile"):
                notes[name] = f"compile and first runs {time.perf_counter() - started:.0f} s at batch {batch}"
            print(f"  {name} batch {batch}: {speed[name][batch]:.1f} img/s", flush=True)
    return speed, notes


def report(parity: dict, speed: dict, notes: dict, args, device: torch.device) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\nstudent {args.student_model} on {name}, {args.iters} timed runs per cell\n")
    print("| engine | " + " | ".join(f"batch {b} img/s" for b in args.batches) + " | note |")
    print("| --- | " + " | ".join("---" for _ in args.batches) + " | --- |")
    for engine in sorted(set(speed) | set(notes), key=lambda e: (e not in speed, e)):
        cells = [f"{speed.get(engine, {}).get(b, 0):.1f}" if b in speed.get(engine, {}) else "-"
                 for b in args.batches]
        print(f"| {engine} | " + " | ".join(cells) + f" | {notes.get(engine, '')} |")
    print("\n| against eager fp32 on this device | min cosine | top-1 agreement |")
    print("| --- | --- | --- |")
    for engine, figures in parity.items():
        print(f"| {engine} | {figures['min_cosine']:.6f} | {figures['top1_agreement']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "student_gpu.json").write_text(json.dumps(
        {"device": name, "student": args.student_model, "speed": speed, "notes": notes, "parity": parity},
        indent=2))


if __name__ == "__main__":
    main()
