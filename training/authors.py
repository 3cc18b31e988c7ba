"""Import the PromptSRC teacher checkpoints published by PromptKD's authors, so users can skip stage 1.

Their checkpoints (Dassl `model-best.pth.tar` / `model.pth.tar-20`, built on OpenAI's CLIP) hold the whole
prompted CLIP under "state_dict". Only the prompts are learned, laid out as:

    prompt_learner.ctx                                  [N, text width]    text context (input layer)
    text_encoder.transformer.resblocks.{i}.VPT_shallow  [N, text width]    deep text prompts, i >= 1
    image_encoder.VPT                                   [N, image width]   visual prompts (input layer)
    image_encoder.transformer.resblocks.{i}.VPT_shallow [N, image width]   deep visual prompts, i >= 1

Their visual prompts sit after the patch tokens and ours after the class token; with positional embeddings
already added and no attention mask in the image tower, the two orders compute the same features.
"""
from __future__ import annotations

import collections
import pickle
import re
import types
from pathlib import Path

import torch

from .teacher import Teacher, TeacherConfig, build_teacher

# Folder names in the authors' teacher download, per dataset (their spelling, "StandfordCars" included).
RELEASE_FOLDERS = {
    "imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets", "stanford_cars": "StandfordCars",
    "oxford_flowers": "OxfordFlowers", "food101": "Food101", "fgvc_aircraft": "FGVCaircraft", "sun397": "SUN397",
    "dtd": "DescribableTextures", "eurosat": "EuroSAT", "ucf101": "UCF101",
}

_DEEP = re.compile(r"^(text_encoder|image_encoder)\.transformer\.resblocks\.(\d+)\.VPT_shallow$")


def read_prompts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' prompt tensors stacked as this project's [depth, tokens, width] text and visual prompts."""
    for key in ("prompt_learner.ctx", "image_encoder.VPT"):
        if key not in state_dict:
            raise ValueError(f"not a PromptSRC/IVLP teacher checkpoint: no {key!r}")
    deep: dict[str, dict[int, torch.Tensor]] = {"text_encoder": {}, "image_encoder": {}}
    for key, value in state_dict.items():
        match = _DEEP.match(key)
        if match:
            deep[match.group(1)][int(match.group(2))] = value
    stacked = {}
    for name, tower, first in (("text_prompts", "text_encoder", "prompt_learner.ctx"),
                               ("visual_prompts", "image_encoder", "image_encoder.VPT")):
        layers = [state_dict[first]] + [deep[tower][i] for i in sorted(deep[tower])]
        if sorted(deep[tower]) != list(range(1, len(layers))):
            raise ValueError(f"{tower} deep prompts are not contiguous from layer 1: {sorted(deep[tower])}")
        stacked[name] = torch.stack([t.float() for t in layers])
    return stacked


def released_teacher(root: Path, protocol: str, dataset: str) -> Path:
    """Where the authors' download keeps a protocol's teacher: one base-class teacher per dataset for base-to-novel
    (shared by every seed), one all-class ImageNet teacher for cross-dataset."""
    if protocol == "cross_dataset":
        return root / "ImageNet-xd" / "VLPromptLearner_large" / "model.pth.tar-20"
    return root / RELEASE_FOLDERS[dataset] / "VLPromptLearner" / "model-best.pth.tar"


class Opaque:
    """Stands in for every class or function a checkpoint names that is not on the allow-list.

    Dassl's checkpoints pickle whole objects beside the weights: the optimizer and the warm-up scheduler with
    its successor (`dassl.optim.lr_scheduler.ConstantWarmupScheduler`, `torch.optim.lr_scheduler.
    CosineAnnealingLR`, `torch.optim.sgd.SGD`). Loading them for real would need Dassl installed and would run
    whatever callables the file names. An Opaque records its name and arguments and runs nothing.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state) -> None:
        self.state = state

    def append(self, item) -> None:
        self.items.append(item)

    def extend(self, items) -> None:
        self.items.extend(items)

    def __setitem__(self, key, value) -> None:
        self.items.append((key, value))

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


def _allowed_globals() -> dict[tuple[str, str], object]:
    """What a tensor checkpoint needs and nothing more: containers, tensor rebuilders, dtypes, sizes."""
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    }
    for name in dir(torch._utils):
        if name.startswith("_rebuild_"):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})


# torch.load takes a pickle module; this one resolves globals through the allow-list only.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
    __name__="restricted_pickle",
)


def read_checkpoint(path: Path) -> dict:
    """A Dassl checkpoint (`state_dict`, `epoch`, `optimizer`, `scheduler`, `val_result`) read without running
    any code it names: tensors are rebuilt, every other object becomes an inert Opaque."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a checkpoint: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def import_teacher(path: Path, model: str, pretrained: str | None, weights: str | None = None) -> Teacher:
    """Build this project's teacher on `model`/`pretrained` (the CLIP the authors started from) with their prompts."""
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    prompts = read_prompts(state)
    text, visual = prompts["text_prompts"], prompts["visual_prompts"]
    cfg = TeacherConfig(model, pretrained, text_tokens=text.shape[1], text_depth=text.shape[0],
                        visual_tokens=visual.shape[1], visual_depth=visual.shape[0], weights=weights)
    teacher, _ = build_teacher(cfg)
    teacher.load_prompt_state(prompts)
    return teacher.eval()
