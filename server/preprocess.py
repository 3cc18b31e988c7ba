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

import contextlib
import io
import os
import threading
import warnings
from contextlib import nullcontext

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bundle import InputSpec

from .budget import MemoryBudget

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
DRAFT_FACTOR = 4
DRAFT_TOLERANCE = 0.03
MAX_ASPECT = 64  # a 1 x 40-million-pixel strip would otherwise be resized to gigabytes before the crop
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # more than 8 bits per sample, one channel
_ROWS = 256  # rows converted at a time, so a wide image never has a second full-size copy in a wider type


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# Bytes per pixel of Pillow's modes, for what decoding an image will cost before it is decoded.
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
               "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_cost(image: Image.Image) -> int:
    """Peak bytes of decoding an opened (header-only) image to the model input: the decoded frame, up to two
    more copies while it is rotated or widened, and the 8-bit grey and RGB images made from it. Measured peaks
    on 4-megapixel images: 11.8 bytes per pixel for 16-bit greyscale, 15.5 for 32-bit (estimated 12 and 18)."""
    return image.width * image.height * (3 * _MODE_BYTES.get(image.mode, 4) + 6)


def open_header(data: bytes, max_pixels: int, target_size: int | None = None,
                formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Read only the image's header: format, size (checked against `max_pixels`) and, for large JPEGs, the
    reduced decoding scale. Nothing is decoded yet, so a decompression bomb costs nothing."""
    if not data:
        raise ImageError(400, "the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(413, f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            if target_size and image.format == "JPEG":
                image.draft("RGB", (DRAFT_FACTOR * target_size, DRAFT_FACTOR * target_size))
            return image
    except ImageError:
        raise
    except UnidentifiedImageError:
        claimed = _claimed_by(data)
        if claimed & set(formats):
            raise ImageError(400, "the image header is corrupt or truncated") from None
        if claimed:
            raise ImageError(415, f"{'/'.join(sorted(claimed))} images are not accepted here; accepted: "
                                  f"{', '.join(formats)}") from None
        raise ImageError(415, "the upload is not an image in a format this server can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, f"image too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(400, f"the image header is corrupt: {err}") from None


def decode(data: bytes, max_pixels: int, target_size: int | None = None,
           formats: tuple[str, ...] = DEFAULT_FORMATS) -> Image.Image:
    """Bytes to a fully loaded RGB image (the first frame of an animation).

    Refuses empty, unknown, truncated and oversized images, and formats outside `formats` (only those Pillow
    decoders are ever tried). The pixel limit is checked on the header, before any pixel is decoded. With
    `target_size`, large JPEGs are decoded at a reduced scale that keeps both sides >= DRAFT_FACTOR x
    target_size."""
    return load(open_header(data, max_pixels, target_size, formats))


def load(image: Image.Image) -> Image.Image:
    """Decode an opened image's pixels (EXIF orientation applied) and make it RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, f"image too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageError(400, f"the image data is truncated or corrupt: {err}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(400, f"image has no pixels ({image.width}x{image.height})")
    return _to_rgb(image)


def _claimed_by(data: bytes) -> set[str]:
    """The formats whose signature these leading bytes carry (a damaged or refused image, not a non-image).
    Only the signature checks run, never a decoder."""
    Image.init()
    prefix = data[:64]
    return {name for name, (_, accept) in Image.OPEN.items() if accept is not None and _accepts(accept, prefix)}


def _accepts(accept, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except Exception:  # a plugin's signature check choking on a short prefix claims nothing
        return False


def _to_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB") clips 16-bit greyscale at 255 (a white image); scale it to 8 bits first, a band
    of rows at a time in integers, so the cost stays ~ pixels x (source bytes + 1) plus one band."""
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image)
        grey = np.empty(pixels.shape, dtype=np.uint8)
        for top in range(0, pixels.shape[0], _ROWS):
            band = pixels[top : top + _ROWS]
            if band.dtype.kind == "f":  # Pillow's F mode: values as they are, clipped to 0..255
                grey[top : top + _ROWS] = np.clip(np.rint(band), 0, 255)
            else:  # 16-bit samples (I;16*, or I holding 16-bit data) to 8 bits: round(v / 257)
                grey[top : top + _ROWS] = (np.clip(band.astype(np.int64), 0, 65535) + 128) // 257
        del pixels
        image = Image.fromarray(grey, "L")
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


def prepare(data: bytes, spec: InputSpec, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS,
            budget: MemoryBudget | None = None) -> np.ndarray:
    """Upload bytes to the model input: decode (draft-scaled when large), resize, crop, normalise.

    With a budget, the decoding's peak memory is reserved from the header before any pixel is decoded; an
    image that does not fit now is refused (OverBudget) rather than decoded."""
    image = open_header(data, max_pixels, spec.image_size, formats)
    with budget.hold(decode_cost(image), "decoding this image") if budget else nullcontext():
        return to_tensor(load(image), spec)


def yield_to_the_engine() -> None:
    """A thread initializer for decoders: they run at a lower priority (nice 10, this thread only, on Linux) than
    the inference threads, whose parallel kernels wait for their slowest thread, so a decode preempting one of them
    costs the whole batch, while a decode delayed by a few milliseconds costs nothing while work is queued."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
