"""Accuracy of teacher and student against the shared class vectors, and the base-to-novel protocol."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import load_distilled
from .class_vectors import ClassVectors
from .data.datasets import Split, base_novel
from .data.views import ViewDataset, collate_skipping
from .loss import cosine_logits
from .results import harmonic_mean
from .transforms import eval_transform


@torch.no_grad()
def top1(
    encoder: nn.Module, loader: DataLoader, vectors: torch.Tensor, logit_scale: float, desc: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-1 predictions, labels and indices into the split of an image encoder over a loader (unreadable images
    are left out, so the indices say which images the predictions are of)."""
    device = vectors.device
    empty = torch.empty(0, dtype=torch.long)
    preds, labels, indices = [empty], [empty], [empty]
    for images, index, y, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        if not len(y):
            continue
        logits = cosine_logits(encoder(images.to(device)).float(), vectors, logit_scale)
        preds.append(logits.argmax(dim=-1).cpu())
        labels.append(y)
        indices.append(index)
    return torch.cat(preds), torch.cat(labels), torch.cat(indices)


def predict(
    encoder: nn.Module, loader: DataLoader, vectors: torch.Tensor, logit_scale: float, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 predictions and labels of an image encoder over a loader (unreadable images are left out)."""
    preds, labels, _ = top1(encoder, loader, vectors, logit_scale, desc)
    return preds, labels


def _loader(split: Split, transform, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ViewDataset(split.items, transform, seed=0), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_skipping)


def _scores(split: Split, preds: dict[str, torch.Tensor], labels: torch.Tensor) -> dict:
    """Accuracy (%) of each encoder's predictions, and the student's top-1 agreement with the teacher."""
    result: dict = {"images": len(split), "classes": len(split.classnames), "skipped_images": len(split) - len(labels)}
    for name, pred in preds.items():
        result[f"{name}_acc"] = 100.0 * (pred == labels).float().mean().item() if len(labels) else 0.0
    if "student" in preds and "teacher" in preds:
        result["agreement"] = 100.0 * (preds["student"] == preds["teacher"]).float().mean().item()
    return result


def evaluate_split(
    encoders: dict[str, nn.Module],
    split: Split,
    vectors: torch.Tensor,
    logit_scale: float,
    transform,
    batch_size: int = 64,
    workers: int = 0,
) -> dict:
    """Accuracy (%) of each encoder on a labelled split, and the student's top-1 agreement with the teacher."""
    loader = _loader(split, transform, batch_size, workers)
    preds, labels = {}, torch.empty(0, dtype=torch.long)
    for name, encoder in encoders.items():
        preds[name], labels = predict(encoder, loader, vectors, logit_scale, desc=f"eval {name}")
    return _scores(split, preds, labels)


class EpochTracker:
    """evaluate_split of the student and its frozen teacher on one labelled split, again and again (before, after
    every epoch, after training): the teacher's predictions are computed once."""

    def __init__(self, teacher: nn.Module, split: Split, vectors: torch.Tensor, logit_scale: float, transform,
                 workers: int = 0) -> None:
        self.split, self.loader = split, _loader(split, transform, 64, workers)
        self.vectors, self.logit_scale = vectors, logit_scale
        self.teacher_pred, self.labels = predict(teacher, self.loader, vectors, logit_scale, desc="eval teacher")

    def report(self, student: nn.Module) -> dict:
        """What evaluate_split({"teacher": ..., "student": student}, ...) reports."""
        pred, _ = predict(student, self.loader, self.vectors, self.logit_scale, desc="eval student")
        return _scores(self.split, {"teacher": self.teacher_pred, "student": pred}, self.labels)

    def __call__(self, student: nn.Module) -> dict[str, float]:
        """The per-epoch figures for metrics.jsonl."""
        if not len(self.labels):
            return {}
        report = self.report(student)
        return {"eval_acc": report["student_acc"], "eval_agreement": report["agreement"]}


def evaluate_base_novel(
    encoders: dict[str, nn.Module], split: Split, vectors: torch.Tensor, logit_scale: float, transform, **kw
) -> dict:
    """Base accuracy on base images among base classes, novel likewise, and their harmonic mean."""
    n_base = len(base_novel(split, "base").classnames)
    report = {
        "base": evaluate_split(encoders, base_novel(split, "base"), vectors[:n_base], logit_scale, transform, **kw),
        "novel": evaluate_split(encoders, base_novel(split, "novel"), vectors[n_base:], logit_scale, transform, **kw),
    }
    report["hm"] = {
        f"{name}_acc": harmonic_mean(report["base"][f"{name}_acc"], report["novel"][f"{name}_acc"])
        for name in encoders
    }
    return report


def evaluate_encoders(encoders: dict[str, nn.Module], split: Split, vectors: ClassVectors, transform,
                      device: torch.device, base_novel_split: bool, workers: int) -> dict:
    """Encoders on `split` against `vectors` (checked to be the split's classes): overall, or base/novel/HM."""
    vectors.check_labels(split.classnames)
    encoders = {name: encoder.to(device) for name, encoder in encoders.items()}
    run = evaluate_base_novel if base_novel_split else evaluate_split
    return run(encoders, split, vectors.vectors.to(device), vectors.logit_scale, transform, workers=workers)


def evaluate_checkpoint(checkpoint: Path, split: Split, device: torch.device, base_novel_split: bool,
                        workers: int, vectors: ClassVectors | None = None, with_teacher: bool = True) -> dict:
    """A distilled student.pt (and, unless left out, the teacher it learned from) on a labelled split, against
    `vectors` or else the class vectors it was distilled with: what the CLI's evaluate and the protocols run."""
    encoders, pre, cfg = load_distilled(checkpoint, with_teacher)
    vectors = vectors or ClassVectors.load(Path(cfg["class_vectors"]))
    return evaluate_encoders(encoders, split, vectors, eval_transform(pre), device, base_novel_split, workers)


def checkpoint_predictions(checkpoint: Path, split: Split, device: torch.device, workers: int,
                           vectors: ClassVectors) -> dict[str, torch.Tensor]:
    """Image by image, what evaluate_checkpoint scores: the top-1 class of a distilled student and of the teacher it
    learned from, against `vectors`, with each readable image's label and index into `split` ("student",
    "teacher", "label", "index"), so that another model's answers on the same images can be scored alike."""
    encoders, pre, _ = load_distilled(checkpoint, with_teacher=True)
    vectors.check_labels(split.classnames)
    loader = _loader(split, eval_transform(pre), 64, workers)
    on_device = vectors.vectors.to(device)
    result: dict[str, torch.Tensor] = {}
    for name, encoder in encoders.items():
        result[name], result["label"], result["index"] = top1(encoder.to(device), loader, on_device,
                                                              vectors.logit_scale, f"gate {name}")
    return result
