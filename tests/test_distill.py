"""Class vectors and stage-2 distillation on real Fashion-MNIST photos with tiny towers."""
import math

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint
from training.class_vectors import ClassVectors
from training.data.datasets import find_images
from training.distill import DistillConfig, build, distill
from training.runtime import lr_at
from training.towers import load_clip

from conftest import STUDENT, TEACHER


def test_class_vectors_file_round_trip(class_vectors, tiny_weights):
    vectors = ClassVectors.load(class_vectors)
    assert vectors.vectors.shape == (10, 64)
    assert torch.allclose(vectors.vectors.norm(dim=-1), torch.ones(10), atol=1e-5)
    teacher, _ = load_clip(TEACHER, str(tiny_weights["teacher"]))
    assert vectors.logit_scale == pytest.approx(teacher.logit_scale.exp().item())
    assert vectors.classnames[0] == "ankle boot"


def test_class_vectors_file_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a class-vectors file"):
        ClassVectors.load(bad)
    np.savez(tmp_path / "short.npz", vectors=np.zeros((3, 4), np.float32), classnames=np.array(["a"]),
             logit_scale=np.float32(1), meta=np.array("{}"))
    with pytest.raises(ValueError, match="3 vectors for 1 class names"):
        ClassVectors.load(tmp_path / "short.npz")


def _config(tmp_path, tiny_weights, class_vectors, **kw) -> DistillConfig:
    base = dict(
        teacher_model=TEACHER, teacher_pretrained=str(tiny_weights["teacher"]),
        student_model=STUDENT, student_pretrained=str(tiny_weights["student"]),
        class_vectors=str(class_vectors), output_dir=str(tmp_path), epochs=1, batch_size=8,
        lr=0.05, kd_weight=10.0, workers=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def test_only_prompts_and_projector_train(tmp_path, tiny_weights, class_vectors, fmnist, monkeypatch):
    """Run distillation and prove every backbone weight (student and teacher) is bit-identical afterwards."""
    import training.distill as module

    captured = {}
    real_build = module.build

    def spy(cfg):
        captured["parts"] = parts = real_build(cfg)
        captured["before"] = {k: v.clone() for k, v in parts[1].tower.visual.state_dict().items()}
        captured["teacher"] = {k: v.clone() for k, v in parts[2].state_dict().items()}
        captured["prompts"] = parts[1].tower.prompts.detach().clone()
        return parts

    monkeypatch.setattr(module, "build", spy)
    # No weight decay and no warm-up: then only a gradient can move the prompts.
    distill(_config(tmp_path, tiny_weights, class_vectors, weight_decay=0.0, warmup_epochs=0),
            find_images(fmnist / "train")[:32])
    student, teacher = captured["parts"][1], captured["parts"][2]
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"tower.prompts"} | {f"projector.{n}" for n, _ in student.projector.named_parameters()}
    for k, v in student.tower.visual.state_dict().items():
        assert torch.equal(v, captured["before"][k]), k
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, captured["teacher"][k]), k
    moved = (student.tower.prompts - captured["prompts"]).norm() / captured["prompts"].norm()
    assert moved > 1e-3, f"the prompts barely learned ({moved:.2e})"


def test_checkpoint_reloads_the_same_student(tmp_path, distilled, fmnist):
    student, pre, cfg = load_checkpoint(distilled)
    again, _, _ = load_checkpoint(distilled)
    x = torch.randn(4, 3, pre.image_size, pre.image_size)
    with torch.no_grad():
        assert torch.equal(student(x), again(x))
    saved = torch.load(distilled, weights_only=True)
    assert set(saved) == {"format", "config", "epoch", "state"}
    assert cfg["student_model"] == STUDENT and cfg["teacher_dim"] == 64


def test_mismatched_class_vectors_are_refused(tmp_path, tiny_weights):
    wrong = tmp_path / "wrong.npz"
    ClassVectors(torch.nn.functional.normalize(torch.randn(3, 17), dim=-1), ["a", "b", "c"], 10.0, {}).save(wrong)
    with pytest.raises(ValueError, match="17-d"):
        build(_config(tmp_path, tiny_weights, wrong))


def test_schedule_warms_up_then_decays():
    cfg = DistillConfig("t", None, "s", None, "cv", "out", epochs=5, lr=0.1, warmup_epochs=1, warmup_lr=1e-5)
    lrs = [lr_at(e, cfg) for e in range(5)]
    assert lrs[0] == 1e-5 and lrs[1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[4] == pytest.approx(0.05 * (1 + math.cos(math.pi * 3 / 5)))  # Dassl's: T_max 5, count from 0 at epoch 1


def test_class_vectors_must_match_the_split_classes(class_vectors):
    vectors = ClassVectors.load(class_vectors)
    vectors.check_labels(list(vectors.classnames))
    with pytest.raises(ValueError, match="another order"):
        vectors.check_labels(vectors.classnames[::-1])
