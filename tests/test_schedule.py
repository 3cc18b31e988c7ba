"""The learning-rate schedule is the authors' (Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max =
MAX_EPOCH), WARMUP_RECOUNT on, stepped once after each epoch), epoch by epoch."""
import math
from dataclasses import dataclass

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler

from training.runtime import lr_at

# The published settings (docs/FIDELITY.md, both stages): 20 epochs, SGD lr 0.005, 1 warm-up epoch at 1e-5.
# Epoch e >= 1 runs at 0.5 * 0.005 * (1 + cos(pi * (e - 1) / 20)); epochs counted from 0.
PUBLISHED_LRS = [
    1e-05,                    # 0: warm-up
    0.005,                    # 1: cos(0)
    0.0049692208514878445,    # 2: cos(pi/20)
    0.0048776412907378846,    # 3
    0.00472751631047092,      # 4
    0.0045225424859373685,    # 5: cos(pi/5)
    0.004267766952966369,     # 6: 0.0025 * (1 + sqrt(2)/2)
    0.003969463130731183,     # 7
    0.003634976249348867,     # 8
    0.0032725424859373687,    # 9
    0.0028910861626005773,    # 10
    0.0025,                   # 11: cos(pi/2) = 0, half the lr
    0.0021089138373994237,    # 12
    0.0017274575140626316,    # 13
    0.0013650237506511332,    # 14
    0.0010305368692688174,    # 15
    0.0007322330470336313,    # 16: 0.0025 * (1 - sqrt(2)/2)
    0.00047745751406263163,   # 17
    0.00027248368952908055,   # 18
    0.00012235870926211617,   # 19: cos(pi * 18/20), the last epoch, about 2.4% of the lr
]


@dataclass
class Schedule:
    epochs: int = 20
    lr: float = 0.005
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


def test_the_published_schedule_epoch_by_epoch():
    assert [lr_at(e, Schedule()) for e in range(20)] == pytest.approx(PUBLISHED_LRS, rel=1e-12, abs=0)


def test_the_hand_values_are_what_their_closed_forms_say():
    """The table above, from its exact forms: the test's own numbers are not the code's output copied back."""
    assert PUBLISHED_LRS[6] == pytest.approx(0.0025 * (1 + math.sqrt(2) / 2), rel=1e-12)
    assert PUBLISHED_LRS[16] == pytest.approx(0.0025 * (1 - math.sqrt(2) / 2), rel=1e-12)
    assert PUBLISHED_LRS[5] == pytest.approx(0.0025 * (1 + (1 + math.sqrt(5)) / 4), rel=1e-12)  # cos(pi/5)
    assert PUBLISHED_LRS[19] == pytest.approx(0.0025 * (1 - math.cos(math.pi / 10)), rel=1e-12)
    assert PUBLISHED_LRS[19] == pytest.approx(1.2236e-4, rel=1e-4)


def test_not_the_cosine_over_the_epochs_after_the_warm_up():
    """What this code did before (cosine over epochs - warm-up, so the last epoch ran at 3.4e-5): no longer."""
    old_last = 0.5 * 0.005 * (1 + math.cos(math.pi * 18 / 19))
    assert lr_at(19, Schedule()) != pytest.approx(old_last, rel=1e-3)
    assert lr_at(11, Schedule()) == pytest.approx(0.0025, rel=1e-12)  # halfway is epoch 11, not 10.5


class _ConstantWarmup(LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), line for line but for the `verbose` argument
    recent torch no longer takes."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer, last_epoch)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def _dassl_lrs(cfg: Schedule) -> list[float]:
    """The lr each epoch trains at under Dassl's build_lr_scheduler (WARMUP_RECOUNT: the cosine's own count is
    left at 0), stepped after each epoch as its trainers do (update_lr on the epoch's last batch)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=cfg.lr)
    scheduler = CosineAnnealingLR(optimizer, float(cfg.epochs))
    if cfg.warmup_epochs > 0:
        scheduler = _ConstantWarmup(optimizer, scheduler, cfg.warmup_epochs, cfg.warmup_lr)
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("cfg", [Schedule(), Schedule(epochs=5, lr=0.1, warmup_epochs=2, warmup_lr=1e-3),
                                 Schedule(epochs=40), Schedule(epochs=6, warmup_epochs=0)], ids=repr)
def test_every_epoch_equals_dassl_s_scheduler(cfg):
    assert [lr_at(e, cfg) for e in range(cfg.epochs)] == pytest.approx(_dassl_lrs(cfg), rel=1e-9, abs=0)
