"""Deep visual prompts on open_clip towers, the projector, and the distillation loss."""
import copy

import pytest
import torch
from open_clip.transformer import Transformer
from torch.nn import functional as F

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
        tower.prompts[2] += 1.0  # a deep (not input) prompt
    assert not torch.allclose(before, tower(x))


def test_student_output_is_normalised_and_checkpoint_holds_only_trained_state(visual):
    student = Student(PromptedVisionTower(visual, 4, 2), Projector(48, 64)).eval()
    out = student(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 64)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    keys = set(student.trainable_state())
    assert "prompts" in keys and all(k == "prompts" or k.startswith("projector.") for k in keys)
    assert not any("visual" in k for k in keys)


def test_kd_loss_matches_the_formula():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    tau = 2.0
    p_t = F.softmax(t / tau, -1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2
    assert torch.allclose(kd_loss(s, t, tau), manual, atol=1e-6)
    assert kd_loss(t, t).abs() < 1e-6
