"""scripts/gpu_check.sh runs end to end on a machine without a GPU: each GPU step is skipped with a line saying
what it needs and what is missing, and the helpers its steps call work on the CPU (tiny towers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ["stage2", "student", "ddp", "bundle", "trt", "serve-cuda", "serve-trt", "engines"]


def _run(tmp_path, **env):
    return subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PY=sys.executable, **env))


def test_dry_run_names_every_step_and_what_it_lacks(tmp_path):
    proc = _run(tmp_path, DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STEPS
    assert all(line.split()[1] == "SKIP" and "dry run: needs" in line for line in lines)
    if "torch sees no CUDA device" in lines[0]:  # a CPU-only machine: say what is missing
        assert all("missing here:" in line for line in lines)


def test_without_a_gpu_a_real_run_skips_instead_of_failing(tmp_path):
    proc = _run(tmp_path, STEPS="bundle serve-trt")
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["bundle", "serve-trt"]
    if all(" SKIP " in line for line in lines):
        assert proc.returncode == 0 and all("missing here:" in line for line in lines)


def test_the_gpu_steps_helpers_run_on_a_cpu(tmp_path):
    """The bundle step's builder and the engine benchmark's GPU branch, at tiny size: the GPU pieces that are
    absent are said, not crashed on."""
    proc = subprocess.run([sys.executable, "bench/real_size_bundle.py", "--student-model", "PKD-Tiny-Student",
                           "--classes", "10", "--out", str(tmp_path / "bundle")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["num_labels"] == 10 and manifest["feature_dim"] == 768 and manifest["parity"]["images"] == 20
    proc = subprocess.run([sys.executable, "bench/engines.py", "--student-model", "PKD-Tiny-Student", "--gpu",
                           "--no-cpu", "--skip-teacher", "--feature-dim", "64", "--batches", "1", "--iters", "1",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "engines.json").read_text())["results"]
    assert "pytorch eager fp32" in results
    if "tensorrt fp16" not in results:
        assert "TensorRT engine left out" in proc.stderr


def test_the_wheels_for_the_gpu_image_fetch_and_install_into_an_empty_target(tmp_path):
    """What scripts/gpu_check.sh --fetch-wheels puts in .whl/ installs, without an index or dependencies, into an
    empty target for the lent machines' CPython 3.12, and stays well under what a device call carries."""
    wheels, target = tmp_path / "whl", tmp_path / "site"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--fetch-wheels"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PY=sys.executable, WHEELS=str(wheels)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = [line.split("==")[0] for line in (REPO / "scripts" / "gpu_wheels.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    assert len(list(wheels.glob("*.whl"))) == len(listed)
    assert sum(f.stat().st_size for f in wheels.iterdir()) < 16 * 2**20
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(target), "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.12",
                           "--platform", "manylinux2014_x86_64", *map(str, wheels.glob("*.whl"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for package in ("open_clip", "ftfy", "wcwidth", "pydantic", "pydantic_core", "annotated_types"):
        assert (target / package / "__init__.py").is_file(), package
    assert len(list((target / "foolbox" / "data").glob("*.jpg"))) == 20


def test_the_student_and_ddp_steps_run_on_a_cpu(tmp_path):
    """The new steps' scripts at tiny size on a CPU: the student's precisions and the exported graph against eager
    fp32, the GPU-only modes said instead of run; a two-process DDP step (gloo here) ending with equal weights."""
    proc = subprocess.run([sys.executable, "bench/student_gpu.py", "--student-model", "PKD-Tiny-Student",
                           "--feature-dim", "64", "--batches", "1", "4", "--iters", "2", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "student_gpu.json").read_text())
    assert set(report["speed"]) == {"eager fp32", "eager bf16"} and "needs CUDA" in report["notes"]["cuda graph fp16"]
    assert report["parity"]["onnxruntime CPU fp32 (exported graph)"]["min_cosine"] > 0.9999
    assert report["parity"]["eager bf16"]["min_cosine"] > 0.99
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "bench/ddp_gpu.py", "--student-model", "PKD-Tiny-Student", "--feature-dim", "64",
                           "--backend", "gloo"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks, backend gloo" in proc.stdout and "weights equal across ranks: yes" in proc.stdout
