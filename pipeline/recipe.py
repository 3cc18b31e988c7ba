"""The recipe: one YAML file that says everything a run needs, from data to bundle, checked whole before any work.

Every mistake is reported at once with its field path (pydantic). Relative paths are relative to the folder the
command runs in, as on a command line; `~` and $VAR / ${VAR} in a path are expanded here, once, so that every step
sees the same folder (an unset variable is refused). The file and `--set` values are read by one bounded YAML
reader (size, nesting, no anchors), so no value of either ends in a traceback. Defaults are the training commands'
(tests/test_pipeline.py keeps them equal): the published PromptKD settings, except that stage 2 keeps its last
epoch unless `selection: best_val` (published; the paper recipes set it).
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, DirectoryPath, Field, FilePath, PositiveFloat,
    ValidationError, ValidationInfo, field_validator, model_validator,
)

from bundle.files import NotARegularFile, load_yaml, read_small
from bundle.manifest import MODEL_NAME
from server.loop.rollout import RolloutConfig
from training.data.fashion_mnist import CLASSNAMES as FASHION_MNIST_CLASSES
from training.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from training.data.names import DATASETS

STAND_IN = "stand-in"  # a tower's `pretrained` value: weights made here by pretrain-tiny (demos, tests)
VARIANTS = ("optimized", "int8", "int8_vnni", "fp16")
# The run folder's own subfolders (steps.py writes them); a bundle may not go there.
STEP_FOLDERS = ("data", "weights", "stage1", "class_vectors", "teacher_cache", "stage2", "evaluate", "gate")
RUN_FILES = ("pipeline_state.json", "metrics.jsonl", "recipe.yaml", "curves.png")  # the run's own records
MAX_COUNT = 10**9  # epochs, images, tokens, batch sizes: far past any run, short of overflowing a float or a tensor
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few KB; a file (or a device) past this is not one
MAX_RECIPE_DEPTH = 16  # nesting of mappings and lists, in the file, in a --set value, and of a --set key; recipes use 4


class RecipeError(ValueError):
    """The recipe cannot be read or is invalid; the message lists every problem with its field path."""


def _known_model(name: str) -> str:
    import open_clip

    import training.towers  # noqa: F401  (registers this project's tiny architectures with open_clip)

    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (open_clip.list_models() lists them)"
        raise ValueError(f"unknown open_clip model {name!r}{hint}")
    return name


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _expand(value: object) -> object:
    """`~` and $VAR / ${VAR} expanded, as a shell would on a command line but does not in a YAML file or after
    `--set KEY=`; a variable left unset is refused rather than becoming a folder named after it."""
    if not isinstance(value, (str, Path)):
        return value
    text = str(value)
    if "${" in text and "}" not in text.split("${", 1)[1]:
        raise ValueError("a ${ is not closed")
    for match in re.finditer(r"\$(\w+)|\$\{([^}]*)\}", text):  # checked before expanding: a value may hold a $
        if (match.group(1) or match.group(2)) not in os.environ:
            raise ValueError(f"environment variable {match.group()} is not set")
    text = os.path.expandvars(os.path.expanduser(text))
    if text.startswith("~"):
        raise ValueError(f"{text.split('/')[0]} names no user here")
    return text


def full_batches(images: int, batch_size: int, setting: str, counted: str = "") -> None:
    """Refuse a batch larger than the images it is drawn from: training keeps full batches only, so it would
    train nothing (or fail deep inside with a message that names no setting). `check` calls it where the count is
    known from the recipe (`counted` says how), each training step with the images it found."""
    if batch_size > images:
        raise ValueError(f"{setting} {batch_size} is more than the {images} images it trains on{counted}: lower it "
                         "or give more images")


def _not_a_file(path: Path) -> Path:
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{path} is a link to nothing")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    return path


PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ModelName = Annotated[str, AfterValidator(_known_model)]
Fraction = Annotated[float, AfterValidator(_fraction)]
Expanded = BeforeValidator(_expand)  # on every path (and on `pretrained`, which may be a file)
AnyPath = Annotated[Path, Expanded]
File = Annotated[FilePath, Expanded]
Folder = Annotated[DirectoryPath, Expanded]


class Section(BaseModel):
    # allow_inf_nan: an infinite learning rate, KD weight or weight decay passes any bound and trains nothing
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Tower(Section):
    model: ModelName
    pretrained: Annotated[str, Expanded] = Field("openai",
                                                 description="open_clip tag, local checkpoint file, or 'stand-in'")
    weights: File | None = Field(None, description="local file holding the weights of the `pretrained` tag")

    @field_validator("pretrained")
    @classmethod
    def _pretrained_exists(cls, value: str, info: ValidationInfo) -> str:
        import open_clip

        model = info.data.get("model")  # absent when the model itself was refused
        if value == STAND_IN or Path(value).is_file() or model is None:
            return value
        if not open_clip.get_pretrained_cfg(model, value):
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise ValueError(f"{value!r} is neither a file nor an open_clip tag for {model} "
                             f"(tags: {', '.join(tags) or 'none'}; or {STAND_IN!r} for demo weights)")
        return value


class StandIn(Section):
    """Stand-in CLIP weights trained here on the labelled data, for machines where no pretrained CLIP can be had."""

    epochs: PositiveInt = 10
    lr: PositiveFloat = 2e-3
    batch_size: PositiveInt = 64


class CoOp(Section):
    root: Folder
    dataset: Literal[DATASETS]  # type: ignore[valid-type]


class FashionMNIST(Section):
    """Demo data: Fashion-MNIST photos (Debian's dataset-fashion-mnist) written to <workdir>/data as labelled
    folders."""

    train_per_class: PositiveInt = 400
    test_per_class: PositiveInt = 50
    seed: Seed = 0
    source: Folder = Field(FASHION_MNIST_ROOT, validate_default=True)


class Data(Section):
    """Exactly one labelled source: a CoOp dataset, a folder <image_folder>/<split>/<class>/<image>, or the demo
    photos."""

    coop: CoOp | None = None
    image_folder: Folder | None = None
    fashion_mnist: FashionMNIST | None = None
    unlabelled: Folder | None = Field(
        None, description="stage 2's images, searched recursively (default: the labelled train split)")
    classnames: File | None = Field(
        None, description="one class name per line: the classes served (default: the labelled data's)")

    @model_validator(mode="after")
    def _one_source(self) -> Data:
        given = [name for name in ("coop", "image_folder", "fashion_mnist") if getattr(self, name) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of coop, image_folder, fashion_mnist (got {got})")
        return self


class Stage1(Section):
    """The teacher: PromptSRC prompt tuning on few-shot labelled images, or an imported authors' checkpoint."""

    authors_checkpoint: File | None = Field(
        None, description="import this PromptSRC teacher released by PromptKD's authors instead of training")
    data: Data | None = Field(None, description="labelled data for stage 1 when it differs (cross-dataset)")
    subset: Literal["base", "all"] = "all"
    shots: PositiveInt = 16
    val_shots: PositiveInt = 4
    text_tokens: NonNegativeInt = 4
    text_depth: PositiveInt = 9
    visual_tokens: NonNegativeInt = 4
    visual_depth: PositiveInt = 9
    init_words: str = "a photo of a"
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 0.005
    gpa_mean: float | None = Field(None, description="default: 3/4 of the epochs (15 of 20)")
    gpa_std: PositiveFloat = 1.0
    selection: Literal["gpa", "val"] = "gpa"
    text_targets: Literal["ensemble", "single"] = "ensemble"
    crop_min: Fraction = 0.08


class Stage2(Section):
    """The student: deep visual prompts and a projector distilled on unlabelled images."""

    prompt_tokens: NonNegativeInt = 4
    prompt_depth: PositiveInt = 9
    projector_hidden: PositiveInt | None = None
    epochs: PositiveInt = 20
    batch_size: int = Field(8, ge=2, le=MAX_COUNT, description="global; at least 2 images per process (BatchNorm)")
    lr: PositiveFloat = 0.005
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: NonNegativeInt = 1
    warmup_lr: PositiveFloat = 1e-5
    temperature: PositiveFloat = 1.0
    kd_weight: PositiveFloat = 1000.0
    crop_min: Fraction = 0.08
    selection: Literal["last", "best_val"] = "last"
    teacher_cache_views: NonNegativeInt = Field(
        0, description="0 (published): the teacher runs on every batch; K: its features are cached for K views")
    max_images: PositiveInt | None = None
    track_eval: bool = Field(True, description="accuracy and agreement on the evaluation split after every epoch "
                                               "(the curves); one student pass over it per epoch")


class Evaluation(Section):
    split: Literal["test", "val"] = "test"
    protocol: Literal["all", "base2novel"] = "all"


class Export(Section):
    name: str | None = Field(None, description="model name in the manifest (default: the recipe's name)")
    out: AnyPath | None = Field(None, description="bundle folder (default: <workdir>/bundle)")
    variants: list[Literal[VARIANTS]] = []  # type: ignore[valid-type]
    parity_count: PositiveInt = 64
    parity_set: NonNegativeInt = 32
    calibration_count: PositiveInt = 512
    skip_failing_variants: bool = False
    repository: AnyPath | None = Field(None, description="write a domain bundle into this model repository, at "
                                    "<repository>/<name>/<version>, on the repository's shared backbone (exported "
                                    "there by the first domain of the student tower), instead of a folded bundle")
    version: PositiveInt = Field(1, description="with repository: the version folder to write")
    rollout: RolloutConfig | None = Field(None, description="with repository: written as the model's model.yaml "
                                          "(`rollout:`, the keys given) when the model has none yet, so that the "
                                          "server measures each new version against the serving one before it "
                                          "serves (server/loop/rollout.py); an existing model.yaml is never changed")


class Gate(Section):
    """Before a version is published into a model repository: the new student against the newest published version
    below it, on the evaluation split; nothing is published unless it is at least as good (pipeline/gate.py)."""

    enabled: bool = True
    tolerance: float = Field(0.0, ge=0, le=100, description="percentage points the new student may lose, in "
                                                            "agreement with the teacher and in accuracy, and pass")


class Run(Section):
    workdir: Annotated[AnyPath, AfterValidator(_not_a_file)]
    seed: Seed = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    workers: NonNegativeInt = 4
    device: str = "auto"


class Recipe(Section):
    name: str = Field(min_length=1)
    description: str = ""
    run: Run
    teacher: Tower
    student: Tower
    stand_in: StandIn | None = None
    data: Data
    stage1: Stage1 = Stage1()
    stage2: Stage2 = Stage2()
    evaluation: Evaluation = Evaluation()
    export: Export = Export()
    gate: Gate = Gate()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        stand_in = [t for t in ("teacher", "student") if getattr(self, t).pretrained == STAND_IN]
        if stand_in and self.stand_in is None:
            raise ValueError(f"{' and '.join(stand_in)} use pretrained {STAND_IN!r}: add a stand_in section")
        if self.stage1.data is not None and self.stage1.data.fashion_mnist is not None:
            raise ValueError("stage1.data cannot be fashion_mnist: give it at data, which stage 1 then uses")
        if self.stage1.gpa_mean is not None and not 0 < self.stage1.gpa_mean <= self.stage1.epochs:
            raise ValueError(f"stage1.gpa_mean must be within the {self.stage1.epochs} epochs")
        if self.export.repository is not None and self.export.out is not None:
            raise ValueError("give export.out (a folded bundle) or export.repository (a domain bundle), not both")
        if self.export.repository is None and self.export.rollout is not None:
            raise ValueError("export.rollout is written beside the versions of a model repository: set "
                             "export.repository, or remove export.rollout (a folded bundle has no model.yaml)")
        if self.export.repository is not None and not MODEL_NAME.fullmatch(self.export.name or self.name):
            raise ValueError(f"model name {self.export.name or self.name!r} cannot be a repository folder: set "
                             "export.name to letters, digits, '_', '.' and '-' (at most 64)")
        # Compared resolved: WD/bundle/../stage1 and a symlink into the run folder are the folders they name.
        workdir, out = Path(os.path.realpath(self.run.workdir)), Path(os.path.realpath(self.bundle_dir))
        owned = [workdir / name for name in STEP_FOLDERS + RUN_FILES]
        if out == workdir or out in workdir.parents or any(out == f or f in out.parents for f in owned):
            raise ValueError(f"export.out {self.bundle_dir} would replace the run folder or one of its steps' "
                             "folders: choose a folder outside run.workdir, or leave it unset (<workdir>/bundle)")
        if self.stage2.warmup_epochs >= self.stage2.epochs:
            raise ValueError("stage2.warmup_epochs must be fewer than stage2.epochs")
        return self

    @model_validator(mode="after")
    def _batches_fit(self) -> Recipe:
        """A batch larger than its images trains nothing (full batches only); refused here where the count is known
        without reading the data (the demo photos, stage2.max_images), and by the step itself otherwise."""
        demo = self.data.fashion_mnist
        photos = demo.train_per_class * len(FASHION_MNIST_CLASSES) if demo is not None else None
        known = [n for n in (None if self.data.unlabelled else photos, self.stage2.max_images) if n is not None]
        counted = " (data.fashion_mnist.train_per_class x 10 classes"
        if known:
            full_batches(min(known), self.stage2.batch_size, "stage2.batch_size", counted + ", or stage2.max_images)")
        if self.stand_in is not None and photos is not None and self.stage1.data is None:
            full_batches(photos, self.stand_in.batch_size, "stand_in.batch_size", counted + ")")
        return self

    @property
    def bundle_dir(self) -> Path:
        """The bundle folder the export writes: a domain's version folder in a repository, or a folded bundle."""
        if self.export.repository is not None:
            return self.export.repository / (self.export.name or self.name) / str(self.export.version)
        return self.export.out or self.run.workdir / "bundle"


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` (value read as YAML, as the file is) set in the raw recipe, creating sections as needed."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment[:80]!r}: expected KEY=VALUE, e.g. stage2.epochs=5")
    *parents, leaf = path.split(".")
    if len(parents) >= MAX_RECIPE_DEPTH or len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"--set {path[:80]}: a key of at most {MAX_RECIPE_DEPTH} parts and a value of at most "
                          f"{MAX_RECIPE_BYTES >> 20} MiB")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment[:80]!r}: {key} is not a section")
    try:
        node[leaf] = load_yaml(text, max_depth=MAX_RECIPE_DEPTH, what="a recipe")
    except ValueError as err:
        raise RecipeError(f"--set {path[:80]}: the value is not valid YAML: {err}") from None


def _short(value: object) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**80 else "a number of over 80 digits"
    return text if len(text) <= 80 else text[:77] + "..."


def describe(err: ValidationError) -> list[str]:
    """One line per problem: the field path, what is wrong and, where it helps, the value given."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(recipe)"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if isinstance(given, (dict, list)) or problem["type"] == "missing" else f" (got {_short(given)})"
        lines.append(f"{where}: {message}{shown}")
    return lines


def read_recipe_file(path: Path) -> dict:
    """The recipe file as raw data: a regular file only (a FIFO would hang the reader, a device never ends), at most
    MAX_RECIPE_BYTES, read as bounded YAML."""
    try:
        data = read_small(path, MAX_RECIPE_BYTES)
    except NotARegularFile:
        raise RecipeError(f"cannot read recipe {path}: not a regular file") from None
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror or err}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path} is over {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file") from None
    try:
        raw = load_yaml(text, max_depth=MAX_RECIPE_DEPTH, what="a recipe")
    except ValueError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, run:, teacher:, ...)")
    return raw


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; RecipeError lists every problem at once."""
    raw = read_recipe_file(path)
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = describe(err)
        raise RecipeError(f"{path}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems)) from None
    except RecursionError:  # not expected within MAX_RECIPE_DEPTH; never a traceback all the same
        raise RecipeError(f"{path}: nested too deeply") from None
