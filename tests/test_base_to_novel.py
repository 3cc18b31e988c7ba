"""The base-to-novel protocol end to end on real Fashion-MNIST photos with tiny towers: stage 1 on 16 shots of
the 5 base classes, class vectors for all 10, stage 2 on every unlabelled training photo, then base, novel
and harmonic-mean accuracy for the zero-shot teacher, the trained teacher and the distilled student."""
import json

import pytest

from training.cli import main

TEACHER = "PKD-Tiny-Teacher"


def _evaluate(out, *args) -> dict:
    assert main(["evaluate", "--protocol", "base2novel", "--workers", "0", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_base_to_novel(demo_workdir, tmp_path, capsys):
    work, _ = demo_workdir
    data, weights = work / "data", work / "weights"
    teacher = ["--teacher-model", TEACHER, "--teacher-pretrained", str(weights / "teacher.pt")]

    assert main(["train-teacher", *teacher, "--image-folder", str(data), "--subset", "base", "--shots", "16",
                 "--out", str(tmp_path / "teacher"), "--epochs", "10", "--lr", "0.05", "--gpa-mean", "8",
                 "--crop-min", "0.5",
                 "--workers", "0"]) == 0
    assert main(["distill", *teacher, "--teacher-checkpoint", str(tmp_path / "teacher" / "teacher.pt"),
                 "--student-model", "PKD-Tiny-Student", "--student-pretrained", str(weights / "student.pt"),
                 "--images", str(data / "train"), "--class-vectors", str(tmp_path / "teacher" / "class_vectors.npz"),
                 "--teacher-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "student"), "--epochs", "6",
                 "--batch-size", "32", "--lr", "0.05", "--kd-weight", "10", "--crop-min", "0.5", "--workers", "0",
                 "--eval-split", ""]) == 0

    zero_shot = _evaluate(tmp_path / "zs.json", *teacher, "--image-folder", str(data))
    trained = _evaluate(tmp_path / "tt.json", "--teacher-checkpoint", str(tmp_path / "teacher" / "teacher.pt"),
                        "--image-folder", str(data))
    distilled = _evaluate(tmp_path / "st.json", "--checkpoint", str(tmp_path / "student" / "student.pt"),
                          "--image-folder", str(data))
    rows = {
        "zero-shot teacher": (zero_shot, "teacher"),
        "trained teacher": (trained, "teacher"),
        "distilled student": (distilled, "student"),
    }
    with capsys.disabled():
        print("\n| model | base | novel | HM |\n| --- | --- | --- | --- |")
        for name, (report, who) in rows.items():
            key = f"{who}_acc"
            print(f"| {name} | {report['base'][key]:.1f} | {report['novel'][key]:.1f} | {report['hm'][key]:.1f} |")
    assert distilled["hm"]["teacher_acc"] == pytest.approx(trained["hm"]["teacher_acc"])  # same teacher twice
    assert trained["base"]["teacher_acc"] > zero_shot["base"]["teacher_acc"]
    # Margins that hold across CPUs (measured: student HM 67.2 to 69.6 against teachers of 72.4 to 74.7).
    assert distilled["hm"]["student_acc"] >= 0.85 * trained["hm"]["teacher_acc"]
    assert distilled["hm"]["student_acc"] >= zero_shot["hm"]["teacher_acc"] + 5
