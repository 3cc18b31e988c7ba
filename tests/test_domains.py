"""Domain bundles on one shared backbone: the backbone exported once per student tower, each domain's prompts and
projector as data, parity with the folded bundles on real photos, batches that mix domains, and the refusals
(missing backbone, prompts that do not fit, a domain bundle outside a repository)."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from bundle import BACKBONES_DIR, MANIFEST_NAME, file_entry, read_backbone, read_bundle
from bundle.parity import compare
from export.build import build_bundle
from export.domain import build_domain, fold_head
from export.domain_cli import main as domain_cli
from export.parity import load_images, run_graph
from server.runtime.batcher import EngineGate
from server.config import Settings
from server.main import create_app
from server.metrics import Metrics
from server.repository.models import Models
from training.checkpoint import load_checkpoint, save_checkpoint
from training.data.datasets import find_images
from training.transforms import eval_transform

from conftest import foolbox_jpegs


@pytest.fixture(scope="module")
def second_student(distilled, tmp_path_factory) -> Path:
    """Another domain's student on the same frozen tower: other prompts, other projector (BatchNorm statistics
    included, so folding them is exercised)."""
    student, _, cfg = load_checkpoint(distilled)
    torch.manual_seed(7)
    with torch.no_grad():
        student.tower.prompts.add_(torch.randn_like(student.tower.prompts) * 0.5)
        for value in student.projector.parameters():
            value.add_(torch.randn_like(value) * 0.1)
        norm = student.projector.net[1]
        norm.running_mean.add_(torch.randn_like(norm.running_mean) * 0.2)
        norm.running_var.mul_(torch.rand_like(norm.running_var) + 0.5)
    path = tmp_path_factory.mktemp("second") / "student.pt"
    save_checkpoint(path, student, cfg, epoch=1)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory, distilled, second_student, fmnist):
    """A repository with two domains of one tower; the first export makes the backbone (fp32, optimized, int8)."""
    root = tmp_path_factory.mktemp("domains")
    parity = find_images(fmnist / "test")[:32]
    first = build_domain(distilled, root, "clothes", parity, variants=("optimized", "int8"),
                         calibration_images=find_images(fmnist / "train")[::4], skip_failing_variants=True)
    second = build_domain(second_student, root, "shoes", parity, skip_failing_variants=True)
    return root, first, second


@pytest.fixture(scope="module")
def photos(fmnist, distilled) -> np.ndarray:
    """Real photos the parity sets never saw: Fashion-MNIST test images past the first 32, and ImageNet JPEGs."""
    _, pre, _ = load_checkpoint(distilled)
    paths = find_images(fmnist / "test")[32:64] + [str(p) for p in foolbox_jpegs()]
    return load_images(paths, eval_transform(pre)).numpy()


def shared_features(root: Path, model: str, images: np.ndarray, variant: str = "fp32") -> np.ndarray:
    bundle = read_bundle(root / model / "1")
    backbone = read_backbone(root / BACKBONES_DIR / bundle.manifest.backbone.sha256)
    rows = np.broadcast_to(bundle.prompts, (len(images), *bundle.prompts.shape))
    return bundle.head(run_graph(backbone.model_path(variant), images, ["CPUExecutionProvider"], extra=(rows,)))


def test_the_backbone_is_exported_once_and_domains_hold_only_their_own_parts(repo):
    root, first, second = repo
    assert first.backbone_created and not second.backbone_created and first.backbone == second.backbone
    assert [p.name for p in (root / BACKBONES_DIR).iterdir()] == [first.backbone]
    backbone = read_backbone(root / BACKBONES_DIR / first.backbone)
    for model in ("clothes", "shoes"):
        folder = root / model / "1"
        assert not list(folder.glob("*.onnx"))
        manifest = read_bundle(folder).manifest
        assert manifest.backbone == backbone.manifest.ref()
        assert set(manifest.variants) <= set(backbone.manifest.variants)
        assert manifest.parity.min_cosine >= 0.9999 and manifest.parity.top1_agreement == 1.0
    assert "optimized" in backbone.manifest.variants
    assert "optimized" in second.manifest.variants  # measured for the second domain on the first one's variants


def test_the_shared_graph_gives_each_domain_its_folded_bundles_features(repo, distilled, second_student, fmnist,
                                                                       tmp_path, photos):
    root = repo[0]
    for model, checkpoint in (("clothes", distilled), ("shoes", second_student)):
        build_bundle(checkpoint, tmp_path / model, find_images(fmnist / "test")[:16], parity_set=0)
        written = json.loads((tmp_path / model / MANIFEST_NAME).read_text())
        assert written["schema_version"] == 2 and "backbone" not in written  # older servers still read it
        expected = run_graph(tmp_path / model / "student.onnx", photos, ["CPUExecutionProvider"])
        got = shared_features(root, model, photos)
        cosine = (expected * got).sum(axis=1)
        assert cosine.min() >= 0.99999, (model, cosine.min())
    apart = (shared_features(root, "clothes", photos) * shared_features(root, "shoes", photos)).sum(axis=1)
    assert apart.mean() < 0.999  # the two domains' prompts and projectors really differ


def test_variants_of_the_backbone_hold_their_floors_per_domain(repo, photos):
    root = repo[0]
    for model in ("clothes", "shoes"):
        manifest = read_bundle(root / model / "1").manifest
        reference = shared_features(root, model, photos)
        for name, variant in manifest.variants.items():
            parity = compare(reference, shared_features(root, model, photos, name),
                             read_bundle(root / model / "1").class_vectors)
            assert parity.min_cosine >= variant.min_cosine, (model, name, parity)


def test_the_head_is_the_projector_with_its_batchnorm_folded(second_student):
    student, _, _ = load_checkpoint(second_student)
    pooled = torch.randn(16, student.tower.output_dim)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(student.projector(pooled), dim=-1).numpy()
    np.testing.assert_allclose(fold_head(student.projector)(pooled.numpy()), expected, atol=2e-6)


def test_prompts_per_row_equal_the_batch_prompts(distilled, second_student, photos):
    one, _, _ = load_checkpoint(distilled)
    two, _, _ = load_checkpoint(second_student)
    images = torch.from_numpy(photos[:4])
    rows = torch.stack([one.tower.prompts, two.tower.prompts, two.tower.prompts, one.tower.prompts])
    with torch.no_grad():
        mixed = one.tower.encode(images, rows)
        alone = [one.tower.encode(images[i : i + 1], rows[i]) for i in range(4)]
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_gives_each_row_what_its_domain_alone_gives(repo, photos):
    root = repo[0]

    async def scenario():
        settings = Settings(model_repository=root, max_batch_size=16, max_wait_ms=300, variant="fp32")
        models = Models(settings, Metrics(), EngineGate(1))
        await models.start()
        try:
            clothes, shoes = models.resolve("clothes", None), models.resolve("shoes", None)
            assert clothes.batcher.engine is shoes.batcher.engine and len(models.backbones.engines) == 1
            engine = clothes.batcher.engine
            sizes = []
            run = engine.batcher.run
            engine.batcher.run = lambda batch, *extra: (sizes.append(len(batch)), run(batch, *extra))[1]
            mixed = await asyncio.gather(clothes.batcher.submit(photos[:3]), shoes.batcher.submit(photos[3:7]),
                                         clothes.batcher.submit(photos[7:9]))
            alone = [clothes.classifier.session.run(photos[:3]), shoes.classifier.session.run(photos[3:7]),
                     clothes.classifier.session.run(photos[7:9])]
            return sizes, mixed, alone
        finally:
            await models.stop()

    sizes, mixed, alone = asyncio.run(scenario())
    assert sizes == [9]  # one batch held all three requests of both domains
    for got, expected in zip(mixed, alone):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_one_flooded_domain_does_not_refuse_the_others(repo, photos):
    from server.runtime.batcher import Overloaded

    async def scenario():
        settings = Settings(model_repository=repo[0], max_batch_size=4, max_queue_images=6, max_images_per_request=6,
                            variant="fp32")
        models = Models(settings, Metrics(), EngineGate(1))
        await models.start()
        try:
            clothes, shoes = models.resolve("clothes", None), models.resolve("shoes", None)
            flood = [asyncio.create_task(clothes.batcher.submit(photos[:3])) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded, match="of this model"):
                await clothes.batcher.submit(photos[:1])
            other = await shoes.batcher.submit(photos[:5])  # its own bound: served while clothes is full
            await asyncio.gather(*flood)
            return other
        finally:
            await models.stop()

    assert asyncio.run(scenario()).shape[0] == 5


def test_projector_files_are_read_safely(tmp_path):
    from bundle import BundleError, Head

    arrays = {"w1": np.ones((3, 2)), "b1": np.zeros(3), "w2": np.ones((4, 3)), "b2": np.zeros(4)}
    Head(**{k: v.astype(np.float32) for k, v in arrays.items()}).save(tmp_path / "ok.npz")
    assert Head.load(tmp_path / "ok.npz", 2, 4).w2.shape == (4, 3)
    with pytest.raises(BundleError, match="feature width 5"):
        Head.load(tmp_path / "ok.npz", 2, 5)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    with pytest.raises(BundleError, match="uncompressed"):
        Head.load(tmp_path / "packed.npz", 2, 4)
    np.save(tmp_path / "plain.npy", arrays["w1"])
    with pytest.raises(BundleError, match="not a readable .npz"):
        Head.load(tmp_path / "plain.npy", 2, 4)
    np.savez(tmp_path / "short.npz", w1=arrays["w1"])
    with pytest.raises(BundleError, match="exactly w1, b1, w2, b2"):
        Head.load(tmp_path / "short.npz", 2, 4)
    np.savez(tmp_path / "objects.npz", **{**arrays, "b2": np.array([None] * 4)})
    with pytest.raises(BundleError, match="numeric"):
        Head.load(tmp_path / "objects.npz", 2, 4)


def test_the_server_serves_every_domain_from_one_backbone(repo, fmnist):
    root, first, _ = repo
    photo = sorted((fmnist / "test").rglob("*.png"))[0].read_bytes()
    with TestClient(create_app(Settings(model_repository=root))) as client:
        index = client.post("/v2/repository/index").json()
        assert {(e["name"], e["state"]) for e in index} == {("clothes", "READY"), ("shoes", "READY")}
        answers = {}
        for model in ("clothes", "shoes"):
            reply = client.post(f"/models/{model}/classify", files={"file": ("a.png", photo)})
            assert reply.status_code == 200, reply.text
            answers[model] = reply.json()["results"][0]["predictions"]
            info = client.get("/", params={"model": model}, headers={"Accept": "application/json"}).json()
            assert f"shared backbone {first.backbone[:12]}" in info["runtime"]
        assert answers["clothes"] != answers["shoes"]
        metrics = client.get("/metrics").text
        assert f'promptkd_batch_size_count{{model="backbone-{first.backbone[:12]}"' in metrics


def _index(root: Path) -> dict[str, dict]:
    with TestClient(create_app(Settings(model_repository=root))) as client:
        return {e["name"]: e for e in client.post("/v2/repository/index").json()}


def test_a_domain_whose_backbone_is_missing_is_refused_naming_it(repo, tmp_path):
    root, first, _ = repo
    shutil.copytree(root / "clothes", tmp_path / "clothes")
    entry = _index(tmp_path)["clothes"]
    assert entry["state"] == "UNAVAILABLE" and first.backbone in entry["reason"]
    assert "not in the repository" in entry["reason"]


def test_prompts_that_do_not_fit_the_backbone_are_refused_at_load(repo, tmp_path):
    root = repo[0]
    shutil.copytree(root, tmp_path / "repo", symlinks=True)
    folder = tmp_path / "repo" / "shoes" / "1"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    prompts = np.load(folder / "prompts.npy")
    np.save(folder / "prompts.npy", np.concatenate([prompts, prompts[:, :1]], axis=1))
    manifest["backbone"]["prompts"]["tokens"] += 1
    manifest["files"]["prompts"] = file_entry(folder, "prompts.npy").model_dump()
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    index = _index(tmp_path / "repo")
    assert index["clothes"]["state"] == "READY"
    assert index["shoes"]["state"] == "UNAVAILABLE" and "do not fit backbone" in index["shoes"]["reason"]


def test_a_domain_bundle_alone_is_refused_with_the_way_to_serve_it(repo):
    with pytest.raises(Exception, match="model repository"):
        with TestClient(create_app(Settings(bundle=repo[0] / "clothes" / "1"))):
            pass


def test_the_cli_refuses_bad_names_and_variants_the_backbone_lacks(repo, second_student, fmnist, capsys):
    root = repo[0]
    common = ["--checkpoint", str(second_student), "--repository", str(root), "--parity-images",
              str(fmnist / "test"), "--parity-count", "8", "--parity-set", "4"]
    assert domain_cli([*common, "--model", "../escape"]) == 2
    assert "model name" in capsys.readouterr().err
    assert domain_cli([*common, "--model", "boots", "--variants", "fp16"]) == 2
    assert "has no fp16 variant" in capsys.readouterr().err
    assert not (root / "boots").exists()
    assert domain_cli([*common, "--model", "boots"]) == 0
    assert json.loads(capsys.readouterr().out)["backbone_created"] is False
    assert read_bundle(root / "boots" / "1").manifest.backbone.sha256 == repo[1].backbone
