"""``pipeline train workflow.yaml``: fit a built-in network to image/label pairs.

The workflow has a ``model`` section (as a run's: the architecture, classes, channels and
normalisation) and a ``train`` section (:class:`config.TrainConfig`). Images and labels are
read whole (training data fits in memory; the images it is applied to need not), labels
decoded as the evaluation decodes them. The result is a checkpoint that ``pipeline run``
loads from ``model.path`` alone (:mod:`pipeline.io.checkpoints`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import yaml

from . import __version__
from .config import (
    DilatedConfig,
    NormalizeConfig,
    TrainData,
    TrainWorkflow,
    UNetConfig,
    format_error,
    resolve_path,
)
from .encodings import EncodingError, LabelEncoding, decode
from .errors import OutputExistsError, PipelineError, WorkflowError
from .io import fs
from .io.checkpoints import metadata_path
from .io.images import ImageSpec, open_image
from .io.listing import list_images
from .models.loading import load_model
from .normalization import resolve_normalization
from .train.checkpoints import save_checkpoint
from .train.loop import IGNORE, Sample, train, training_patch

TRAINABLE = ("unet", "dilated")


def train_command(path: str, resume: bool = False) -> int:
    wf = load_train_workflow(path)
    cfg, model_cfg = wf.train, wf.model
    if not isinstance(model_cfg, (UNetConfig, DilatedConfig)):
        raise PipelineError(f"model.arch: {model_cfg.arch} cannot be trained here; expected one of {', '.join(TRAINABLE)}")
    state_path = fs.sibling(cfg.output, f"{fs.stem(cfg.output)}.last.pt")
    if fs.exists(cfg.output) and not (cfg.overwrite or resume):
        raise OutputExistsError(
            f"train.output: {fs.redact(cfg.output)} already exists; set train.overwrite: true to replace it, "
            f"or pass --resume to continue its training"
        )
    encoding = LabelEncoding(
        kind=cfg.encoding,
        palette=tuple(c.colour for c in cfg.classes or [] if c.colour is not None) if cfg.encoding == "palette" else (),
        ignore_colours=tuple(cfg.ignore_colours),
    )
    k = model_cfg.num_classes
    stacks = isinstance(model_cfg, UNetConfig) and model_cfg.dims == 3  # a 3D U-Net trains on (z, y, x) stacks
    pairs = (encoding, cfg.ignore_index, k, model_cfg.in_channels, stacks, model_cfg.normalize)
    samples = load_pairs(cfg.data, "train.data", *pairs)
    validation = (
        load_pairs(cfg.validation, "train.validation", *pairs)
        if cfg.validation else []
    )  # fmt: skip
    loaded = load_model(model_cfg, "cpu", with_digest=False)
    training_patch(loaded.geometry, cfg.patch, samples)  # refused before the run is announced
    section = model_cfg.model_dump(mode="json", exclude={"path", "seed", "storage_options"})
    names = [c.name for c in cfg.classes] if cfg.classes else [f"class {i}" for i in range(k)]
    colours = [list(c.colour) if c.colour else None for c in cfg.classes] if cfg.classes else None

    def save(module: torch.nn.Module, figures: dict[str, Any]) -> None:
        extra = {
            "classes": [{"name": n, **({"colour": colours[i]} if colours and colours[i] else {})} for i, n in enumerate(names)],
            "training": {
                "pipeline_version": __version__,
                "workflow": fs.redact(wf.source),
                "data": {
                    "images": in_reading_order(s.name for s in samples),
                    "validation": in_reading_order(s.name for s in validation),
                },
                "settings": cfg.model_dump(mode="json", exclude={"data", "validation", "output", "overwrite"}),
                "figures": figures,
            },
        }
        save_checkpoint(cfg.output, module, section, extra)

    print(
        f"train      {model_cfg.arch} on {len(samples)} image(s), validating on {len(validation)}; "
        f"{cfg.epochs} epochs x {cfg.steps_per_epoch} steps x {cfg.batch_size} patches -> {fs.redact(cfg.output)}",
        file=sys.stderr, flush=True,
    )  # fmt: skip
    history = train(loaded.module, loaded.geometry, k, model_cfg.normalize, cfg, samples, validation, save, state_path, resume)
    best = history.epochs[history.best_epoch - 1] if history.best_epoch else {}
    shown = f"mIoU {100 * best['mean_iou']:.1f}%" if "mean_iou" in best else f"loss {best.get('loss', float('nan')):.4f}"
    print(f"checkpoint {fs.redact(cfg.output)} (epoch {history.best_epoch}, {shown}) + {fs.redact(metadata_path(cfg.output))}")
    return 0


def in_reading_order(names: Iterable[str]) -> list[str]:
    """Names sorted with their numbers as numbers ("2" before "10"), as a file browser lists them."""
    return sorted(names, key=lambda name: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)])


def load_train_workflow(path: str) -> TrainWorkflow:
    from pydantic import ValidationError

    try:
        raw = yaml.safe_load(fs.read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise WorkflowError(f"{path}: workflow file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise WorkflowError(f"{path}: cannot read the workflow: {exc}") from None
    if not isinstance(raw, dict):
        raise WorkflowError(f"{path}: expected a mapping with sections model and train")
    try:
        wf = TrainWorkflow.model_validate(raw)
    except ValidationError as exc:
        raise WorkflowError("\n".join(format_error(path, e) for e in exc.errors())) from None
    base = fs.parent(path)

    def data(d: TrainData | None) -> TrainData | None:
        if d is None:
            return None
        def fix(v: str | tuple[str, ...]) -> str | tuple[str, ...]:
            return tuple(resolve_path(p, base) for p in v) if isinstance(v, tuple) else resolve_path(v, base)

        return d.model_copy(update={"images": fix(d.images), "labels": fix(d.labels)})

    train_cfg = wf.train.model_copy(update={
        "data": data(wf.train.data), "validation": data(wf.train.validation), "output": resolve_path(wf.train.output, base),
    })  # fmt: skip
    model = wf.model.model_copy(update={"path": resolve_path(wf.model.path, base)}) if wf.model.path else wf.model
    resolved = wf.model_copy(update={"train": train_cfg, "model": model})
    resolved._source = path
    return resolved


def load_pairs(
    data: TrainData, field: str, encoding: LabelEncoding, ignore_index: int | None, num_classes: int, channels: int,
    stacks: bool, normalize: NormalizeConfig,
) -> list[Sample]:  # fmt: skip
    """Every image/label pair named alike, in memory; labels as class ids with IGNORE.

    A ``zscore`` or ``percentiles`` normalisation is resolved per image over the whole image,
    by the code a run uses (:func:`normalization.resolve_normalization`, which reads the file
    once more: its chunked sums, not NumPy's, give the run's statistics to the last bit), so
    training sees each image as a run will.
    """
    images = list_images(data.images, f"{field}.images")
    labels = list_images(data.labels, f"{field}.labels")
    if len(images) == len(labels) == 1:  # one pair: whatever their names
        labels = {next(iter(images)): next(iter(labels.values()))}
    missing = [n for n in images if n not in labels]
    if missing:
        raise PipelineError(f"{field}.labels: no label image for {', '.join(map(repr, missing[:5]))} (named as the images)")
    samples = []
    for name, path in sorted(images.items()):
        spec = ImageSpec(path, data.channel_axis, f"{field}.images", volume=stacks)
        reader = open_image(spec)
        if reader.channels != channels:
            raise PipelineError(f"{field}.images: {fs.redact(path)} has {reader.channels} channel(s); model.in_channels is {channels}")
        image = reader.read(tuple(slice(0, n) for n in reader.shape)).astype(np.float32)
        label_reader = open_image(
            ImageSpec(labels[name], -1 if encoding.kind == "palette" else None, f"{field}.labels", volume=stacks)
        )
        if label_reader.shape != reader.shape:
            raise PipelineError(
                f"{field}.labels: {fs.redact(labels[name])} has shape {label_reader.shape}, its image {reader.shape}"
            )
        raw = label_reader.read(tuple(slice(0, n) for n in label_reader.shape))
        try:
            ids, ignored = decode(raw if encoding.kind == "palette" else raw[0], encoding)
        except EncodingError as exc:
            raise PipelineError(f"{field}.labels: {fs.redact(labels[name])}: {exc}") from None
        ids = ids.astype(np.int64)
        skip = np.zeros(ids.shape, bool) if ignored is None else ignored
        if ignore_index is not None:
            skip |= ids == ignore_index
        bad = np.unique(ids[~skip & ((ids < 0) | (ids >= num_classes))])
        if bad.size:
            raise PipelineError(
                f"{field}.labels: {fs.redact(labels[name])} holds class ids {', '.join(map(str, bad[:5]))}; "
                f"expected 0..{num_classes - 1} (model.num_classes)"
            )
        own = None if normalize.fixed else resolve_normalization(normalize, spec)
        samples.append(Sample(name, image, np.where(skip, IGNORE, ids), normalize=own))
    return samples
