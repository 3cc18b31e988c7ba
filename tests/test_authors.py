"""Import of the authors' released teachers from checkpoints saved exactly as Dassl saves them."""
import sys
import textwrap

import pytest
import torch

from training.authors import Opaque, import_teacher, read_checkpoint
from training.teacher import Teacher, TeacherConfig
from training.towers import load_clip, tokenizer_for

from conftest import TEACHER


# Dassl's warm-up scheduler, written here so the test can pickle one as Dassl does (dassl.optim.lr_scheduler):
# a constant learning rate for the first epochs, then its successor (the cosine schedule) takes over.
DASSL_SCHEDULER = textwrap.dedent('''
    from torch.optim.lr_scheduler import _LRScheduler


    class _BaseWarmupScheduler(_LRScheduler):
        def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1, verbose=False):
            self.successor = successor
            self.warmup_epoch = warmup_epoch
            super().__init__(optimizer, last_epoch)

        def step(self, epoch=None):
            if self.last_epoch >= self.warmup_epoch:
                self.successor.step(epoch)
                self._last_lr = self.successor.get_last_lr()
            else:
                super().step(epoch)


    class ConstantWarmupScheduler(_BaseWarmupScheduler):
        def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1, verbose=False):
            self.cons_lr = cons_lr
            super().__init__(optimizer, successor, warmup_epoch, last_epoch, verbose)

        def get_lr(self):
            if self.last_epoch >= self.warmup_epoch:
                return self.successor.get_last_lr()
            return [self.cons_lr for _ in self.base_lrs]
''')


class WritesAFile:
    """Planted in a checkpoint: unpickling it for real would run `exec` and write `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture
def dassl(tmp_path, monkeypatch):
    """A `dassl` package on sys.path for the duration of the save only, as on the authors' machine."""
    package = tmp_path / "site" / "dassl" / "optim"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "lr_scheduler.py").write_text(DASSL_SCHEDULER)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import dassl.optim.lr_scheduler as module

    yield module
    for name in [n for n in sys.modules if n == "dassl" or n.startswith("dassl.")]:
        del sys.modules[name]


def _authors_model(teacher: Teacher, clip) -> torch.nn.Module:
    """A module whose state_dict has the authors' PromptSRC key layout and dtypes (prompts as Parameters)."""
    model = torch.nn.Module()
    state = {
        "prompt_learner.ctx": teacher.text.prompts[0],
        "image_encoder.VPT": teacher.image.prompts[0],
        "image_encoder.conv1.weight": clip.visual.conv1.weight,
    }
    for i in range(1, teacher.text.prompts.shape[0]):
        state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = teacher.text.prompts[i]
    for i in range(1, teacher.image.prompts.shape[0]):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = teacher.image.prompts[i]
    for key, value in state.items():
        *path, leaf = key.split(".")
        owner = model
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone().half()))
    return model


def _save_like_dassl(model, folder, epoch, dassl_module, extra=None):
    """Dassl's save_model + save_checkpoint: state dict, epoch, optimizer, scheduler (with its successor),
    val_result, written to <output>/VLPromptLearner/model.pth.tar-<epoch> and copied to model-best.pth.tar."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epoch))
    scheduler = dassl_module.ConstantWarmupScheduler(optimizer, cosine, 1, 1e-5)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    state = {"state_dict": model.state_dict(), "epoch": epoch, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "val_result": 81.5, **(extra or {})}
    target = folder / "VLPromptLearner"
    target.mkdir(parents=True)
    torch.save(state, target / f"model.pth.tar-{epoch}")
    (target / "checkpoint").write_text(f"model.pth.tar-{epoch}\n")
    torch.save(state, target / "model-best.pth.tar")
    return target


def test_dassl_checkpoint_imports_without_running_its_pickled_code(tmp_path, tiny_weights, dassl):
    clip, _ = load_clip(TEACHER, str(tiny_weights["teacher"]))
    ours = Teacher(clip, tokenizer_for(TEACHER), TeacherConfig(TEACHER, None, text_depth=3, visual_depth=4))
    with torch.no_grad():
        ours.image.prompts.normal_()
        ours.text.prompts.normal_()
    marker = tmp_path / "pwned.txt"
    folder = _save_like_dassl(_authors_model(ours, clip), tmp_path / "OxfordPets", 20, dassl,
                              extra={"planted": WritesAFile(marker)})
    # The scheduler's successor is a pickled object, as in the authors' files: weights_only refuses the file.
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        torch.load(folder / "model-best.pth.tar", weights_only=True)
    sys.modules.pop("dassl.optim.lr_scheduler")  # the user's machine has no Dassl

    checkpoint = read_checkpoint(folder / "model-best.pth.tar")
    assert not marker.exists(), "a pickled callable ran"
    assert isinstance(checkpoint["planted"], Opaque) and checkpoint["planted"].qualname.endswith(".exec")
    assert checkpoint["epoch"] == 20 and checkpoint["val_result"] == 81.5
    assert isinstance(checkpoint["scheduler"]["successor"], Opaque)
    assert "CosineAnnealingLR" in checkpoint["scheduler"]["successor"].qualname
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] > 0

    for name in ("model-best.pth.tar", "model.pth.tar-20"):
        imported = import_teacher(folder / name, TEACHER, str(tiny_weights["teacher"]))
        assert imported.cfg.text_depth == 3 and imported.cfg.visual_depth == 4
        theirs = checkpoint["state_dict"]
        assert torch.equal(imported.image.prompts[0], theirs["image_encoder.VPT"].float())
        assert torch.equal(imported.image.prompts[3],
                           theirs["image_encoder.transformer.resblocks.3.VPT_shallow"].float())
        assert torch.equal(imported.text.prompts[2], theirs["text_encoder.transformer.resblocks.2.VPT_shallow"].float())
    assert not marker.exists(), "a pickled callable ran"

    # The same plant, loaded the unrestricted way, does run: the check above can fail.
    torch.load(folder / "model-best.pth.tar", weights_only=False)
    assert marker.read_text() == "pwned"


def test_unreadable_checkpoint_has_a_clear_error(tmp_path):
    path = tmp_path / "model-best.pth.tar"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read .* as a checkpoint"):
        read_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a checkpoint dictionary"):
        read_checkpoint(path)
