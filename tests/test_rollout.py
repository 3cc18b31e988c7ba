"""Safe rollout, end to end on real Fashion-MNIST photos: a new version is shadowed and compared with the serving
one on the same images, then refused (a worse version) or taken through canary to promoted (a good one); a
promoted version that turns out worse rolls back by itself; decisions survive a restart through the state
folder; an external controller drives the admin calls from the metrics; hostile settings and calls get 4xx or a
reported model state. Shadow work yields to serving work at the engine (EngineGate, MicroBatcher)."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bundle import MANIFEST_NAME, file_entry, read_bundle, write_labels_and_vectors
from server.runtime.batcher import EngineGate, MicroBatcher, Overloaded
from server.config import Settings
from server.main import create_app
from server.metrics import Metrics
from server.repository.layout import read_config

TOKEN = "rollout-token-0123456789abcdef012345"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FAST = "promote_when: {images: 24, agreement: 0.9}\n  refuse_when: {images: 16, agreement_below: 0.7}\n"


def permuted_copy(source: Path, target: Path) -> Path:
    """The same student with its class vectors shifted by one against its labels: a version that answers wrong."""
    shutil.copytree(source, target)
    bundle = read_bundle(source)
    write_labels_and_vectors(target, bundle.labels, np.ascontiguousarray(np.roll(bundle.class_vectors, 1, axis=0)))
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    manifest["files"]["class_vectors"] = file_entry(target, manifest["files"]["class_vectors"]["path"]).model_dump()
    (target / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    read_bundle(target)
    return target


def repository(root: Path, bundle_dir: Path, second: str, rollout: str) -> Path:
    shutil.copytree(bundle_dir, root / "m" / "1")
    if second == "same":
        shutil.copytree(bundle_dir, root / "m" / "2")
    else:
        permuted_copy(bundle_dir, root / "m" / "2")
    (root / "m" / "model.yaml").write_text(f"rollout:\n  {rollout}")
    return root


def client(root: Path, state: Path | None = None, **settings) -> TestClient:
    config = Settings(model_repository=root, admin_token=TOKEN, rollout_state=state, max_wait_ms=1, **settings)
    return TestClient(create_app(config))


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [p.read_bytes() for p in sorted((fmnist / "test").rglob("*.png"))[:48]]


def post(app: TestClient, photos: list[bytes], per_request: int = 4, headers: dict | None = None) -> list[str]:
    """Classify the photos; every request must succeed. Returns the version that answered each."""
    versions = []
    for start in range(0, len(photos), per_request):
        files = [("file", (f"{i}.png", data)) for i, data in enumerate(photos[start : start + per_request])]
        reply = app.post("/classify", files=files, headers=headers or {})
        assert reply.status_code == 200, reply.text
        versions.append(reply.json()["version"])
        time.sleep(0.02)  # room for the shadow copy: the engine is idle between requests, as a real server's is
    return versions


def index(app: TestClient) -> dict[str, dict]:
    return {e.get("version"): e for e in app.post("/v2/repository/index").json()}


def wait_until(check, what: str, seconds: float = 20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"never: {what}")


def test_a_worse_version_is_shadowed_and_refused_while_version_1_serves(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "permuted", f"shadow_sample: 1\n  {FAST}")
    with client(root, tmp_path) as app:
        entries = index(app)
        assert entries["2"]["rollout"]["stage"] == "shadow" and "measured against it" in entries["1"]["reason"]
        versions = post(app, photos)
        assert set(versions) == {"1"}, "the candidate never answers in shadow"
        refused = wait_until(lambda: index(app)["2"]["state"] == "UNAVAILABLE" and index(app)["2"], "refused")
        assert "refused by its rollout policy in shadow against version 1: agreement" in refused["reason"]
        assert set(post(app, photos[:8])) == {"1"}
        card = app.get("/", headers={"Accept": "application/json"}).json()
        decision = card["rollout"]["decisions"][-1]
        assert decision["action"] == "refuse" and decision["figures"]["agreement"] < 0.7
        assert decision["figures"]["images"] >= 16 and decision["figures"]["candidate"]["version"] == "2"
        metrics = app.get("/metrics").text
        assert 'promptkd_rollout_decisions_total{action="refuse",by="policy",model="m",version="2"} 1.0' in metrics
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["promoted"] == 1 and "2" in saved["refused"]

    with client(root, tmp_path) as app:  # a restart keeps the refusal: version 2 is not even loaded
        entries = index(app)
        assert entries["2"]["state"] == "UNAVAILABLE" and "refused" in entries["2"]["reason"]
        assert entries["1"]["state"] == "READY" and "rollout" not in entries["1"] or not entries["1"]["rollout"]
    with client(root) as app:  # without a state folder the decision is gone: version 2 is measured again
        assert index(app)["2"]["rollout"]["stage"] == "shadow"


def test_a_good_version_goes_shadow_canary_promoted_and_the_previous_one_leaves_after_the_grace(
        bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same",
                      f"shadow_sample: 1\n  canary_share: 0.5\n  grace_s: 1\n  {FAST}")
    with client(root) as app:
        assert set(post(app, photos[:24])) == {"1"}, "24 images compared at least before the canary"
        wait_until(lambda: index(app)["2"]["rollout"]["stage"] == "canary", "canary")
        answered = set()
        for key in range(24):  # sticky: one client, one version
            seen = set(post(app, photos[:8], headers={"x-client-id": f"client-{key}"}))
            assert len(seen) == 1
            answered |= seen
            if index(app).get("2", {}).get("rollout", {}).get("stage") == "promoted":
                break
        assert answered == {"1", "2"}, "in canary both versions answer"
        promoted = wait_until(lambda: index(app)["2"].get("rollout", {}).get("stage") == "promoted" and index(app),
                              "promoted")
        assert "previous version" in promoted["1"]["reason"]
        assert set(post(app, photos[:8])) == {"2"}
        wait_until(lambda: index(app)["1"]["state"] == "UNAVAILABLE", "version 1 unloaded after the grace period")
        actions = [d["action"] for d in app.get("/", headers={"Accept": "application/json"}).json()["rollout"][
            "decisions"]]
        assert actions == ["advance", "promote", "settle"]


def test_a_promoted_version_that_turns_out_worse_rolls_back_by_itself(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "permuted",
                      "shadow_sample: 1\n  grace_s: 600\n  decide: auto\n  promote_when: {images: 10000}\n  "
                      "refuse_when: {images: 10000}\n  rollback_when: {images: 16, agreement_below: 0.7}\n")
    with client(root, tmp_path) as app:
        reply = app.post("/v2/repository/models/m/promote", json={"parameters": {"version": 2}}, headers=ADMIN)
        assert reply.status_code == 200 and reply.json() == {"model": "m", "version": "2", "decision": "promote"}
        assert index(app)["2"]["rollout"]["stage"] == "promoted"
        versions = post(app, photos)
        assert versions[0] == "2"
        back = wait_until(lambda: index(app)["2"]["state"] == "UNAVAILABLE" and index(app), "rolled back")
        assert "rolled back by its rollout policy in promoted against version 1" in back["2"]["reason"]
        assert set(post(app, photos[:8])) == {"1"}
    assert json.loads((tmp_path / "m.json").read_text())["promoted"] == 1


def test_an_external_controller_reads_the_metrics_and_promotes(bundle_dir, photos, tmp_path):
    """decide: external: the replica only measures; a controller sums the counters (as a PromQL query over the
    replicas would) and calls promote when its analysis passes."""
    root = repository(tmp_path / "repo", bundle_dir, "same", f"shadow_sample: 1\n  decide: external\n  {FAST}")
    with client(root) as app:
        post(app, photos)
        time.sleep(0.5)
        assert index(app)["2"]["rollout"]["stage"] == "shadow", "an external decision is never taken by the replica"
        metrics = app.get("/metrics").text
        counted = {m[0]: float(m[1]) for m in re.findall(
            r'promptkd_rollout_images_total\{candidate="2",model="m",outcome="(\w+)",version="1"\} (\S+)', metrics)}
        assert counted["compared"] >= 24 and counted["agreed"] / counted["compared"] >= 0.9
        for body, status in (({"parameters": {"stage": "nope"}}, 400), ({"parameters": {"stage": 1}}, 400),
                             ({"parameters": {"stage": "canary"}}, 200), ({"parameters": {"stage": "canary"}}, 409)):
            reply = app.post("/v2/repository/models/m/promote", json=body, headers=ADMIN)
            assert reply.status_code == status, reply.text
        assert index(app)["2"]["rollout"]["stage"] == "canary"
        reply = app.post("/v2/repository/models/m/promote", json={}, headers=ADMIN)
        assert reply.status_code == 200 and reply.json()["decision"] == "promote"
        assert set(post(app, photos[:8])) == {"2"}
        reply = app.post("/v2/repository/models/m/refuse", json={}, headers=ADMIN)  # in the grace: a rollback
        assert reply.json()["decision"] == "rollback"
        assert set(post(app, photos[:8])) == {"1"}


def test_hostile_rollout_settings_and_calls_get_4xx_or_a_model_state(bundle_dir, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(bundle_dir, root / "m" / "1")
    shutil.copytree(bundle_dir, root / "plain" / "1")
    for text, message in (("rollout: {shadow_sample: 2}", "shadow_sample"), ("rollout: {stages: [canary, shadow]}",
                          "stages"), ("rollout: {stages: []}", "stages"), ("rollout: {grace_s: .nan}", "grace_s"),
                          ("rollout: {sticky_header: 'x y'}", "sticky_header"), ("rollout: {decide: maybe}", "decide"),
                          ("rollout: {promote_when: {agreement: -1}}", "agreement"), ("rollout: [1]", "rollout"),
                          ("rollout: {shadow_queue_images: 100000}", "shadow_queue_images"),
                          ("rollout: {extra: 1}", "extra")):
        policy = root / "m" / "model.yaml"
        policy.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_config(policy)
    (root / "m" / "model.yaml").write_text("rollout: {shadow_sample: 2}\n")
    with client(root) as app:
        entries = app.post("/v2/repository/index").json()
        bad = next(e for e in entries if e["name"] == "m")
        assert bad["state"] == "UNAVAILABLE" and "shadow_sample" in bad["reason"]
        assert any(e["name"] == "plain" and e["state"] == "READY" for e in entries)
        calls = [("/v2/repository/models/plain/promote", {}, ADMIN, 409),
                 ("/v2/repository/models/plain/refuse", {"parameters": {"version": "1"}}, ADMIN, 409),
                 ("/v2/repository/models/nope/promote", {}, ADMIN, 404),
                 ("/v2/repository/models/plain/promote", {}, {}, 401),
                 ("/v2/repository/models/plain/promote", {"parameters": {"version": "²"}}, ADMIN, 400),
                 ("/v2/repository/models/plain/promote", {"parameters": {"version": True}}, ADMIN, 400),
                 ("/v2/repository/models/plain/promote", {"parameters": []}, ADMIN, 400)]
        for path, body, headers, status in calls:
            reply = app.post(path, json=body, headers=headers)
            assert reply.status_code == status, (path, body, reply.text)
            assert "error" in reply.json()


def test_a_candidate_with_another_input_is_refused_not_compared(bundle_dir, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same", f"{FAST}")
    manifest = json.loads((root / "m" / "2" / MANIFEST_NAME).read_text())
    manifest["input"]["mean"] = [0.5, 0.5, 0.5]
    (root / "m" / "2" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with client(root) as app:
        entries = index(app)
        assert entries["2"]["state"] in ("UNLOADING", "UNAVAILABLE") and "input" in entries["2"]["reason"]
        assert entries["1"]["state"] == "READY"


def test_the_engine_gives_shadow_work_a_slot_only_when_no_serving_work_waits():
    async def scenario() -> list[str]:
        gate, order = EngineGate(1), []
        await gate.acquire()  # a serving batch runs
        gate.queued(2)  # two serving images wait in some batcher
        shadow = asyncio.ensure_future(gate.acquire(shadow=True))
        serving = asyncio.ensure_future(gate.acquire())
        shadow.add_done_callback(lambda _: order.append("shadow"))
        serving.add_done_callback(lambda _: order.append("serving"))
        await asyncio.sleep(0.01)
        gate.release()
        await asyncio.sleep(0.01)
        assert order == ["serving"], "a serving batch goes before a shadow batch that waited longer"
        gate.release()
        await asyncio.sleep(0.01)
        assert order == ["serving"], "shadow waits while serving images are queued"
        gate.queued(-2)
        await asyncio.sleep(0.01)
        assert order == ["serving", "shadow"] and gate.busy == 1
        cancelled = asyncio.ensure_future(gate.acquire(shadow=True))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        gate.release()
        await asyncio.sleep(0.01)
        assert gate.busy == 0, "a cancelled wait never keeps a slot"
        return order

    asyncio.run(scenario())


def test_a_batcher_runs_serving_jobs_first_and_drops_shadow_copies_past_their_limit():
    async def scenario() -> None:
        ran: list[str] = []

        def run(batch: np.ndarray) -> np.ndarray:
            time.sleep(0.02)
            ran.append("shadow" if batch[0, 0] < 0 else "serving")
            return batch[:, :2]

        gate = EngineGate(1)
        batcher = MicroBatcher(run, 2, 0, 64, Metrics(), gate, {"model": "m", "version": "1"})
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit(np.ones((2, 3))))  # the engine is busy with this
        await asyncio.sleep(0.005)
        shadow = [asyncio.ensure_future(batcher.submit(-np.ones((1, 3)), shadow=True, limit=2)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit(-np.ones((1, 3)), shadow=True, limit=2)
        serving = asyncio.ensure_future(batcher.submit(np.ones((1, 3))))
        timing: list[float] = []
        await asyncio.gather(blocker, serving, *shadow, batcher.submit(np.ones((1, 3)), timing=timing))
        assert ran[:2] == ["serving", "serving"] and ran[-1] == "shadow", ran
        assert timing and timing[0] > 0 and gate.serving_queued == 0 and batcher.shadow_images == 0
        await batcher.stop()

    asyncio.run(scenario())


def test_a_worse_domain_on_a_shared_backbone_is_shadowed_on_the_shared_engine_and_refused(distilled, fmnist, photos,
                                                                                          tmp_path):
    """Domains share one engine batcher: the candidate's copies run there at the lower priority, and the
    comparison holds as for folded bundles."""
    from export.domain import build_domain
    from training.data.datasets import find_images

    root = tmp_path / "repo"
    build_domain(distilled, root, "m", find_images(fmnist / "test")[:16], version=1)
    permuted_copy(root / "m" / "1", root / "m" / "2")
    (root / "m" / "model.yaml").write_text(f"rollout:\n  shadow_sample: 1\n  {FAST}")
    with client(root) as app:
        assert index(app)["2"]["rollout"]["stage"] == "shadow"
        assert set(post(app, photos)) == {"1"}
        refused = wait_until(lambda: index(app)["2"]["state"] == "UNAVAILABLE" and index(app)["2"], "refused")
        assert "agreement" in refused["reason"]
        metrics = app.get("/metrics").text
        assert re.search(r'promptkd_batch_size_count\{model="backbone-[0-9a-f]{12}",version="fp32"\}', metrics)


def test_shadow_work_waits_for_a_pause_as_long_as_a_serving_batch():
    """Under steady traffic the gaps between serving batches are shorter than a batch: shadow work runs only in
    a pause at least as long as the recent serving batches took."""
    async def scenario() -> float:
        gate = EngineGate(1)
        async with gate.slot():
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        await gate.acquire(shadow=True)
        waited = time.perf_counter() - started
        gate.release()
        return waited

    assert asyncio.run(scenario()) >= 0.09


def test_the_fleets_promoted_version_and_a_damaged_state_file(bundle_dir, tmp_path):
    """model.yaml's `promoted` serves on a replica that starts without a record of its own; a state file that is not
    the server's is set aside (never lost) and the model starts without a record."""
    root = repository(tmp_path / "repo", bundle_dir, "same", "promoted: 2\n")
    state = tmp_path / "state"
    state.mkdir()
    (state / "m.json").write_text('{"promoted": "two", "extra": [1]}')
    with client(root, state) as app:
        entries = index(app)
        assert app.get("/", headers={"Accept": "application/json"}).json()["version"] == "2"
        assert "rollout" not in entries["2"] or not entries["2"]["rollout"]
    assert (state / "m.json.unreadable").read_text() == '{"promoted": "two", "extra": [1]}'
    assert json.loads((state / "m.json").read_text())["promoted"] == 2
