"""The server checks the graph it picks on the bundle's parity set, on the machine it runs on, and never serves
one under its manifest floors: auto falls back (logged, in GET / and /metrics), an explicit choice is refused."""
import json
import logging
import shutil

import pytest
from fastapi.testclient import TestClient

import server.runtime.sessions.choice as engine
from bundle import MANIFEST_NAME, cpu_flags, read_bundle
from export.build import build_bundle
from export.variants import NON_SATURATING_INT8
from server.config import Settings
from server.main import create_app
from training.data.datasets import find_images

from conftest import foolbox_jpegs


@pytest.fixture(scope="module")
def int8_bundle(distilled, fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("startup") / "bundle"
    build_bundle(distilled, out, find_images(fmnist / "test")[::4], variants=("optimized", "int8", "int8_vnni"),
                 calibration_images=find_images(fmnist / "train")[::8], force_variants=True)
    return out


def _copy_with(source, target, **variant_updates):
    """A copy of the bundle whose manifest changes some variants' fields (the manifest is not checksummed)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    for name, fields in variant_updates.items():
        manifest["variants"][name].update(fields)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


def _unforced(bundle, tmp_path):
    """Every variant marked as passed at export, so that only the start-up check decides."""
    names = json.loads((bundle / MANIFEST_NAME).read_text())["variants"]
    return _copy_with(bundle, tmp_path / "unforced", **{n: {"forced": False} for n in names})


def test_auto_serves_the_fastest_variant_that_passes_here(int8_bundle, tmp_path):
    folder = _unforced(int8_bundle, tmp_path)
    expected = "int8_vnni" if cpu_flags() & set(NON_SATURATING_INT8) else "int8"
    with TestClient(create_app(Settings(bundle=folder))) as client:
        info = client.get("/").json()
        assert info["variant"] == expected, info["variant_reason"]
        assert info["variant_reason"].startswith(f"{expected} passed the start-up check on 20 images")
        assert [c["variant"] for c in info["startup_checks"]] == [expected]
        check = info["startup_checks"][0]
        assert check["passed"] and check["parity"]["min_cosine"] >= check["min_cosine"] == 0.99
        metrics = client.get("/metrics").text
        labels = f'model="{info["name"]}",'
        assert f'promptkd_startup_check{{figure="passed",{labels}variant="{expected}",version="1"}} 1.0' in metrics
        assert (f'promptkd_serving{{{labels}runtime="{info["runtime"]}",variant="{expected}",version="1"}} 1.0'
                in metrics)


def test_a_variant_failing_its_check_here_is_skipped_in_auto_and_refused_when_named(int8_bundle, tmp_path, caplog):
    """Floors no int8 graph can reach stand in for a CPU whose kernels saturate: the check measures, the floors
    decide, and the figures measured here are what GET / shows."""
    impossible = {"min_cosine": 0.999999, "min_agreement": 1.0}
    folder = _copy_with(_unforced(int8_bundle, tmp_path), tmp_path / "strict", int8=impossible, int8_vnni=impossible)
    with caplog.at_level(logging.WARNING, logger="promptkd.server"):
        with TestClient(create_app(Settings(bundle=folder))) as client:
            info = client.get("/").json()
            assert info["variant"] == "optimized"
            tried = {c["variant"]: c for c in info["startup_checks"]}
            assert not any(tried[name]["passed"] for name in tried if name.startswith("int8"))
            assert tried["int8"]["parity"]["min_cosine"] < 0.999999 and tried["optimized"]["passed"]
            assert (f'promptkd_startup_check{{figure="passed",model="{info["name"]}",variant="int8",version="1"}} 0.0'
                    in client.get("/metrics").text)
            response = client.post("/classify", files={"file": foolbox_jpegs()[0].open("rb")})
            assert response.status_code == 200 and response.json()["variant"] == "optimized"
    assert "int8 failed the start-up check" in caplog.text
    with pytest.raises(Exception, match="int8 failed the start-up check.*serve another variant"):
        with TestClient(create_app(Settings(bundle=folder, variant="int8"))):
            pass


def test_the_check_uses_the_stored_features(int8_bundle, tmp_path):
    """Parity features that are not the fp32 graph's (a damaged or mismatched set) make every variant fail."""
    folder = tmp_path / "bundle"
    shutil.copytree(int8_bundle, folder)
    bundle = read_bundle(folder)
    inputs, features = bundle.parity_set()
    assert engine.check_on_parity_set(engine.OrtSession(bundle.model_path("optimized"), ["CPUExecutionProvider"]),
                                      bundle, "optimized", bundle.manifest.variants["optimized"]).passed
    bundle.parity_set = lambda: (inputs, features[::-1].copy())
    check = engine.check_on_parity_set(engine.OrtSession(bundle.model_path("optimized"), ["CPUExecutionProvider"]),
                                       bundle, "optimized", bundle.manifest.variants["optimized"])
    assert not check.passed and check.parity.min_cosine < 0.99


def test_int8_vnni_is_never_picked_on_a_cpu_without_the_flags(int8_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    folder = _unforced(int8_bundle, tmp_path)
    with TestClient(create_app(Settings(bundle=folder))) as client:
        info = client.get("/").json()
        assert info["variant"] == "int8" and "int8_vnni" not in [c["variant"] for c in info["startup_checks"]]
    with pytest.raises(Exception, match="for CPUs with one of avx512_vnni"):
        with TestClient(create_app(Settings(bundle=folder, variant="int8_vnni"))):
            pass


def test_without_a_parity_set_or_with_the_check_off_the_reason_says_so(distilled, fmnist, int8_bundle, tmp_path):
    bare = tmp_path / "bare"
    build_bundle(distilled, bare, find_images(fmnist / "test")[:16], variants=("optimized",), parity_set=0)
    assert read_bundle(bare).parity_set() is None
    with TestClient(create_app(Settings(bundle=bare))) as client:
        info = client.get("/").json()
        assert info["variant"] == "optimized" and "no parity set" in info["variant_reason"]
    with TestClient(create_app(Settings(bundle=_unforced(int8_bundle, tmp_path), startup_check=False))) as client:
        assert "PROMPTKD_STARTUP_CHECK=false" in client.get("/").json()["variant_reason"]


def test_cpu_flags_are_read_for_x86_and_arm(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags.__wrapped__(x86) >= {"avx2", "avx512_vnni"}
    assert cpu_flags.__wrapped__(arm) & set(NON_SATURATING_INT8) == {"asimddp"}
    assert cpu_flags.__wrapped__(tmp_path / "missing") == frozenset()
