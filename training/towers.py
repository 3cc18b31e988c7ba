"""Load CLIP towers through open_clip: built-in names, our tiny test architectures, tags or local files."""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

log = logging.getLogger(__name__)


class TowerLoadError(RuntimeError):
    """A model or its weights could not be loaded; the message says what to do."""


@dataclass
class Preprocess:
    """What an image must look like before the image tower sees it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"


def _is_torchscript(path: Path) -> bool:
    """OpenAI's released `.pt` files are TorchScript archives; open_clip state dicts are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def load_clip(model_name: str, pretrained: str | None = None) -> tuple[nn.Module, Preprocess]:
    """Build an open_clip CLIP model and load its weights.

    `pretrained` is an open_clip tag (e.g. `openai`), a local open_clip checkpoint
    (`.pt`/`.pth`/`.bin`/`.safetensors`), an OpenAI TorchScript `.pt`, or None for random weights.
    """
    name = model_name.replace("/", "-")
    if name not in open_clip.list_models():
        raise TowerLoadError(
            f"unknown model architecture {model_name!r}; open_clip knows: {', '.join(open_clip.list_models())}"
        )
    quick_gelu = False
    path = Path(pretrained) if pretrained else None
    if pretrained and path is not None and path.is_file():
        quick_gelu = _is_torchscript(path)  # every OpenAI CLIP was trained with QuickGELU
        try:
            # A TorchScript archive cannot be read with weights_only; plain state dicts always are.
            model = open_clip.create_model(
                name, pretrained=str(path), force_quick_gelu=quick_gelu, weights_only=not quick_gelu
            )
        except Exception as err:
            raise TowerLoadError(f"could not load weights from {path} into {name}: {err}") from err
    elif pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise TowerLoadError(
                f"{pretrained!r} is neither a local file nor a known open_clip tag for {name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            model = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu)
        except Exception as err:
            raise TowerLoadError(
                f"could not download the {name} weights for tag {pretrained!r} ({err}). Without network access, "
                f"download the checkpoint elsewhere and pass its local path instead of the tag."
            ) from err
    else:
        log.warning("no pretrained weights given for %s: using random weights", name)
        model = open_clip.create_model(name, pretrained=None)
    model.eval()
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return model, Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a module in place: no gradients, eval mode (no dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def tokenizer_for(model_name: str):
    return open_clip.get_tokenizer(model_name.replace("/", "-"))


@torch.no_grad()
def encode_text(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features, batched so thousands of class names fit in memory."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        out.append(nn.functional.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(out)
