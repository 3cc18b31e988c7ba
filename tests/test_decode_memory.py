"""Decoding memory: what the budget is charged covers what Pillow really allocates, one 16-bit PNG at the pixel
limit costs well under 100 MB (not 420), and the streamed 16-bit PNG decoder reads every PNG filter exactly."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle import InputSpec
from server.runtime.preprocess import DRAFT_TOLERANCE, ImageError, decode, prepare, to_tensor

from bench.decode_memory import measure, saved as _saved
from conftest import foolbox_jpegs

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MIB = 1 << 20
needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from /proc")


def _charged_and_peak(data: bytes, warm_up: bytes) -> tuple[int, int]:
    """Budget charged and peak RSS increase of preparing `data` for a 224px model, in a fresh process."""
    result = measure(data, warm_up, 224)
    return result["charged"], result["peak"]


def _rotated(exif_orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    return exif.tobytes()


@needs_proc
def test_one_sixteen_bit_png_at_the_pixel_limit_costs_well_under_100_mb(capsys):
    """6324 x 6324 16-bit greyscale (40 Mpx, the default limit) compresses to 78 KB; it used to cost 420 MB."""
    data = _saved(Image.new("I;16", (6324, 6324)), "PNG")
    charged, peak = _charged_and_peak(data, _saved(Image.new("I;16", (300, 300)), "PNG"))
    with capsys.disabled():
        print(f"\n6324x6324 16-bit PNG of {len(data):,} bytes: peak RSS +{peak / MIB:.1f} MiB, "
              f"charged {charged / MIB:.1f} MiB")
    assert peak < 100 * MIB
    assert peak <= charged < 100 * MIB  # four in one request take well under half the default 1 GiB budget


KINDS = {  # name: (mode, size, format, save options)
    "16-bit greyscale PNG": ("I;16", (2000, 2000), "PNG", {}),
    "16-bit greyscale PNG, rotated": ("I;16", (2000, 2000), "PNG", {"exif": _rotated(6)}),
    "16-bit greyscale TIFF": ("I;16", (2000, 2000), "TIFF", {}),
    "32-bit integer TIFF": ("I", (2000, 2000), "TIFF", {}),
    "32-bit float TIFF, rotated": ("F", (2000, 2000), "TIFF", {"exif": _rotated(6)}),
    "RGBA PNG": ("RGBA", (2000, 2000), "PNG", {}),
    "RGB PNG": ("RGB", (2000, 2000), "PNG", {}),
    "RGB PNG, rotated": ("RGB", (2000, 2000), "PNG", {"exif": _rotated(8)}),
    "greyscale PNG": ("L", (2000, 2000), "PNG", {}),
    "RGB JPEG, rotated": ("RGB", (1000, 700), "JPEG", {"exif": _rotated(6)}),
}


@needs_proc
@pytest.mark.parametrize("kind", KINDS)
def test_the_budget_charge_covers_the_real_peak_and_stays_near_it(kind):
    """What the budget is charged, from the header, is at least what preparing the image really allocates: Pillow's
    real bytes per pixel (RGB and two-band modes take 4, 16-bit greyscale 2), rotations and conversions included;
    and not much more, so the budget admits what the memory can hold (it charged 1.5x an RGBA PNG's peak)."""
    mode, size, fmt, options = KINDS[kind]
    data, warm_up = _saved(Image.new(mode, size), fmt, **options), _saved(Image.new(mode, (64, 64)), fmt)
    charged, peak = _charged_and_peak(data, warm_up)
    figures = f"{kind}: charged {charged / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB"
    assert peak <= charged, figures
    assert charged <= 1.2 * peak + 12 * MIB, figures  # 12 MiB: the model input, one band, the allocator


def _filtered_png16(pixels: np.ndarray, exif: bytes | None = None) -> bytes:
    """A 16-bit greyscale PNG whose rows use the five PNG filters in turn, its data split over several IDAT chunks
    (Pillow's encoder picks its own filters and writes one chunk)."""
    height, width = pixels.shape
    raw = pixels.astype(">u2").view(np.uint8).reshape(height, width * 2).astype(np.int32)
    prior, rows = np.zeros(width * 2, np.int32), []
    for y, row in enumerate(raw):
        left = np.concatenate([[0, 0], row[:-2]])
        upper_left = np.concatenate([[0, 0], prior[:-2]])
        estimate = left + prior - upper_left
        far_left, far_up, far_diag = np.abs(estimate - left), np.abs(estimate - prior), np.abs(estimate - upper_left)
        paeth = np.where((far_left <= far_up) & (far_left <= far_diag), left,
                         np.where(far_up <= far_diag, prior, upper_left))
        predicted = (0, left, prior, (left + prior) // 2, paeth)[y % 5]
        rows.append(bytes([y % 5]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
        prior = row
    compressed = zlib.compress(b"".join(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = b"".join(chunk(b"IDAT", compressed[at : at + 5000]) for at in range(0, len(compressed), 5000))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)) + idat
            + (chunk(b"eXIf", exif[6:]) if exif else b"") + chunk(b"IEND", b""))


def test_streamed_sixteen_bit_png_rows_equal_pillows_full_decode():
    """Every filter, band boundaries, several IDAT chunks, and an EXIF orientation after the pixel data."""
    pixels = np.random.default_rng(0).integers(0, 65536, (1001, 301), dtype=np.uint16)
    pixels[:100] = np.linspace(0, 65535, 301, dtype=np.uint16)  # smooth rows too, where filters matter most
    data = _filtered_png16(pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)  # the test file is a valid PNG
    expected = ((pixels.astype(np.int64) + 128) // 257).astype(np.uint8)
    decoded = np.asarray(decode(data, 10**8))
    assert decoded.shape == (1001, 301, 3) and np.array_equal(decoded[..., 1], expected)
    for orientation, upright in ((2, np.fliplr(expected)), (6, np.rot90(expected, -1))):
        rotated = np.asarray(decode(_filtered_png16(pixels, exif=_rotated(orientation)), 10**8))
        assert np.array_equal(rotated[..., 0], upright), orientation


def test_broken_sixteen_bit_pngs_are_refused_with_400():
    data = _filtered_png16(np.random.default_rng(1).integers(0, 65536, (400, 300), dtype=np.uint16))
    start = data.index(b"IDAT") + 4
    rows = bytearray(zlib.decompress(b"".join(_idat_payloads(data))))
    rows[(300 * 2 + 1) * 7] = 9  # row 7's filter type; there are five
    broken = {"truncated": data[: len(data) // 2], "not zlib": data[:start] + b"\0" * 200 + data[start + 200 :],
              "unknown filter": _replace_idat(data, zlib.compress(bytes(rows)))}
    for name, bad in broken.items():
        with pytest.raises(ImageError) as err:
            prepare(bad, InputSpec(image_size=32, mean=MEAN, std=STD), 10**8)
        assert err.value.status == 400, name


def _idat_payloads(png: bytes) -> list[bytes]:
    at, payloads = 8, []
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at : at + 8])
        if kind == b"IDAT":
            payloads.append(png[at + 8 : at + 8 + length])
        at += 12 + length
    return payloads


def _replace_idat(png: bytes, compressed: bytes) -> bytes:
    first = png.index(b"IDAT") - 4
    end = png.index(b"IEND") - 4
    return (png[:first] + struct.pack(">I", len(compressed)) + b"IDAT" + compressed
            + struct.pack(">I", zlib.crc32(b"IDAT" + compressed)) + png[end:])


def test_large_wide_images_are_reduced_close_to_the_exact_decode(capsys):
    """A large 16-bit image is narrowed and box-reduced a band at a time to no less than DRAFT_FACTOR x the input
    size before the exact resize (like JPEG draft decoding), upright or rotated; the model input stays within
    DRAFT_TOLERANCE of the full decode's (measured: about 0.003, a tenth of it)."""
    diffs: dict[int, list[float]] = {32: [], 112: [], 224: []}
    kinds = (("PNG", {}), ("TIFF", {}), ("PNG", {"exif": _rotated(2)}), ("PNG", {"exif": _rotated(6)}),
             ("TIFF", {"exif": _rotated(8)}))
    for path, (fmt, options) in zip(foolbox_jpegs(), kinds):
        grey = Image.open(path).convert("L").resize((2399, 1801), Image.Resampling.BICUBIC)  # partial boxes
        data = _saved(Image.fromarray(np.asarray(grey, np.uint16) * 257), fmt, **options)
        exact = decode(data, 10**8)  # no target size: decoded at full size, as before
        for size, found in diffs.items():
            spec = InputSpec(image_size=size, mean=MEAN, std=STD)
            found.append(np.abs(prepare(data, spec, 10**8) - to_tensor(exact, spec)).mean())
    with capsys.disabled():
        for size, found in diffs.items():
            print(f"\nreduced vs full decode of 2399x1801 16-bit photos at {size}px: mean abs diff "
                  f"{np.mean(found):.4f} (worst {np.max(found):.4f}, tolerance {DRAFT_TOLERANCE})", end="")
    assert max(max(found) for found in diffs.values()) <= DRAFT_TOLERANCE


def test_small_wide_images_decode_exactly_as_before():
    """Below DRAFT_FACTOR x the input size nothing is reduced: the tensor equals narrowing the full decode, turned
    upright first when the image is rotated."""
    spec = InputSpec(image_size=64, mean=MEAN, std=STD)
    grey = np.asarray(Image.open(foolbox_jpegs()[0]).convert("L").resize((300, 200)), np.uint16)
    expected = Image.fromarray(grey.astype(np.uint8))
    for mode, pixels in (("I;16", grey * 257), ("I", grey.astype(np.int32) * 257), ("F", grey.astype(np.float32))):
        data = _saved(Image.fromarray(pixels), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == mode
        assert np.array_equal(prepare(data, spec, 10**8), to_tensor(expected.convert("RGB"), spec)), mode
    for orientation, method in ((2, Image.Transpose.FLIP_LEFT_RIGHT), (6, Image.Transpose.ROTATE_270)):
        data = _saved(Image.fromarray(grey * 257), "PNG", exif=_rotated(orientation))
        upright = to_tensor(expected.transpose(method).convert("RGB"), spec)
        assert np.array_equal(prepare(data, spec, 10**8), upright), orientation
