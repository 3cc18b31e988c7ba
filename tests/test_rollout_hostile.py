"""Rollout under attack (from a hostile review): calls, folder changes and cancellations in the middle of a rollout
must leave the server consistent: no engine slot or shadow tensor kept, a call obeyed or refused with a 4xx, no
figures of other files counted, no version served that its policy or a call excludes, nothing left of a removed
model."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest

from server.repository.backbones import DomainBatcher, Engine
from server.runtime.batcher import EngineGate, MicroBatcher
from server.metrics import Metrics

from test_rollout import ADMIN, FAST, client, index, permuted_copy, post, repository, wait_until


@pytest.fixture(scope="module")
def photos(fmnist) -> list[bytes]:
    return [p.read_bytes() for p in sorted((fmnist / "test").rglob("*.png"))[:48]]


def service(app):
    return app.app.state.service


def test_a_batcher_stopped_as_its_shadow_slot_is_granted_gives_the_slot_back():
    """stop() cancelling the worker just after the gate granted its shadow acquire: slot must not leak."""
    leaks = []
    async def once(k):
        gate = EngineGate(1)
        b = MicroBatcher(lambda x: x[:, :2], 2, 0, 64, Metrics(), gate, {"model": "m", "version": "1"})
        b.start()
        await gate.acquire()  # someone else's batch holds the only slot
        sub = asyncio.ensure_future(b.submit(-np.ones((1, 3)), shadow=True, limit=8))
        for _ in range(5):
            await asyncio.sleep(0)
        gate.release()  # grants the worker's shadow acquire (busy back to 1)
        for _ in range(k):
            await asyncio.sleep(0)
        await b.stop()
        sub.cancel()
        return gate.busy
    async def main():
        for k in range(6):
            leaks.append((k, await once(k)))
    asyncio.run(main())
    assert all(busy == 0 for _, busy in leaks), f"engine slot leaked (busy after stop): {leaks}"


def test_domain_shadow_copies_that_timed_out_leave_the_shared_engine_queue():
    """Domain-level shadow limit is released on timeout, but the job stays in the engine's shadow deque."""
    async def main():
        gate = EngineGate(1)
        batcher = MicroBatcher(lambda x, p: x[:, :2], 8, 0, 10_000, Metrics(), gate, {"model": "b", "version": "fp32"})
        batcher.start()
        class S:  # minimal DomainSession
            def __init__(self, engine): self.engine = engine
            def rows(self, n): return np.zeros((n, 1))
            def head(self, x): return x
        engine = Engine(("a", "fp32", "x"), "fp32", None, batcher)
        async def rel(e): pass
        dom = DomainBatcher(S(engine), {"model": "m", "version": "1"}, 256, rel)
        gate.queued(1)  # serving work is always waiting somewhere in the process (sustained load)
        for _ in range(20):
            tasks = [asyncio.ensure_future(asyncio.wait_for(dom.submit(np.ones((4, 3)), shadow=True, limit=32), 0.01))
                     for _ in range(8)]
            await asyncio.gather(*tasks, return_exceptions=True)
        held = len(batcher._shadow)
        gate.queued(-1)
        await batcher.stop()
        return held
    held = asyncio.run(main())
    assert held == 0, f"{held} shadow jobs whose callers gave up are still held by the engine"


def test_a_large_shadow_copy_runs_a_batch_at_a_time():
    async def main():
        gate = EngineGate(1)
        runs = []

        def run(x):
            time.sleep(0.05)
            runs.append(("shadow" if x[0, 0] < 0 else "serving", len(x)))
            return x[:, :2]
        b = MicroBatcher(run, 8, 0, 256, Metrics(), gate, {"model": "m", "version": "1"})
        b.start()
        sh = asyncio.ensure_future(b.submit(-np.ones((32, 3)), shadow=True, limit=32))
        await asyncio.sleep(0.01)  # the shadow batch starts (engine idle)
        t0 = time.perf_counter()
        await b.submit(np.ones((1, 3)))
        waited = time.perf_counter() - t0
        await sh
        await b.stop()
        return waited, runs
    waited, runs = asyncio.run(main())
    assert waited < 0.12, "a serving request waited behind more than one (shadow) batch"


def test_unloading_the_serving_version_mid_shadow_is_obeyed(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same", f"shadow_sample: 1\n  decide: external\n  {FAST}")
    with client(root) as app:
        assert index(app)["2"]["rollout"]["stage"] == "shadow"
        r = app.post("/v2/repository/models/m/unload", json={"parameters": {"version": 1}}, headers=ADMIN)
        assert r.status_code == 200, r.text
        assert index(app)["1"]["state"] in ("UNLOADING", "UNAVAILABLE")
        assert set(post(app, photos[:8])) == {"2"}, "version 1 was unloaded by request: version 2 is left"


def test_unloading_the_whole_model_mid_shadow_stops_it(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same", f"shadow_sample: 1\n  decide: external\n  {FAST}")
    with client(root) as app:
        assert index(app)["2"]["rollout"]["stage"] == "shadow"
        r = app.post("/v2/repository/models/m/unload", json={}, headers=ADMIN)
        assert r.status_code == 200, r.text
        reply = app.post("/classify", files=[("file", ("a.png", photos[0]))])
        assert reply.status_code == 503, "the model was unloaded by request, yet it answers"


def test_stages_changed_mid_shadow_start_the_rollout_again(bundle_dir, photos, tmp_path, caplog):
    root = repository(tmp_path / "repo", bundle_dir, "same", "shadow_sample: 1\n  stages: [shadow, canary]\n  "
                      "promote_when: {images: 8, agreement: 0.5}\n  refuse_when: {images: 1000}\n")
    with client(root) as app:
        assert index(app)["2"]["rollout"]["stage"] == "shadow"
        (root / "m" / "model.yaml").write_text("rollout:\n  shadow_sample: 1\n  stages: [canary]\n  promote_when: "
                                               "{images: 8, agreement: 0.5}\n  refuse_when: {images: 1000}\n")
        assert app.post("/v2/repository/models/m/load", json={}, headers=ADMIN).status_code == 200
        post(app, photos)
        time.sleep(1)
        view = index(app)["2"]["rollout"]
        assert not [r for r in caplog.records if r.exc_info], "no decision or comparison raised"
        assert view["stage"] != "shadow", "met promote_when with plenty of images, but never moves on"


def test_an_operator_promote_superseded_while_waiting_for_the_lock_is_a_409(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same", f"shadow_sample: 1\n  decide: external\n  {FAST}")
    with client(root) as app:
        models = service(app).models
        assert index(app)["2"]["rollout"]["stage"] == "shadow"
        shutil.copytree(bundle_dir, root / "m" / "3")
        original = models._load

        async def slow_load(name, folder):
            if folder.version == 3:
                await asyncio.sleep(1.5)
            return await original(name, folder)
        models._load = slow_load
        t = threading.Thread(target=lambda: app.post("/v2/repository/models/m/load", json={}, headers=ADMIN))
        t.start()
        time.sleep(0.5)  # the load call (or a poll) holds the model's lock, loading version 3
        reply = app.post("/v2/repository/models/m/promote", json={"parameters": {"version": 2}}, headers=ADMIN)
        t.join()
        assert reply.status_code == 409 and "ended before the call" in reply.json()["error"], reply.text
        assert index(app)["3"]["rollout"]["stage"] == "shadow"


def test_a_candidate_rewritten_mid_shadow_is_measured_from_nothing(bundle_dir, photos, tmp_path):
    root = repository(tmp_path / "repo", bundle_dir, "same", "shadow_sample: 1\n  stages: [shadow]\n  decide: "
                      "external\n  promote_when: {images: 24, agreement: 0.7}\n  refuse_when: {images: 1000}\n")
    with client(root) as app:
        post(app, photos[:20])
        wait_until(lambda: index(app)["2"]["rollout"]["figures"]["images"] >= 20, "20 compared")
        shutil.rmtree(root / "m" / "2")
        permuted_copy(bundle_dir, root / "m" / "2")  # new files: a version that answers wrong
        assert app.post("/v2/repository/models/m/load", json={}, headers=ADMIN).status_code == 200
        figures = index(app)["2"]["rollout"]["figures"]
        assert figures["images"] == 0, "figures of the old files count for the new files"


def test_a_version_outside_a_specific_policy_never_serves_under_rollout(bundle_dir, photos, tmp_path):
    root = tmp_path / "repo"
    for v in (1, 2, 3):
        shutil.copytree(bundle_dir, root / "m" / str(v))
    (root / "m" / "model.yaml").write_text("version_policy: {specific: [1, 3]}\nrollout:\n  decide: external\n")
    with client(root) as app:
        entries = index(app)
        assert entries["2"]["state"] != "READY", "version 2 is outside specific [1, 3]"
        assert set(post(app, photos[:4])) == {"1"} and entries["3"]["rollout"]["serving"] == "1"


def test_a_model_folder_removed_mid_rollout_leaves_no_rollout_behind(bundle_dir, photos, tmp_path, caplog):
    root = repository(tmp_path / "repo", bundle_dir, "same",
                      f"shadow_sample: 1\n  grace_s: 2\n  decide: external\n  {FAST}")
    with client(root, repository_poll_s=0.2) as app:
        assert app.post("/v2/repository/models/m/promote", json={}, headers=ADMIN).status_code == 200
        shutil.move(root / "m", tmp_path / "away")
        wait_until(lambda: "m" not in service(app).models.models, "model dropped by the poll")
        metrics = app.get("/metrics").text
        left = [line for line in metrics.splitlines() if line.startswith("promptkd_rollout{")]
        caplog.clear()
        time.sleep(3)  # the grace timer of the removed model fires
        assert not left, "a removed model still reports a rollout on /metrics"


def test_a_folder_replaced_during_the_grace_leaves_no_orphan_version(bundle_dir, tmp_path, caplog):
    root = repository(tmp_path / "repo", bundle_dir, "same",
                      f"shadow_sample: 1\n  grace_s: 3\n  decide: external\n  {FAST}")
    with client(root, repository_poll_s=0.2) as app:
        models = app.app.state.service.models
        assert app.post("/v2/repository/models/m/promote", json={}, headers=ADMIN).status_code == 200
        old = models.models["m"]
        shutil.move(root / "m", tmp_path / "away")
        wait_until(lambda: "m" not in models.models, "dropped")
        shutil.move(tmp_path / "away", root / "m")
        wait_until(lambda: "m" in models.models and models.models["m"].default is not None, "back")
        new = models.models["m"]
        time.sleep(4)  # the old Model's grace timer would fire here
        assert new.served and not old.served, "a version loaded into a model no longer served is never reachable"
