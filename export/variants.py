"""Faster variants of the fp32 student graph, each proven against it on held-out real images.

- optimized: onnxruntime's graph optimisations (fusions, constant folding) saved offline, fp32, any device.
- int8: static quantisation with onnxruntime, calibrated on real training images, per-channel int8 weights;
  only MatMul/Gemm/Conv are quantised, so LayerNorm, softmax and the final L2 normalisation stay fp32. Weights use
  7 bits (reduce_range): without AVX512-VNNI, x86 multiplies u8 x s8 pairs into saturating int16 sums, and full-range
  weights overflow them (on the demo bundle this cost 10 points of top-1 agreement). For CPUs.
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

from .parity import compare, run_graph

log = logging.getLogger(__name__)

VARIANTS = ("optimized", "int8", "fp16")
PRECISION = {"optimized": "fp32", "int8": "int8", "fp16": "fp16"}
DEVICE = {"optimized": "any", "int8": "cpu", "fp16": "gpu"}
# (minimum per-image cosine to fp32, minimum top-1 agreement with fp32) a variant must reach.
THRESHOLDS = {"optimized": (0.9999, 1.0), "int8": (0.0, 0.99), "fp16": (0.999, 0.995)}
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

    def __init__(self, name: str, images: np.ndarray, batch_size: int = 8) -> None:
        self.batches = [{name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)]
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self):
        return next(self.pending, None)


def build_int8(source: Path, target: Path, calibration: np.ndarray) -> None:
    """Static int8 (QDQ, per-channel 7-bit weights, uint8 activations) calibrated on `calibration` images.

    Activation ranges are the 99.999th percentile of their histograms rather than min/max: a few outlier
    activations otherwise stretch the scale and cost top-1 agreement."""
    if len(calibration) < 8:
        raise VariantError(f"int8 calibration needs at least 8 images, got {len(calibration)}")
    prepared = target.with_name(target.stem + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress; our stdout is the JSON summary
            quantize_static(
                str(prepared), str(target), _Batches(name, calibration),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                calibrate_method=CalibrationMethod.Percentile, reduce_range=True,
                extra_options={"CalibStridedMinMax": 1},
            )
    finally:
        prepared.unlink(missing_ok=True)


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
    min_cos, min_agree = THRESHOLDS[variant]
    return parity.min_cosine >= min_cos and parity.top1_agreement >= min_agree


def add_variant(
    name: str, source: Path, folder: Path, reference: np.ndarray, held_out: np.ndarray, vectors: np.ndarray,
    calibration: np.ndarray | None, force: bool,
) -> tuple[str, Variant]:
    """Build variant `name` of the fp32 graph into `folder`, measure it against the fp32 features `reference`
    on the `held_out` images, and refuse it under its threshold unless forced. Returns its file name and entry."""
    target = folder / f"student.{name}.onnx"
    if name == "int8":
        if calibration is None:
            raise VariantError("the int8 variant needs --calibration-images (real training images)")
        build_int8(source, target, calibration)
    elif name == "fp16":
        build_fp16(source, target)
    elif name == "optimized":
        build_optimized(source, target)
    else:
        raise VariantError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    providers = providers_for(name)
    parity = compare(reference, run_graph(target, held_out, providers), vectors) if providers else None
    ok = parity is not None and passes(name, parity)
    if not ok and not force:
        target.unlink()
        if parity is None:
            raise VariantError(f"the {name} variant cannot be measured on this machine (it needs a CUDA GPU with "
                               "onnxruntime-gpu); pass --force-variants to include it unmeasured")
        min_cos, min_agree = THRESHOLDS[name]
        raise VariantError(
            f"the {name} variant misses its threshold against fp32 on {parity.images} held-out images: min cosine "
            f"{parity.min_cosine:.5f} (need >= {min_cos}), top-1 agreement {parity.top1_agreement:.4f} (need >= "
            f"{min_agree}); pass --force-variants to include it anyway"
        )
    if not ok:
        log.warning("including the %s variant although it is %s", name, "unmeasured" if parity is None else
                    "under its threshold")
    return target.name, Variant(file=f"model_{name}", precision=PRECISION[name], device=DEVICE[name],
                                parity=parity, forced=not ok)
