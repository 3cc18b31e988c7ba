"""The published recipe at real size: ViT-L/14 teacher and ViT-B/16 student (random weights) at 224 px, on a CPU.

Toy towers cannot show a wrong width, depth, parameter count or loss constant; this does, with the published
settings as the code's defaults: one stage-1 step (all PromptSRC terms, template ensemble), class vectors, one
stage-2 step whose gradient is checked against the authors' KD formula recomputed by hand, and the ONNX export
with its parity check.
"""
import copy
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from export.build import build_bundle
from training.checkpoint import build_student, save_checkpoint
from training.class_vectors import PROMPTSRC_TEMPLATES
from training.distill import DistillConfig, kd_step
from training.loss import KDObjective
from training.teacher import TeacherImageEncoder
from training.runtime import Runtime, grad_scaler
from training.teacher_training import Stage1Config, frozen_text_targets, teacher_loss
from training.teacher import Teacher
from training.towers import load_clip, tokenizer_for
from training.transforms import train_transform

from conftest import foolbox_jpegs

pytestmark = pytest.mark.slow

CLASSES = ["goldfish", "tabby cat", "school bus"]


@pytest.fixture(scope="module")
def cpu() -> Runtime:
    return Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def photos():
    return foolbox_jpegs()[:8]  # real ImageNet photos


@pytest.fixture(scope="module")
def teacher_and_vectors(cpu, photos):
    """Stage 1 at real size: one optimisation step with the published defaults, then the class vectors."""
    torch.manual_seed(0)
    clip, pre = load_clip("ViT-L-14", None)
    tokenizer = tokenizer_for("ViT-L-14")
    cfg = Stage1Config(model="ViT-L-14", pretrained=None, output_dir="unused")
    frozen_text = frozen_text_targets(clip, tokenizer, CLASSES, cfg)
    teacher = Teacher(clip, tokenizer, cfg.teacher())
    trainable = {n: p for n, p in teacher.named_parameters() if p.requires_grad}
    transform = train_transform(pre)
    from PIL import Image

    images = torch.stack([transform(Image.open(p)) for p in photos[:2]])
    labels = torch.tensor([0, 2])
    teacher.train()
    loss, parts = teacher_loss(teacher, images, labels, CLASSES, frozen_text, cfg, cpu)
    optimizer = torch.optim.SGD(trainable.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    loss.backward()
    grads = {n: p.grad.norm().item() for n, p in trainable.items()}
    optimizer.step()
    teacher.eval()
    vectors = teacher.class_vectors(CLASSES, source="real-size test")
    return {"teacher": teacher, "pre": pre, "cfg": cfg, "frozen_text": frozen_text, "loss": loss, "parts": parts,
            "trainable": trainable, "before": before, "grads": grads, "vectors": vectors}


def test_stage1_step_at_real_size(teacher_and_vectors):
    t = teacher_and_vectors
    teacher, cfg = t["teacher"], t["cfg"]
    assert len(PROMPTSRC_TEMPLATES) == 60
    assert t["frozen_text"].shape == (len(CLASSES), 768)
    assert torch.allclose(t["frozen_text"].norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)
    assert math.isfinite(t["loss"].item()) and t["loss"].item() > 0
    assert set(t["parts"]) == {"ce", "text_l1", "image_l1", "kl"}
    assert all(math.isfinite(v) and v > 0 for v in t["parts"].values()), t["parts"]
    expected = (t["parts"]["ce"] + 25 * t["parts"]["text_l1"] + 10 * t["parts"]["image_l1"] + 1 * t["parts"]["kl"])
    assert t["loss"].item() == pytest.approx(expected, rel=1e-5)
    # Published shapes: 4 tokens at depth 9 in both towers, text width 768, image width 1024 (ViT-L/14).
    assert tuple(teacher.text.prompts.shape) == (9, 4, 768)
    assert tuple(teacher.image.prompts.shape) == (9, 4, 1024)
    assert set(t["trainable"]) == {"text.prompts", "image.prompts"}
    for name, p in t["trainable"].items():
        assert t["grads"][name] > 0, f"{name} got no gradient"
        decay_only = cfg.lr * cfg.weight_decay * t["before"][name].norm()
        assert (p - t["before"][name]).norm() > 10 * decay_only, f"{name} moved by weight decay alone"
    assert cfg.text_targets == "ensemble" and cfg.selection == "gpa"
    vectors = t["vectors"]
    assert vectors.vectors.shape == (len(CLASSES), 768)
    assert torch.allclose(vectors.vectors.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)


def test_stage2_step_matches_the_authors_formula_and_exports(teacher_and_vectors, cpu, photos, tmp_path):
    t = teacher_and_vectors
    torch.manual_seed(1)
    weights = tmp_path / "vit-b-16.bin"  # the student backbone as a local file, named with its tag (QuickGELU)
    torch.save(load_clip("ViT-B-16", None)[0].state_dict(), weights)
    cfg = DistillConfig(teacher_model="ViT-L-14", teacher_pretrained=None, student_model="ViT-B-16",
                        student_pretrained="openai", student_weights=str(weights),
                        class_vectors=str(tmp_path / "vectors.npz"), output_dir=str(tmp_path / "run"))
    assert (cfg.prompt_tokens, cfg.prompt_depth, cfg.kd_weight, cfg.temperature) == (4, 9, 1000.0, 1.0)
    student, pre = build_student(cfg.student_model, cfg.student_pretrained, 768, cfg.prompt_tokens,
                                 cfg.prompt_depth, cfg.projector_hidden, cfg.student_weights)
    assert pre.image_size == 224
    trainable = [p for p in student.parameters() if p.requires_grad]
    prompts = 9 * 4 * 768
    projector = (512 * 768 + 768) + 2 * 768 + (768 * 768 + 768)  # linear 512->768, BatchNorm, linear 768->768
    assert sum(p.numel() for p in trainable) == prompts + projector  # 1,013,760: "about 1M" in the paper
    teacher = TeacherImageEncoder(t["teacher"].image, pre, t["pre"])
    from PIL import Image

    transform = train_transform(pre)
    # 8 photos: with 2, the projector's BatchNorm maps each channel to about +-1 whatever the features are.
    images = torch.stack([transform(Image.open(p)) for p in photos])
    with torch.no_grad():
        teacher_features = teacher(images)
    assert teacher_features.shape == (len(photos), 768)
    vectors = t["vectors"].vectors
    scale = t["vectors"].logit_scale

    # The authors' trainer, recomputed by hand on a copy: q = scale * normalize(f) @ W.T for both,
    # KL(softmax(q_t / T) || softmax(q_s / T)) summed, times T^2, divided by batch x classes, times KD_WEIGHT.
    reference = copy.deepcopy(student).train()
    reference.tower.visual.eval()
    q_s = scale * F.normalize(reference(images), dim=-1) @ vectors.t()
    q_t = scale * F.normalize(teacher_features, dim=-1) @ vectors.t()
    tau = cfg.temperature
    p_t = torch.softmax(q_t / tau, dim=-1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(q_s / tau, dim=-1))).sum()
    authors = cfg.kd_weight * kl * tau * tau / q_s.numel()
    authors.backward()

    student.train()
    student.tower.visual.eval()
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    objective = KDObjective(vectors, scale, cfg.kd_weight, cfg.temperature)
    loss = kd_step(student, images, teacher_features, objective, optimizer, grad_scaler(cpu, "fp32"), cpu, "fp32")
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(authors.item(), rel=1e-5)
    theirs = [p.grad for p in reference.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    total = torch.cat([g.flatten() for g in theirs]).norm()
    # Relative to the gradient's norm: a per-sample mean ("batchmean") would be off by a factor of 3 here. The
    # first linear layer's bias feeds a BatchNorm, so its true gradient is zero and only rounding is compared.
    assert torch.cat([(p.grad - g).flatten() for p, g in zip(trainable, theirs)]).norm() <= 1e-4 * total
    for p, g in zip(trainable, theirs):
        assert (p.grad - g).norm() <= 1e-4 * g.norm() + 1e-5 * total
    assert student.tower.prompts.grad.norm() > 0 and student.projector.net[0].weight.grad.norm() > 0

    t["vectors"].save(tmp_path / "vectors.npz")
    cfg.teacher_dim = 768
    save_checkpoint(tmp_path / "run" / "student.pt", student, asdict(cfg), 1)
    manifest = build_bundle(tmp_path / "run" / "student.pt", tmp_path / "bundle", [str(p) for p in photos])
    assert manifest.input.image_size == 224 and manifest.feature_dim == 768 and manifest.num_labels == 3
    assert manifest.parity.images == len(photos) and manifest.parity.min_cosine >= 0.9999
    assert manifest.parity.top1_agreement == 1.0

    # The same student as a domain on a shared ViT-B/16 backbone: equal features to the folded graph's.
    from bundle import read_backbone, read_bundle
    from export.domain import build_domain
    from export.parity import load_images, run_graph
    from training.transforms import eval_transform

    done = build_domain(tmp_path / "run" / "student.pt", tmp_path / "models", "real", [str(p) for p in photos])
    domain = read_bundle(done.folder)
    assert domain.manifest.backbone.prompts.width == 768 and domain.manifest.backbone.tower_dim == 512
    assert domain.manifest.parity.min_cosine >= 0.9999 and domain.manifest.parity.top1_agreement == 1.0
    images = load_images([str(p) for p in foolbox_jpegs()], eval_transform(pre)).numpy()
    backbone = read_backbone(tmp_path / "models" / "_backbones" / done.backbone)
    rows = np.broadcast_to(domain.prompts, (len(images), *domain.prompts.shape))
    shared = domain.head(run_graph(backbone.model_path(), images, ["CPUExecutionProvider"], extra=(rows,)))
    folded = run_graph(tmp_path / "bundle" / "student.onnx", images, ["CPUExecutionProvider"])
    assert (shared * folded).sum(axis=1).min() >= 0.99999
