"""Finished protocol cells as tables beside the paper's numbers: CSV, markdown and a bar chart per protocol.

Works on partial runs: a dataset shows the seeds it has, unfinished cells are listed with the stage they reached,
and the average row compares like with like (the paper's mean over the same datasets).
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .data.names import BASE2NOVEL_DATASETS, CROSS_TARGETS

RESULT = "result.json"  # each protocol cell's figures, written by protocols.py

REFERENCE_DIR = Path(__file__).parent / "reference"
PROTOCOLS = {
    # protocol: (metrics, reference file, datasets in table order)
    "base2novel": (("base", "novel", "hm"), "base2novel_vitb16.csv", BASE2NOVEL_DATASETS),
    "cross_dataset": (("accuracy",), "cross_dataset_vitb16.csv", CROSS_TARGETS),
}
PAPER, PAPER_TEACHER = "promptkd", "teacher_vitl14"
# Base-to-novel: the mean over seeds of each seed's own HM, beside the paper's HM (of the mean base and novel).
SEED_HM = "hm_mean_of_seed_hms"


def read_reference(path: Path) -> dict[tuple[str, str], dict[str, float]]:
    """The paper's table: (method, dataset) -> metrics. Its header is the last '# method,...' comment line."""
    header: list[str] = []
    rows = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if line.lstrip("# ").startswith("method,"):
                header = line.lstrip("# ").split(",")
            continue
        if line.strip() and header:
            values = dict(zip(header, line.split(",")))
            key = (values.pop("method"), values.pop("dataset"))
            rows[key] = {k: float(v) for k, v in values.items()}
    if not header:
        raise ValueError(f"{path}: no '# method,dataset,...' header line")
    return rows


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@dataclass
class Row:
    dataset: str
    seeds: list[int] = field(default_factory=list)
    student: dict[str, list[float]] = field(default_factory=dict)
    teacher: dict[str, list[float]] = field(default_factory=dict)
    mixed_settings: bool = False


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def seed_means(per_seed: dict[str, list[float]]) -> dict[str, float | None]:
    """Each metric's mean over the seeds, and the HM as the paper reports it: the HM of the seeds' mean base and
    mean novel accuracy, not the mean of each seed's HM (which is never larger, and smaller when seeds disagree)."""
    means = {m: _mean(values) for m, values in per_seed.items()}
    if "hm" in means and means["base"] is not None and means["novel"] is not None:
        means["hm"] = harmonic_mean(means["base"], means["novel"])
    return means


def collect(runs: Path, protocol: str) -> tuple[list[Row], list[str]]:
    """Rows of finished cells per dataset (table order), and a line for every unfinished cell."""
    metrics, _, datasets = PROTOCOLS[protocol]
    rows, pending = [], []
    for dataset in datasets:
        row = Row(dataset, student={m: [] for m in metrics}, teacher={m: [] for m in metrics})
        settings = []
        for cell in sorted((runs / protocol / dataset).glob("seed*"), key=lambda p: p.name):
            result = cell / RESULT
            if not result.is_file():
                pending.append(f"{dataset} {cell.name}: {_stage_reached(cell)}")
                continue
            data = json.loads(result.read_text())
            row.seeds.append(int(data["seed"]))
            for m in metrics:
                row.student[m].append(float(data["student"][m]))
                row.teacher[m].append(float(data["teacher"][m]))
            settings.append(json.dumps(data.get("settings", {}), sort_keys=True))
        if row.seeds:
            row.mixed_settings = len(set(settings)) > 1
            rows.append(row)
    return rows, pending


def _stage_reached(cell: Path) -> str:
    if (cell / "student" / "student.pt").is_file():
        return "student training (or its evaluation) unfinished"
    if (cell / "teacher" / "teacher.pt").is_file() or (cell / "class_vectors.npz").is_file():
        return "teacher done, student not started"
    return "teacher training unfinished"


def _average(per_dataset: list[dict[str, float]], metrics: tuple[str, ...]) -> dict[str, float]:
    """Mean over datasets of each metric; the HM of the mean base and novel, as the paper computes it."""
    means = {m: statistics.fmean(d[m] for d in per_dataset) for m in metrics}
    if "hm" in means:
        means["hm"] = harmonic_mean(means["base"], means["novel"])
    return means


def _paper_average(reference: dict, method: str, datasets: list[str], metrics: tuple[str, ...]) -> dict:
    """The paper's average over exactly `datasets`; empty where it lacks one of them."""
    found = [reference[(method, d)] for d in datasets if (method, d) in reference]
    return _average(found, metrics) if found and len(found) == len(datasets) else {}


def table(runs: Path, protocol: str, reference_dir: Path = REFERENCE_DIR) -> tuple[list[dict], list[str]]:
    """One record per dataset with finished cells, then the average row; and the unfinished cells."""
    metrics, reference_file, datasets = PROTOCOLS[protocol]
    reference = read_reference(reference_dir / reference_file)
    rows, pending = collect(runs, protocol)
    records = []
    for row in rows:
        record: dict = {"dataset": row.dataset, "seeds": " ".join(map(str, row.seeds))}
        paper = reference.get((PAPER, row.dataset), {})
        paper_teacher = reference.get((PAPER_TEACHER, row.dataset), {})
        student, teacher = seed_means(row.student), seed_means(row.teacher)
        for m in metrics:
            record[f"{m}_mean"] = student[m]
            record[f"{m}_std"] = _std(row.student[m])  # hm: the spread of the seeds' own HMs
            record[f"paper_{m}"] = paper.get(m)
            record[f"diff_{m}"] = None if m not in paper else record[f"{m}_mean"] - paper[m]
            record[f"teacher_{m}"] = teacher[m]
            record[f"paper_teacher_{m}"] = paper_teacher.get(m)
        if "hm" in metrics:
            record[SEED_HM] = _mean(row.student["hm"])
        record["note"] = "seeds ran with different settings" if row.mixed_settings else ""
        records.append(record)
    if rows:
        names = [r.dataset for r in rows]
        ours = _average([seed_means(r.student) for r in rows], metrics)
        teacher = _average([seed_means(r.teacher) for r in rows], metrics)
        paper = _paper_average(reference, PAPER, names, metrics)
        paper_teacher = _paper_average(reference, PAPER_TEACHER, names, metrics)
        complete = len(rows) == len(datasets)
        record = {"dataset": "average", "seeds": ""}
        for m in metrics:
            record.update({f"{m}_mean": ours[m], f"{m}_std": None, f"paper_{m}": paper.get(m),
                           f"diff_{m}": ours[m] - paper[m] if m in paper else None,
                           f"teacher_{m}": teacher[m], f"paper_teacher_{m}": paper_teacher.get(m)})
        if "hm" in metrics:
            record[SEED_HM] = None  # a per-dataset figure: the average row is the HM of the mean base and novel
        record["note"] = "" if complete else f"{len(rows)} of {len(datasets)} datasets; paper over the same"
        records.append(record)
    return records, pending


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def markdown(protocol: str, records: list[dict], pending: list[str]) -> str:
    metrics = PROTOCOLS[protocol][0]
    title = {"base2novel": "Base-to-novel (student, accuracy %, mean ± std over seeds; HM of the mean base and "
                           "novel, as the paper)",
             "cross_dataset": "Cross-dataset (student, accuracy %, mean ± std over seeds)"}[protocol]
    head = ["dataset", "seeds"]
    for m in metrics:
        head += [m, f"paper {m}", f"Δ {m}"]
    last = metrics[-1]
    seed_hm = "hm" in metrics
    head += ["mean of seed HMs"] * seed_hm + [f"teacher {last}", f"paper teacher {last}", "note"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        cells = [r["dataset"], r["seeds"]]
        for m in metrics:
            spread = f" ± {r[f'{m}_std']:.2f}" if r[f"{m}_std"] is not None else ""
            cells += [f"{_fmt(r[f'{m}_mean'])}{spread}", _fmt(r[f"paper_{m}"]), _fmt(r[f"diff_{m}"], signed=True)]
        if seed_hm:
            cells.append(_fmt(r[SEED_HM]))
        cells += [_fmt(r[f"teacher_{last}"]), _fmt(r[f"paper_teacher_{last}"]), r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    if not records:
        lines.append("| (no finished cells) |" + " |" * (len(head) - 1))
    if pending:
        lines += ["", "Unfinished cells: " + "; ".join(pending) + "."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, records: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]) if records else ["dataset"])
        writer.writeheader()
        for r in records:
            writer.writerow({k: "" if v is None else (round(v, 4) if isinstance(v, float) else v)
                             for k, v in r.items()})


def bar_chart(path: Path, protocol: str, records: list[dict]) -> None:
    """Ours (with the seeds' std as error bars) beside the paper, per dataset, on the protocol's headline metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = PROTOCOLS[protocol][0][-1]
    names = [r["dataset"] for r in records]
    ours = [r[f"{metric}_mean"] for r in records]
    errors = [r[f"{metric}_std"] or 0.0 for r in records]
    paper = [r[f"paper_{metric}"] if r[f"paper_{metric}"] is not None else 0.0 for r in records]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4))
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=errors, capsize=3, label="this run")
    ax.bar([i + 0.2 for i in x], paper, 0.4, label="PromptKD paper")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel(f"{'HM' if metric == 'hm' else 'accuracy'} (%)")
    ax.set_title({"base2novel": "Base-to-novel, harmonic mean", "cross_dataset": "Cross-dataset accuracy"}[protocol])
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(runs: Path, out: Path, reference_dir: Path = REFERENCE_DIR) -> dict[str, str]:
    """Tables and charts for every protocol that has a folder under `runs`; returns the markdown per protocol."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    for protocol in PROTOCOLS:
        if not (runs / protocol).is_dir():
            continue
        records, pending = table(runs, protocol, reference_dir)
        texts[protocol] = markdown(protocol, records, pending)
        (out / f"{protocol}.md").write_text(texts[protocol])
        write_csv(out / f"{protocol}.csv", records)
        if records:
            bar_chart(out / f"{protocol}.png", protocol, records)
    if not texts:
        raise FileNotFoundError(f"no protocol runs under {runs} (expected {' or '.join(PROTOCOLS)} folders)")
    return texts
