"""The benchmark scripts run end to end (on tiny towers here; their figures come from real-size runs)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_engine_benchmark_writes_every_engine(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/engines.py", "--student-model", "PKD-Tiny-Student", "--teacher-model",
         "PKD-Tiny-Teacher", "--feature-dim", "64", "--batches", "1", "4", "--iters", "2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "engines.json").read_text())["results"]
    assert {"pytorch eager fp32", "onnxruntime fp32", "onnxruntime optimized", "onnxruntime int8"} <= set(results)
    assert all(len(rows) == 2 and rows[1]["images_per_s"] > 0 for rows in results.values())
    assert (tmp_path / "engines.png").stat().st_size > 0
    assert "| onnxruntime int8 |" in proc.stdout
