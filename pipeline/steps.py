"""The steps a recipe becomes, in order, each with the settings it depends on, the files it writes and the call
into training/ or export/ that does the work: data -> stand-in weights -> stage 1 -> class vectors -> stage 2
-> (base/novel evaluation) -> (gate, into a model repository) -> bundle.

Run folder layout (`run.workdir`): data/, weights/, stage1/, class_vectors/, teacher_cache/, stage2/,
evaluate/, gate/, bundle/ (unless export.out says otherwise), recipe.yaml, pipeline_state.json, metrics.jsonl,
curves.png.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bundle.files import write_atomic
from server.repository.layout import POLICY_FILE, read_config
from server.loop.rollout import RolloutConfig
from training.data.datasets import Split, few_shot_splits, find_images, load_coop_split, load_image_folder

from .recipe import STAND_IN, Data, Recipe, Tower, full_batches


@dataclass
class Step:
    name: str
    title: str
    settings: dict  # everything the step's result depends on, besides its inputs' keys
    needs: list[str]
    outputs: list[Path]  # files checked (sha256) to call the step up to date
    action: Callable[[bool], dict]  # resume -> figures for the summary, "result" being its one-line text
    folder: Path | None = None  # owned by the step: emptied before a fresh (not resumed) run
    resumable: bool = False
    cleanup: list[Path] = field(default_factory=list)  # files removed before a fresh run


def labelled(data: Data, workdir: Path) -> Callable[[str], Split]:
    """The labelled source of `data` as a function from split name to Split."""
    if data.coop is not None:
        return lambda split: load_coop_split(data.coop.root, data.coop.dataset, split)
    folder = data.image_folder if data.image_folder is not None else workdir / "data"
    return lambda split: load_image_folder(folder / split)


def _dump(section) -> dict:
    return section.model_dump(mode="json") if section is not None else {}


def _export_settings(export) -> dict:
    """The export step's key settings; a folded export's key is what it was before domain exports existed, so that
    existing run folders stay up to date."""
    settings = _dump(export)
    settings.pop("rollout")  # written once, beside the versions, never part of a bundle
    if export.repository is None:
        settings.pop("repository"), settings.pop("version")
    return settings


def _identity(value: str | Path | None) -> list | str | None:
    """A tag as itself; a local file as its path, size and modification time (hashing weights on every run would
    cost more than the check is worth)."""
    if value is None or not Path(value).is_file():
        return str(value) if value is not None else None
    stat = Path(value).stat()
    return [str(value), stat.st_size, stat.st_mtime_ns]


class Plan:
    """A recipe's steps, and the few things several of them share (where files go, how data is read)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.work = recipe.run.workdir
        self.data = labelled(recipe.data, self.work)
        self.stage1_data = labelled(recipe.stage1.data or recipe.data, self.work)
        self.teacher_file = self.work / "stage1" / "teacher.pt"
        self.vectors_file = self.work / "class_vectors" / "class_vectors.npz"
        self.student_file = self.work / "stage2" / "student.pt"

    def steps(self, overwrite_bundle: bool) -> list[Step]:
        r = self.recipe
        steps = []
        if r.data.fashion_mnist is not None:
            steps.append(Step("data", "Fashion-MNIST photos", _dump(r.data.fashion_mnist), [],
                              [self.work / "data" / "photos.json"], self._prepare_data, folder=self.work / "data"))
        for role in ("teacher", "student"):
            if getattr(r, role).pretrained == STAND_IN:
                steps.append(self._stand_in_step(role))
        steps += [self._stage1_step(), self._class_vectors_step(), self._stage2_step()]
        if r.evaluation.protocol == "base2novel":
            steps.append(Step("evaluate", "base/novel/HM evaluation", _dump(r.evaluation), ["stage2", "class_vectors"],
                              [self.work / "evaluate" / "report.json"], self._evaluate, folder=self.work / "evaluate"))
        if r.export.repository is not None:
            steps.append(self._gate_step())
        steps.append(Step("export", "ONNX export, parity, variants, bundle",
                          {**_export_settings(r.export), "name": self._bundle_name, "parity_split": r.evaluation.split},
                          ["stage2", "class_vectors"], [r.bundle_dir / "manifest.json"],
                          lambda resume: self._export(overwrite_bundle)))
        names = {step.name for step in steps}
        for step in steps:
            step.needs = [n for n in step.needs if n in names]
        return steps

    # ---- settings and inputs

    @property
    def _bundle_name(self) -> str:
        return self.recipe.export.name or self.recipe.name

    @staticmethod
    def _source(data: Data) -> dict:
        """What identifies a labelled source: where it is (file contents are not hashed: a dataset is too large);
        the demo photos are the data step's, whose key its dependents include."""
        return {"coop": _dump(data.coop) if data.coop else None,
                "image_folder": str(data.image_folder) if data.image_folder else None,
                "fashion_mnist": data.fashion_mnist is not None}

    def _tower_settings(self, role: str) -> list:
        """What identifies a tower: its model and weights (a local file by path, size and time, so that a
        replaced file counts as changed); stand-in weights are the weights step's, whose key its dependents
        include."""
        tower: Tower = getattr(self.recipe, role)
        return [tower.model, _identity(tower.pretrained), _identity(tower.weights)]

    def _tower(self, role: str) -> tuple[str, str, str | None]:
        tower: Tower = getattr(self.recipe, role)
        pretrained = str(self.work / "weights" / f"{role}.pt") if tower.pretrained == STAND_IN else tower.pretrained
        return tower.model, pretrained, str(tower.weights) if tower.weights else None

    def _run_settings(self) -> dict:
        return {"seed": self.recipe.run.seed, "precision": self.recipe.run.precision}

    def student_images(self) -> list[str]:
        r = self.recipe
        images = find_images(r.data.unlabelled) if r.data.unlabelled else [p for p, _ in self.data("train").items]
        return images[: r.stage2.max_images] if r.stage2.max_images else images

    def classnames(self) -> list[str]:
        if self.recipe.data.classnames is not None:
            lines = self.recipe.data.classnames.read_text().splitlines()
            return [line.strip() for line in lines if line.strip()]
        return self.data("train").classnames

    # ---- steps

    def _prepare_data(self, resume: bool) -> dict:
        from training.data import fashion_mnist

        spec = self.recipe.data.fashion_mnist
        counts = fashion_mnist.export(self.work / "data", {"train": spec.train_per_class, "test": spec.test_per_class},
                                      seed=spec.seed, root=spec.source)
        (self.work / "data" / "photos.json").write_text(json.dumps(counts))
        return {"result": f"{counts['train']} train / {counts['test']} test photos", **counts}

    def _stand_in_step(self, role: str) -> Step:
        model = getattr(self.recipe, role).model
        out = self.work / "weights" / f"{role}.pt"

        def action(resume: bool) -> dict:
            from training.pretrain import pretrain_clip

            s, split = self.recipe.stand_in, self.stage1_data("train")
            full_batches(len(split), s.batch_size, "stand_in.batch_size")
            loss = pretrain_clip(model, split, out, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)
            return {"result": f"{model} stand-in weights, final loss {loss:.3f}", "final_loss": loss}

        settings = {"model": model, "stand_in": _dump(self.recipe.stand_in),
                    "data": self._source(self.recipe.stage1.data or self.recipe.data)}
        return Step(f"{role}_weights", f"stand-in CLIP weights for the {role} ({model})", settings,
                    ["data"], [out], action, cleanup=[out])

    def _stage1_step(self) -> Step:
        r = self.recipe
        if r.stage1.authors_checkpoint is not None:
            settings = {"authors_checkpoint": _identity(r.stage1.authors_checkpoint),
                        "teacher": self._tower_settings("teacher")}
        else:
            settings = {"stage1": {k: v for k, v in _dump(r.stage1).items() if k not in ("data", "authors_checkpoint")},
                        "data": self._source(r.stage1.data or r.data), "teacher": self._tower_settings("teacher"),
                        **self._run_settings()}
        title = ("stage 1: import the authors' teacher" if r.stage1.authors_checkpoint
                 else "stage 1: PromptSRC teacher on few-shot labelled images")
        return Step("stage1", title, settings, ["data", "teacher_weights"], [self.teacher_file], self._stage1,
                    folder=self.teacher_file.parent, resumable=r.stage1.authors_checkpoint is None)

    def _stage1(self, resume: bool) -> dict:
        from training.teacher_training import Stage1Config, train_teacher

        r, s = self.recipe, self.recipe.stage1
        model, pretrained, weights = self._tower("teacher")
        if s.authors_checkpoint is not None:
            from bundle import sha256_file
            from training.authors import import_teacher
            from training.teacher import save_teacher

            teacher = import_teacher(s.authors_checkpoint, model, pretrained, weights)
            save_teacher(self.teacher_file, teacher, {"imported_from": str(s.authors_checkpoint),
                                                      "sha256": sha256_file(s.authors_checkpoint)})
            return {"result": f"imported {s.authors_checkpoint.name}"}
        train, val = few_shot_splits(self.stage1_data, s.shots, s.val_shots, r.run.seed, s.subset)
        cfg = Stage1Config(
            model=model, pretrained=pretrained, weights=weights, output_dir=str(self.teacher_file.parent),
            text_tokens=s.text_tokens, text_depth=s.text_depth, visual_tokens=s.visual_tokens,
            visual_depth=s.visual_depth, init_words=s.init_words, epochs=s.epochs, batch_size=s.batch_size, lr=s.lr,
            gpa_mean=s.gpa_mean if s.gpa_mean is not None else s.epochs * 3 / 4, gpa_std=s.gpa_std,
            precision=r.run.precision, workers=r.run.workers, seed=r.run.seed, device=r.run.device,
            selection=s.selection, text_targets=s.text_targets, crop_min=s.crop_min,
        )
        report = train_teacher(cfg, train, val, resume=resume)
        return {"result": f"val accuracy {report['val_acc']:.1f}% ({report['selected']}), {len(train)} images",
                "val_acc": report["val_acc"], "selected": report["selected"]}

    def _class_vectors_step(self) -> Step:
        names = self.recipe.data.classnames
        settings = {"classnames": self.classnames() if names else self._source(self.recipe.data)}
        return Step("class_vectors", "class vectors: the teacher's text tower, once, over the class names", settings,
                    ["stage1", "data"], [self.vectors_file], self._class_vectors, folder=self.vectors_file.parent)

    def _class_vectors(self, resume: bool) -> dict:
        from training.teacher import load_teacher

        names = self.classnames()
        teacher, _ = load_teacher(self.teacher_file)
        vectors = teacher.class_vectors(names, source=f"teacher checkpoint {self.teacher_file}")
        vectors.save(self.vectors_file)
        dim = int(vectors.vectors.shape[1])
        return {"result": f"{len(names)} classes x {dim}", "classes": len(names), "dim": dim}

    def _stage2_step(self) -> Step:
        r = self.recipe
        settings = {"stage2": {k: v for k, v in _dump(r.stage2).items() if k != "track_eval"},
                    "student": self._tower_settings("student"), "data": self._source(r.data),
                    "unlabelled": str(r.data.unlabelled) if r.data.unlabelled else None,
                    "selection_split": [r.stage1.shots, r.stage1.val_shots], **self._run_settings()}
        return Step("stage2", "stage 2: distil the student on unlabelled images", settings,
                    ["class_vectors", "stage1", "student_weights", "data"], [self.student_file], self._stage2,
                    folder=self.student_file.parent, resumable=True)

    def _stage2(self, resume: bool) -> dict:
        from training.distill import DistillConfig, distill

        r, s = self.recipe, self.recipe.stage2
        images = self.student_images()
        full_batches(len(images), s.batch_size, "stage2.batch_size")
        model, pretrained, weights = self._tower("student")
        cfg = DistillConfig(
            teacher_model=r.teacher.model, teacher_pretrained=None, teacher_checkpoint=str(self.teacher_file),
            student_model=model, student_pretrained=pretrained, student_weights=weights,
            class_vectors=str(self.vectors_file), output_dir=str(self.student_file.parent),
            prompt_tokens=s.prompt_tokens, prompt_depth=s.prompt_depth, projector_hidden=s.projector_hidden,
            epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
            warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, temperature=s.temperature, kd_weight=s.kd_weight,
            crop_min=s.crop_min, selection=s.selection, precision=r.run.precision, workers=r.run.workers,
            seed=r.run.seed, device=r.run.device, track_eval=s.track_eval,
            cache_dir=str(self.work / "teacher_cache") if s.teacher_cache_views else None,
            cache_views=max(1, s.teacher_cache_views),
        )
        eval_split = self.data(r.evaluation.split)
        # Labelled held-out images of every class choose the epoch (the val split, else training images the
        # few-shot draw left out), never the test split; as the protocol runners do.
        val_split = None
        if s.selection == "best_val":
            _, val_split = few_shot_splits(self.data, r.stage1.shots, r.stage1.val_shots, r.run.seed, "all")
        report = distill(cfg, images, eval_split, resume=resume, val_split=val_split)
        figures = {"images": report["train_images"], **{f"{k}_after": v for k, v in report["after"].items()
                                                         if k.endswith(("_acc", "agreement"))}}
        text = (f"student {report['after']['student_acc']:.1f}%, teacher {report['after']['teacher_acc']:.1f}%, "
                f"agreement {report['after']['agreement']:.1f}%")
        if "before" in report:
            figures.update({f"{k}_before": v for k, v in report["before"].items() if k.endswith(("_acc", "agreement"))})
            text = (f"student {report['before']['student_acc']:.1f}% -> {report['after']['student_acc']:.1f}%, "
                    f"teacher {report['after']['teacher_acc']:.1f}%, agreement "
                    f"{report['before']['agreement']:.1f}% -> {report['after']['agreement']:.1f}%")
        return {"result": text, **figures}

    def _evaluate(self, resume: bool) -> dict:
        from training.class_vectors import ClassVectors
        from training.evaluate import evaluate_checkpoint
        from training.runtime import setup

        r = self.recipe
        device = setup(r.run.device).device
        report = evaluate_checkpoint(self.student_file, self.data(r.evaluation.split), device, True, r.run.workers,
                                     ClassVectors.load(self.vectors_file))
        out = self.work / "evaluate" / "report.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        base, novel, hm = (report[k]["student_acc"] for k in ("base", "novel", "hm"))
        return {"result": f"student base {base:.1f}% / novel {novel:.1f}% / HM {hm:.1f}%", "base": base,
                "novel": novel, "hm": hm}

    def _gate_step(self) -> Step:
        """Keyed on the serving version's folder as well (its fingerprint), so a version published or changed
        since reruns the comparison."""
        from .gate import serving_version

        r, e = self.recipe, self.recipe.export
        # Keyed on the newest version below: the version this run publishes changes the folder at its own number.
        below = serving_version(e.repository, self._bundle_name, e.version - 1) if r.gate.enabled else None
        settings = {"gate": _dump(r.gate), "split": r.evaluation.split, "data": self._source(r.data),
                    "repository": str(e.repository), "model": self._bundle_name, "version": e.version,
                    "serving": [below.version, below.fingerprint] if below else None}
        report = self.work / "gate" / "report.json"
        return Step("gate", "gate: the new student against the serving version on held-out photos", settings,
                    ["stage2", "class_vectors", "data"], [report], lambda resume: self._gate(report),
                    folder=report.parent)

    def _gate(self, report_file: Path) -> dict:
        from training.class_vectors import ClassVectors
        from training.evaluate import checkpoint_predictions
        from training.runtime import setup

        from .gate import compare, decide, serving_version

        r, e = self.recipe, self.recipe.export
        serving = serving_version(e.repository, self._bundle_name, e.version) if r.gate.enabled else None
        report = {"model": self._bundle_name, "version": e.version, "repository": str(e.repository),
                  "split": r.evaluation.split}
        if not r.gate.enabled or serving is None:
            reason = "nothing to compare with: first version" if r.gate.enabled else "gate.enabled is false: skipped"
            return decide({**report, "reason": reason}, report_file, e.repository, r.gate.tolerance)
        split = self.data(r.evaluation.split)
        predictions = checkpoint_predictions(self.student_file, split, setup(r.run.device).device, r.run.workers,
                                             ClassVectors.load(self.vectors_file))
        report.update(compare(predictions, split, serving, e.repository))
        return decide(report, report_file, e.repository, r.gate.tolerance)

    def _export(self, overwrite: bool) -> dict:
        from export.build import build_bundle, spread
        from export.domain import build_domain

        r, e = self.recipe, self.recipe.export
        parity = spread(sorted(p for p, _ in self.data(r.evaluation.split).items), e.parity_count)
        calibration = spread(sorted(self.student_images()), e.calibration_count) if e.variants else None
        if e.repository is not None:
            policy = write_rollout(e.repository / self._bundle_name, e.rollout)  # before a version can appear
            done = build_domain(self.student_file, e.repository, self._bundle_name, parity, e.version,
                                self.vectors_file, tuple(e.variants), calibration, parity_set=e.parity_set,
                                skip_failing_variants=e.skip_failing_variants, overwrite=overwrite)
            manifest, where = done.manifest, f"{r.bundle_dir} on backbone {done.backbone[:12]}{policy}"
        else:
            manifest = build_bundle(self.student_file, r.bundle_dir, parity, self.vectors_file, self._bundle_name,
                                    overwrite, tuple(e.variants), calibration, parity_set=e.parity_set,
                                    skip_failing_variants=e.skip_failing_variants)
            where = str(r.bundle_dir)
        variants = sorted(manifest.variants)
        calibration = manifest.calibration
        calibrated = (f", calibration error {calibration.ece_before:.3f} -> {calibration.ece_after:.3f} (T "
                      f"{calibration.temperature:.2f})" if calibration is not None else "")
        return {"result": f"{where} (fp32{''.join(', ' + v for v in variants)}), min cosine "
                          f"{manifest.parity.min_cosine:.5f}{calibrated}",
                "bundle": str(r.bundle_dir), "variants": variants, "min_cosine": manifest.parity.min_cosine}


def write_rollout(model: Path, rollout: RolloutConfig | None) -> str:
    """The model's model.yaml with the recipe's rollout settings, when it has none: an operator's file is never
    changed. Returns what was done, for the step's result line."""
    policy = model / POLICY_FILE
    if rollout is None:
        return ""
    if policy.is_symlink() and not policy.exists():
        raise ValueError(f"{policy} is a link to nothing: the server would serve without rollout settings; remove "
                         "it, or make it the model's model.yaml")
    if policy.exists() or policy.is_symlink():
        read_config(policy)  # ValueError: one the server cannot read stops the model, so nothing is published
        return f"; its {POLICY_FILE} kept as it is"
    text = yaml.safe_dump({"rollout": rollout.model_dump(mode="json", exclude_unset=True)}, sort_keys=False)
    write_atomic(policy, lambda tmp: tmp.write_text("# written by the recipe's export.rollout: new versions are "
                                                    "measured against the serving one before they serve\n" + text))
    return f"; rollout settings written to its {POLICY_FILE}"


def clean(step: Step) -> None:
    """Remove what an earlier, different or unfinished run of this step left, before a fresh run."""
    if step.folder is not None:
        shutil.rmtree(step.folder, ignore_errors=True)
    for path in step.cleanup:
        path.unlink(missing_ok=True)
