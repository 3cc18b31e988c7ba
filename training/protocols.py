"""The paper's two protocols as resumable runs over cells (dataset x seed), on one device or under torchrun.

Base-to-novel, per dataset and seed: stage-1 teacher on 16 shots of the base classes, class vectors for every
class, stage-2 student on every unlabelled training image, then base / novel / HM on the test split.
Cross-dataset, per seed: one stage-1 teacher on 16 shots of all ImageNet classes; per target dataset, its
class vectors for the target's classes, a student distilled on the target's unlabelled training images (prompt
depth 3) and accuracy on the target's test split.

With `authors_teachers`, stage 1 imports the teachers PromptKD's authors released instead of training them.

Every stage leaves a completion marker; a finished cell (`result.json`) is never redone, and an interrupted
stage resumes from its run state. Under torchrun every process walks the same cells; training is distributed,
evaluation and writes happen on rank 0.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bundle import sha256_file, write_atomic

from .authors import import_teacher, released_teacher
from .class_vectors import ClassVectors
from .data.datasets import (
    BASE2NOVEL_DATASETS, CROSS_SOURCE, CROSS_TARGETS, DatasetError, Split, few_shot_splits, load_coop_split,
)
from .distill import DistillConfig, distill
from .runtime import RUN_STATE, Runtime, barrier, setup, teardown
from .evaluate import evaluate_checkpoint
from .results import RESULT
from .teacher_training import Stage1Config, train_teacher
from .teacher import load_teacher, save_teacher

log = logging.getLogger(__name__)

SEEDS = (1, 2, 3)
# The published scripts' stage-2 settings that differ per dataset or protocol: base2new_train.sh lowers the KD
# weight for three datasets; xd_train.sh uses 1000 for every cross-dataset target, those three included.
KD_WEIGHT = 1000.0
KD_WEIGHT_BASE2NOVEL = {"fgvc_aircraft": 200.0, "oxford_flowers": 200.0, "dtd": 200.0}
PROMPT_DEPTH = {"base2novel": 9, "cross_dataset": 3}


@dataclass
class ProtocolConfig:
    """One protocol run; defaults are the published settings (ViT-L/14 teacher, ViT-B/16 student)."""

    data_root: str
    out: str
    datasets: list[str] = field(default_factory=list)  # empty: every dataset of the protocol
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    teacher_model: str = "ViT-L-14"
    teacher_pretrained: str | None = "openai"
    teacher_weights: str | None = None  # a local file for the tag (offline machines; see towers.load_clip)
    student_model: str = "ViT-B-16"
    student_pretrained: str | None = "openai"
    student_weights: str | None = None
    shots: int = 16
    val_shots: int = 4
    teacher_epochs: int = 20
    teacher_lr: float = 0.005
    teacher_batch_size: int = 8
    gpa_mean: float | None = None  # None: three quarters into training (epoch 15 of 20, as published)
    gpa_std: float = 1.0
    teacher_selection: str = "gpa"  # as published: the GPA prompts; "val": the better of them and the best epoch
    student_epochs: int = 20
    student_lr: float = 0.005
    student_batch_size: int = 8
    kd_weight: float | None = None  # None: the published weight of each dataset
    student_selection: str = "best_val"  # as published (on a real val split here); "last": the final epoch
    crop_min: float = 0.08  # random resized crop scale (0.08, 1), Dassl's default, both stages
    prompt_depth: int | None = None  # None: the published depth of the protocol
    teacher_cache_views: int = 0  # 0: the teacher runs on every batch, as published; K > 0: cached, K views
    authors_teachers: str | None = None  # the authors' teacher download: stage 1 imports instead of training
    precision: str = "fp32"
    workers: int = 4
    device: str = "auto"

    def kd_weight_for(self, dataset: str, protocol: str) -> float:
        if self.kd_weight is not None:
            return self.kd_weight
        return KD_WEIGHT_BASE2NOVEL.get(dataset, KD_WEIGHT) if protocol == "base2novel" else KD_WEIGHT


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2)))


def _split(cfg: ProtocolConfig, dataset: str, split: str) -> Split:
    return load_coop_split(Path(cfg.data_root), dataset, split)


def _stage1(cfg: ProtocolConfig, protocol: str, dataset: str, seed: int, folder: Path, rt: Runtime) -> float:
    """Train (or import, resume, or skip when finished) the stage-1 teacher into `folder`; returns seconds spent."""
    if (folder / "report.json").is_file() and (folder / "teacher.pt").is_file():
        return 0.0
    started = time.time()
    if cfg.authors_teachers:
        _import_stage1(cfg, protocol, dataset, folder, rt)
        return time.time() - started
    subset = "base" if protocol == "base2novel" else "all"
    train, held_out = few_shot_splits(lambda split: _split(cfg, dataset, split), cfg.shots, cfg.val_shots, seed,
                                      subset)
    log.info("%s seed %d: stage 1 (%s classes) -> %s", dataset, seed, subset, folder)
    train_teacher(teacher_config(cfg, seed, folder), train, held_out, resume=(folder / RUN_STATE).is_file())
    return time.time() - started


def teacher_config(cfg: ProtocolConfig, seed: int, folder: Path) -> Stage1Config:
    """The stage-1 settings of a cell: the protocol's choices over Stage1Config's published defaults."""
    return Stage1Config(
        model=cfg.teacher_model, pretrained=cfg.teacher_pretrained, weights=cfg.teacher_weights,
        output_dir=str(folder), epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch_size, lr=cfg.teacher_lr,
        gpa_mean=cfg.gpa_mean if cfg.gpa_mean is not None else 0.75 * cfg.teacher_epochs, gpa_std=cfg.gpa_std,
        selection=cfg.teacher_selection, crop_min=cfg.crop_min, precision=cfg.precision, workers=cfg.workers,
        seed=seed, device=cfg.device,
    )


def student_config(cfg: ProtocolConfig, protocol: str, dataset: str, seed: int, teacher_dir: Path, vectors: Path,
                   folder: Path) -> DistillConfig:
    """The stage-2 settings of a cell: the protocol's and dataset's choices over DistillConfig's defaults."""
    cache = folder.parent / "teacher_cache" if cfg.teacher_cache_views else None
    return DistillConfig(
        teacher_model=cfg.teacher_model, teacher_pretrained=cfg.teacher_pretrained,
        teacher_checkpoint=str(teacher_dir / "teacher.pt"), student_weights=cfg.student_weights,
        student_model=cfg.student_model, student_pretrained=cfg.student_pretrained,
        class_vectors=str(vectors), output_dir=str(folder),
        prompt_depth=cfg.prompt_depth or PROMPT_DEPTH[protocol], epochs=cfg.student_epochs,
        batch_size=cfg.student_batch_size, lr=cfg.student_lr, kd_weight=cfg.kd_weight_for(dataset, protocol),
        selection=cfg.student_selection, crop_min=cfg.crop_min, precision=cfg.precision,
        cache_dir=str(cache) if cache else None, cache_views=max(1, cfg.teacher_cache_views),
        workers=cfg.workers, seed=seed, device=cfg.device,
    )


def _import_stage1(cfg: ProtocolConfig, protocol: str, dataset: str, folder: Path, rt: Runtime) -> None:
    """The authors' released teacher as this cell's stage 1 (rank 0 writes, everyone waits)."""
    if rt.is_main:
        source = released_teacher(Path(cfg.authors_teachers), protocol, dataset)
        log.info("%s: stage 1 imported from %s", dataset, source)
        teacher = import_teacher(source, cfg.teacher_model, cfg.teacher_pretrained, cfg.teacher_weights)
        provenance = {"imported_from": str(source), "sha256": sha256_file(source)}
        folder.mkdir(parents=True, exist_ok=True)
        save_teacher(folder / "teacher.pt", teacher, provenance)
        _write_json(folder / "report.json", provenance)
    barrier(rt)


def _class_vectors(teacher_dir: Path, classnames: list[str], target: Path, rt: Runtime) -> None:
    """The trained teacher's text tower, run once over `classnames` (rank 0 writes, everyone waits)."""
    if rt.is_main and not target.is_file():
        teacher, _ = load_teacher(teacher_dir / "teacher.pt")
        teacher.class_vectors(classnames, source=f"teacher checkpoint {teacher_dir / 'teacher.pt'}").save(target)
    barrier(rt)


def _stage2(cfg: ProtocolConfig, protocol: str, dataset: str, seed: int, teacher_dir: Path, vectors: Path,
            folder: Path) -> float:
    """Distil (or resume, or skip when finished) the student on the dataset's unlabelled training images."""
    if (folder / "report.json").is_file() and (folder / "student.pt").is_file():
        return 0.0
    started = time.time()
    stage2 = student_config(cfg, protocol, dataset, seed, teacher_dir, vectors, folder)
    images = [path for path, _ in _split(cfg, dataset, "train").items]
    # Labelled held-out images of every class (the val split, or for ImageNet training images left out of the
    # few-shot draw) choose the epoch; the authors chose on the base classes' test split.
    val = None
    if cfg.student_selection == "best_val":
        _, val = few_shot_splits(lambda split: _split(cfg, dataset, split), cfg.shots, cfg.val_shots, seed, "all")
    log.info("%s seed %d: stage 2 on %d unlabelled images -> %s", dataset, seed, len(images), folder)
    distill(stage2, images, eval_split=None, resume=(folder / RUN_STATE).is_file(), val_split=val)
    return time.time() - started


def _evaluate(cfg: ProtocolConfig, dataset: str, student: Path, vectors_path: Path, base_novel_split: bool,
              rt: Runtime) -> dict:
    """The distilled student and its teacher on the dataset's test split, once, at the end of a cell (rank 0)."""
    return evaluate_checkpoint(student, _split(cfg, dataset, "test"), rt.device, base_novel_split, cfg.workers,
                               ClassVectors.load(vectors_path))


def _finish(cell: Path, payload: dict | None, rt: Runtime) -> None:
    """Rank 0 writes the cell's result (its completion marker) and drops the teacher cache it no longer needs."""
    if rt.is_main and payload is not None:
        _write_json(cell / RESULT, payload)
        shutil.rmtree(cell / "teacher_cache", ignore_errors=True)
    barrier(rt)


def _base2novel_cell(cfg: ProtocolConfig, dataset: str, seed: int, cell: Path, rt: Runtime) -> None:
    seconds = {"teacher": _stage1(cfg, "base2novel", dataset, seed, cell / "teacher", rt)}
    all_classes = _split(cfg, dataset, "train").classnames
    _class_vectors(cell / "teacher", all_classes, cell / "teacher" / "class_vectors.npz", rt)
    seconds["student"] = _stage2(cfg, "base2novel", dataset, seed, cell / "teacher",
                                 cell / "teacher" / "class_vectors.npz", cell / "student")
    payload = None
    if rt.is_main:
        started = time.time()
        report = _evaluate(cfg, dataset, cell / "student" / "student.pt", cell / "teacher" / "class_vectors.npz",
                           True, rt)
        seconds["evaluation"] = time.time() - started
        payload = {
            "protocol": "base2novel", "dataset": dataset, "seed": seed,
            "student": {"base": report["base"]["student_acc"], "novel": report["novel"]["student_acc"],
                        "hm": report["hm"]["student_acc"]},
            "teacher": {"base": report["base"]["teacher_acc"], "novel": report["novel"]["teacher_acc"],
                        "hm": report["hm"]["teacher_acc"]},
            "agreement": {"base": report["base"]["agreement"], "novel": report["novel"]["agreement"]},
            "test_images": {"base": report["base"]["images"], "novel": report["novel"]["images"]},
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "settings": _settings(cfg, "base2novel", dataset),
        }
    _finish(cell, payload, rt)


def _cross_cell(cfg: ProtocolConfig, dataset: str, seed: int, teacher_dir: Path, cell: Path, rt: Runtime) -> None:
    cell.mkdir(parents=True, exist_ok=True)
    _class_vectors(teacher_dir, _split(cfg, dataset, "train").classnames, cell / "class_vectors.npz", rt)
    seconds = {"student": _stage2(cfg, "cross_dataset", dataset, seed, teacher_dir, cell / "class_vectors.npz",
                                  cell / "student")}
    payload = None
    if rt.is_main:
        started = time.time()
        report = _evaluate(cfg, dataset, cell / "student" / "student.pt", cell / "class_vectors.npz", False, rt)
        seconds["evaluation"] = time.time() - started
        payload = {
            "protocol": "cross_dataset", "dataset": dataset, "seed": seed,
            "student": {"accuracy": report["student_acc"]}, "teacher": {"accuracy": report["teacher_acc"]},
            "agreement": report["agreement"], "test_images": report["images"],
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "settings": _settings(cfg, "cross_dataset", dataset),
        }
    _finish(cell, payload, rt)


def _settings(cfg: ProtocolConfig, protocol: str, dataset: str) -> dict:
    settings = asdict(cfg)
    settings.update(kd_weight=cfg.kd_weight_for(dataset, protocol),
                    prompt_depth=cfg.prompt_depth or PROMPT_DEPTH[protocol])
    for key in ("datasets", "seeds", "workers", "device", "out"):
        settings.pop(key)
    return settings


def _check_datasets(cfg: ProtocolConfig, datasets: list[str]) -> None:
    """Fail before any training when a dataset's split files cannot be read (images are checked by check-data)."""
    problems = []
    for dataset in datasets:
        for split in ("train", "test"):
            try:
                _split(cfg, dataset, split)
            except DatasetError as err:
                problems.append(f"{dataset}: {err}")
    if problems:
        raise DatasetError("datasets not ready (python -m training check-data says what to fetch):\n  "
                           + "\n  ".join(problems))


def _check_teachers(cfg: ProtocolConfig, protocol: str, datasets: list[str]) -> None:
    """Fail before any training when a teacher to import is not in the authors' download."""
    if not cfg.authors_teachers:
        return
    root = Path(cfg.authors_teachers)
    missing = [str(path) for path in sorted({released_teacher(root, protocol, d) for d in datasets})
               if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            "the authors' teachers are not all there (their download, teacher_model/, holds <Dataset>/VLPromptLearner/"
            "model-best.pth.tar per dataset and ImageNet-xd/VLPromptLearner_large/model.pth.tar-20):\n  "
            + "\n  ".join(missing))


def _chosen(requested: list[str], known: tuple[str, ...], protocol: str) -> list[str]:
    unknown = [d for d in requested if d not in known]
    if unknown:
        raise DatasetError(f"{', '.join(unknown)}: not a dataset of the {protocol} protocol ({', '.join(known)})")
    return list(requested) or list(known)


def run_base2novel(cfg: ProtocolConfig) -> list[Path]:
    """Every (dataset, seed) cell of the base-to-novel protocol; returns the cells' result files."""
    datasets = _chosen(cfg.datasets, BASE2NOVEL_DATASETS, "base-to-novel")
    _check_datasets(cfg, datasets)
    _check_teachers(cfg, "base2novel", datasets)
    rt = setup(cfg.device)
    results = []
    try:
        for dataset in datasets:
            for seed in cfg.seeds:
                cell = Path(cfg.out) / "base2novel" / dataset / f"seed{seed}"
                if not (cell / RESULT).is_file():
                    log.info("base2novel %s seed %d: running", dataset, seed)
                    _base2novel_cell(cfg, dataset, seed, cell, rt)
                results.append(cell / RESULT)
    finally:
        teardown(rt)
    return results


def run_cross_dataset(cfg: ProtocolConfig) -> list[Path]:
    """Per seed one ImageNet teacher (all classes), then every target cell; returns the cells' result files."""
    targets = _chosen(cfg.datasets, CROSS_TARGETS, "cross-dataset")
    _check_datasets(cfg, [CROSS_SOURCE, *targets])
    _check_teachers(cfg, "cross_dataset", [CROSS_SOURCE])
    rt = setup(cfg.device)
    results = []
    try:
        for seed in cfg.seeds:
            root = Path(cfg.out) / "cross_dataset"
            pending = [t for t in targets if not (root / t / f"seed{seed}" / RESULT).is_file()]
            teacher_dir = root / f"{CROSS_SOURCE}_teacher" / f"seed{seed}"
            if pending:
                _stage1(cfg, "cross_dataset", CROSS_SOURCE, seed, teacher_dir, rt)
            for dataset in targets:
                cell = root / dataset / f"seed{seed}"
                if dataset in pending:
                    log.info("cross_dataset %s seed %d: running", dataset, seed)
                    _cross_cell(cfg, dataset, seed, teacher_dir, cell, rt)
                results.append(cell / RESULT)
    finally:
        teardown(rt)
    return results
