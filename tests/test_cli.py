"""The training command line: help for every command, clean errors for bad input."""
import subprocess
import sys
from pathlib import Path

import pytest

from training.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare-fashion-mnist", "pretrain-tiny", "class-vectors", "train-teacher", "import-teacher",
            "distill", "evaluate", "base2novel", "cross-dataset", "check-data", "results"]


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.parametrize("args", [["--help"], ["distill", "--help"]])
def test_help_runs(args):
    proc = subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys, tiny_weights, fmnist):
    assert main(["distill", "--teacher-model", "PKD-Tiny-Teacher", "--student-model", "PKD-Tiny-Student",
                 "--images", str(fmnist / "train"), "--class-vectors", str(tmp_path / "none.npz"),
                 "--out", str(tmp_path / "run"), "--eval-split", ""]) == 2
    assert "not a class-vectors file" in capsys.readouterr().err
    assert main(["class-vectors", "--teacher-model", "PKD-Tiny-Teacher", "--teacher-pretrained",
                 str(tmp_path / "missing.pt"), "--image-folder", str(fmnist), "--out", str(tmp_path / "cv.npz")]) == 2
    assert "neither a local file nor a known open_clip tag" in capsys.readouterr().err
    assert main(["class-vectors", "--teacher-model", "PKD-Tiny-Teacher", "--out", str(tmp_path / "cv.npz")]) == 2
    assert "--image-folder" in capsys.readouterr().err
    assert not (tmp_path / "cv.npz").exists()


def test_out_of_range_numbers_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["distill", "--class-vectors", "cv.npz", "--out", "run", "--epochs", "0"])
    assert exit_info.value.code == 2
    assert "must be at least 1, got 0" in capsys.readouterr().err
