"""Hardening against a real uvicorn: admin closed unless a strong token is configured, unauthenticated admin
bodies never read, liveness that reflects the engine, settings checked against each other, a decoder allow-list,
no build-host paths in the model card, and a memory budget held under a flood of worst-case images."""
from __future__ import annotations

import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from bundle import BundleError
from server.budget import memory_limit
from server.config import Settings, _cgroup_quota
from server.main import create_app

from conftest import serve_bundle, stop_server

TOKEN = "s3cret-token-0123456789abcdef-0123456789"


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _swap(url: str, authorization: str | None) -> httpx.Response:
    labels = b'["x", "y"]'
    vectors = io.BytesIO()
    np.save(vectors, np.eye(2, 64, dtype=np.float32))
    import hashlib

    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.post(f"{url}/admin/class-vectors", headers=headers, timeout=30,
                      files={"labels": ("labels.json", labels), "class_vectors": ("v.npy", vectors.getvalue())},
                      data={"labels_sha256": hashlib.sha256(labels).hexdigest(),
                            "class_vectors_sha256": hashlib.sha256(vectors.getvalue()).hexdigest()})


def test_admin_stays_closed_with_an_empty_token(bundle_dir):
    """compose passes PROMPTKD_ADMIN_TOKEN="" when the host sets none: that must disable admin."""
    proc, url = serve_bundle(bundle_dir, admin_token="")
    try:
        for authorization in ("Bearer", "", None, f"Bearer {TOKEN}"):  # h11 strips "Bearer " to "Bearer"
            assert _swap(url, authorization).status_code == 404
        assert httpx.get(f"{url}/labels").json()["source"] == "bundle"
    finally:
        stop_server(proc)


def test_a_short_token_is_a_start_up_error_naming_the_variable(bundle_dir):
    proc, _ = serve_bundle(bundle_dir, admin_token="short-token")
    assert proc.wait(timeout=60) != 0
    assert "PROMPTKD_ADMIN_TOKEN" in stop_server(proc)


def test_wrong_or_empty_bearer_never_swaps_and_the_token_can_come_from_a_file(bundle_dir, tmp_path):
    secret = tmp_path / "admin_token"
    secret.write_text(TOKEN + "\n")
    proc, url = serve_bundle(bundle_dir, admin_token_file=str(secret))
    try:
        for authorization in ("Bearer", "", None, "Bearer wrong", f"Basic {TOKEN}", TOKEN):
            response = _swap(url, authorization)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/labels").json()["source"] == "bundle"
        assert _swap(url, f"Bearer {TOKEN}").status_code == 200
        assert httpx.get(f"{url}/labels").json() | {"version": None} == {"labels": ["x", "y"], "version": None,
                                                                          "source": "admin"}
    finally:
        stop_server(proc)


def test_an_unauthenticated_admin_upload_is_refused_before_its_body_is_read(bundle_dir):
    """Headers announcing 100 MB and no body at all: the 401 must come without waiting for a single byte."""
    proc, url = serve_bundle(bundle_dir, admin_token=TOKEN)
    try:
        before = _peak_rss(proc.pid)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /admin/class-vectors HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\nAuthorization: Bearer nope\r\n\r\n")
            answer = sock.recv(4096)  # times out (the test fails) if the server waits for the body
            assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
            try:  # whatever the client still sends is not read: the server closed the connection
                for _ in range(100):
                    sock.sendall(b"x" * (1 << 20))
            except OSError:
                pass
        assert _peak_rss(proc.pid) - before < 20 << 20
    finally:
        stop_server(proc)


def test_settings_that_could_never_serve_are_refused(bundle_dir):
    for bad, names in (({"max_batch_size": 300}, "PROMPTKD_MAX_BATCH_SIZE"),
                       ({"max_images_per_request": 300}, "PROMPTKD_MAX_IMAGES_PER_REQUEST"),
                       ({"top_k": 200}, "PROMPTKD_TOP_K"),
                       ({"max_inflight_bytes": 1 << 20}, "PROMPTKD_MAX_INFLIGHT_BYTES"),
                       ({"image_formats": " , "}, "PROMPTKD_IMAGE_FORMATS"),
                       ({"admin_token": TOKEN, "admin_token_file": "/nonexistent"}, "not both")):
        with pytest.raises(ValidationError, match=names):
            Settings(bundle=bundle_dir, **bad)


def test_cpu_quota_and_memory_limit_come_from_the_cgroup(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_quota(tmp_path) is None
    (tmp_path / "memory.max").write_text("2147483648\n")
    assert memory_limit(tmp_path) == 2 << 30
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(tmp_path) is None


def test_an_engine_that_cannot_run_never_serves(bundle_dir, monkeypatch, tmp_path):
    """Warm-up is part of loading: a single bundle whose engine fails stops the start-up with the reason; in a
    repository that version is reported UNAVAILABLE and the server stays up, not ready."""
    from server.repository.classifier import Classifier

    def broken(self, batch):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(Classifier, "features", broken)
    with pytest.raises(BundleError, match="warm-up failed.*engine exploded"):
        with TestClient(create_app(Settings(bundle=bundle_dir))):
            pass
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "1").symlink_to(bundle_dir)
    with TestClient(create_app(Settings(model_repository=tmp_path))) as client:
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        [entry] = client.post("/v2/repository/index").json()
        assert entry["state"] == "UNAVAILABLE" and "engine exploded" in entry["reason"]
        assert client.post("/classify", files={"file": ("a.png", b"x")}).status_code == 503


def test_liveness_fails_when_the_batch_worker_dies(bundle_dir, fmnist):
    photo = next((fmnist / "test").rglob("*.png")).read_bytes()
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        deadline = time.time() + 30
        while client.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/healthz").status_code == 200
        client.app.state.service.models.resolve(None, None).batcher._worker.cancel()
        time.sleep(0.2)
        health = client.get("/healthz")
        assert health.status_code == 503 and "worker" in health.json()["detail"]
        response = client.post("/classify", files={"file": ("a.png", photo)})
        assert response.status_code == 503  # answered at once, not left hanging until the timeout


def test_only_allowed_decoders_run_and_the_model_card_has_no_paths(bundle_dir, fmnist):
    photo = Image.open(next((fmnist / "test").rglob("*.png"))).convert("RGB")
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        for fmt in ("PPM", "TGA", "PCX"):
            data = io.BytesIO()
            photo.save(data, fmt)
            response = client.post("/classify", files={"file": (f"a.{fmt.lower()}", data.getvalue())})
            assert response.status_code == 415 and "not accepted" in response.json()["detail"], fmt
        data = io.BytesIO()
        photo.save(data, "PNG")
        response = client.post("/classify", files={"file": ("a" * 400 + ".png", data.getvalue())})
        assert response.status_code == 200 and len(response.json()["results"][0]["filename"]) == 255
        provenance = client.get("/").json()["provenance"]
        assert provenance["student_pretrained"] and "/" not in str(provenance)
    with TestClient(create_app(Settings(bundle=bundle_dir, image_formats="JPEG"))) as client:
        data = io.BytesIO()
        photo.save(data, "PNG")
        assert client.post("/classify", files={"file": ("a.png", data.getvalue())}).status_code == 415


def _worst_case_images(pixels: int, max_bytes: int) -> list[tuple[str, bytes]]:
    """Small files that decode to the most memory the pixel limit allows (16-bit and 32-bit greyscale, float),
    and a file of nearly the largest size allowed (incompressible noise)."""
    side = int(pixels ** 0.5)
    noise_side = int((max_bytes / 3.1) ** 0.5)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (noise_side, noise_side, 3), dtype=np.uint8)).save(
        noise, "PNG", compress_level=1)
    images = [("noise.png", noise.getvalue())]
    for mode, fmt, name in (("I;16", "PNG", "grey16.png"), ("I", "TIFF", "int32.tif"), ("F", "TIFF", "float.tif"),
                            ("RGB", "PNG", "rgb.png")):
        data = io.BytesIO()
        image = Image.new(mode, (side, side))
        image.save(data, fmt, **({"compression": "tiff_adobe_deflate"} if fmt == "TIFF" else {}))
        images.append((name, data.getvalue()))
    return images


@pytest.mark.slow
def test_a_flood_of_worst_case_images_stays_within_the_memory_budget(bundle_dir):
    budget = 160 << 20
    pixels = 4_000_000
    proc, url = serve_bundle(bundle_dir, {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"},
                       max_inflight_bytes=str(budget), max_image_pixels=str(pixels),
                       max_upload_bytes=str(8 << 20), decode_threads="4", max_images_per_request="4")
    try:
        images = _worst_case_images(pixels, 8 << 20)
        assert 7 << 20 < max(len(data) for _, data in images) <= 8 << 20
        base = _peak_rss(proc.pid)

        def post(i: int) -> int:
            files = [("file", images[(i + k) % len(images)]) for k in range(4)]
            try:
                return httpx.post(f"{url}/classify", files=files, timeout=120).status_code
            except httpx.HTTPError:
                return -1

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(post, range(48)))
        peak = _peak_rss(proc.pid)
        print(f"\nflood: {len(statuses)} requests, statuses {sorted(set(statuses))}, {statuses.count(503)} x 503; "
              f"peak RSS {base >> 20} -> {peak >> 20} MiB (budget {budget >> 20} MiB)")
        assert set(statuses) <= {200, 413, 503} and 200 in statuses
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert peak - base <= budget
    finally:
        stop_server(proc)


def _metric(url: str, name: str) -> float:
    """The value of one Prometheus sample, summed over the labels not named (0 when it does not exist yet)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        series = line.rsplit(" ", 1)[0]
        if series == name or ("{" not in name and series.startswith(name + "{")):
            total += float(line.split()[-1])
    return total


def test_work_for_a_client_that_went_away_is_dropped(bundle_dir, fmnist):
    """A request waiting for the engine (held by another request's batch here) is abandoned when its client
    disconnects: counted, and its image never runs through the engine. A real uvicorn, in a thread of this process
    so that the engine can be held."""
    import threading

    import uvicorn

    from conftest import free_port

    app = create_app(Settings(bundle=bundle_dir, max_batch_size=8))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    sizes, entered, release = [], threading.Event(), threading.Event()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not server.started:
            time.sleep(0.05)
        batcher = app.state.service.models.resolve(None, None).batcher
        run = batcher.run

        def held(batch):
            entered.set()
            release.wait(30)
            sizes.append(len(batch))
            return run(batch)

        batcher.run = held
        photo = next((fmnist / "test").rglob("*.png")).read_bytes()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/classify", files={"file": ("a.png", photo)}, timeout=30)
            assert entered.wait(30)
            body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                    b"Content-Type: image/png\r\n\r\n" + photo + b"\r\n--b--\r\n")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b"
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                time.sleep(0.5)
            time.sleep(1.0)
            assert _metric(url, 'promptkd_rejected_total{reason="client_gone"}') == 1
            release.set()
            assert first.result().status_code == 200
        assert httpx.post(f"{url}/classify", files={"file": ("a.png", photo)}, timeout=30).status_code == 200
        assert sizes == [1, 1]  # the held request's batch, then the last one's: the abandoned image never ran
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_parts_are_counted_while_the_body_streams(bundle_dir, fmnist):
    from server.protocol.rest.middleware import PartCounter

    counter = PartCounter(b'multipart/form-data; boundary="xyz"', limit=2)
    for chunk in (b"--xy", b"z\r\n1\r\n--", b"xyz\r\n2\r\n--xyz--"):  # delimiters split across chunks
        counter.feed(chunk)
    assert counter.seen == 3
    with pytest.raises(Exception, match="more than 2 parts"):
        counter.feed(b"--xyz\r\n3\r\n--xyz--")
    PartCounter(b"application/json", limit=0).feed(b"--xyz--xyz--xyz")  # not multipart: never counted

    photo = next((fmnist / "test").rglob("*.png")).read_bytes()
    with TestClient(create_app(Settings(bundle=bundle_dir, max_images_per_request=4))) as client:
        response = client.post("/classify", files=[("file", (f"{i}.png", photo)) for i in range(40)])
        assert response.status_code == 413 and "parts" in response.json()["detail"]
        assert client.post("/classify", files=[("file", (f"{i}.png", photo)) for i in range(4)]).status_code == 200
