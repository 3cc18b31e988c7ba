"""The shared backbone: a student's frozen image tower exported once, with the prompts as an input, into
`<repository>/_backbones/<sha256>/`, named by the sha256 of the tower's weights. Every domain distilled on the
same tower finds it there and adds only its prompts, projector and class vectors (export/domain.py)."""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bundle import (
    BACKBONE_MANIFEST, Backbone, BackboneManifest, BackboneRef, BackboneVariant, PromptShape,
    backbone_folder, check_fits, file_entry, read_backbone,
)
from training.prompts import PromptedVisionTower
from training.towers import Preprocess

from .build import EXPORTER, input_spec
from .onnx_export import export_backbone
from .variants import DEVICE, NON_SATURATING_INT8, PRECISION, VariantError, build_variant

log = logging.getLogger(__name__)
MODEL_FILE = "backbone.onnx"


def weights_sha256(tower: PromptedVisionTower) -> str:
    """The sha256 of the frozen tower's weights (names, dtypes, shapes and values, in name order): equal for every
    student distilled on the same backbone, whatever its prompts."""
    digest = hashlib.sha256()
    for name, value in sorted(tower.visual.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{list(value.shape)}\n".encode())
        digest.update(value.numpy().tobytes() if value.dtype != torch.bfloat16 else value.view(torch.int16).numpy())
    return digest.hexdigest()


def prompt_shape(tower: PromptedVisionTower) -> PromptShape:
    depth, tokens, width = tower.prompts.shape
    return PromptShape(depth=int(depth), tokens=int(tokens), width=int(width))


def ensure_backbone(
    tower: PromptedVisionTower, pre: Preprocess, cfg: dict, repository: Path, variants: tuple[str, ...],
    calibration: np.ndarray | None, skip_failing_variants: bool,
) -> tuple[Backbone, bool]:
    """The repository's backbone for this tower, exported (with `variants`, calibrated on `calibration` images
    with this tower's prompts) when it is not there yet. Returns it and whether it was created now."""
    sha = weights_sha256(tower)
    folder = backbone_folder(repository, sha)
    if folder.exists():
        backbone = read_backbone(folder)
        check_fits(backbone.manifest, _ref(tower, sha))
        return backbone, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{sha[:12]}.staging-", dir=folder.parent))
    try:
        manifest = _export(tower, pre, cfg, sha, staging, variants, calibration, skip_failing_variants)
        (staging / BACKBONE_MANIFEST).write_text(manifest.model_dump_json(indent=2))
        staging.chmod(0o755)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.exists():
                raise
            log.info("backbone %s was published by another export meanwhile; using that one", sha[:12])
            return read_backbone(folder), False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_backbone(folder), True


def _ref(tower: PromptedVisionTower, sha: str) -> BackboneRef:
    return BackboneRef(sha256=sha, prompts=prompt_shape(tower), tower_dim=tower.output_dim)


def _export(
    tower: PromptedVisionTower, pre: Preprocess, cfg: dict, sha: str, staging: Path, variants: tuple[str, ...],
    calibration: np.ndarray | None, skip_failing_variants: bool,
) -> BackboneManifest:
    """The graph and its variants into `staging`; their parity is measured per domain, not here."""
    export_backbone(tower, pre.image_size, staging / MODEL_FILE)
    files = {"model": MODEL_FILE}
    entries = {}
    prompts = tower.prompts.detach().numpy()
    for name in variants:
        target = staging / f"backbone.{name}.onnx"
        rows = None if calibration is None else (np.broadcast_to(prompts, (len(calibration), *prompts.shape)),)
        try:
            build_variant(name, staging / MODEL_FILE, target, calibration, rows or ())
        except VariantError as err:
            if not skip_failing_variants:
                raise
            log.warning("leaving the backbone's %s variant out: %s", name, err)
            continue
        files[f"model_{name}"] = target.name
        entries[name] = BackboneVariant(file=f"model_{name}", precision=PRECISION[name], device=DEVICE[name],
                                        cpu_features=NON_SATURATING_INT8 if name == "int8_vnni" else ())
    return BackboneManifest(
        sha256=sha, student_model=cfg["student_model"], student_pretrained=cfg["student_pretrained"],
        input=input_spec(pre),
        prompts=prompt_shape(tower), tower_dim=tower.output_dim,
        files={role: file_entry(staging, name) for role, name in files.items()}, variants=entries,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), exporter=EXPORTER,
    )
