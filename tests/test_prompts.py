"""Deep visual prompts on open_clip towers, the projector, and the distillation loss."""
import copy

import pytest
import torch
from open_clip.transformer import Transformer

from training.loss import kd_loss
from training.prompts import PromptedVisionTower
from training.student import Projector, Student
from training.towers import load_clip


@pytest.fixture(scope="module")
def visual():
    torch.manual_seed(0)
    model, _ = load_clip("PKD-Tiny-Student", None)
    return model.visual.eval()


def test_zero_prompts_reproduce_open_clip_forward(visual):
    """With no prompt tokens our forward must be open_clip's own forward, to float precision."""
    x = torch.randn(3, 3, 32, 32)
    tower = PromptedVisionTower(visual, num_tokens=0, depth=9)
    assert torch.allclose(tower(x), visual(x), atol=1e-5)


def test_sequence_first_transformer_gives_the_same_result(visual):
    x = torch.randn(2, 3, 32, 32)
    seq_first = copy.deepcopy(visual)
    old = visual.transformer
    seq_first.transformer = Transformer(old.width, old.layers, old.resblocks[0].attn.num_heads, 4.0,
                                        batch_first=False)
    seq_first.transformer.load_state_dict(old.state_dict())
    a = PromptedVisionTower(visual, 4, 9)
    b = PromptedVisionTower(seq_first, 4, 9)
    b.prompts.data.copy_(a.prompts.data)
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_depth_is_clamped_and_prompts_change_the_output(visual):
    tower = PromptedVisionTower(visual, num_tokens=4, depth=9)
    assert tower.depth == len(visual.transformer.resblocks) == 4
    assert tower.prompts.shape == (4, 4, 64)
    x = torch.randn(2, 3, 32, 32)
    before = tower(x)
    with torch.no_grad():
        # A random change: a uniform shift of every channel would be removed by the block's pre-norm LayerNorm.
        tower.prompts[2] += torch.randn_like(tower.prompts[2])  # a deep (not input) prompt
    assert (tower(x) - before).abs().max() > 1e-2 * before.abs().max()
    with torch.no_grad():
        tower.prompts[3] += 1.0  # the uniform shift: pre-norm removes it, so only float noise remains
    moved = tower(x)
    with torch.no_grad():
        tower.prompts[3] -= 1.0
    assert (moved - tower(x)).abs().max() < 1e-3 * before.abs().max()


def test_student_output_is_normalised_and_checkpoint_holds_only_trained_state(visual):
    student = Student(PromptedVisionTower(visual, 4, 2), Projector(48, 64)).eval()
    out = student(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    keys = set(student.trainable_state())
    assert "prompts" in keys and all(k == "prompts" or k.startswith("projector.") for k in keys)
    assert not any("visual" in k for k in keys)


def test_kd_loss_is_the_authors_mean_over_logits():
    """tau^2 * sum(KL) / (batch * classes), as PromptKD's trainer computes it, recomputed by hand."""
    torch.manual_seed(0)
    for batch, classes, tau in ((4, 10, 2.0), (3, 37, 1.0), (2, 1000, 0.5)):
        s, t = torch.randn(batch, classes) * 5, torch.randn(batch, classes) * 5
        p_t = torch.exp(t / tau) / torch.exp(t / tau).sum(-1, keepdim=True)
        log_p_s = s / tau - torch.logsumexp(s / tau, -1, keepdim=True)
        manual = tau**2 * (p_t * (p_t.log() - log_p_s)).sum() / (batch * classes)
        assert torch.allclose(kd_loss(s, t, tau), manual, atol=1e-6, rtol=1e-6)
        per_sample_mean = manual * classes  # the "batchmean" form the published weights were NOT tuned for
        assert not torch.allclose(kd_loss(s, t, tau), per_sample_mean)
    assert kd_loss(t, t).abs() < 1e-6
