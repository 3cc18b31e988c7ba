"""Shared fixtures: real Fashion-MNIST photos, tiny random-weight towers saved as local checkpoints, and a
bundle exported from a short distillation. Session-scoped so the suite builds them once."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying a hub that cannot be reached
os.environ.setdefault("PROMPTKD_GRPC_PORT", "0")  # in-process apps: gRPC only where a test asks for it

TEACHER = "PKD-Tiny-Teacher"
STUDENT = "PKD-Tiny-Student"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nobody listens on, for a real uvicorn."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_bundle(bundle_dir: Path, process_env: dict | None = None, **env: str) -> tuple[subprocess.Popen, str]:
    """A real uvicorn on loopback serving the bundle with PROMPTKD_* settings; waits until ready (or exits)."""
    return serve(process_env, bundle=str(bundle_dir), **env)


def serve(process_env: dict | None = None, uvicorn_args: tuple[str, ...] = (), ready_path: str = "/readyz",
          **env: str) -> tuple[subprocess.Popen, str]:
    """A real uvicorn on loopback with these PROMPTKD_* settings (bundle=... or model_repository=...) and extra
    uvicorn options; waits until `ready_path` answers 200 (or the process exits)."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")} | (process_env or {})
    environment.update({f"PROMPTKD_{k.upper()}": v for k, v in env.items()})
    environment.setdefault("PROMPTKD_GRPC_PORT", "0")  # servers side by side: gRPC only where a test asks for it
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", *uvicorn_args], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            return proc, url
        try:
            if httpx.get(f"{url}{ready_path}", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("server did not become ready")


def stop_server(proc: subprocess.Popen) -> str:
    """Stop it and return what it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out.decode(errors="replace")


def derive_bundle(source: Path, target: Path, prefix: str, reverse: bool = False) -> Path:
    """A copy of a bundle whose labels carry `prefix` (and, with `reverse`, whose labels and class vectors are in
    reverse order), with its manifest's checksums updated: another model or version that answers visibly apart."""
    import json
    import shutil

    import numpy as np

    from bundle import MANIFEST_NAME, file_entry, read_bundle, write_labels_and_vectors

    shutil.copytree(source, target)
    bundle = read_bundle(source)
    labels = [f"{prefix}{label}" for label in bundle.labels]
    vectors = bundle.class_vectors
    if reverse:
        labels, vectors = labels[::-1], np.ascontiguousarray(vectors[::-1])
    write_labels_and_vectors(target, labels, vectors)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    for role in ("labels", "class_vectors"):
        manifest["files"][role] = file_entry(target, manifest["files"][role]["path"]).model_dump()
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    read_bundle(target)
    return target


def client_pixels(bundle_dir: Path, photos: list[bytes]):
    """The photos as a client would send them as PIXELS, preprocessed as the model card says (the server's own
    decoder here): float32 [N, 3, S, S]."""
    import numpy as np

    from bundle import read_bundle
    from server.runtime.preprocess import prepare

    spec = read_bundle(bundle_dir).manifest.input
    return np.stack([prepare(photo, spec, 40_000_000) for photo in photos])


def foolbox_jpegs() -> list[Path]:
    """The 20 real ImageNet JPEGs that PyPI's foolbox wheel ships (installed --no-deps, files only)."""
    import importlib.util

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (real test JPEGs) is not installed; run scripts/setup.sh")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return sorted(folder.glob("*.jpg"))


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory) -> Path:
    """20 train and 8 test photos per class, as labelled folders."""
    from training.data import fashion_mnist

    out = tmp_path_factory.mktemp("fmnist")
    fashion_mnist.export(out, {"train": 20, "test": 8}, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> dict[str, Path]:
    """Random-weight tiny teacher and student, saved as open_clip state dicts (the local-file path)."""
    import torch

    from training.towers import load_clip

    out = tmp_path_factory.mktemp("weights")
    paths = {}
    for role, name in (("teacher", TEACHER), ("student", STUDENT)):
        torch.manual_seed(0 if role == "teacher" else 1)
        model, _ = load_clip(name, None)
        paths[role] = out / f"{role}.pt"
        torch.save(model.state_dict(), paths[role])
    return paths


@pytest.fixture(scope="session")
def class_vectors(tmp_path_factory, tiny_weights, fmnist) -> Path:
    from training.class_vectors import zero_shot_vectors
    from training.data.datasets import load_image_folder

    names = load_image_folder(fmnist / "train").classnames
    path = tmp_path_factory.mktemp("cv") / "class_vectors.npz"
    zero_shot_vectors(TEACHER, str(tiny_weights["teacher"]), names).save(path)
    return path


@pytest.fixture(scope="session")
def distilled(tmp_path_factory, tiny_weights, class_vectors, fmnist) -> Path:
    """A student.pt from one short distillation epoch (enough for export and server tests)."""
    from training.data.datasets import find_images
    from training.distill import DistillConfig, distill

    out = tmp_path_factory.mktemp("run")
    cfg = DistillConfig(
        teacher_model=TEACHER, teacher_pretrained=str(tiny_weights["teacher"]),
        student_model=STUDENT, student_pretrained=str(tiny_weights["student"]),
        class_vectors=str(class_vectors), output_dir=str(out),
        epochs=1, batch_size=16, lr=0.05, warmup_epochs=0, kd_weight=10.0, workers=0,
    )
    distill(cfg, find_images(fmnist / "train")[:64])
    return out / "student.pt"


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, distilled, fmnist) -> Path:
    from export.build import build_bundle
    from training.data.datasets import find_images

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_bundle(distilled, out, find_images(fmnist / "test")[:32], name="tiny-test")
    return out


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> tuple[Path, float]:
    """The demo recipe (recipes/fashion_mnist_demo.yaml through scripts/build_demo_bundle.sh) exactly as shipped, run
    once; returns its folder and wall time."""
    work = tmp_path_factory.mktemp("demo") / "demo"
    env = dict(os.environ, PY=sys.executable)
    started = time.time()
    subprocess.run(["bash", "scripts/build_demo_bundle.sh", str(work)], cwd=Path(__file__).resolve().parents[1],
                   env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return work, time.time() - started


@contextlib.contextmanager
def mounted_tmpfs(point: Path, options: str):
    """A tmpfs mounted at point with these mount options (a size to fill, `ro` for a read-only disk), always
    unmounted after; the test is skipped, saying so, where mounting is not permitted (root and mount(8) only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8): the read-only or full disk is not tested")
    point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({done.stderr.strip()}): not tested")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
