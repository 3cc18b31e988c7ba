"""Image transforms. The eval transform is what the server reproduces without torch: keep them in step."""
from __future__ import annotations

from PIL import Image
from torchvision import transforms as T

from .towers import Preprocess

_MODES = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
# Dassl's default INPUT.RRCROP_SCALE, which the authors' configs of both stages keep.
CROP_SCALE = (0.08, 1.0)


def _rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def eval_transform(pre: Preprocess) -> T.Compose:
    """RGB, shortest side to the input size, centre crop, [0, 1], normalise (CLIP's eval pipeline).

    RGB comes first: resizing a palette image in place would fall back to nearest-neighbour sampling.
    """
    if pre.resize_mode != "shortest":
        raise ValueError(f"resize mode {pre.resize_mode!r} is not supported yet; only 'shortest'")
    return T.Compose([
        _rgb,
        T.Resize(pre.image_size, interpolation=_MODES[pre.interpolation]),
        T.CenterCrop(pre.image_size),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def train_transform(pre: Preprocess, crop_scale: tuple[float, float] = CROP_SCALE) -> T.Compose:
    """Random resized crop (area fraction in `crop_scale`) and horizontal flip, as both published stages."""
    return T.Compose([
        _rgb,
        T.RandomResizedCrop(pre.image_size, scale=crop_scale, interpolation=_MODES[pre.interpolation]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])
