"""What a recipe run shows at the end: a summary table of its steps and a PNG of both stages' training curves."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    step: str
    status: str  # "ran", "resumed" or "up to date"
    seconds: float
    result: str


def table(rows: list[Row]) -> str:
    """A plain-text table: one line per step, with what it did, how long it took and what came out."""
    header = Row("step", "status", 0.0, "result")
    cells = [(r.step, r.status, "time" if r is header else _duration(r.seconds), r.result) for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(line.rstrip() for line in lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def read_metrics(path: Path) -> list[dict]:
    """Per-epoch entries of a stage's metrics.jsonl, the last entry of each epoch kept (a resumed run appends)."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        by_epoch[int(entry["step"])] = entry
    return [by_epoch[e] for e in sorted(by_epoch)]


PANELS = (  # (stage folder, title, metrics plotted, y label)
    ("stage1", "stage 1: teacher loss", ("loss", "ce"), "loss"),
    ("stage1", "stage 1: teacher held-out accuracy", ("val_acc",), "%"),
    ("stage2", "stage 2: student KD loss", ("loss",), "loss"),
    ("stage2", "stage 2: student on the eval split", ("eval_acc", "eval_agreement", "val_acc"), "%"),
)


def plot_curves(workdir: Path, out: Path) -> bool:
    """curves.png: loss and accuracy/agreement per epoch for both stages; False when no stage has metrics yet."""
    metrics = {stage: read_metrics(workdir / stage / "metrics.jsonl") for stage in ("stage1", "stage2")}
    if not any(metrics.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (stage, title, keys, unit) in zip(axes.flat, PANELS):
        entries = metrics[stage]
        for key in keys:
            points = [(e["step"], e[key]) for e in entries if key in e]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(unit)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True
