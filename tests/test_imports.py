"""Import boundaries: the results tables load without torch, so summarising a finished run needs no model stack."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK_TORCH = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Blocker())
"""


def test_results_tables_import_without_torch():
    code = BLOCK_TORCH + "import training.results as r; print(r.harmonic_mean(50.0, 100.0), r.RESULT)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["66.66666666666667", "result.json"]
    blocked = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import training.evaluate"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert "blocked in this test" in blocked.stderr, "the blocker must actually block torch"


def test_the_bulk_command_and_its_ray_job_import_without_torch():
    """Bulk classification runs where the server runs: the bundle and the server's sessions, no model stack."""
    code = BLOCK_TORCH + "import bulk.cli, bulk.job, bulk.ray_job, bulk.writers; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_recipe_runner_imports_without_the_servers_web_stack():
    """The training image has the server's torch-free modules the runner reads (the rollout schema, the repository
    scan, preprocessing for the gate) but not its web stack."""
    block = BLOCK_TORCH.replace('("torch", "torchvision", "open_clip")',
                                '("fastapi", "starlette", "uvicorn", "pydantic_settings", "prometheus_client")')
    code = block + "import pipeline.cli, pipeline.recipe, pipeline.steps, pipeline.gate; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "COPY server /app/server" in (REPO / "docker" / "training.Dockerfile").read_text()
