"""Dataset layouts, few-shot sampling and base/novel splits."""
import json
from pathlib import Path

import pytest
from PIL import Image

from training.data.datasets import (
    DatasetError, Split, base_novel, few_shot, find_images, load_coop_split, load_image_folder,
)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


def test_coop_split_file_layout(tmp_path):
    root = tmp_path / "eurosat"
    entries = {
        "train": [["Forest/a.jpg", 1, "Forest"], ["Annual_Crop/b.jpg", 0, "Annual_Crop"]],
        "val": [["Forest/c.jpg", 1, "Forest"]],
        "test": [["River/d.jpg", 2, "River"]],
    }
    root.mkdir()
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
    train = load_coop_split(tmp_path, "eurosat", "train")
    assert train.classnames == ["Annual Crop", "Forest", "River"]  # from every split, by label
    assert train.items[0] == (str(root / "2750" / "Forest" / "a.jpg"), 1)
    assert len(load_coop_split(tmp_path, "eurosat", "test")) == 1


def test_coop_missing_split_file_says_which(tmp_path):
    with pytest.raises(DatasetError, match="split_zhou_OxfordPets.json"):
        load_coop_split(tmp_path, "oxford_pets", "train")


def test_coop_malformed_split_file(tmp_path):
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not a CoOp split file"):
        load_coop_split(tmp_path, "dtd", "train")


def test_imagenet_classnames_and_val_as_test(tmp_path):
    base = tmp_path / "imagenet"
    base.mkdir()
    (base / "classnames.txt").write_text("n01 tench\nn02 goldfish fish\n")
    _image(base / "images" / "val" / "n02" / "x.jpeg")
    _image(base / "images" / "train" / "n01" / "y.jpeg")
    test = load_coop_split(tmp_path, "imagenet", "test")
    assert test.classnames == ["tench", "goldfish fish"]
    assert test.items == [(str(base / "images" / "val" / "n02" / "x.jpeg"), 1)]
    with pytest.raises(DatasetError, match="official val set is the test set"):
        load_coop_split(tmp_path, "imagenet", "val")  # never selection on the test images


def test_fgvc_aircraft_variant_lists(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    base.mkdir()
    (base / "variants.txt").write_text("707-320\nA300B4\n")
    (base / "images_variant_train.txt").write_text("0001 A300B4\n0002 707-320\n")
    split = load_coop_split(tmp_path, "fgvc_aircraft", "train")
    assert split.classnames == ["707-320", "A300B4"]
    assert [y for _, y in split.items] == [1, 0]


def test_image_folder_and_recursive_unlabelled(tmp_path):
    _image(tmp_path / "b_class" / "1.png")
    _image(tmp_path / "a_class" / "deep" / "2.png")
    (tmp_path / "notes.txt").write_text("not an image")
    split = load_image_folder(tmp_path)
    assert split.classnames == ["a class", "b class"]
    assert sorted(y for _, y in split.items) == [0, 1]
    assert len(find_images(tmp_path)) == 2
    with pytest.raises(DatasetError):
        find_images(tmp_path / "missing")


def test_few_shot_is_reproducible_and_bounded():
    split = Split([(f"{c}-{i}", c) for c in range(3) for i in range(10)], ["a", "b", "c"])
    one, again, other = few_shot(split, 4, seed=1), few_shot(split, 4, seed=1), few_shot(split, 4, seed=2)
    assert one.items == again.items
    assert one.items != other.items
    assert [sum(1 for _, y in one.items if y == c) for c in range(3)] == [4, 4, 4]


def test_base_novel_relabels_from_zero():
    split = Split([(str(i), i) for i in range(5)], list("abcde"))
    base, novel = base_novel(split, "base"), base_novel(split, "novel")
    assert base.classnames == ["a", "b", "c"] and [y for _, y in base.items] == [0, 1, 2]
    assert novel.classnames == ["d", "e"] and [y for _, y in novel.items] == [0, 1]
