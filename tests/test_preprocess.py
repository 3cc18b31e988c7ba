"""The server's numpy preprocessing must equal the training eval transform (torchvision) on real images."""
import io

import numpy as np
import pytest
from PIL import Image

from bundle import InputSpec
from server.runtime.preprocess import DRAFT_TOLERANCE, ImageError, decode, prepare, to_tensor
from training.data.datasets import find_images
from training.towers import Preprocess
from training.transforms import eval_transform

from conftest import foolbox_jpegs

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _both(path_or_image, size):
    spec = InputSpec(image_size=size, mean=MEAN, std=STD)
    reference = eval_transform(Preprocess(size, MEAN, STD))
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode in ("P", "RGBA", "LA", "I;16") else "JPEG", quality=95)
    ours = to_tensor(decode(buffer.getvalue(), 10**8), spec)
    theirs = reference(Image.open(io.BytesIO(buffer.getvalue()))).numpy()
    return ours, theirs


@pytest.mark.parametrize("size", [224, 32])
def test_real_photos_match_torchvision(size):
    photos = foolbox_jpegs()
    assert len(photos) >= 10
    for path in photos:
        ours, theirs = _both(path, size)
        assert ours.shape == theirs.shape == (3, size, size)
        assert np.abs(ours - theirs).max() <= 1e-6, path.name


def test_fashion_mnist_greyscale_matches(fmnist):
    for path in find_images(fmnist / "test")[:20]:
        with open(path, "rb") as f:
            data = f.read()
        spec = InputSpec(image_size=32, mean=MEAN, std=STD)
        ours = to_tensor(decode(data, 10**8), spec)
        theirs = eval_transform(Preprocess(32, MEAN, STD))(Image.open(path)).numpy()
        assert np.abs(ours - theirs).max() <= 1e-6


def test_palette_alpha_and_non_square_images_match():
    photo = Image.open(foolbox_jpegs()[0]).resize((300, 170))
    for image in (photo.convert("P"), photo.convert("RGBA"), photo.convert("L"), photo.rotate(90, expand=True)):
        ours, theirs = _both(image, 64)
        assert np.abs(ours - theirs).max() <= 1e-6, image.mode


def test_bad_bytes_are_refused_with_a_status():
    with pytest.raises(ImageError) as empty:
        decode(b"", 10**6)
    assert empty.value.status == 400
    with pytest.raises(ImageError) as junk:
        decode(b"<html>not an image</html>", 10**6)
    assert junk.value.status == 415
    data = foolbox_jpegs()[0].read_bytes()
    with pytest.raises(ImageError) as cut:
        decode(data[: len(data) // 2], 10**6)
    assert cut.value.status == 400
    with pytest.raises(ImageError) as big:
        decode(data, 100)
    assert big.value.status == 413


@pytest.mark.parametrize("size", [32, 64, 112])
def test_draft_decoding_of_large_jpegs_stays_within_the_stated_tolerance(size, capsys):
    """Large JPEGs decode at a reduced scale first; on real photos the model input stays close to the exact one."""
    spec = InputSpec(image_size=size, mean=MEAN, std=STD)
    diffs = []
    for path in foolbox_jpegs():
        data = path.read_bytes()
        exact = to_tensor(decode(data, 10**8), spec)
        fast = prepare(data, spec, 10**8)
        diffs.append(np.abs(fast - exact).mean())
    with capsys.disabled():
        print(f"\ndraft decode at {size}px vs full decode on {len(diffs)} real 512px JPEGs: mean abs diff "
              f"{np.mean(diffs):.4f} (worst photo {np.max(diffs):.4f}, tolerance {DRAFT_TOLERANCE})")
    assert max(diffs) <= DRAFT_TOLERANCE


def test_draft_decoding_keeps_enough_resolution():
    image = Image.open(foolbox_jpegs()[0])
    buffer = io.BytesIO()
    image.resize((4000, 3000)).save(buffer, "JPEG")
    assert min(decode(buffer.getvalue(), 10**8, target_size=224).size) >= 4 * 224
    assert decode(buffer.getvalue(), 10**8, target_size=224).size == (2000, 1500)


def test_exif_orientation_is_applied():
    photo = Image.open(foolbox_jpegs()[0]).convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 270 degrees to display
    tagged, plain = io.BytesIO(), io.BytesIO()
    photo.save(tagged, "JPEG", exif=exif, quality=95)
    photo.save(plain, "JPEG", quality=95)
    decoded = decode(tagged.getvalue(), 10**8)
    assert decoded.size == (80, 120)
    expected = np.asarray(decode(plain.getvalue(), 10**8).transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
    assert np.abs(np.asarray(decoded, dtype=np.float32) - expected).max() == 0


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buffer, "PNG")
    decoded = np.asarray(decode(buffer.getvalue(), 10**8))
    assert decoded.shape == (64, 64, 3) and np.array_equal(decoded[..., 0], grey)


def test_extreme_aspect_ratios_are_refused_before_resizing():
    buffer = io.BytesIO()
    Image.new("RGB", (6500, 100)).save(buffer, "PNG")
    with pytest.raises(ImageError, match="more elongated than 64:1") as err:
        prepare(buffer.getvalue(), InputSpec(image_size=32, mean=MEAN, std=STD), 10**8)
    assert err.value.status == 400
