"""Hostile callers and hostile files against the model repository and the admin routes: the admin gate behind a
root path, a proxy prefix and a mount; version strings and header numbers that are not ASCII digits; one model's
bad files confined to that model; host paths kept out of public reasons; a single bundle's manifest name."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app

from conftest import derive_bundle, serve, stop_server

TOKEN = "hardening-token-0123456789abcdef0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Strings str.isdigit() accepts but int() refuses or that are not 1 to 10 ASCII digits.
BAD_VERSIONS = ["²", "①", "١", "𝟙", "1" * 5000, "12345678901", "1\n", " 1", "-1", "1.0", "", "0x1"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, bundle_dir) -> Path:
    root = tmp_path_factory.mktemp("hardening")
    derive_bundle(bundle_dir, root / "alpha" / "1", "a:")
    derive_bundle(bundle_dir, root / "beta" / "1", "b:")
    return root


@pytest.fixture(scope="module")
def photo(fmnist) -> bytes:
    return sorted((fmnist / "test").rglob("*.png"))[0].read_bytes()


def _swap_files(bundle_dir: Path) -> dict:
    import hashlib

    labels = (bundle_dir / "labels.json").read_bytes()
    vectors = (bundle_dir / "class_vectors.npy").read_bytes()
    return {"files": {"labels": ("labels.json", labels), "class_vectors": ("class_vectors.npy", vectors)},
            "data": {"labels_sha256": hashlib.sha256(labels).hexdigest(),
                     "class_vectors_sha256": hashlib.sha256(vectors).hexdigest()}}


def _assert_admin_closed(post, prefix: str, bundle_dir: Path) -> None:
    """Without the token every admin route is refused (401) and acts not; with it, they act."""
    unload = post(f"{prefix}/v2/repository/models/alpha/unload")
    assert unload.status_code == 401, unload.text
    assert unload.json() == {"error": "missing or wrong bearer token"}  # the protocol's error body behind a prefix
    swap = post(f"{prefix}/admin/class-vectors", params={"model": "alpha"}, **_swap_files(bundle_dir))
    assert swap.status_code == 401, swap.text
    assert post(f"{prefix}/v2/repository/models/alpha/load", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    ready = post(f"{prefix}/v2/repository/index").json()
    assert {(e["name"], e["state"]) for e in ready} == {("alpha", "READY"), ("beta", "READY")}
    assert post(f"{prefix}/v2/repository/models/alpha/unload", headers=AUTH).status_code == 200
    assert post(f"{prefix}/v2/repository/models/alpha/load", headers=AUTH).status_code == 200


def _refused_before_the_body(url: str, path: str) -> bytes:
    """The status line answering an admin POST that announces 100 MB and sends none of it: only a gate that
    decides from the headers answers at all (the test's socket times out otherwise)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n".encode()
                     + b"Content-Type: multipart/form-data; boundary=b\r\nAuthorization: Bearer nope\r\n\r\n")
        return sock.recv(4096).split(b"\r\n", 1)[0]


def test_admin_routes_stay_closed_under_a_root_path(repository, bundle_dir):
    """uvicorn --root-path /api: routing takes the prefix off, and so must the gate (it once compared the
    prefixed path and let every admin call through without a token)."""
    proc, url = serve(model_repository=str(repository), admin_token=TOKEN, uvicorn_args=("--root-path", "/api"))
    try:
        for path in ("/admin/class-vectors", "/v2/repository/models/alpha/load"):
            assert _refused_before_the_body(url, path) == b"HTTP/1.1 401 Unauthorized"
        with httpx.Client(timeout=30) as client:
            _assert_admin_closed(client.post, url, bundle_dir)  # the proxy stripped /api: paths arrive bare
            for path in ("/api/v2/repository/models/alpha/unload", "/api/admin/class-vectors"):  # or it did not
                assert client.post(f"{url}{path}").status_code in (401, 404)
            assert client.get(f"{url}/v2/models/alpha/ready").status_code == 200
    finally:
        stop_server(proc)


def test_admin_routes_stay_closed_behind_a_proxy_prefix(repository, bundle_dir):
    """--proxy-headers with X-Forwarded-Prefix (which uvicorn does not apply): no header makes a route public."""
    proc, url = serve(model_repository=str(repository), admin_token=TOKEN,
                      uvicorn_args=("--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"))
    try:
        headers = {"X-Forwarded-Prefix": "/api", "X-Forwarded-For": "10.0.0.1", "X-Forwarded-Proto": "https"}
        with httpx.Client(timeout=30, headers=headers) as client:
            _assert_admin_closed(client.post, url, bundle_dir)
            assert client.post(f"{url}/api/v2/repository/models/alpha/unload").status_code == 404
    finally:
        stop_server(proc)


def test_admin_routes_stay_closed_in_a_mounted_sub_application(repository, bundle_dir):
    child = create_app(Settings(model_repository=repository, admin_token=TOKEN))

    @asynccontextmanager
    async def lifespan(_app):
        async with child.router.lifespan_context(child):
            yield

    parent = FastAPI(lifespan=lifespan)
    parent.mount("/api", child)
    with TestClient(parent) as client:
        _assert_admin_closed(client.post, "/api", bundle_dir)


@pytest.fixture(scope="module")
def client(repository):
    with TestClient(create_app(Settings(model_repository=repository, admin_token=TOKEN))) as client:
        yield client


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_version_that_is_not_ascii_digits_is_a_4xx_on_every_route(client, photo, version):
    """str.isdigit() took '²' and '①', which int() refuses: each of these routes answered 500."""
    files = {"file": ("a.png", photo)}
    quoted = quote(version, safe="")  # percent-encoded, as a path segment
    answers = {
        "classify": client.post("/classify", params={"model": "alpha", "version": version}, files=files),
        "path classify": client.post("/models/alpha/classify", params={"version": version}, files=files),
        "path embed": client.post("/models/alpha/embed", params={"version": version}, files=files),
        "labels": client.get("/labels", params={"model": "alpha", "version": version}),
        "load": client.post("/v2/repository/models/alpha/load", json={"parameters": {"version": version}},
                            headers=AUTH),
        "unload": client.post("/v2/repository/models/alpha/unload", json={"parameters": {"version": version}},
                              headers=AUTH),
    }
    if version:  # an empty path segment is another route
        answers |= {
            "v2 metadata": client.get(f"/v2/models/alpha/versions/{quoted}"),
            "v2 ready": client.get(f"/v2/models/alpha/versions/{quoted}/ready"),
            "v2 infer": client.post(f"/v2/models/alpha/versions/{quoted}/infer", json={"inputs": []}),
        }
    for route, answer in answers.items():
        assert 400 <= answer.status_code < 500, (route, answer.status_code, answer.text[:200])
        if route.startswith("v2") or route in ("load", "unload"):
            assert answer.status_code in (400, 404) and "error" in answer.json(), (route, answer.text[:200])
    assert client.get("/labels", params={"model": "alpha", "version": "1"}).status_code == 200


def test_a_5000_digit_json_version_and_a_non_ascii_header_number_are_400(client, photo):
    for raw in (b'{"parameters": {"version": ' + b"1" * 5000 + b"}}", b'{"parameters": {"version": ' + b"1" * 4000
                + b"}}", b'{"parameters": {"version": true}}', b'{"parameters": {"version": 2147483648}}',
                b'{"parameters": {"version": 1.5}}'):
        answer = client.post("/v2/repository/models/alpha/load", content=raw,
                             headers={**AUTH, "Content-Type": "application/json"})
        assert answer.status_code == 400 and "error" in answer.json(), answer.text[:200]
        assert "parameters.version" in answer.json()["error"] or len(raw) > 5000, answer.text[:200]
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4 + len(photo)}}]}).encode()
    body = header + len(photo).to_bytes(4, "little") + photo
    for length in (b"\xb2", "١٢".encode(), b"1" * 5000, str(len(header)).encode() + b"\xb9"):
        answer = client.post("/v2/models/alpha/infer", content=body,
                             headers=[(b"Inference-Header-Content-Length", length),
                                      (b"Content-Type", b"application/octet-stream")])
        assert answer.status_code == 400 and "Inference-Header-Content-Length" in answer.json()["error"]
    good = client.post("/v2/models/alpha/infer", content=body,
                       headers={"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"})
    assert good.status_code == 200, good.text[:200]


def _hostile_policies(root: Path) -> None:
    """Model folders whose model.yaml or contents break a reader in every way found so far."""
    (root / "deep" / "model.yaml").write_text("version_policy: " + "[" * 5000 + "]" * 5000 + "\n")
    (root / "bigint" / "model.yaml").write_text("version_policy: {latest: " + "9" * 5000 + "}\n")
    (root / "huge" / "model.yaml").write_text("# padding\n" * 20000 + "version_policy: all\n")
    (root / "binary" / "model.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (root / "folderpolicy" / "model.yaml").mkdir(parents=True)
    (root / "fifo").mkdir(exist_ok=True)
    os.mkfifo(root / "fifo" / "model.yaml")  # reading it would block the scan forever
    (root / "digits" / "²").mkdir(parents=True)  # isdigit() said version; int() said no
    (root / "anchors" / "model.yaml").write_text("a: &x [[[[1]]]]\nb: [*x, *x, *x]\nversion_policy: all\n")
    os.makedirs(bytes(root) + b"/not-utf8-\xff/1")  # a name JSON cannot carry as it is


def test_one_models_bad_files_affect_that_model_alone(repository, bundle_dir, photo, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(repository, root)
    for name in ("deep", "bigint", "huge", "binary", "folderpolicy", "fifo", "digits", "anchors"):
        derive_bundle(bundle_dir, root / name / "1", f"{name}:")
    _hostile_policies(root)
    settings = Settings(model_repository=root, admin_token=TOKEN, repository_poll_s=0.2)
    with TestClient(create_app(settings)) as client:  # the start-up survives every one of them
        index = {(e["name"], e.get("version")): e for e in client.post("/v2/repository/index").json()}
        assert index[("not-utf8-\\xff", None)]["state"] == "UNAVAILABLE"
        for path in ("/", "/labels?model=alpha", "/labels"):  # every message naming the models can be sent
            assert client.get(path).status_code in (200, 400), path
        for name in ("deep", "bigint", "huge", "binary", "folderpolicy", "fifo", "anchors"):
            assert index[(name, None)]["state"] == "UNAVAILABLE", index[(name, None)]
            assert "model.yaml" in index[(name, None)]["reason"]
            answer = client.post(f"/v2/repository/models/{name}/load", headers=AUTH)
            assert answer.status_code == 400 and "model.yaml" in answer.json()["error"], answer.text[:300]
        assert "nested more than" in index[("deep", None)]["reason"]
        assert index[("digits", "1")]["state"] == "READY"  # the '²' folder is simply not a version
        derive_bundle(bundle_dir, root / "alpha" / "2", "a2:")  # the poll goes past the bad models
        deadline = time.time() + 30
        while time.time() < deadline and client.get("/labels", params={"model": "alpha"}).json()["labels"][0][:3] \
                != "a2:":
            time.sleep(0.2)
        assert client.get("/labels", params={"model": "alpha"}).json()["labels"][0].startswith("a2:")
        assert client.post("/classify", params={"model": "beta"}, files={"file": ("a.png", photo)}).status_code == 200


def test_reasons_never_show_a_host_path(bundle_dir, tmp_path):
    """A model folder linked from elsewhere on the host: its failures are told without the host's folders."""
    outside = tmp_path / "secret place" / "else where"  # spaces: a path is not one word
    shutil.copytree(bundle_dir, outside / "1")
    (outside / "1" / "labels.json").unlink()
    root = tmp_path / "repo"
    derive_bundle(bundle_dir, root / "good" / "1", "g:")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    with TestClient(create_app(Settings(model_repository=root))) as client:
        index = client.post("/v2/repository/index").json()
        linked = [e for e in index if e["name"] == "linked"]
        assert linked and linked[0]["state"] == "UNAVAILABLE"
        text = json.dumps(index)
        assert "secret" not in text and "else where" not in text and str(tmp_path) not in text, text
        assert "labels" in linked[0]["reason"]


def test_a_single_bundles_name_must_be_a_model_name(bundle_dir, tmp_path):
    """The manifest's name names capture's folder: `../escaped` once made capture write outside its folder."""
    for name in ("../escaped", "a/b", "", "x" * 65, ".hidden", "tiny-test\n"):
        copy = tmp_path / "bundle"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(bundle_dir, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["name"] = name
        (copy / "manifest.json").write_text(json.dumps(manifest))
        capture = tmp_path / "capture"
        with pytest.raises(Exception, match="model name"):
            with TestClient(create_app(Settings(bundle=copy, capture_dir=capture, capture_rate=1.0))):
                pass
        assert not (tmp_path / "escaped").exists()


def test_the_part_limit_reads_the_boundary_as_the_multipart_parser_does(bundle_dir, photo):
    """`boundary = X` (spaces around '=') or a quoted boundary with an escape: the parts are still counted, so a
    body of 900 parts is refused before they are built (the counter once missed these and the parser built them)."""
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        for header, boundary in (("boundary = XyZ", "XyZ"), ('boundary="X\\"yZ"', 'X"yZ'), ("BOUNDARY=XyZ", "XyZ")):
            parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
                             f"Content-Type: image/png\r\n\r\n".encode() + photo + b"\r\n" for i in range(900))
            body = parts + f"--{boundary}--\r\n".encode()
            answer = client.post("/classify", content=body,
                                 headers={"Content-Type": f"multipart/form-data; {header}"})
            assert answer.status_code == 413 and "parts" in answer.json()["detail"], (header, answer.text[:200])
