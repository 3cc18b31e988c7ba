"""The recipe: one YAML file that says everything a run needs, from data to bundle, checked whole before any work.

Every mistake is reported at once with its field path (pydantic). Relative paths are relative to the folder the
command runs in, as on a command line. Defaults are the training commands' (tests/test_pipeline.py keeps them
equal): the published PromptKD settings, except that stage 2 keeps its last epoch unless `selection: best_val`
(published; the paper recipes set it).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, DirectoryPath, Field, FilePath, NonNegativeInt, PositiveFloat,
    PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator,
)

from bundle.manifest import MODEL_NAME
from training.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from training.data.names import DATASETS

STAND_IN = "stand-in"  # a tower's `pretrained` value: weights made here by pretrain-tiny (demos, tests)
VARIANTS = ("optimized", "int8", "int8_vnni", "fp16")
# The run folder's own subfolders (steps.py writes them); a bundle may not go there.
STEP_FOLDERS = ("data", "weights", "stage1", "class_vectors", "teacher_cache", "stage2", "evaluate")


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


ModelName = Annotated[str, AfterValidator(_known_model)]
Fraction = Annotated[float, AfterValidator(_fraction)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tower(Section):
    model: ModelName
    pretrained: str = Field("openai", description="open_clip tag, local checkpoint file, or 'stand-in'")
    weights: FilePath | None = Field(None, description="local file holding the weights of the `pretrained` tag")

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
    root: DirectoryPath
    dataset: Literal[DATASETS]  # type: ignore[valid-type]


class FashionMNIST(Section):
    """Demo data: Fashion-MNIST photos (Debian's dataset-fashion-mnist) written to <workdir>/data as labelled
    folders."""

    train_per_class: PositiveInt = 400
    test_per_class: PositiveInt = 50
    seed: int = 0
    source: DirectoryPath = Field(FASHION_MNIST_ROOT, validate_default=True)


class Data(Section):
    """Exactly one labelled source: a CoOp dataset, a folder <image_folder>/<split>/<class>/<image>, or the demo
    photos."""

    coop: CoOp | None = None
    image_folder: DirectoryPath | None = None
    fashion_mnist: FashionMNIST | None = None
    unlabelled: DirectoryPath | None = Field(
        None, description="stage 2's images, searched recursively (default: the labelled train split)")
    classnames: FilePath | None = Field(
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

    authors_checkpoint: FilePath | None = Field(
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
    batch_size: int = Field(8, ge=2, description="global; at least 2 images per process (BatchNorm)")
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
    out: Path | None = Field(None, description="bundle folder (default: <workdir>/bundle)")
    variants: list[Literal[VARIANTS]] = []  # type: ignore[valid-type]
    parity_count: PositiveInt = 64
    parity_set: NonNegativeInt = 32
    calibration_count: PositiveInt = 512
    skip_failing_variants: bool = False
    repository: Path | None = Field(None, description="write a domain bundle into this model repository, at "
                                    "<repository>/<name>/<version>, on the repository's shared backbone (exported "
                                    "there by the first domain of the student tower), instead of a folded bundle")
    version: PositiveInt = Field(1, description="with repository: the version folder to write")


class Run(Section):
    workdir: Path
    seed: int = 1
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
        if self.export.repository is not None and not MODEL_NAME.fullmatch(self.export.name or self.name):
            raise ValueError(f"model name {self.export.name or self.name!r} cannot be a repository folder: set "
                             "export.name to letters, digits, '_', '.' and '-' (at most 64)")
        workdir, out = self.run.workdir.absolute(), self.bundle_dir.absolute()
        owned = [workdir / name for name in STEP_FOLDERS]
        if out == workdir or out in workdir.parents or any(out == f or f in out.parents for f in owned):
            raise ValueError(f"export.out {self.bundle_dir} would replace the run folder or one of its steps' "
                             "folders: choose a folder outside run.workdir, or leave it unset (<workdir>/bundle)")
        if self.stage2.warmup_epochs >= self.stage2.epochs:
            raise ValueError("stage2.warmup_epochs must be fewer than stage2.epochs")
        return self

    @property
    def bundle_dir(self) -> Path:
        """The bundle folder the export writes: a domain's version folder in a repository, or a folded bundle."""
        if self.export.repository is not None:
            return self.export.repository / (self.export.name or self.name) / str(self.export.version)
        return self.export.out or self.run.workdir / "bundle"


def apply_override(raw: dict, assignment: str) -> None:
    """`a.b.c=value` (value read as YAML) set in the raw recipe, creating sections as needed."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise RecipeError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stage2.epochs=5")
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {assignment!r}: {key} is not a section")
    node[leaf] = yaml.safe_load(text)


def describe(err: ValidationError) -> list[str]:
    """One line per problem: the field path, what is wrong and, where it helps, the value given."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(recipe)"
        message = problem["msg"].removeprefix("Value error, ")
        given = problem.get("input")
        shown = "" if isinstance(given, (dict, list)) or problem["type"] == "missing" else f" (got {given!r})"
        lines.append(f"{where}: {message}{shown}")
    return lines


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe; RecipeError lists every problem at once."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, run:, teacher:, ...)")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = describe(err)
        raise RecipeError(f"{path}: {len(problems)} problem(s), nothing was run:\n  " + "\n  ".join(problems)) from None
