"""The bundle manifest: everything a server needs to know about a model folder, and nothing torch-specific."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3
# 2 added the parity set and per-variant thresholds and CPU features; 3 added domain bundles (`backbone`) and
# calibrated confidence (`calibration`). A bundle with neither is still written as 2, for servers from before.
FOLDED_SCHEMA = 2
READABLE_SCHEMAS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
BACKBONE_MANIFEST = "backbone.json"
BACKBONE_SCHEMA = 1
BACKBONES_DIR = "_backbones"  # in a model repository: _backbones/<sha256>/, one per distinct student tower
SHA256 = r"^[0-9a-f]{64}$"
# A model's folder name in a repository. Match with fullmatch: re's `$` also matches before a final newline.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    """How raw pixels become the model's input tensor (NCHW float32)."""

    image_size: int = Field(gt=0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # shortest side to image_size, then centre crop
    interpolation: str = "bicubic"


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=SHA256)
    bytes: int = Field(ge=0)


class Parity(_Strict):
    """Exported graph against the PyTorch student on real images."""

    images: int
    min_cosine: float
    mean_cosine: float
    top1_agreement: float  # fraction of images whose top-1 class matches
    max_abs_diff: float


class Variant(_Strict):
    """A faster form of the fp32 graph, with its parity against that graph on held-out real images."""

    file: str  # a role in Manifest.files
    precision: Literal["fp32", "fp16", "int8"]
    device: Literal["any", "cpu", "gpu"]
    parity: Parity | None  # None: could not be measured where it was built (e.g. fp16 without a GPU)
    forced: bool = False  # included although under its threshold or unmeasured
    # The floors it was accepted against, checked again by the server on the parity set where it serves.
    min_cosine: float = Field(0.0, ge=0, le=1)
    min_agreement: float = Field(0.0, ge=0, le=1)
    # CPU flags (/proc/cpuinfo) of which one must be present for it to be right on a CPU; empty: any CPU.
    cpu_features: tuple[str, ...] = ()
    runtime: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    built_for: dict[str, str] = Field(default_factory=dict)  # a TensorRT engine runs only on the GPU it was built for


class Provenance(_Strict):
    teacher_model: str
    teacher_pretrained: str | None
    student_model: str
    student_pretrained: str | None
    prompt_tokens: int
    prompt_depth: int
    class_vectors_source: str
    created: str
    exporter: str


class PromptShape(_Strict):
    """Deep visual prompts: `tokens` learned tokens of `width` before each of the first `depth` blocks."""

    depth: int = Field(gt=0)
    tokens: int = Field(gt=0)
    width: int = Field(gt=0)


class BackboneRef(_Strict):
    """What a domain bundle needs of its backbone: which one (the sha256 of the frozen tower's weights), the
    prompt shape its graph takes, and the width of its output (the input of the domain's projector)."""

    sha256: str = Field(pattern=SHA256)
    prompts: PromptShape
    tower_dim: int = Field(gt=0)


class BackboneVariant(_Strict):
    """A faster graph of the shared backbone; whether it is good enough is measured per domain (the domain
    bundle's `variants` list the ones that passed for it, with its parity)."""

    file: str  # a role in BackboneManifest.files
    precision: Literal["fp32", "fp16", "int8"]
    device: Literal["any", "cpu", "gpu"]
    cpu_features: tuple[str, ...] = ()


class BackboneManifest(_Strict):
    """`_backbones/<sha256>/backbone.json`: the student image tower once, with the prompts as an input
    (images [N,3,S,S] and prompts [N, depth, tokens, width] in, the tower's pooled output [N, tower_dim] out)."""

    schema_version: int = BACKBONE_SCHEMA
    kind: Literal["backbone"] = "backbone"
    sha256: str = Field(pattern=SHA256)
    student_model: str
    student_pretrained: str | None
    input: InputSpec
    prompts: PromptShape
    tower_dim: int = Field(gt=0)
    files: dict[str, FileEntry]  # "model" (fp32) and one per variant
    variants: dict[str, BackboneVariant] = Field(default_factory=dict)
    created: str
    exporter: str

    def ref(self) -> BackboneRef:
        return BackboneRef(sha256=self.sha256, prompts=self.prompts, tower_dim=self.tower_dim)


class Threshold(_Strict):
    """The lowest confidence at which the held-out answers reached `precision`, and the share answered there."""

    precision: float = Field(gt=0, le=1)
    confidence: float | None = Field(None, ge=0, le=1)  # None: no confidence reached the target on held-out images
    coverage: float = Field(ge=0, le=1)
    reached: float | None = None  # the precision measured at that threshold


class Calibration(_Strict):
    """Temperature scaling fitted on held-out labelled images, and the thresholds for chosen precision targets."""

    temperature: float = Field(gt=0)
    images: int = Field(gt=0)
    accuracy: float = Field(ge=0, le=1)
    ece_before: float = Field(ge=0, le=1)  # expected calibration error (15 bins) at temperature 1
    ece_after: float = Field(ge=0, le=1)
    thresholds: list[Threshold] = Field(default_factory=list)

    def threshold(self, precision: float) -> Threshold | None:
        return next((t for t in self.thresholds if abs(t.precision - precision) < 1e-9), None)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    input: InputSpec
    feature_dim: int = Field(gt=0)
    logit_scale: float = Field(gt=0)
    num_labels: int = Field(gt=0)
    # roles: "model" (a domain bundle: "prompts" and "projector" instead), "labels", "class_vectors", one per
    # variant (not in a domain bundle: its variants' files are its backbone's), and optionally "parity_inputs" /
    # "parity_features": preprocessed held-out images (float16) and the fp32 graph's features for them, which
    # the server uses to check the variant it picked on the machine it runs on.
    files: dict[str, FileEntry]
    parity: Parity
    provenance: Provenance
    variants: dict[str, Variant] = Field(default_factory=dict)  # name -> variant; "fp32" is files["model"]
    # A domain bundle: no graph of its own but "prompts" and "projector" files, run on this shared backbone
    # (its variants' `file` then names a role of the backbone's manifest).
    backbone: BackboneRef | None = None
    # Calibrated confidence (schema 3): probabilities are softmax(logit_scale * cos / temperature), and requests
    # may ask to abstain under a confidence or a precision target.
    calibration: Calibration | None = None

    def to_json(self) -> str:
        """The manifest file's text: without the schema-3 fields a bundle is written as schema 2 (or the 1 it was
        read as), so that servers from before them read it."""
        if self.backbone is not None or self.calibration is not None:
            return self.model_copy(update={"schema_version": SCHEMA_VERSION}).model_dump_json(indent=2)
        older = self.model_copy(update={"schema_version": min(self.schema_version, FOLDED_SCHEMA)})
        return older.model_dump_json(indent=2, exclude={"backbone", "calibration"})
