"""The gate before publishing into a model repository: the new student against the version serving now, on the
recipe's held-out photos; nothing is published unless the new one is at least as good.

"The version serving now" is the version folder being replaced when the export would replace one, else the newest
version folder of the model below the one being exported (as the server's repository scan reads version folders).
A version policy may pin an older one, and a rollout may have refused the newest, but the newest is what the
default policy serves and what the new version replaces, and it needs no server to ask. Its labels must be the
recipe's classes (in any order): answers of different vocabularies cannot be compared.

Both are scored on the same photos against the same teacher: top-1 agreement with the teacher's predictions and,
where the photos have labels, accuracy. The new student runs as its PyTorch checkpoint (it is not exported yet;
export proves the graph gives its top-1 on the parity photos); the serving version runs as it is published: its
bundle read and verified, the server's preprocessing, onnxruntime's fp32 graph on CPU (its shared backbone's, for
a domain bundle), its own labels. The figures are compared in percentage points, less `gate.tolerance`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bundle import Bundle, BundleError, backbone_folder, check_fits, read_backbone, read_bundle
from server.defaults import DEFAULT_MAX_PIXELS
from server.runtime.preprocess import ImageError, prepare
from server.repository.layout import VersionFolder, read_model
from training.data.datasets import Split

UNREAD = -2  # a photo the serving bundle's preprocessing refuses: left out of both sides' figures
UNKNOWN = -1  # a label of the serving bundle that the recipe's classes do not have: never agrees
CHUNK = 256  # photos preprocessed and run at a time, so a large split is never in memory at once
MAX_PIXELS = DEFAULT_MAX_PIXELS  # the server's default limit
SLACK = 1e-9  # float rounding of a difference in points


class GateRefused(ValueError):
    """The new student is worse than the serving version; the message is the report in one paragraph."""


def serving_version(repository: Path, model: str, version: int) -> VersionFolder | None:
    """The version folder the new one is measured against: `version` itself when it exists (the export would
    replace it), else the newest below it; None for a first version."""
    folder = repository / model
    if not folder.is_dir():
        return None
    below = [v for number, v in read_model(folder).versions.items() if number <= version]
    return max(below, key=lambda v: v.version, default=None)


def _graph(bundle: Bundle, repository: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Features of preprocessed images as the bundle serves them, fp32 on CPU: its own graph, or its shared
    backbone's with its prompts and projector."""
    from export.domain import DomainRunner
    from export.parity import run_graph

    if bundle.manifest.backbone is None:
        return lambda images: run_graph(bundle.model_path("fp32"), images, ["CPUExecutionProvider"])
    ref = bundle.manifest.backbone
    backbone = read_backbone(backbone_folder(repository, ref.sha256))
    check_fits(backbone.manifest, ref)
    return DomainRunner(backbone, bundle.prompts, bundle.head).features


def served_predictions(folder: Path, repository: Path, paths: list[str], classnames: list[str]) -> np.ndarray:
    """The published bundle's top-1 class of each photo, as an index into `classnames` (matched by name; UNKNOWN
    for a label they lack, UNREAD for a photo its preprocessing refuses)."""
    bundle = read_bundle(folder)
    if sorted(bundle.labels) != sorted(classnames):
        missing, extra = sorted(set(classnames) - set(bundle.labels)), sorted(set(bundle.labels) - set(classnames))
        raise BundleError(f"its labels are not the recipe's classes (the recipe's missing there: {missing[:5]}; its "
                          f"own: {extra[:5]}), so the two cannot be compared answer for answer")
    features = _graph(bundle, repository)
    ours = {name: i for i, name in enumerate(classnames)}
    to_ours = np.array([ours.get(label, UNKNOWN) for label in bundle.labels])
    out = np.full(len(paths), UNREAD)
    for start in range(0, len(paths), CHUNK):
        read, inputs = [], []
        for i, path in enumerate(paths[start : start + CHUNK], start):
            try:
                inputs.append(prepare(Path(path).read_bytes(), bundle.manifest.input, MAX_PIXELS))
                read.append(i)
            except (ImageError, OSError):
                continue
        if inputs:
            out[read] = to_ours[(features(np.stack(inputs)) @ bundle.class_vectors.T).argmax(1)]
    return out


def score(pred: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement with the teacher and, over the labelled photos (label >= 0), accuracy, in %."""
    labelled = labels >= 0
    accuracy = 100.0 * float((pred[labelled] == labels[labelled]).mean()) if labelled.any() else None
    return {"agreement": 100.0 * float((pred == teacher).mean()), "accuracy": accuracy}


def shortfalls(new: dict, serving: dict, tolerance: float) -> list[str]:
    """Each figure where the new student is below the serving version by more than the tolerance."""
    return [f"{what} {new[what]:.1f}% < {serving[what]:.1f}%" for what in ("agreement", "accuracy")
            if new[what] is not None and serving[what] is not None and new[what] < serving[what] - tolerance - SLACK]


def compare(predictions: dict, split: Split, serving: VersionFolder, repository: Path) -> dict:
    """Both models' figures on the photos both could read (`predictions`: training.evaluate.checkpoint_predictions
    of the new student)."""
    index = predictions["index"].numpy()
    try:
        served = served_predictions(serving.path, repository, [split.items[i][0] for i in index], split.classnames)
    except BundleError as err:
        raise BundleError(f"the gate cannot run version {serving.version} as it serves ({err}): repair it, or "
                          "publish without comparing: --set gate.enabled=false") from None
    both = served != UNREAD
    if not both.any():
        raise ValueError(f"the gate has no held-out photo that both the new student and version {serving.version} "
                         "could read: nothing to compare on")
    teacher, labels = predictions["teacher"].numpy()[both], predictions["label"].numpy()[both]
    return {"photos": int(both.sum()), "labelled": int((labels >= 0).sum()), "left_out": len(split) - int(both.sum()),
            "teacher_accuracy": score(teacher, teacher, labels)["accuracy"],
            "new": score(predictions["student"].numpy()[both], teacher, labels),
            "serving": {"version": serving.version, "folder": str(serving.path),
                        **score(served[both], teacher, labels)}}


def _figures(side: dict) -> str:
    accuracy = f", accuracy {side['accuracy']:.1f}%" if side["accuracy"] is not None else ""
    return f"agreement with the teacher {side['agreement']:.1f}%{accuracy}"


def decide(report: dict, report_file: Path, repository: Path, tolerance: float) -> dict:
    """Write the report; return the step's summary when the new student passes, else raise GateRefused."""
    report_file.parent.mkdir(parents=True, exist_ok=True)
    failed = shortfalls(report["new"], report["serving"], tolerance) if "serving" in report else []
    report.update(passed=not failed, shortfalls=failed, tolerance=tolerance)
    report_file.write_text(json.dumps(report, indent=2))
    if "serving" not in report:
        return {"result": report["reason"], "passed": True}
    serving = report["serving"]
    text = (f"on {report['photos']} held-out photos ({report['split']} split), new {_figures(report['new'])}; "
            f"version {serving['version']} (serving) {_figures(serving)}")
    if not failed:
        return {"result": text, "passed": True, "photos": report["photos"], **{f"new_{k}": v for k, v in
                report["new"].items()}, **{f"serving_{k}": serving[k] for k in ("agreement", "accuracy")}}
    raise GateRefused(
        f"the gate refused to publish version {report['version']} of {report['model']!r}: {text} ({report['labelled']} "
        f"labelled, {report['left_out']} left out as unreadable; tolerance {tolerance:g} points): "
        f"{'; '.join(failed)}. Nothing was written to {repository}. Report: {report_file}. To publish it anyway: "
        "--set gate.enabled=false, or allow a drop with --set gate.tolerance=POINTS.")
