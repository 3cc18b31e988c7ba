"""Decode uploads with Pillow and reproduce the training eval transform in numpy, without torch.

Same steps, same order, same float32 arithmetic as training/transforms.py: RGB, shortest side to the input
size (torchvision's rounding), centre crop (torchvision's rounding), /255, (x - mean) / std.

Three deliberate differences from a plain `Image.open(...).convert("RGB")`, all for real-world uploads:
- EXIF orientation is applied, so a phone photo is classified the way it is displayed.
- Large JPEGs are decoded in draft mode (the JPEG decoder's own 1/2, 1/4 or 1/8 scaling) to no less than
  DRAFT_FACTOR x the input size before the exact resize. Decoding a 12-megapixel photo costs a fraction of the
  time and memory; the tensor stays within DRAFT_TOLERANCE (mean absolute difference, in normalised units) of
  the full decode on real photos (about 2 grey levels), which tests/test_preprocess.py measures; a 12-megapixel
  photo bound for a 224px model decodes at half scale.
- Images of more than 8 bits per sample (16-bit and 32-bit greyscale, float), which convert("RGB") would clip at
  255, are scaled to 8 bits and box-reduced by an integer factor to no less than DRAFT_FACTOR x the input size, a
  band of rows at a time, then resized from exactly the region they cover; a plain 16-bit greyscale PNG is even
  decoded band by band from its compressed data, so its full-size frame never exists (6324 x 6324, a 78 KB file:
  2 MB of memory instead of 420). The tensor stays within a tenth of DRAFT_TOLERANCE of the full decode's, which
  tests/test_decode_memory.py measures.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import nullcontext

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from bundle import InputSpec

from ..budget import MemoryBudget
from ..defaults import DEFAULT_FORMATS

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
DRAFT_FACTOR = 4
DRAFT_TOLERANCE = 0.03
MAX_ASPECT = 64  # a 1 x 40-million-pixel strip would otherwise be resized to gigabytes before the crop
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # more than 8 bits per sample, one channel
# Bytes per pixel Pillow really allocates (Image.new measured): 1 for these, 2 for 16-bit greyscale, 4 for every
# other mode, the three-band and two-band ones (RGB, YCbCr, LA, PA) included.
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_BAND_PIXELS = 1 << 17  # pixels of a wide image narrowed at a time (a band of rows: ~20 rows of a 40 Mpx square)
_BAND_BYTES = 40  # bytes per band pixel alive at once: its compressed, inflated and decoded copies, the integers
_PIECE = 1 << 16  # compressed PNG data read at a time
_SLACK = 2 << 20  # the allocator's rounding, Python objects
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation: the transposition that displays the image upright
_SWAPS = {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE}
_FLIPS_X = {Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
            Image.Transpose.TRANSVERSE}  # transpositions that put the image's last column (after a swap) first
_FLIPS_Y = {Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90,
            Image.Transpose.TRANSVERSE}  # and its last row


class ImageError(ValueError):
    """An upload that cannot be classified; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_cost(image: Image.Image, target_size: int | None = None) -> int:
    """Peak bytes of preparing an opened (header-only) image for a `target_size` model, as Pillow really allocates
    them (_STORAGE), so the budget reflects what decoding costs. A wide image: its frame (none for a streamed 16-bit
    PNG; two while a rotated one is turned upright), one band and the 8-bit image reduced from them. Any other: its
    frame, one more 4-byte image (the RGB conversion, or a rotated copy while the EXIF orientation is applied) unless
    it is RGB and known to be upright, and the resize's first pass. bench/decode_memory.py prints the real peaks;
    tests/test_decode_memory.py checks that this covers them."""
    width, height = image.size
    if image.mode in _WIDE_MODES:
        factor = _reduction(image.size, target_size)
        # Pillow turns a TIFF upright in place as it loads it: two frames for a moment.
        frame = 0 if _streamed(image) else width * height * _STORAGE.get(image.mode, 4) * (1 + (not _upright(image)))
        reduced = 2 * -(-width // factor) * -(-height // factor)  # the 8-bit image and the resize's first pass
        return frame + _band_rows(width, factor) * width * _BAND_BYTES + reduced + _input_cost(image.size, target_size)
    copy = 0 if image.mode == "RGB" and _upright(image) else 4
    resized = _resized(image.size, target_size)
    first_pass = 4 * resized[0] * height if resized else 0
    return width * height * (_STORAGE.get(image.mode, 4) + copy) + first_pass + _input_cost(image.size, target_size)


def _resized(size: tuple[int, int], target_size: int | None) -> tuple[int, int] | None:
    """The size the image is resized to for a `target_size` model; None when it never is (no target size, or refused
    as empty or too elongated)."""
    if not target_size or min(size) < 1 or max(size) > MAX_ASPECT * min(size):
        return None
    return _shortest_size(size, target_size)


def _input_cost(size: tuple[int, int], target_size: int | None) -> int:
    """The image at the model's shortest side (RGB) and the model input made from it (float32 copies), plus the
    allocator's rounding."""
    resized = _resized(size, target_size)
    if not resized:
        return _SLACK
    return 4 * resized[0] * resized[1] + 64 * target_size * target_size + _SLACK


def _upright(image: Image.Image) -> bool:
    """Whether the header says no EXIF rotation applies. For a PNG, only when no metadata chunk follows its pixel
    data: Pillow reads those (EXIF, text, XMP) while decoding."""
    try:
        if image.format != "PNG":
            return image.getexif().get(ExifTags.Base.Orientation, 1) not in _TRANSPOSE
        after = {kind for kind, _ in _png_chunks(image.fp, image.tile[0].offset)}
        if after & {b"eXIf", b"tEXt", b"zTXt", b"iTXt"}:
            return False
        return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1) not in _TRANSPOSE  # PNG's would load
    except Exception:  # unreadable metadata: assume the worst; decoding reports it if it matters
        return False


def _reduction(size: tuple[int, int], target_size: int | None) -> int:
    """The integer factor a wide image is reduced by: the largest that keeps both sides >= DRAFT_FACTOR x
    target_size, as JPEG draft decoding does (1 without a target size)."""
    return max(1, min(size) // (DRAFT_FACTOR * target_size)) if target_size else 1


def _band_rows(width: int, factor: int) -> int:
    """Rows narrowed at a time: about _BAND_PIXELS, a multiple of the reduction factor."""
    return factor * max(1, _BAND_PIXELS // (width * factor))


def _streamed(image: Image.Image) -> bool:
    """A plain 16-bit greyscale PNG (not interlaced, not animated): decoded from its compressed data a band of rows
    at a time, never as a whole frame."""
    return (image.format == "PNG" and image.mode == "I;16" and not image.info.get("interlace")
            and getattr(image, "n_frames", 1) == 1 and len(image.tile) == 1
            and image.tile[0].extents == (0, 0, *image.size))


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
    `target_size`, large JPEGs are decoded at a reduced scale, and large wide images reduced while they are
    narrowed, keeping both sides >= DRAFT_FACTOR x target_size."""
    return load(open_header(data, max_pixels, target_size, formats), target_size)


def load(image: Image.Image, target_size: int | None = None) -> Image.Image:
    """Decode an opened image's pixels (EXIF orientation applied) and make it RGB; wide images are narrowed to 8
    bits (reduced for a `target_size` model) a band at a time."""
    with _decoding():
        if image.mode in _WIDE_MODES:
            image, method = _load_wide(image, _reduction(image.size, target_size))
            image = image if method is None else image.transpose(method)
        else:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: an upright image is not copied
    if image.width < 1 or image.height < 1:
        raise ImageError(400, f"image has no pixels ({image.width}x{image.height})")
    return image if image.mode == "RGB" else image.convert("RGB")


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's and zlib's errors while decoding pixels as ImageErrors: 413 for a bomb, 400 for broken data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(413, f"image too large to decode safely: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as err:
        raise ImageError(400, f"the image data is truncated or corrupt: {err}") from None


def _load_wide(image: Image.Image, factor: int) -> tuple[Image.Image, Image.Transpose | None]:
    """A wide image's pixels narrowed to 8 bits and reduced by `factor` a band of rows at a time, and the
    transposition that turns them upright (EXIF orientation). A plain 16-bit PNG is decoded band by band; other
    images (TIFF) are decoded whole first."""
    rows = _band_rows(image.width, factor)
    if _streamed(image):
        grey = _narrowed(_png_bands(image, rows), image.size, factor)
        orientation = _png_orientation(image)
    else:
        image.load()
        bands = (np.asarray(image.crop((0, top, image.width, min(top + rows, image.height))))
                 for top in range(0, image.height, rows))
        grey = _narrowed(bands, image.size, factor)
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return grey, _TRANSPOSE.get(orientation)


def _narrowed(bands: Iterable[np.ndarray], size: tuple[int, int], factor: int) -> Image.Image:
    """Bands of wide pixels (top to bottom, each a multiple of `factor` rows but the last) to one 8-bit image
    reduced by `factor` (Pillow's box reduction, edges included)."""
    width, height = size
    grey = Image.new("L", (-(-width // factor), -(-height // factor)))
    top = 0
    for band in bands:
        narrow = Image.fromarray(_eight_bits(band))
        narrow = narrow.reduce(factor) if factor > 1 else narrow
        grey.paste(narrow, (0, top))
        top += narrow.height
    return grey


def _eight_bits(pixels: np.ndarray) -> np.ndarray:
    """Pillow's convert("L") clips 16-bit values at 255 (a white image): scale them, round(v / 257), in integers.
    Float (F) values are taken as they are, clipped to 0..255."""
    if pixels.dtype.kind == "f":
        return np.clip(np.nan_to_num(np.rint(pixels)), 0, 255).astype(np.uint8)
    wide = pixels.astype(np.int32)  # 16-bit unsigned (I;16*) or 32-bit signed (I): both fit once clipped
    np.clip(wide, 0, 65535, out=wide)
    wide += 128
    wide //= 257
    return wide.astype(np.uint8)


def _png_bands(image: Image.Image, rows: int) -> Iterator[np.ndarray]:
    """A 16-bit greyscale PNG's pixels, `rows` rows at a time, inflated from its IDAT chunks as they are needed.
    Pillow's own PNG decoder unfilters each band, given first the last row of the band before, unfiltered (filter
    type None), which the filters of the band's first row refer to."""
    width, height = image.size
    row_bytes = 1 + 2 * width
    previous = bytes(row_bytes)  # the row above the first one: zeros, as PNG defines it
    for block in _inflate(_png_idat(image.fp, image.tile[0].offset), rows * row_bytes, height * row_bytes):
        band = Image.frombytes("I;16", (width, len(block) // row_bytes + 1), zlib.compress(previous + block, 0),
                               "zip", "I;16B")
        pixels = np.asarray(band)
        previous = b"\0" + pixels[-1].astype(">u2").tobytes()
        yield pixels[1:]


def _inflate(pieces: Iterator[bytes], block: int, total: int) -> Iterator[bytearray]:
    """The first `total` bytes of a zlib stream given in pieces, `block` bytes at a time (the last block shorter):
    never more than a block inflated at once, however well the data compresses."""
    inflater = zlib.decompressobj()
    pending = b""
    for start in range(0, total, block):
        want, out = min(block, total - start), bytearray()
        while len(out) < want:
            pending = pending or next(pieces, b"")
            if inflater.eof or not pending:
                raise EOFError("image file is truncated")
            out += inflater.decompress(pending, want - len(out))
            pending = inflater.unconsumed_tail
        yield out


def _png_chunks(fp: io.IOBase, offset: int) -> Iterator[tuple[bytes, int]]:
    """Type and length of each PNG chunk from the one whose data starts at `offset` on, the file positioned at the
    chunk's data (read it or not)."""
    position = offset - 8
    while True:
        fp.seek(position)
        header = fp.read(8)
        if len(header) < 8:
            return
        length, kind = struct.unpack(">I4s", header)
        yield kind, length
        if kind == b"IEND":
            return
        position += 12 + length


def _png_idat(fp: io.IOBase, offset: int) -> Iterator[bytes]:
    """The compressed pixel data: the consecutive IDAT chunks from `offset` on, _PIECE bytes at a time (their CRCs
    are not checked, as Pillow does not check them)."""
    for kind, length in _png_chunks(fp, offset):
        if kind != b"IDAT":
            return
        for start in range(0, length, _PIECE):
            yield fp.read(min(_PIECE, length - start))


def _png_orientation(image: Image.Image) -> int:
    """The EXIF orientation of a PNG never loaded by Pillow, which reads an eXIf chunk after the pixel data only
    while loading: that chunk is looked for here."""
    if "exif" not in image.info:
        for kind, length in _png_chunks(image.fp, image.tile[0].offset):
            if kind == b"eXIf":
                image.info["exif"] = image.fp.read(length)
                break
    return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)  # the base method: PNG's would load it


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


def _shortest_size(size: tuple[int, int], target_size: int) -> tuple[int, int]:
    """The size with the shorter side at `target_size` and the aspect kept, with torchvision's rounding."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = target_size, int(target_size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def resize_shortest(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    new_size = _shortest_size(image.size, size)
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
    _check_size(image.size)
    image = center_crop(resize_shortest(image, spec.image_size, _RESAMPLE[spec.interpolation]), spec.image_size)
    rgb = np.asarray(image)
    tensor = np.empty((3, *rgb.shape[:2]), np.float32)
    for channel, (mean, std) in enumerate(zip(spec.mean, spec.std)):
        # (x / 255 - mean) / std in float32, as training computes it, one channel plane at a time and in place:
        # the same values as the whole-array expression, without its temporaries (a quarter of the time).
        plane = tensor[channel]
        np.divide(rgb[:, :, channel], np.float32(255), out=plane, dtype=np.float32)
        plane -= np.float32(mean)
        plane /= np.float32(std)
    return tensor


def prepare(data: bytes, spec: InputSpec, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS,
            budget: MemoryBudget | None = None) -> np.ndarray:
    """Upload bytes to the model input: decode (draft-scaled when large), resize, crop, normalise.

    With a budget, the decoding's peak memory is reserved from the header before any pixel is decoded; an
    image that does not fit now is refused (OverBudget) rather than decoded."""
    image = open_header(data, max_pixels, spec.image_size, formats)
    _check_size(image.size)  # before anything is decoded
    with budget.hold(decode_cost(image, spec.image_size), "decoding this image") if budget else nullcontext():
        return to_tensor(_wide_input(image, spec) if image.mode in _WIDE_MODES else load(image, spec.image_size), spec)


def _check_size(size: tuple[int, int]) -> None:
    """Refuse, before anything is resized, an image with no pixels or more elongated than MAX_ASPECT."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(400, f"image has no pixels ({width}x{height})")
    if max(size) > MAX_ASPECT * min(size):
        raise ImageError(400, f"image {width}x{height} is more elongated than {MAX_ASPECT}:1")


def _wide_input(image: Image.Image, spec: InputSpec) -> Image.Image:
    """A wide image narrowed and reduced a band at a time, turned upright, at the model's shortest side, RGB. The
    reduction's last row and column of boxes are partial (the reduced image reaches a little past the picture), so
    the resize reads exactly the region the picture covers, and its size comes from the full-resolution size: the
    geometry is the full decode's (and without a reduction, the result is)."""
    factor = _reduction(image.size, spec.image_size)
    with _decoding():
        grey, method = _load_wide(image, factor)
    size, extent = image.size, (image.width / factor, image.height / factor)
    if method is not None:
        grey = grey.transpose(method)
        size, extent = (size[::-1], extent[::-1]) if method in _SWAPS else (size, extent)
    left = grey.width - extent[0] if method in _FLIPS_X else 0  # the partial boxes went left
    top = grey.height - extent[1] if method in _FLIPS_Y else 0  # or up
    box = (left, top, left + extent[0], top + extent[1])
    return grey.resize(_shortest_size(size, spec.image_size), _RESAMPLE[spec.interpolation], box=box).convert("RGB")


def yield_to_the_engine() -> None:
    """A thread initializer for decoders: they run at a lower priority (nice 10, this thread only, on Linux) than
    the inference threads, whose parallel kernels wait for their slowest thread, so a decode preempting one of them
    costs the whole batch, while a decode delayed by a few milliseconds costs nothing while work is queued."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
