"""Faster variants of the fp32 student graph, each proven against it on held-out real images.

- optimized: onnxruntime's graph optimisations (fusions, constant folding) saved offline, fp32, any device.
- int8: static quantisation with onnxruntime, calibrated on real training images, per-channel int8 weights;
  only the transformer blocks' weight products are quantised, so the patch embedding, attention, LayerNorm,
  softmax, the head and the final L2 normalisation stay fp32. Weights use
  7 bits (reduce_range): without VNNI, x86 multiplies u8 x s8 pairs into saturating int16 sums, and full-range
  weights overflow them (on the demo bundle this cost 10 points of top-1 agreement). For any CPU.
- int8_vnni: the same with full-range 8-bit weights, for CPUs whose int8 dot products do not saturate (x86 VNNI
  or AMX, ARM's dot-product instructions). The manifest records those CPU flags; the server serves it only on
  such a CPU, and checks it there on the bundle's parity set.
- fp16: fp16 weights and activations with LayerNorm, softmax and the final normalisation kept in fp32, inputs and
  outputs fp32. For GPUs: onnxruntime's CPU provider cannot run fp16 graphs, so its parity is measured on CUDA.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from bundle import Parity, Variant
from bundle.parity import compare, meets

from .parity import run_graph

log = logging.getLogger(__name__)

VARIANTS = ("optimized", "int8", "int8_vnni", "fp16")
PRECISION = {"optimized": "fp32", "int8": "int8", "int8_vnni": "int8", "fp16": "fp16"}
DEVICE = {"optimized": "any", "int8": "cpu", "int8_vnni": "cpu", "fp16": "gpu"}
# (minimum per-image cosine to fp32, minimum top-1 agreement with fp32) a variant must reach.
THRESHOLDS = {"optimized": (0.9999, 1.0), "int8": (0.99, 0.99), "int8_vnni": (0.99, 0.99), "fp16": (0.999, 0.995)}
# CPU flags (as /proc/cpuinfo names them) under which int8 dot products do not saturate, so 8-bit weights are safe.
NON_SATURATING_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
FP32_OPS = ["LayerNormalization", "Softmax", "ReduceL2", "ReduceSumSquare", "Sqrt", "BatchNormalization"]


class VariantError(RuntimeError):
    """A variant could not be built, measured, or missed its parity threshold."""


def build_optimized(source: Path, target: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


class _Batches(CalibrationDataReader):
    """Calibration batches, read one at a time: onnxruntime keeps every activation of the batches it is given
    before reducing them, so the strided read below bounds calibration memory to one batch."""

    def __init__(self, names: list[str], arrays: tuple[np.ndarray, ...], batch_size: int = 8) -> None:
        self.batches = [{n: a[i : i + batch_size] for n, a in zip(names, arrays)}
                        for i in range(0, len(arrays[0]), batch_size)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self.pending, None)


def build_int8(source: Path, target: Path, calibration: np.ndarray, full_range: bool = False,
               extra: tuple[np.ndarray, ...] = ()) -> None:
    """Static int8 (QDQ, per-channel weights of 7 bits, or 8 with `full_range`, uint8 activations) calibrated on
    `calibration` images (with `extra`, the graph's further inputs row by row: a backbone's prompts).

    Only the transformer's weight products are quantised (see `_kept_in_fp32`), and their outputs stay float:
    onnxruntime then runs each as one MatMulIntegerToFloat (int8 GEMM, scaled back in the same kernel) instead of
    requantising every output; softmax stays fp32. Measured on ViT-B/16 (2 AVX-512 VNNI cores,
    batch 8): 1.6x the speed of quantising every MatMul and its output, min cosine to fp32 0.99979 instead of
    0.99956. Activation ranges are the 99.999th percentile of their histograms rather than min/max: a few
    outlier activations otherwise stretch the scale and cost top-1 agreement."""
    if len(calibration) < 8:
        raise VariantError(f"int8 calibration needs at least 8 images, got {len(calibration)}")
    prepared = target.with_name(target.stem + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress; our stdout is the JSON summary
            quantize_static(
                str(prepared), str(target), _Batches([i.name for i in graph.input], (calibration, *extra)),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=_kept_in_fp32(graph),
                calibrate_method=CalibrationMethod.Percentile, reduce_range=not full_range,
                extra_options={"CalibStridedMinMax": 1, "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]},
            )
    finally:
        prepared.unlink(missing_ok=True)


def _kept_in_fp32(graph: onnx.GraphProto) -> list[str]:
    """Products left in fp32 (the patch embedding's Conv is never quantised either): attention's query-key and
    weight-value products (no constant operand), and the head after the last LayerNorm (the tower's projection and
    the student's projector, which place the feature among the class vectors). On the demo student, keeping the
    two ends in fp32 raised top-1 agreement on 500 photos from 98.4% to 100% (mean cosine 0.99994 -> 0.999992),
    for about 2% of ViT-B/16's work."""
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    last_norm = max((i for i, node in enumerate(graph.node) if node.op_type == "LayerNormalization"), default=-1)
    return [node.name for i, node in enumerate(graph.node)
            if (node.op_type == "MatMul" and not any(name in constants for name in node.input))
            or (i > last_norm and node.op_type in ("MatMul", "Gemm"))]


def build_fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True, op_block_list=FP32_OPS)
    onnx.save(model, str(target))


def providers_for(variant: str) -> list[str]:
    """Where a variant can be measured here; empty when this machine cannot run it."""
    available = ort.get_available_providers()
    if variant == "fp16":
        return ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    return ["CPUExecutionProvider"]


def passes(variant: str, parity: Parity) -> bool:
    return meets(parity, *THRESHOLDS[variant])


def build_variant(name: str, source: Path, target: Path, calibration: np.ndarray | None,
                  extra: tuple[np.ndarray, ...] = ()) -> None:
    """Write variant `name` of the fp32 graph `source` to `target` (`extra`: see build_int8)."""
    if name in ("int8", "int8_vnni"):
        if calibration is None:
            raise VariantError(f"the {name} variant needs --calibration-images (real training images)")
        build_int8(source, target, calibration, full_range=name == "int8_vnni", extra=extra)
    elif name == "fp16":
        build_fp16(source, target)
    elif name == "optimized":
        build_optimized(source, target)
    else:
        raise VariantError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def judge(name: str, parity: Parity | None, force: bool, role: str) -> Variant:
    """The manifest entry of a variant measured as `parity` (None: it could not be measured here); VariantError
    when it is under its threshold or unmeasured, unless forced."""
    min_cos, min_agree = THRESHOLDS[name]
    ok = parity is not None and passes(name, parity)
    if not ok and not force:
        if parity is None:
            need = ("a CPU with one of " + ", ".join(NON_SATURATING_INT8) if name == "int8_vnni"
                    else "a CUDA GPU with onnxruntime-gpu")
            raise VariantError(f"the {name} variant cannot be measured on this machine (it needs {need}); pass "
                               "--force-variants to include it unmeasured")
        raise VariantError(
            f"the {name} variant misses its threshold against fp32 on {parity.images} held-out images: min cosine "
            f"{parity.min_cosine:.5f} (need >= {min_cos}), top-1 agreement {parity.top1_agreement:.4f} (need >= "
            f"{min_agree}); pass --force-variants to include it anyway"
        )
    if not ok:
        log.warning("including the %s variant although it is %s", name, "unmeasured" if parity is None else
                    "under its threshold")
    return Variant(
        file=role, precision=PRECISION[name], device=DEVICE[name], parity=parity, forced=not ok,
        min_cosine=min_cos, min_agreement=min_agree,
        cpu_features=NON_SATURATING_INT8 if name == "int8_vnni" else (),
    )


def add_variant(
    name: str, source: Path, folder: Path, reference: np.ndarray, held_out: np.ndarray, vectors: np.ndarray,
    calibration: np.ndarray | None, force: bool,
) -> tuple[str, Variant]:
    """Build variant `name` of the fp32 graph into `folder`, measure it against the fp32 features `reference`
    on the `held_out` images, and refuse it under its threshold unless forced. Returns its file name and entry."""
    target = folder / f"student.{name}.onnx"
    build_variant(name, source, target, calibration)
    providers = providers_for(name)
    parity = compare(reference, run_graph(target, held_out, providers), vectors) if providers else None
    try:
        return target.name, judge(name, parity, force, f"model_{name}")
    except VariantError:
        target.unlink()
        raise
