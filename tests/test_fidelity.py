"""docs/FIDELITY.md is the list of published settings: every default it names is checked against the code."""
import ast
from pathlib import Path

from training.class_vectors import PROMPTSRC_TEMPLATES
from training.cli import build_parser
from training.commands import _protocol_config
from training.protocols import PROMPT_DEPTH, student_config, teacher_config
from training.runtime import lr_at

TABLE = Path(__file__).resolve().parents[1] / "docs" / "FIDELITY.md"


def _rows() -> list[dict[str, str]]:
    """Every row of every table in the document, by column name."""
    rows, header = [], None
    for line in TABLE.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(cells[0]) <= {"-", " "}:
            rows.append(dict(zip(header, cells)))
    return rows


def _defaults() -> dict:
    """What the protocol runners would use, from the CLI's own defaults."""
    parse = build_parser().parse_args
    b2n = _protocol_config(parse(["base2novel", "--data-root", "data", "--out", "runs"]))
    xd = _protocol_config(parse(["cross-dataset", "--data-root", "data", "--out", "runs"]))
    cell = Path("runs/cell")
    return {
        "b2n": b2n, "xd": xd, "PROMPT_DEPTH": PROMPT_DEPTH, "PROMPTSRC_TEMPLATES": PROMPTSRC_TEMPLATES, "lr_at": lr_at,
        "t1": teacher_config(b2n, 1, cell / "teacher"),
        "s2": student_config(b2n, "base2novel", "caltech101", 1, cell / "teacher", cell / "v.npz", cell / "student"),
        "s2x": student_config(xd, "cross_dataset", "eurosat", 1, cell / "teacher", cell / "v.npz", cell / "student"),
    }


def _mismatches(namespace: dict) -> list[str]:
    rows = [r for r in _rows() if r.get("code")]
    assert len(rows) >= 45, f"only {len(rows)} checkable rows: is the table still parsed?"
    wrong = []
    for row in rows:
        expected = ast.literal_eval(row["ours (default)"].split("`")[1])
        actual = eval(row["code"].strip("`"), {}, namespace)  # the repository's own document
        if actual != expected or type(actual) is not type(expected):
            wrong.append(f"{row['setting']}: table says {expected!r}, {row['code']} is {actual!r}")
    return wrong


def test_every_published_setting_in_the_table_is_the_code_default():
    wrong = _mismatches(_defaults())
    assert not wrong, "\n".join(wrong)


def test_a_drifted_default_is_reported():
    namespace = _defaults()
    namespace["b2n"].kd_weight = 1.0
    namespace["t1"].text_targets = "single"
    namespace["s2"].prompt_depth = 12
    wrong = _mismatches(namespace)
    assert len(wrong) == 6, wrong  # KD weight of caltech101 and the three 200-weight datasets, targets, depth
    assert any(w.startswith("frozen text targets") for w in wrong)
