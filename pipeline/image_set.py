"""Many images in one run: ``input.path`` as a list, a glob or a folder of images.

A set becomes one workflow per image, each exactly the workflow a single-image run of that
image would have, so every image is planned, normalised, written, resumed and recorded as
if it ran alone (its own label volume with its own ``run.json``); the runner runs them one
after another on one cluster and evaluates them together (per image and pooled).

Images are named as :mod:`pipeline.io.listing` says (``Tile 1/image_part_001``); a name
decides the image's label volume (``output.path`` a folder: ``<folder>/<name>.zarr``, or a
template: ``{name}`` replaced) and pairs it with its ground truth and ignore mask (a glob
or folder of theirs, by the same names). The set's own files (the pooled evaluation and
``run.json`` listing every image) go into the output folder.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass

from .config import EvaluationConfig, Workflow
from .errors import (
    EvaluationError,
    InputImageError,
    OutputExistsError,
    PipelineError,
    WorkflowError,
)
from .io import fs
from .io.listing import fixed_folder, is_pattern, list_images, names_many
from .io.ome import label_image_name
from .planning import Prepared, describe_plan, prepare, storage_rules
from .scorecard import ReportFiles

NAME = "{name}"
SET_RECORD = "run.json"
SET_KIND = "image set"  # run.json's "kind": the record of a set, not of one volume


@dataclass(frozen=True)
class ImageRun:
    """One image of a set: its name and the single-image workflow that segments it."""

    name: str
    workflow: Workflow


@dataclass(frozen=True)
class ImageSet:
    """The images of a many-image workflow and where the set's own files go."""

    workflow: Workflow
    images: tuple[ImageRun, ...]
    folder: str

    @property
    def record_path(self) -> str:
        """``<folder>/run.json``: every image's status, output and timings."""
        return fs.join(self.folder, SET_RECORD)

    @property
    def reports(self) -> ReportFiles:
        """The pooled evaluation of the set: ``<folder>/evaluation.json``, ``.csv``, heatmap, preview."""
        objects = self.workflow.evaluation is not None and self.workflow.evaluation.instances
        return ReportFiles(
            json=fs.join(self.folder, "evaluation.json"),
            csv=fs.join(self.folder, "evaluation.csv"),
            heatmap=fs.join(self.folder, "confusion.png"),
            preview=fs.join(self.folder, "preview.png"),
            instances_csv=fs.join(self.folder, "instances.csv") if objects else None,
            instances_plot=fs.join(self.folder, "instances.png") if objects else None,
        )

    def own_files(self) -> list[str]:
        files = [self.record_path]
        return files + (self.reports.written() if self.workflow.evaluation is not None else [])


def is_image_set(wf: Workflow) -> bool:
    """Whether ``input.path`` names several images (a list, a glob, a folder of images)."""
    fs.use_rules(storage_rules(wf))
    with fs.storage_errors("input.path", fixed_folder(_first(wf.input.path))):
        return names_many(wf.input.path)


def expand_images(wf: Workflow) -> ImageSet | None:
    """The set ``wf`` describes, one workflow per image; None for a single-image workflow.

    Errors (:class:`~pipeline.errors.PipelineError`) name the workflow file and the field:
    no images, two images of one name, an output that is one volume, an image without
    its ground truth.
    """
    try:
        return _expand(wf)
    except PipelineError as exc:
        raise type(exc)(f"{wf.source}: {exc}") from None


def _expand(wf: Workflow) -> ImageSet | None:
    template = NAME in wf.output.path
    if not is_image_set(wf):
        if template:
            raise WorkflowError(
                f"output.path: {fs.redact(wf.output.path)} is a name template for several images, but "
                f"input.path names one image; give the label volume's path (e.g. out/slide.zarr)"
            )
        return None
    named = list_images(wf.input.path, "input.path", InputImageError)
    folder = _output_folder(wf.output.path, len(named))
    volumes = {name: _volume(wf.output.path, name) for name in named}
    _check_outputs_outside_inputs(wf, named, volumes)
    ev = wf.evaluation
    truths = masks = objects = None
    if ev is not None:
        truths = _paired(ev.ground_truth, "evaluation.ground_truth", named)
        masks = _paired(ev.ignore_mask, "evaluation.ignore_mask", named) if ev.ignore_mask else None
        objects = _paired(ev.truth_instances, "evaluation.truth_instances", named) if ev.truth_instances else None
    if wf.instances is not None and wf.instances.path is not None:
        raise WorkflowError(
            f"instances.path: one instance volume for {len(named)} images; leave it out, and each "
            f"image's objects go beside its label volume (<name>_instances.zarr)"
        )
    if wf.tiling.skip is not None and wf.tiling.skip.mask is not None:
        raise WorkflowError(
            f"tiling.skip.mask: one mask for {len(named)} images; a run over several images cannot "
            f"take a skip mask (use tiling.skip's other rules, or one run per image)"
        )
    images = []
    for name, path in named.items():
        one = wf.model_copy(
            update={
                "input": wf.input.model_copy(update={"path": path}),
                "output": wf.output.model_copy(update={"path": volumes[name]}),
                "evaluation": _image_evaluation(ev, truths, masks, objects, name),
            }
        )
        one._source = wf.source
        images.append(ImageRun(name, one))
    return ImageSet(wf, tuple(images), folder)


def _first(path: str | tuple[str, ...]) -> str:
    return path if isinstance(path, str) else path[0]


def _output_folder(output: str, count: int) -> str:
    """The folder holding the set's volumes and its own files."""
    if NAME in output:
        head = output[: output.index(NAME)]
        folder = head[: head.rfind("/")] if "/" in head else "."
        return folder or "/"
    if fs.suffix(output).lower() == ".zarr":
        raise WorkflowError(
            f"output.path: {fs.redact(output)} is one label volume, but input.path names {count} images; "
            f"give a folder (e.g. {fs.redact(fs.sibling(output, fs.stem(output)))}: one <name>.zarr per "
            f"image) or a name template (e.g. {fs.redact(fs.sibling(output, NAME + '.zarr'))})"
        )
    return output.rstrip("/") or "/"


def _volume(output: str, name: str) -> str:
    if NAME in output:
        return output.replace(NAME, name)
    return fs.join(output, *f"{name}.zarr".split("/"))


def _check_outputs_outside_inputs(wf: Workflow, named: dict[str, str], volumes: dict[str, str]) -> None:
    """A set's volumes must not become inputs of its next run (a folder or glob would list
    them); an OME-Zarr image's own ``labels/<name>`` is where its labels belong."""
    sources = wf.input.path if isinstance(wf.input.path, tuple) else (wf.input.path,)
    loose = [v for name, v in volumes.items() if label_image_name(v, named[name]) is None]
    for source in sources:
        if is_pattern(source):
            clash = next((v for v in loose if fnmatch.fnmatch(v, source)), None)
        elif fs.is_dir(source):
            root = fs.location(source).rstrip("/") + "/"
            clash = next((v for v in loose if fs.location(v).startswith(root)), None)
        else:
            clash = None
        if clash is not None:
            raise OutputExistsError(
                f"output.path: {fs.redact(clash)} would lie among the images input.path names "
                f"({fs.redact(source)}); choose an output folder outside them"
            )


def _paired(path: str, field: str, named: dict[str, str]) -> dict[str, str]:
    """``{image name: path}`` of a set of label images, one for every input image."""
    if not names_many(path):
        raise EvaluationError(
            f"{field}: {fs.redact(path)} is one file for {len(named)} images; expected a folder or a "
            f"glob of label images named as the input images (e.g. labels/*.png for images/*.png)"
        )
    listed = list_images(path, field, EvaluationError)
    missing = [name for name in named if name not in listed]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise EvaluationError(
            f"{field}: no label image for {shown} among {len(listed)} in {fs.redact(path)} (names are "
            f"the path parts a glob's wildcards match, or the path below a folder, without suffix; "
            f"e.g. {next(iter(listed))!r})"
        )
    return listed


def _image_evaluation(
    ev: EvaluationConfig | None,
    truths: dict[str, str] | None,
    masks: dict[str, str] | None,
    objects: dict[str, str] | None,
    name: str,
) -> EvaluationConfig | None:
    """One image's evaluation section: its own truth and mask. A set resamples whole images,
    so an image's checks need no regions for a bootstrap (the set's evaluation has one)."""
    if ev is None or truths is None:
        return None
    update: dict[str, object] = {"ground_truth": truths[name], "bootstrap": 0}
    if masks is not None:
        update["ignore_mask"] = masks[name]
    if objects is not None:
        update["truth_instances"] = objects[name]
    return ev.model_copy(update=update)


def prepare_set(images: ImageSet, resume: bool = False) -> list[Prepared]:
    """Every image's checks (:func:`pipeline.planning.prepare`), all before any is written."""
    prepared = []
    for item in images.images:
        try:
            prepared.append(prepare(item.workflow, resume=resume))
        except OutputExistsError as exc:
            if resume or "(a complete label volume)" not in str(exc):
                raise
            raise OutputExistsError(
                f"{exc}; or rerun with --resume to keep the complete volumes of an earlier run of this "
                f"set and compute the rest"
            ) from None
    return prepared


def check_set_files(images: ImageSet, resume: bool) -> None:
    """The set's own files (run.json, pooled reports) are replaced only when an earlier run of
    a set wrote them (its run.json says so) and ``output.overwrite`` or ``--resume`` asks."""
    wf = images.workflow
    ours = _is_set_record(images.record_path)
    for path in images.own_files():
        with fs.storage_errors("output.path", path):
            present = fs.exists(path)
        if not present or ours and (wf.output.overwrite or resume):
            continue
        why = (
            "set output.overwrite: true to replace it, or rerun with --resume"
            if ours
            else f"no record of a run over several images ({fs.redact(images.record_path)}) says this "
            f"pipeline wrote it; move it away or choose another output folder"
        )
        raise OutputExistsError(f"{wf.source}: output.path: {fs.redact(path)} already exists; {why}")


def _is_set_record(path: str) -> bool:
    try:
        document = json.loads(fs.read_bytes(path))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("kind") == SET_KIND


def describe_set(images: ImageSet, prepared: list[Prepared]) -> str:
    """The set as a person reads it: how many images, where each goes, then the first one's plan."""
    names = [item.name for item in images.images]
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
    pixels = [math.prod(p.image.shape) / 1e6 for p in prepared]
    example = images.images[0].workflow.output.path
    lines = [
        f"images     {len(names)} images: {shown}",
        f"           {min(pixels):.2f} to {max(pixels):.2f} MPx each, {sum(pixels):.1f} MPx in all; each "
        f"planned, normalised and written as a run of that image alone would",
        f"output     {fs.redact(images.folder)}: one label volume per image (e.g. {fs.redact(example)}); "
        f"{fs.redact(images.record_path)} lists them",
    ]
    if images.workflow.evaluation is not None:
        lines.append(f"evaluation per image and pooled -> {fs.redact(images.reports.json or '')}")
    lines.append(f"first      {names[0]}:")
    lines.append(describe_plan(prepared[0], evaluation=False))
    return "\n".join(lines)

