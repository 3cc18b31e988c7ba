"""Decode uploads with Pillow and reproduce the training eval transform in numpy, without torch.

Same steps, same order, same float32 arithmetic as training/transforms.py: RGB, shortest side to the input
size (torchvision's rounding), centre crop (torchvision's rounding), /255, (x - mean) / std.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from bundle import InputSpec

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes to a fully loaded RGB image; refuses empty, unknown, truncated and oversized images."""
    if not data:
        raise ImageError(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(415, "the upload is not an image in a format this server can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, f"image too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(400, f"the image data is truncated or corrupt: {err}") from None
    return image.convert("RGB")


def resize_shortest(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise ImageError(400, f"image {width}x{height} is smaller than the {size}px crop after resizing")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded RGB image to the model's [3, S, S] float32 input."""
    if spec.resize_mode != "shortest":
        raise ValueError(f"resize mode {spec.resize_mode!r} is not supported")
    image = center_crop(resize_shortest(image, spec.image_size, _RESAMPLE[spec.interpolation]), spec.image_size)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))
