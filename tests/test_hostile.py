"""A corpus of hostile uploads, made here, sent to a real uvicorn: every one gets a 4xx with a JSON message,
the server stays healthy, and its peak memory stays bounded (no bomb is ever decoded)."""
import gzip
import io
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import foolbox_jpegs, free_port

REPO = Path(__file__).resolve().parents[1]
UPLOAD_LIMIT = 3_000_000
PIXEL_LIMIT = 20_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def _png_bomb() -> bytes:
    """A real, valid 8000 x 8000 PNG (64 megapixels, ~190 MB decoded) that compresses to a few hundred KB."""
    row = b"\0" + b"\0" * 8000 * 3
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(8000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    buffer = io.BytesIO()
    Image.open(foolbox_jpegs()[0]).save(buffer, "JPEG")  # baseline: its frame header is SOF0
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _text_bomb_png() -> bytes:
    """A small PNG carrying a zTXt chunk that inflates to 100 MB."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    png = buffer.getvalue()
    text = b"Comment\0\0" + zlib.compress(b"A" * 100_000_000, 9)
    end = png.rindex(b"IEND") - 4
    return png[:end] + _png_chunk(b"zTXt", text) + png[end:]


def _corpus() -> dict[str, tuple[bytes, int]]:
    photo = foolbox_jpegs()[1].read_bytes()
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(buffer, "PNG")
    png = buffer.getvalue()
    strip = io.BytesIO()
    Image.new("L", (20_000, 2)).save(strip, "PNG")
    return {
        "zero-byte file": (b"", 400),
        "random bytes": (np.random.default_rng(0).bytes(10_000), 415),
        "HTML named .jpg": (b"<!DOCTYPE html><html><script>alert(1)</script></html>", 415),
        "SVG with an external entity": (b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                                        b'<svg xmlns="http://www.w3.org/2000/svg">&x;</svg>', 415),
        "gzip archive": (gzip.compress(b"x" * 1000), 415),
        "PDF header": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", 415),
        "JPEG cut in half": (photo[: len(photo) // 2], 400),
        "JPEG magic only": (b"\xff\xd8\xff\xe0", 400),
        "PNG cut in half": (png[: len(png) // 2], 400),
        "PNG with a broken CRC": (png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], 400),
        "PNG decompression bomb (8000x8000)": (_png_bomb(), 413),
        "PNG header claiming 100000x100000": (_png_header_only(100_000, 100_000), 413),
        "JPEG header claiming 60000x60000": (_jpeg_with_size(60_000, 60_000), 413),
        "PNG zTXt text bomb": (_text_bomb_png(), 400),
        "20000x2 strip": (strip.getvalue(), 400),
        "file over the upload limit": (photo + b"\0" * UPLOAD_LIMIT, 413),
    }


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc")
def test_hostile_corpus_gets_4xx_and_the_server_stays_healthy_and_small(bundle_dir, capsys):
    port = free_port()
    env = dict(os.environ, PROMPTKD_BUNDLE=str(bundle_dir), PROMPTKD_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
               PROMPTKD_MAX_IMAGE_PIXELS=str(PIXEL_LIMIT), PROMPTKD_MAX_REQUEST_BYTES=str(4 * UPLOAD_LIMIT))
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port)], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(200):
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            good = foolbox_jpegs()[2].read_bytes()
            assert client.post("/classify", files={"file": ("ok.jpg", good)}).status_code == 200
            baseline = _peak_rss_mb(server.pid)
            lines = []
            for _ in range(2):
                lines = []
                for name, (data, expected) in _corpus().items():
                    response = client.post("/classify", files={"file": ("upload.jpg", data, "image/jpeg")})
                    lines.append(f"{name}: {response.status_code}")
                    assert response.status_code == expected, f"{name}: {response.status_code} {response.text}"
                    assert isinstance(response.json()["detail"], str) and response.json()["detail"], name
                    assert client.get("/healthz").status_code == 200, f"unhealthy after {name}"
            body_limit = client.post("/classify", files={"file": ("big.jpg", b"\0" * (5 * UPLOAD_LIMIT))})
            assert body_limit.status_code == 413
            lines.append(f"request body over the limit: {body_limit.status_code}")
            wrong_field = client.post("/classify", files={"image": ("ok.jpg", good)})
            assert wrong_field.status_code == 422
            lines.append(f"wrong form field name: {wrong_field.status_code}")
            assert client.post("/classify", files={"file": ("ok.jpg", good)}).status_code == 200
            peak = _peak_rss_mb(server.pid)
        with capsys.disabled():
            print("\nhostile uploads -> status:\n  " + "\n  ".join(lines))
            print(f"server peak RSS {baseline:.0f} MB before the corpus, {peak:.0f} MB after (x2 passes)")
        assert peak - baseline < 150, "a hostile upload made the server allocate like a decoded bomb"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_ordinary_image_kind_classifies(bundle_dir):
    """CMYK, 16-bit, palette (with transparency), alpha, greyscale, animated and EXIF-rotated images all work."""
    from fastapi.testclient import TestClient

    from server.config import Settings
    from server.main import create_app

    photo = Image.open(foolbox_jpegs()[3]).convert("RGB").resize((96, 64))
    kinds = {}

    def save(name, image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kw)
        kinds[name] = buffer.getvalue()

    save("CMYK JPEG", photo.convert("CMYK"), "JPEG")
    save("16-bit greyscale PNG", Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG")
    save("palette PNG with transparency", photo.convert("P"), "PNG", transparency=0)
    save("RGBA PNG", photo.convert("RGBA"), "PNG")
    save("greyscale+alpha PNG", photo.convert("LA"), "PNG")
    save("greyscale JPEG", photo.convert("L"), "JPEG")
    save("animated GIF", photo.convert("P"), "GIF", save_all=True, append_images=[photo.rotate(90).convert("P")])
    save("animated WebP", photo, "WEBP", save_all=True, append_images=[photo.rotate(90)])
    save("TIFF", photo, "TIFF")
    save("BMP", photo, "BMP")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("EXIF-rotated JPEG", photo, "JPEG", exif=exif)
    with TestClient(create_app(Settings(bundle=bundle_dir))) as client:
        for name, data in kinds.items():
            response = client.post("/classify", files={"file": ("x", data)})
            assert response.status_code == 200, f"{name}: {response.text}"
