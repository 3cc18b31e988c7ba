"""Decode uploads with Pillow and reproduce the training eval transform in numpy, without torch.

Same steps, same order, same float32 arithmetic as training/transforms.py: RGB, shortest side to the input
size (torchvision's rounding), centre crop (torchvision's rounding), /255, (x - mean) / std.

Two deliberate differences from a plain `Image.open(...).convert("RGB")`, both for real-world uploads:
- EXIF orientation is applied, so a phone photo is classified the way it is displayed.
- Large JPEGs are decoded in draft mode (the JPEG decoder's own 1/2, 1/4 or 1/8 scaling) to no less than
  DRAFT_FACTOR x the input size before the exact resize. Decoding a 12-megapixel photo costs a fraction of the
  time and memory; the tensor stays within DRAFT_TOLERANCE (mean absolute difference, in normalised units) of
  the full decode on real photos (about 2 grey levels), which tests/test_preprocess.py measures; a 12-megapixel
  photo bound for a 224px model decodes at half scale.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bundle import InputSpec

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
DRAFT_FACTOR = 4
DRAFT_TOLERANCE = 0.03
MAX_ASPECT = 64  # a 1 x 40-million-pixel strip would otherwise be resized to gigabytes before the crop
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode(data: bytes, max_pixels: int, target_size: int | None = None) -> Image.Image:
    """Bytes to a fully loaded RGB image (the first frame of an animation).

    Refuses empty, unknown, truncated and oversized images. The pixel limit is checked on the header, before
    any pixel is decoded, so a decompression bomb costs nothing. With `target_size`, large JPEGs are decoded
    at a reduced scale that keeps both sides >= DRAFT_FACTOR x target_size."""
    if not data:
        raise ImageError(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            if target_size and image.format == "JPEG":
                image.draft("RGB", (DRAFT_FACTOR * target_size, DRAFT_FACTOR * target_size))
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if _has_image_signature(data):
            raise ImageError(400, "the image header is corrupt or truncated") from None
        raise ImageError(415, "the upload is not an image in a format this server can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, f"image too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(400, f"the image data is truncated or corrupt: {err}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(400, f"image has no pixels ({image.width}x{image.height})")
    return _to_rgb(image)


def _has_image_signature(data: bytes) -> bool:
    """Whether some Pillow decoder claims these leading bytes (a damaged image rather than a non-image)."""
    Image.init()
    prefix = data[:64]
    return any(accept is not None and accept(prefix) for _, accept in Image.OPEN.values())


def _to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB") clips 16-bit greyscale at 255 (a white image); scale it to 8 bits first."""
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(pixels / 257), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shortest(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new_size == image.size else image.resize(new_size, resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        raise ImageError(400, f"image {width}x{height} is too elongated: under {size}px after resizing")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded RGB image to the model's [3, S, S] float32 input."""
    if spec.resize_mode != "shortest":
        raise ValueError(f"resize mode {spec.resize_mode!r} is not supported")
    if max(image.size) > MAX_ASPECT * min(image.size):
        raise ImageError(400, f"image {image.width}x{image.height} is more elongated than {MAX_ASPECT}:1")
    image = center_crop(resize_shortest(image, spec.image_size, _RESAMPLE[spec.interpolation]), spec.image_size)
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1))


def prepare(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """Upload bytes to the model input: decode (draft-scaled when large), resize, crop, normalise."""
    return to_tensor(decode(data, max_pixels, spec.image_size), spec)
