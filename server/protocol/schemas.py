"""Request and response bodies of the HTTP API."""
from __future__ import annotations

from pydantic import BaseModel, Field, StrictInt


class Prediction(BaseModel):
    label: str
    index: int = Field(description="position of the label in GET /labels order")
    probability: float


class ImageError(BaseModel):
    status: int = Field(description="the HTTP status this image alone would have got (400, 413 or 415)")
    detail: str


class Timing(BaseModel):
    decode_ms: float = Field(description="decoding and preprocessing, all images of the request")
    inference_ms: float = Field(description="waiting for a batch plus running it")
    total_ms: float


class ClassifiedImage(BaseModel):
    filename: str | None
    label: str | None = Field(None, description="the answer: the most probable label; null when the model abstained "
                                                "(its confidence under min_confidence) or the image had an error")
    abstained: bool = Field(False, description="true when the top probability is under the request's threshold")
    predictions: list[Prediction] | None = Field(None, description="top-k labels, most probable first")
    error: ImageError | None = Field(None, description="why this image was not classified")


class ClassifyResponse(BaseModel):
    model: str
    version: str = Field(description="the model version that answered")
    variant: str = Field(description="the graph that ran")
    labels_version: str = Field(description="which labels and class vectors answered (changes on a swap)")
    min_confidence: float | None = Field(None, description="the top probability under which answers abstain: the "
                                                           "request's min_confidence, or the calibrated threshold of "
                                                           "its precision target; null: none asked")
    results: list[ClassifiedImage] = Field(description="one per uploaded image, in upload order")
    timing: Timing


class EmbeddedImage(BaseModel):
    filename: str | None
    embedding: list[float] | None = Field(None, description="projected, L2-normalised student features")
    error: ImageError | None = None


class EmbedResponse(BaseModel):
    model: str
    version: str
    variant: str
    dim: int
    results: list[EmbeddedImage]
    timing: Timing


class Labels(BaseModel):
    labels: list[str]
    version: str
    source: str = Field(description="'bundle', or 'admin' after a swap")


class ModelSummary(BaseModel):
    name: str
    versions: list[str] = Field(description="versions serving now")
    default_version: str | None = Field(description="the version requests that name none get; null: none ready")


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="the version this card describes: the model's default")
    bundle_name: str = Field(description="the name in the bundle's manifest")
    schema_version: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str
    interpolation: str
    feature_dim: int
    logit_scale: float
    num_labels: int
    labels_version: str
    variant: str = Field(description="the graph being served")
    variants: list[str] = Field(description="graphs the bundle has")
    variant_reason: str = Field(description="why this graph serves: configuration, or the start-up check it passed")
    startup_checks: list[dict] = Field(description="graphs run on the bundle's parity set at start-up, rejected "
                                                   "ones included, with their figures and floors")
    runtime: str = Field(description="the runtime and device running it")
    max_batch_size: int
    provenance: dict
    parity: dict = Field(description="each graph's parity figures, from the manifest")
    calibration: dict | None = Field(description="temperature scaling fitted at export (probabilities are "
                                                 "calibrated with it), calibration error before and after, and the "
                                                 "confidence threshold of each precision target with its coverage "
                                                 "on held-out images; null: the bundle has none")
    drift: dict | None = Field(description="the last PROMPTKD_DRIFT_WINDOW images against the bundle's held-out "
                                           "reference: confidence PSI, feature shift, abstain rate, mean entropy, "
                                           "their alert levels and whether they alert; null: no reference or off")
    rollout: dict | None = Field(None, description="a new version being measured against this one (stage, figures, "
                                                   "why it waits) and the last rollout decisions; null: the model "
                                                   "has no rollout settings")
    limits: dict[str, int] = Field(description="upload limits a client should respect before sending: "
                                               "max_upload_bytes, max_images_per_request, max_top_k, top_k")
    models: list[ModelSummary] = Field(description="every model this server holds; ?model= picks the card")


class Health(BaseModel):
    status: str
    detail: str | None = None


class Ready(BaseModel):
    ready: bool
    detail: str


class SwapResponse(BaseModel):
    labels: int
    version: str
    previous_version: str


class ErrorResponse(BaseModel):
    detail: str


class InvalidRequest(BaseModel):
    """422: FastAPI's list of parameter errors, or the server's own message (a checksum, a top_k over the limit)."""

    detail: str | list[dict]


# The Open Inference Protocol (KServe v2 / Triton HTTP), served under /v2 by rest/v2.py and over gRPC by grpc/.
Parameters = dict[str, str | int | float | bool]


class V2Error(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(description="protocol extensions this server supports")


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dimension of variable size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInput(BaseModel):
    name: str
    shape: list[StrictInt]  # `true` or "3" is no dimension
    datatype: str
    parameters: Parameters = Field(default_factory=dict, description="`binary_data_size` when the elements follow "
                                   "the JSON as binary data; `content_type: base64` for base64 strings in `data`")
    data: list | None = Field(None, description="the elements in row-major order (flat, or one list per row)")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: Parameters = Field(default_factory=dict, description="`binary_data` (bool); `classification` (int, "
                                                                     "PROBABILITIES only)")


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict, description="`top_k` (int), `binary_data_output` (bool), "
                                                                     "`content_type: base64` for every input")
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput] | None = Field(None, description="default: LABELS and PROBABILITIES")


class RepositoryIndexRequest(BaseModel):
    ready: bool = Field(False, description="only versions that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str | None = Field(None, description="absent for a model-level problem (e.g. a bad model.yaml)")
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str
    rollout: dict | None = Field(None, description="on a version under rollout: its stage, the figures measured "
                                                   "against the serving version, why it waits, the last decisions")


class RolloutDecision(BaseModel):
    model: str
    version: str = Field(description="the version decided on")
    decision: str = Field(description="promote, refuse, or rollback (a refusal during the grace period)")


class RepositoryRequest(BaseModel):
    parameters: Parameters = Field(default_factory=dict, description="`version`: the one version to "
                                             "load (and serve by default until the next load: a rollback) or "
                                             "unload; without it, load follows the model's policy and unload "
                                             "takes every version")


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = Field(None, description="`binary_data_size` when the data follows the JSON")
    data: list | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters = Field(description="`labels_version`: which labels and class vectors answered")
    outputs: list[InferOutput]
