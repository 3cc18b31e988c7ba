"""Build a TensorRT engine from a bundle's ONNX student and record it in the bundle.

    python export/to_trt.py --bundle DIR --parity-images DIR [--min-batch 1 --opt-batch 8 --max-batch 32]
                            [--no-fp16] [--workspace-gb 4] [--timing-cache FILE] [--force]

fp16 by default with LayerNorm kept in fp32, one optimisation profile over the batch axis, a reusable timing
cache and a workspace limit. TensorRT 10 builds fp16 from the fp32 graph with its FP16 flag and fp32 layer
constraints on LayerNorm; TensorRT 11 networks are strongly typed (those flags and per-layer precisions are gone),
so there the precision is the graph's: the engine is built from the bundle's fp16 variant (export it with
`--variants fp16`), whose LayerNorm and Softmax are fp32 already. The engine is checked against onnxruntime
(fp32, CPU) on real images before it is added; the manifest records the GPU, its compute capability and the
TensorRT version, because an engine only runs on the GPU model it was built for. Exit status: 2 bad arguments or
bundle, 3 no TensorRT or no GPU, 4 parity under threshold (fp16: cosine >= 0.999 and top-1 >= 99.5%; fp32: the
optimised graph's floors), 5 TensorRT failed to build or run the engine.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bundle import BundleError, Manifest, Parity, Variant, read_bundle, record_variant, write_atomic
from bundle.parity import compare, meets
from export.parity import load_images, run_graph
from export.variants import THRESHOLDS
from training.data.datasets import DatasetError, find_images
from training.towers import Preprocess
from training.transforms import eval_transform


class Unavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing here."""


def check_profile(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")


def environment() -> dict[str, str]:
    """GPU name, compute capability and TensorRT version; raises Unavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise Unavailable("TensorRT's Python package is not installed (pip install tensorrt, on a machine "
                          "with an NVIDIA GPU and driver)") from None
    import torch

    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU is visible: a TensorRT engine must be built on the GPU it will run on")
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "tensorrt": trt.__version__}


def build_engine(onnx_path: Path, image_size: int, profile: tuple[int, int, int], fp16: bool, workspace_gb: float,
                 timing_cache: Path | None) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8; implicit in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)  # strongly typed always in TensorRT 11
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and weakly_typed(trt):
        _fp16_with_fp32_layernorm(trt, config, network)
    name = network.get_input(0).name
    shapes = [(b, 3, image_size, image_size) for b in profile]
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(name, *shapes)
    if config.add_optimization_profile(optimisation) < 0:
        raise RuntimeError(f"TensorRT refused the optimisation profile {shapes} for input {name!r}")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    if timing_cache:
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(engine)


def weakly_typed(trt) -> bool:
    """TensorRT 10 lets a builder flag lower precision; TensorRT 11 has no such flag (strongly typed only)."""
    return hasattr(trt.BuilderFlag, "FP16")


def _fp16_with_fp32_layernorm(trt, config, network) -> None:
    """TensorRT 10: fp16 where TensorRT finds it faster, LayerNorm held in fp32 by precision constraints."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            if hasattr(layer, "compute_precision"):
                layer.compute_precision = trt.float32


def engine_source(bundle, fp16: bool, trt) -> Path:
    """The ONNX graph to build from: the fp32 graph, or on TensorRT 11 the bundle's fp16 variant for fp16."""
    if not fp16 or weakly_typed(trt):
        return bundle.model_path()
    if "fp16" not in bundle.manifest.variants:
        raise BundleError(f"TensorRT {trt.__version__} builds fp16 engines from an fp16 graph only (strongly typed "
                          "networks); the bundle has no fp16 variant: export it with --variants fp16 "
                          "(--force-variants where no GPU measures it), or pass --no-fp16")
    return bundle.model_path("fp16")


def run_engine(engine_bytes: bytes, images: np.ndarray, batch: int) -> np.ndarray:
    """Features of the engine for `images`, in batches no larger than the profile allows."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    smallest = int(engine.get_tensor_profile_shape(inp, 0)[0][0])
    stream = torch.cuda.Stream()
    outputs = []
    for i in range(0, len(images), batch):
        chunk = pad_to(images[i : i + batch], smallest)
        with torch.cuda.stream(stream):
            x = torch.from_numpy(chunk).cuda().contiguous()
            if not context.set_input_shape(inp, tuple(x.shape)):
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)} (outside the profile)")
            y = torch.empty(tuple(context.get_tensor_shape(out)), dtype=torch.float32, device="cuda")
            if not (context.set_tensor_address(inp, x.data_ptr()) and context.set_tensor_address(out, y.data_ptr())):
                raise RuntimeError("TensorRT refused a tensor address")
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        outputs.append(y.cpu().numpy()[: len(images[i : i + batch])])
    return np.concatenate(outputs)


def pad_to(batch: np.ndarray, smallest: int) -> np.ndarray:
    """A batch under the profile's minimum, padded with copies of its last image (their rows are dropped)."""
    if len(batch) >= smallest:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], smallest - len(batch), axis=0)])


def engine_floors(precision: str) -> tuple[float, float]:
    """The parity floors of an engine: fp16's, or for an fp32 engine those of the optimised fp32 graph."""
    return THRESHOLDS["fp16" if precision == "fp16" else "optimized"]


def record_engine(folder: Path, engine_bytes: bytes, precision: str, parity: Parity, built_for: dict[str, str],
                  forced: bool) -> Manifest:
    """Add the engine to a verified bundle: write its file, then record it in the manifest (atomically)."""
    read_bundle(folder)
    name = f"student.{precision}.plan"
    write_atomic(folder / name, lambda tmp: tmp.write_bytes(engine_bytes))
    min_cos, min_agree = engine_floors(precision)
    variant = Variant(file="engine_tensorrt", precision=precision, device="gpu", parity=parity, forced=forced,
                      runtime="tensorrt", built_for=built_for, min_cosine=min_cos, min_agreement=min_agree)
    return record_variant(folder, "tensorrt", name, variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python export/to_trt.py", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder made by python -m export bundle")
    parser.add_argument("--parity-images", type=Path, required=True,
                        help="folder of real images (recursive) to check the engine against onnxruntime")
    parser.add_argument("--parity-count", type=int, default=64, help="how many of those images to use")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch the engine accepts")
    parser.add_argument("--opt-batch", type=int, default=8, help="batch the engine is tuned for")
    parser.add_argument("--max-batch", type=int, default=32, help="largest batch the engine accepts")
    parser.add_argument("--no-fp16", action="store_true", help="build in fp32 (fp16 with fp32 LayerNorm otherwise)")
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit in GiB")
    parser.add_argument("--timing-cache", type=Path,
                        help="timing cache file, read if present and written back (speeds up rebuilds)")
    parser.add_argument("--force", action="store_true", help="record the engine even under its parity threshold")
    args = parser.parse_args(argv)
    try:
        check_profile(args.min_batch, args.opt_batch, args.max_batch)
        bundle = read_bundle(args.bundle)
        spec = bundle.manifest.input
        images = load_images(find_images(args.parity_images)[: args.parity_count],
                             eval_transform(Preprocess(spec.image_size, spec.mean, spec.std, spec.interpolation,
                                                       spec.resize_mode))).numpy()
    except (ValueError, BundleError, DatasetError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        built_for = environment()
    except Unavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return _build_and_record(args, bundle, images, built_for)


def _build_and_record(args, bundle, images: np.ndarray, built_for: dict[str, str]) -> int:
    """Build, check against onnxruntime fp32 on CPU, and record the engine when it meets its floors."""
    import tensorrt as trt

    precision = "fp32" if args.no_fp16 else "fp16"
    try:
        source = engine_source(bundle, not args.no_fp16, trt)
    except BundleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        engine = build_engine(source, bundle.manifest.input.image_size, (args.min_batch, args.opt_batch,
                              args.max_batch), not args.no_fp16, args.workspace_gb, args.timing_cache)
        features = run_engine(engine, images, args.max_batch)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 5
    reference = run_graph(bundle.model_path(), images, ["CPUExecutionProvider"])
    parity = compare(reference, features, bundle.class_vectors)
    min_cos, min_agree = engine_floors(precision)
    ok = meets(parity, min_cos, min_agree)
    summary = {"bundle": str(args.bundle), "source": source.name, "parity": parity.model_dump(),
               "built_for": built_for}
    if not ok and not args.force:
        print(json.dumps(summary, indent=2))
        print(f"error: the engine misses its threshold (cosine >= {min_cos}, top-1 >= {min_agree}); "
              "nothing was recorded (--force records it anyway)", file=sys.stderr)
        return 4
    record_engine(args.bundle, engine, precision, parity, built_for, forced=not ok)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
