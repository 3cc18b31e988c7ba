"""The benchmark scripts run end to end (on tiny towers here; their figures come from real-size runs)."""
import importlib.util
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
    report = json.loads((tmp_path / "engines.json").read_text())
    results, agreement = report["results"], report["agreement"]
    cpu = {"pytorch eager fp32", "onnxruntime fp32", "onnxruntime optimized", "onnxruntime int8 (7-bit weights)",
           "onnxruntime int8_vnni (8-bit weights)"}
    if importlib.util.find_spec("openvino"):
        cpu |= {"openvino fp32", "openvino int8 (7-bit weights, server session)",
                "openvino int8_vnni (8-bit weights, server session)"}
    assert cpu <= set(results) and set(agreement) == set(results) - {"teacher PKD-Tiny-Teacher eager fp32"}
    assert all(len(rows) == 2 and rows[1]["images_per_s"] > 0 for rows in results.values())
    assert agreement["pytorch eager fp32"]["min_cosine"] > 0.99999
    assert agreement["onnxruntime fp32"]["min_cosine"] > 0.9999 and agreement["onnxruntime fp32"]["images"] == 20
    assert (tmp_path / "engines.png").stat().st_size > 0
    assert "| onnxruntime int8 (7-bit weights) |" in proc.stdout


def test_load_benchmark_drives_a_real_server_without_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/load.py", "--student-model", "PKD-Tiny-Student", "--feature-dim", "64",
         "--concurrency", "1", "8", "--requests", "24", "--max-batch-size", "4", "--engine-seconds", "1",
         "--protocol", "http", "grpc", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert [(r["protocol"], r["concurrency"], r["engine_batch"]) for r in rows] == [
        ("http", 1, 1), ("grpc", 1, 1), ("http", 8, 4), ("grpc", 8, 4)]
    assert all(r["errors"] == 0 and r["server_errors"] == 0 and r["images_per_s"] > 0 for r in rows)
    assert "| http | 8 | 24 |" in proc.stdout and "| grpc | 8 | 24 |" in proc.stdout


def test_stage2_benchmark_measures_every_mode_and_precision(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/stage2_gpu.py", "--teacher-model", "PKD-Tiny-Teacher", "--student-model",
         "PKD-Tiny-Student", "--classes", "10", "--batches", "4", "--steps", "2", "--device", "cpu",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "stage2.json").read_text())["rows"]
    assert {(r["mode"], r["precision"]) for r in rows} == {
        (m, p) for m in ("teacher live", "teacher cached", "cache build") for p in ("fp32", "bf16")}
    assert all(r["images_per_s"] > 0 and r["peak_gib"] is None for r in rows)  # no GPU memory on a CPU
    assert "| fp32 | 4 |" in proc.stdout and "ImageNet stage 2" in proc.stdout


def test_models_benchmark_serves_one_and_several_models_side_by_side(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/models.py", "--student-model", "PKD-Tiny-Student", "--feature-dim", "64",
         "--models", "3", "--concurrency", "4", "--requests", "24", "--rounds", "2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "models.json").read_text())
    assert [r["models"] for r in report["rows"]] == [1, 3]
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["requests"] == 24 for r in report["rows"])
    assert report["rows"][1]["rss_loaded_mib"] > report["rows"][0]["rss_loaded_mib"] and report["per_model_mib"] > 0
    assert "| 3 | 24 |" in proc.stdout and "3 models / 1: throughput" in proc.stdout


def test_domains_benchmark_serves_folded_and_shared_domains_side_by_side(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/domains.py", "--student-model", "PKD-Tiny-Student", "--feature-dim", "64",
         "--weights-tag", "", "--domains", "1", "3", "--concurrency", "4", "--requests", "12", "--rounds", "2",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "domains.json").read_text())["rows"]
    assert {(r["bundles"], r["domains"]) for r in rows} == {("folded", 1), ("folded", 3), ("shared", 1), ("shared", 3)}
    assert all(r["errors"] == 0 and r["images_per_s"] > 0 and r["rss_loaded_mib"] > 0 for r in rows)
    assert "3 domains, shared / folded: memory" in proc.stdout


def test_load_benchmark_measures_drift_and_capture_against_off(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/load.py", "--student-model", "PKD-Tiny-Student", "--feature-dim", "64", "--loop",
         "--concurrency", "4", "--requests", "12", "--rounds", "2", "--variants", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "loop.json").read_text())["rows"][0]
    assert row["off"]["errors"] == row["on"]["errors"] == 0 and row["on"]["images_per_s"] > 0
    assert 'promptkd_captured_total{outcome="saved"} 12.0' in proc.stdout


def test_rollout_benchmark_measures_shadow_samples_against_off(bundle_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/rollout.py", "--bundle", str(bundle_dir), "--concurrency", "1", "4", "--windows", "1",
         "--window-s", "1.5", "--warmup-s", "0.5", "--max-batch-size", "4", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "rollout.json").read_text())
    assert [r["concurrency"] for r in report["rows"]] == [1, 4]
    assert report["stages_at_end"] == {"20%": "shadow", "100%": "shadow"}, "decide: external never promotes"
    for row in report["rows"]:
        configs = row["configs"]
        assert list(configs) == ["off", "20%", "100%"]
        assert all(c["images_per_s"] > 0 and c["errors"] == 0 and c["p99_ratio"] > 0 for c in configs.values())
        assert all(0 < configs[name]["compared_of_sampled"] <= 1 for name in ("20%", "100%"))
        assert "compared" not in configs["off"]
    assert "| 4 | 100% |" in proc.stdout
