"""The datasets this project knows, by name: CoOp's folder layouts and the protocols' dataset lists. Free of torch,
so that results tables and CLIs can name datasets without loading a model stack."""
from __future__ import annotations

# CoOp's folder names: dataset key -> (dataset dir, image dir inside it, split file inside it).
COOP_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": ("food-101", "images", "split_zhou_Food101.json"),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
SPECIAL_DATASETS = ("imagenet", "fgvc_aircraft")
DATASETS = tuple(sorted([*COOP_LAYOUTS, *SPECIAL_DATASETS]))
# The protocols' datasets, in the order of the paper's tables; cross-dataset trains its teacher on ImageNet.
BASE2NOVEL_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                       "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
CROSS_SOURCE = "imagenet"
CROSS_TARGETS = tuple(d for d in BASE2NOVEL_DATASETS if d != CROSS_SOURCE)
