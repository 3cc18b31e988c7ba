"""Is a data root ready for the protocols? For each CoOp dataset: its split files, every image they name (present
and decodable), counts per split, and exactly what is missing with where to get it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .datasets import COOP_LAYOUTS, DatasetError, load_coop_split

COOP_GUIDE = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
# Where each dataset comes from; CoOp's guide has the split files (split_zhou_*.json) and the exact layout.
SOURCES = {
    "imagenet": "ILSVRC-2012 train and val from https://image-net.org into imagenet/images/{train,val}/<wnid>/, "
                "and CoOp's classnames.txt into imagenet/",
    "caltech101": "101_ObjectCategories.tar.gz from https://data.caltech.edu/records/mzrjq-6wc02 into caltech-101/, "
                  "and split_zhou_Caltech101.json",
    "oxford_pets": "images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ into "
                   "oxford_pets/, and split_zhou_OxfordPets.json",
    "stanford_cars": "cars_train, cars_test and the devkit of Stanford Cars into stanford_cars/, and "
                     "split_zhou_StanfordCars.json",
    "oxford_flowers": "102flowers.tgz, imagelabels.mat and cat_to_name.json from "
                      "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into oxford_flowers/, and "
                      "split_zhou_OxfordFlowers.json",
    "food101": "food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ extracted as "
               "food-101/, and split_zhou_Food101.json",
    "fgvc_aircraft": "fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/; its "
                     "data/ folder becomes fgvc_aircraft/ (images/, variants.txt, images_variant_*.txt)",
    "sun397": "SUN397.tar.gz from https://vision.princeton.edu/projects/2010/SUN/ into sun397/, and "
              "split_zhou_SUN397.json",
    "dtd": "dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ extracted as dtd/, and "
           "split_zhou_DescribableTextures.json",
    "eurosat": "EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT into eurosat/ (folder 2750/), and "
               "split_zhou_EuroSAT.json",
    "ucf101": "CoOp's UCF-101-midframes.zip (one middle frame per video) into ucf101/, and split_zhou_UCF101.json",
}
SHOWN = 5  # missing or unreadable files listed by name per split; the rest are counted


def splits_of(dataset: str) -> tuple[str, ...]:
    """ImageNet has no val split in CoOp's protocol: its official val set is the test set."""
    return ("train", "test") if dataset == "imagenet" else ("train", "val", "test")


@dataclass
class SplitReport:
    images: int = 0
    classes: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


@dataclass
class DatasetReport:
    dataset: str
    splits: dict[str, SplitReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def how_to_get(self) -> str:
        return f"{SOURCES[self.dataset]} (see {COOP_GUIDE})"


def _readable(path: str) -> bool:
    """Decodes the image (at reduced size for JPEGs, which is much cheaper and still reads every block)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))
            image.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def check_dataset(root: Path, dataset: str, decode: bool = True, workers: int = 8) -> DatasetReport:
    """Check one dataset under `root`; never raises for a problem of the data, it reports it."""
    report = DatasetReport(dataset)
    for split in splits_of(dataset):
        try:
            items = load_coop_split(root, dataset, split)
        except DatasetError as err:
            if str(err) not in report.problems:  # a missing split file fails every split alike: say it once
                report.problems.append(str(err))
            continue
        except (OSError, ValueError) as err:
            report.problems.append(f"{split}: cannot read its split file: {err}")
            continue
        paths = [path for path, _ in items.items]
        result = SplitReport(images=len(paths), classes=len({label for _, label in items.items}))
        present = []
        for path in paths:
            (present if Path(path).is_file() else result.missing).append(path)
        if decode:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                result.unreadable = [p for p, ok in zip(present, pool.map(_readable, present)) if not ok]
        report.splits[split] = result
        if not paths:
            report.problems.append(f"{split}: no images")
        absent = sorted(set(range(len(items.classnames))) - {label for _, label in items.items})
        if absent:
            names = [items.classnames[i] for i in absent]
            report.problems.append(f"{split}: no images of {len(absent)} of {len(items.classnames)} classes: "
                                   f"{_first(names)}")
        for kind, names in (("missing", result.missing), ("unreadable", result.unreadable)):
            if names:
                report.problems.append(f"{split}: {len(names)} of {len(paths)} images {kind}: {_first(names)}")
    return report


def _first(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def layout_hint(dataset: str) -> str:
    """Where the checker looked, for the message of a dataset that is absent altogether."""
    if dataset in COOP_LAYOUTS:
        ds_dir, image_dir, split_file = COOP_LAYOUTS[dataset]
        return f"{ds_dir}/{split_file} and the images under {ds_dir}/{image_dir + '/' if image_dir else ''}"
    return {"imagenet": "imagenet/classnames.txt and imagenet/images/{train,val}/",
            "fgvc_aircraft": "fgvc_aircraft/variants.txt, images_variant_*.txt and images/"}[dataset]
