"""Every route fuzzed from the app's own OpenAPI document (schemathesis), against a real uvicorn, in both modes.

Checks: no server error (a 503 passes only where the route declares it: a model with no version ready, or the
server overloaded), every status declared, every body and content type as declared. The coverage phase tries
the edges of each declared constraint (patterns, lengths, ranges), the fuzzing phase random values; model names
and versions come from the real ones half of the time, so requests reach the model's code. The seed is printed;
PROMPTKD_FUZZ_SEED repeats a run, PROMPTKD_FUZZ_EXAMPLES sets the examples per route (default 25).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import derive_bundle, serve, stop_server

TOKEN = "fuzz-token-0123456789abcdef0123456789"
SEED = int(os.environ.get("PROMPTKD_FUZZ_SEED", random.randrange(2**31)))
EXAMPLES = int(os.environ.get("PROMPTKD_FUZZ_EXAMPLES", "25"))
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
          "response_headers_conformance")
ADMIN_PATHS = r"^/(admin/|v2/repository/models/)"


def _config(folder: Path, models: list[str], versions: list[str]) -> Path:
    """schemathesis.toml: 503 is no server error where declared; real names and versions half of the time."""
    quoted = lambda values: ", ".join(f'"{v}"' for v in values)  # noqa: E731
    path = folder / "schemathesis.toml"
    path.write_text(f"""
[checks.not_a_server_error]
expected-statuses = ["2XX", "3XX", "4XX", "503"]

[dictionaries.models]
values = [{quoted(models)}]

[dictionaries.versions]
values = [{quoted(versions)}]

[parameters]
"path.name" = {{ dictionary = "models", probability = 0.5 }}
"query.model" = {{ dictionary = "models", probability = 0.5 }}
"path.version" = {{ dictionary = "versions", probability = 0.5 }}
"query.version" = {{ dictionary = "versions", probability = 0.5 }}
""")
    return path


def _fuzz(url: str, config: Path, capsys, *extra: str) -> None:
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
               f"{url}/openapi.json", "--url", url, "--checks", CHECKS, "--max-examples", str(EXAMPLES),
               "--seed", str(SEED), "--phases", "examples,coverage,fuzzing", "--workers", "1",
               "--request-timeout", "60", "--generation-database", "none", "--no-color", *extra]
    with capsys.disabled():
        print(f"\nschemathesis seed {SEED} (PROMPTKD_FUZZ_SEED={SEED} repeats it), {EXAMPLES} examples per route")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=config.parent)
    summary = done.stdout[-600:]
    with capsys.disabled():
        print(summary[summary.rfind("Test cases:"):].strip() if "Test cases:" in summary else summary)
    assert done.returncode == 0, f"seed {SEED}\n{done.stdout[-25000:]}\n{done.stderr[-3000:]}"


def test_no_route_of_a_single_bundle_server_answers_a_server_error(bundle_dir, tmp_path, capsys):
    proc, url = serve(bundle=str(bundle_dir), capture_dir=str(tmp_path / "capture"), capture_rate="0.5")
    try:
        _fuzz(url, _config(tmp_path, ["tiny-test"], ["1"]), capsys)
    finally:
        output = stop_server(proc)
    assert "Traceback" not in output, output[-5000:]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, bundle_dir, distilled, fmnist) -> Path:
    """Several models and versions, a pinned policy, a rollout and a domain on a shared backbone."""
    from export.domain import build_domain
    from training.data.datasets import find_images

    root = tmp_path_factory.mktemp("fuzz-repository")
    derive_bundle(bundle_dir, root / "alpha" / "1", "a1:")
    derive_bundle(bundle_dir, root / "alpha" / "2", "a2:")
    (root / "alpha" / "model.yaml").write_text(  # version 2 goes through its rollout while the routes are fuzzed
        "rollout: {shadow_sample: 1, canary_share: 0.5, grace_s: 2, promote_when: {images: 4, agreement: 0}, "
        "refuse_when: {images: 1000}}\n")
    derive_bundle(bundle_dir, root / "beta" / "1", "b:")
    (root / "beta" / "model.yaml").write_text("version_policy: {specific: [1]}\n")
    build_domain(distilled, root, "clothes", find_images(fmnist / "test")[:16], skip_failing_variants=True)
    return root


def test_no_route_of_a_repository_server_behind_a_root_path_answers_a_server_error(repository, tmp_path, capsys):
    """Every route without the admin token (admin routes refuse), then the admin routes with it (which load and
    unload models while they are fuzzed)."""
    proc, url = serve(model_repository=str(repository), admin_token=TOKEN, capture_dir=str(tmp_path / "capture"),
                      uvicorn_args=("--root-path", "/api"))
    try:
        config = _config(tmp_path, ["alpha", "beta", "clothes"], ["1", "2"])
        _fuzz(url, config, capsys)
        _fuzz(url, config, capsys, "--header", f"Authorization: Bearer {TOKEN}", "--include-path-regex", ADMIN_PATHS)
    finally:
        output = stop_server(proc)
    assert "Traceback" not in output, output[-5000:]
