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


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _tag_cfg(name: str, tag: str) -> dict:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise TowerLoadError(
            f"{tag!r} is neither a local file nor a known open_clip tag for {name} (tags: {', '.join(tags) or 'none'})"
        )
    return cfg


def _quick_gelu_tags(name: str) -> list[str]:
    """The open_clip tags of this architecture whose weights were trained with QuickGELU (OpenAI's among them)."""
    return [t for t in open_clip.list_pretrained_tags_by_model(name)
            if open_clip.get_pretrained_cfg(name, t).get("quick_gelu")]


def _activation_for_file(name: str, path: Path, torchscript: bool, tag_cfg: dict | None) -> bool:
    """Whether weights from a local file need QuickGELU; refuse when that cannot be known.

    A state dict does not say which activation it was trained with: OpenAI's weights (QuickGELU) and LAION's
    (GELU) have the same keys. Loaded into the wrong one, every feature is wrong and nothing fails. So the
    activation comes from OpenAI's TorchScript format, from the tag the file was downloaded for, or from a
    `-quickgelu` architecture; a plain file for an architecture that has QuickGELU weights is refused.
    """
    if torchscript:
        return True  # OpenAI's own release format: every OpenAI CLIP was trained with QuickGELU
    if tag_cfg is not None:
        return bool(tag_cfg.get("quick_gelu", False))
    if (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return False  # the architecture itself is built with QuickGELU
    ambiguous = _quick_gelu_tags(name)
    if ambiguous:
        raise TowerLoadError(
            f"{path} is a state dict for {name}, an architecture whose weights come with QuickGELU "
            f"({', '.join(ambiguous)}) or GELU (others), and the file cannot say which. Name the tag it was "
            f"downloaded for together with the file, e.g. pretrained 'openai' and weights '{path}' "
            f"(--teacher-pretrained openai --teacher-weights {path}), or use the '{name}-quickgelu' architecture."
        )
    return False


def load_clip(
    model_name: str, pretrained: str | None = None, weights: str | None = None
) -> tuple[nn.Module, Preprocess]:
    """Build an open_clip CLIP model and load its weights.

    `pretrained` is an open_clip tag (e.g. `openai`), a local checkpoint (open_clip state dict
    `.pt`/`.pth`/`.bin`/`.safetensors`, or an OpenAI TorchScript `.pt`), or None for random weights.
    `weights` is a local file loaded instead of downloading the tag: the tag then gives the architecture's
    settings (QuickGELU for `openai`), the file the numbers.
    """
    name = model_name.replace("/", "-")
    if name not in open_clip.list_models():
        raise TowerLoadError(
            f"unknown model architecture {model_name!r}; open_clip knows: {', '.join(open_clip.list_models())}"
        )
    tag = pretrained
    if weights is not None:
        if pretrained and Path(pretrained).is_file():
            raise TowerLoadError(f"both {pretrained} and {weights} are files: give the tag the weights file was "
                                 f"downloaded for (e.g. 'openai'), or the file alone")
        file: Path | None = Path(weights)
        if not file.is_file():
            raise TowerLoadError(f"weights file {weights} does not exist")
    else:
        file = Path(pretrained) if pretrained and Path(pretrained).is_file() else None
        tag = None if file is not None else pretrained
    tag_cfg = _tag_cfg(name, tag) if tag else None
    if file is not None:
        torchscript = _is_torchscript(file)
        quick_gelu = _activation_for_file(name, file, torchscript, tag_cfg)
        # The tag's preprocessing (mean, std, interpolation) belongs to its weights, wherever they were read from.
        preprocess = {k: v for k, v in tag_cfg.items() if k in _PREPROCESS_KEYS} if tag_cfg else None
        try:
            # A TorchScript archive cannot be read with weights_only; plain state dicts always are.
            model = open_clip.create_model(
                name, pretrained=str(file), force_quick_gelu=quick_gelu, weights_only=not torchscript,
                force_preprocess_cfg=preprocess,
            )
        except Exception as err:
            raise TowerLoadError(f"could not load weights from {file} into {name}: {err}") from err
    elif tag_cfg is not None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        try:
            model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
        except Exception as err:
            raise TowerLoadError(
                f"could not download the {name} weights for tag {tag!r} ({err}). Without network access, "
                f"download the checkpoint elsewhere and pass it as the weights file beside the tag "
                f"(--teacher-pretrained {tag} --teacher-weights FILE)."
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
def encode_text(
    model: nn.Module, tokenizer, texts: list[str], batch_size: int = 256, normalize: bool = True
) -> torch.Tensor:
    """Text features (L2-normalised unless asked not to), batched so thousands of class names fit in memory."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i : i + batch_size]).to(device)
        features = model.encode_text(tokens).float()
        out.append(nn.functional.normalize(features, dim=-1) if normalize else features)
    return torch.cat(out)
