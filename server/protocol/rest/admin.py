"""Admin routes, off unless PROMPTKD_ADMIN_TOKEN is set. Each depends on auth.require_admin, and AdminGate
(middleware.py) applies that check before the body is read; these handlers only ever run for an authorised
caller."""
from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile

from ...repository.layout import MODEL_NAME
from ..auth import require_admin
from ..schemas import ErrorResponse, InvalidRequest, SwapResponse

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.post("/class-vectors", response_model=SwapResponse, responses={
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"},
    404: {"model": ErrorResponse, "description": "admin routes are disabled (no PROMPTKD_ADMIN_TOKEN), or no such "
                                                 "model"},
    400: {"model": ErrorResponse, "description": "several models and none named"},
    413: {"model": ErrorResponse, "description": "the body over PROMPTKD_MAX_REQUEST_BYTES, or more multipart parts "
                                                 "than a request may hold"},
    422: {"model": InvalidRequest, "description": "checksum mismatch, unreadable files, wrong shape or width, or a "
                                                  "missing field"},
    503: {"model": ErrorResponse, "description": "the model has no version ready; see Retry-After"},
})
async def swap_class_vectors(
    request: Request,
    labels: UploadFile = File(..., description="labels.json: a JSON list of label strings"),
    class_vectors: UploadFile = File(..., description="class_vectors.npy: float [labels, feature_dim], "
                                                      "L2-normalised rows"),
    labels_sha256: str = Form(..., max_length=80, description="sha256 of the labels file, checked before use"),
    class_vectors_sha256: str = Form(..., max_length=80, description="sha256 of the class vectors file"),
    authorization: str | None = Header(None, description="Bearer <PROMPTKD_ADMIN_TOKEN>; checked by AdminGate "
                                                         "before the body is read (documented here)"),
    model: str | None = Query(None, pattern=MODEL_NAME.pattern,
                              description="whose default version gets them (default: the only model)"),
) -> SwapResponse:
    """Replace the labels and class vectors without downtime (e.g. vectors for new class names from the
    stage-1 `class-vectors` command). Everything is validated first; the switch is one atomic reference
    swap, so requests in flight finish on the old set. Not persisted: a restart (or a reload of the version)
    serves the bundle's set."""
    return request.app.state.service.swap_vocabulary(model, await labels.read(), labels_sha256,
                                                     await class_vectors.read(), class_vectors_sha256)
