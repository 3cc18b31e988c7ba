"""The model repository: several models and versions in one server, Triton's layout and policies, every route per
model (native, path form, /v2 through tritonclient), the repository index with states and reasons, admin load,
unload and rollback, and one engine slot shared by every model's batches."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient

from server.config import Settings
from server.main import create_app
from server.repository.layout import ModelConfig, read_config, scan

from conftest import derive_bundle, serve, stop_server

TOKEN = "repository-token-0123456789abcdef0123"


def corrupt_copy(source: Path, target: Path) -> Path:
    """A bundle whose graph no longer matches its checksum, as a damaged upload would be."""
    shutil.copytree(source, target)
    damage(target / "student.onnx")
    return target


def damage(path: Path) -> None:
    """Overwrite a file's last bytes in place: its size stays, its checksum does not."""
    with path.open("r+b") as graph:
        graph.seek(-7, os.SEEK_END)
        graph.write(b"damaged")


@pytest.fixture(scope="module")
def repository(tmp_path_factory, bundle_dir) -> Path:
    root = tmp_path_factory.mktemp("repository")
    derive_bundle(bundle_dir, root / "fmnist" / "1", "v1:")
    derive_bundle(bundle_dir, root / "fmnist" / "2", "v2:")
    (root / "fmnist" / "notes").mkdir()  # not a version folder: ignored
    derive_bundle(bundle_dir, root / "reversed" / "1", "rev:", reverse=True)
    (root / "reversed" / "model.yaml").write_text("version_policy: {specific: [1]}\n")
    corrupt_copy(bundle_dir, root / "broken" / "1")
    derive_bundle(bundle_dir, root / "badpolicy" / "1", "bad:")
    (root / "badpolicy" / "model.yaml").write_text("version_policy: {latest: 0}\n")
    derive_bundle(bundle_dir, root / ".staging" / "1", "hidden:")  # dot folders are never models
    return root


@pytest.fixture(scope="module")
def photo(fmnist) -> bytes:
    return sorted((fmnist / "test").rglob("*.png"))[0].read_bytes()


def test_the_layout_and_policies_are_read_as_triton_reads_them(repository, tmp_path):
    models = scan(repository)
    assert sorted(models) == ["badpolicy", "broken", "fmnist", "reversed"]
    assert sorted(models["fmnist"].versions) == [1, 2] and models["fmnist"].config.version_policy.keep == 1
    assert models["reversed"].config.version_policy.pinned(1)
    assert "latest" in models["badpolicy"].error
    policy = tmp_path / "model.yaml"
    for text, keep in (("version_policy: all\n", None), ("version_policy: {latest: 3}\n", 3), ("", 1)):
        policy.write_text(text)
        assert read_config(policy).version_policy.keep == keep
    assert read_config(tmp_path / "absent.yaml") == ModelConfig()
    for text, message in (("version_policy: {latest: 2, all: true}\n", "one of"), ("policy: all\n", "policy"),
                          ("version_policy: {specific: [0]}\n", "positive"), ("version_policy: [\n", "read")):
        policy.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_config(policy)


@pytest.fixture(scope="module")
def url(repository):
    proc, url = serve(model_repository=str(repository))
    if proc.poll() is not None:
        pytest.fail(stop_server(proc))
    yield url
    stop_server(proc)


def _classify(url: str, photo: bytes, path: str = "/classify", **params) -> httpx.Response:
    return httpx.post(f"{url}{path}", params=params, files={"file": ("a.png", photo)}, timeout=30)


def test_each_model_answers_with_its_own_labels_on_every_route(url, photo):
    mixed = _classify(url, photo)
    assert mixed.status_code == 400 and "fmnist" in mixed.json()["detail"] and "reversed" in mixed.json()["detail"]
    fmnist = _classify(url, photo, model="fmnist").json()
    reversed_ = _classify(url, photo, model="reversed").json()
    assert (fmnist["model"], fmnist["version"]) == ("fmnist", "2")  # latest 1: the newest version serves
    best, rev = fmnist["results"][0]["predictions"][0], reversed_["results"][0]["predictions"][0]
    assert best["label"].startswith("v2:") and rev["label"] == "rev:" + best["label"].removeprefix("v2:")
    assert rev["index"] == 9 - best["index"] and abs(rev["probability"] - best["probability"]) < 1e-6
    assert _classify(url, photo, "/models/reversed/classify").json()["results"] == reversed_["results"]
    assert _classify(url, photo, model="fmnist", version="1").status_code == 404  # not served under latest 1
    assert _classify(url, photo, model="broken").status_code == 503
    assert _classify(url, photo, model="nope").status_code == 404
    embedded = httpx.post(f"{url}/models/fmnist/embed", files={"file": ("a.png", photo)}).json()
    assert embedded["version"] == "2" and len(embedded["results"][0]["embedding"]) == embedded["dim"]
    assert httpx.get(f"{url}/labels", params={"model": "reversed"}).json()["labels"][0].startswith("rev:")
    card = httpx.get(url, params={"model": "reversed"}).json()
    assert card["name"] == "reversed" and card["bundle_name"] == "tiny-test"
    assert {m["name"]: m["default_version"] for m in card["models"]} == {
        "badpolicy": None, "broken": None, "fmnist": "2", "reversed": "1"}
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_the_index_lists_every_model_and_version_with_its_state_and_reason(url, repository):
    index = httpx.post(f"{url}/v2/repository/index").json()
    states = {(e["name"], e.get("version")): e for e in index}
    assert set(states) == {("badpolicy", None), ("badpolicy", "1"), ("broken", "1"), ("fmnist", "1"),
                           ("fmnist", "2"), ("reversed", "1")}
    assert states[("fmnist", "2")]["state"] == "READY" and "graph" in states[("fmnist", "2")]["reason"]
    assert states[("fmnist", "1")]["state"] == "UNAVAILABLE" and "latest 1" in states[("fmnist", "1")]["reason"]
    assert states[("broken", "1")]["state"] == "UNAVAILABLE"
    assert "checksum mismatch" in states[("broken", "1")]["reason"]
    assert str(repository) not in states[("broken", "1")]["reason"]  # the repository's path is not shown
    assert "model.yaml" in states[("badpolicy", None)]["reason"]
    ready = httpx.post(f"{url}/v2/repository/index", json={"ready": True}).json()
    assert {(e["name"], e["version"]) for e in ready} == {("fmnist", "2"), ("reversed", "1")}
    for verb in ("load", "unload"):  # no admin token configured: the control routes do not exist
        assert httpx.post(f"{url}/v2/repository/models/fmnist/{verb}").status_code == 404


def test_tritonclient_infers_on_each_model_and_version(url, photo):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        assert client.is_model_ready("fmnist") and client.is_model_ready("fmnist", "2")
        assert not client.is_model_ready("broken") and not client.is_model_ready("fmnist", "1")
        assert client.get_model_metadata("fmnist")["versions"] == ["2"]
        image = triton.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(np.array([photo], dtype=object))
        for name, version in (("fmnist", ""), ("fmnist", "2"), ("reversed", "1")):
            result = client.infer(name, [image], model_version=version)
            expected = _classify(url, photo, model=name).json()["results"][0]["predictions"]
            assert result.get_response()["model_version"] == (version or "2")
            assert [x.decode() for x in result.as_numpy("LABELS")[0]] == [p["label"] for p in expected]
    finally:
        client.close()


def test_unload_load_and_rollback_through_the_admin_routes(repository, tmp_path, photo):
    root = tmp_path / "repo"
    shutil.copytree(repository / "fmnist", root / "fmnist")
    shutil.copytree(repository / "reversed", root / "reversed")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(Settings(model_repository=root, admin_token=TOKEN))) as client:
        def version() -> str:
            return client.post("/classify", params={"model": "fmnist"}, files={"file": ("a.png", photo)}).json()[
                "version"]

        def call(verb: str, model: str = "fmnist", **parameters) -> httpx.Response:
            return client.post(f"/v2/repository/models/{model}/{verb}", json={"parameters": parameters},
                               headers=auth)

        assert version() == "2"
        assert client.post("/v2/repository/models/fmnist/unload").status_code == 401
        assert call("load", version="1").status_code == 200 and version() == "1"  # rollback
        assert call("unload", version="1").status_code == 200 and version() == "2"
        assert call("load").status_code == 200 and version() == "2"  # the policy again, unloads forgotten
        assert call("unload", version="2").status_code == 200 and version() == "1"  # latest 1: the next one serves
        states = {e["version"]: e for e in client.post("/v2/repository/index").json()}
        assert states["2"]["state"] == "UNAVAILABLE" and states["2"]["reason"] == "unloaded by request"
        assert call("load").status_code == 200 and version() == "2"
        assert call("unload").status_code == 200  # every version
        assert client.post("/classify", params={"model": "fmnist"}, files={"file": ("a.png", photo)}).status_code == 503
        assert call("load").status_code == 200 and version() == "2"
        refused = call("unload", model="reversed")
        assert refused.status_code == 409 and "pinned" in refused.json()["error"]
        assert call("load", version="7").status_code == 404 and call("load", model="nope").status_code == 404
        assert call("load", version="x").status_code == 400
        corrupt_copy(repository / "fmnist" / "1", root / "fmnist" / "3")
        failed = call("load", version="3")
        assert failed.status_code == 400 and "checksum" in failed.json()["error"] and version() == "2"
        _roll_back_and_forward_and_rewrite_in_place(client, call, version, root, repository, photo)


def _roll_back_and_forward_and_rewrite_in_place(client, call, version, root: Path, repository: Path, photo: bytes):
    """A failed load changes nothing that serves; rolling forward unloads the rolled-back version; a version
    rewritten in place is loaded again (its metrics kept), and new contents that fail leave the old ones serving."""
    def serving() -> set[str]:
        index = client.post("/v2/repository/index", json={"ready": True}).json()
        return {e["version"] for e in index if e["name"] == "fmnist"}

    def label() -> str:
        body = client.post("/classify", params={"model": "fmnist"}, files={"file": ("a.png", photo)}).json()
        return body["results"][0]["predictions"][0]["label"]

    assert call("load", version="1").status_code == 200 and version() == "1" and serving() == {"1", "2"}
    assert call("load", version="3").status_code == 400 and version() == "1"  # v3 is broken: nothing changes
    assert call("load", version="2").status_code == 200 and version() == "2" and serving() == {"2"}
    shutil.rmtree(root / "fmnist" / "2")
    derive_bundle(repository / "fmnist" / "2", root / "fmnist" / "2", "new:")
    assert call("load").status_code == 200 and label().startswith("new:v2:")
    time.sleep(1)  # the replaced instance drains
    assert re.search(r'promptkd_serving\{model="fmnist",runtime="[^"]+",variant="fp32",version="2"\} 1.0',
                     client.get("/metrics").text)
    damage(root / "fmnist" / "2" / "student.onnx")
    assert call("load").status_code == 200 and label().startswith("new:v2:")
    [entry] = [e for e in client.post("/v2/repository/index").json() if e.get("version") == "2"]
    assert entry["state"] == "READY" and "cannot serve" in entry["reason"] and "checksum" in entry["reason"]


class Overlap:
    """Wraps a session's run: counts how many runs are in progress at once, across every wrapped session."""

    def __init__(self) -> None:
        self.lock, self.running, self.most, self.runs = threading.Lock(), 0, 0, []

    def wrap(self, name: str, run):
        def counted(batch):
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                threading.Event().wait(0.02)
                return run(batch)
            finally:
                with self.lock:
                    self.running -= 1
                    self.runs.append(name)
        return counted


def test_one_engine_slot_runs_one_batch_at_a_time_whichever_model(repository, photo):
    from concurrent.futures import ThreadPoolExecutor

    with TestClient(create_app(Settings(model_repository=repository, engine_slots=1))) as client:
        overlap = Overlap()
        for name in ("fmnist", "reversed"):
            batcher = client.app.state.service.models.resolve(name, None).batcher
            batcher.run = overlap.wrap(name, batcher.run)
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: client.post("/classify", params={"model": ["fmnist", "reversed"][i % 2]},
                                                          files={"file": ("a.png", photo)}), range(24)))
        assert all(a.status_code == 200 for a in answers)
        assert overlap.most == 1 and {"fmnist", "reversed"} <= set(overlap.runs)


def test_versions_switch_once_under_load_and_a_broken_version_never_answers(bundle_dir, tmp_path, photo):
    """Clients classify without pause while version 2 is dropped into the repository, then a broken version 3:
    no request fails, each client's answers go from version 1 to version 2 once, and version 3 never answers."""
    root = tmp_path / "repo"
    derive_bundle(bundle_dir, root / "m" / "1", "v1:")
    proc, url = serve(model_repository=str(root), repository_poll_s="0.2")
    stop, answers, failures = threading.Event(), {i: [] for i in range(4)}, []

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(f"{url}/classify", files={"file": ("a.png", photo)})
                if response.status_code != 200:
                    failures.append((response.status_code, response.text))
                    continue
                body = response.json()
                answers[i].append((body["version"], body["results"][0]["predictions"][0]["label"][:3]))

    def wait_for(condition, what: str, seconds: float = 90) -> None:
        deadline = threading.Event()
        timer = threading.Timer(seconds, deadline.set)
        timer.start()
        while not condition() and not deadline.is_set():
            deadline.wait(0.1)
        timer.cancel()
        assert condition(), f"timed out waiting for {what}"

    def index() -> dict:
        return {e.get("version"): e for e in httpx.post(f"{url}/v2/repository/index").json()}

    threads = [threading.Thread(target=client, args=(i,)) for i in answers]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(a) >= 3 for a in answers.values()), "answers from version 1")
        staged = derive_bundle(bundle_dir, root / "m" / ".2", "v2:")  # copied beside, then renamed in at once
        staged.rename(root / "m" / "2")
        wait_for(lambda: all(a and a[-1][0] == "2" for a in answers.values()), "every client on version 2")
        corrupt_copy(root / "m" / "2", root / "m" / ".3").rename(root / "m" / "3")
        wait_for(lambda: index().get("3", {}).get("state") == "UNAVAILABLE", "version 3 to be refused")
        assert "checksum mismatch" in index()["3"]["reason"] and index()["2"]["state"] == "READY"
        counts = [len(a) for a in answers.values()]
        wait_for(lambda: all(len(a) >= n + 3 for a, n in zip(answers.values(), counts)), "answers after v3")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        stop_server(proc)
    assert not failures, failures[:3]
    for sequence in answers.values():
        versions = [version for version, _ in sequence]
        switches = sum(a != b for a, b in zip(versions, versions[1:]))
        assert versions[0] == "1" and versions[-1] == "2" and switches == 1, versions
        assert all(label == f"v{version}:" for version, label in sequence)


def test_one_of_a_bundle_or_a_repository_is_required(tmp_path, monkeypatch):
    from pydantic import ValidationError

    for key in [k for k in os.environ if k.startswith("PROMPTKD_")]:
        monkeypatch.delenv(key)
    for settings in ({}, {"bundle": tmp_path, "model_repository": tmp_path}):
        with pytest.raises(ValidationError, match="PROMPTKD_BUNDLE.*PROMPTKD_MODEL_REPOSITORY"):
            Settings(**settings)
    with pytest.raises(Exception, match="is not a folder"):
        with TestClient(create_app(Settings(model_repository=tmp_path / "absent"))):
            pass
