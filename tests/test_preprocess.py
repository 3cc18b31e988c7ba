"""The server's numpy preprocessing must equal the training eval transform (torchvision) on real images."""
import io

import numpy as np
import pytest
from PIL import Image

from bundle import InputSpec
from server.preprocess import ImageError, decode, to_tensor
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
