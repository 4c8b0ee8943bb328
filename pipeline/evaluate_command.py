"""``pipeline evaluate``: flags -> the same evaluation a run's ``evaluation:`` section does."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import dask
import yaml

from .config import EvaluationConfig, format_error
from .errors import EvaluationError, OutputExistsError, PipelineError
from .evaluation import LabelPair, pair_paths
from .instance_evaluation import InstanceEvaluationSpec
from .instance_labels import InstanceSpec, check_connectivity
from .instance_report import format_instances
from .io import fs
from .io.images import ImageSpec, as_dask_array, open_image
from .io.labels import is_label_volume, open_label_volume, recorded_run
from .io.locations import check_not_an_input, check_writable
from .planning import evaluation_spec
from .report import format_table, write_json
from .scorecard import ReportFiles, evaluate_and_report, evaluate_and_report_instances


def evaluate_command(args: argparse.Namespace) -> int:
    fs.use_rules(fs.StorageRules.build(_storage_options(args.storage_options), {}))
    cfg = _config(args)
    axis = -1 if cfg.encoding == "palette" else None
    pairs = pair_paths(
        args.prediction,
        cfg.ground_truth,
        cfg.ignore_mask,
        channel_axis_of={"prediction": axis, "ground truth": axis},
    )
    objects = _objects(args, pairs) if args.instances else None
    if objects is not None and (objects.prediction is None or objects.truth is None):
        return _instances_only(args, cfg, pairs, objects)  # ids are no classes: objects are all to compare
    num_classes = args.num_classes or _num_classes(cfg, pairs)
    if num_classes < 2:
        raise PipelineError(f"--num-classes: expected an integer >= 2, got {num_classes}")
    if cfg.classes is not None and len(cfg.classes) != num_classes:
        raise PipelineError(f"--classes: {len(cfg.classes)} classes listed for {num_classes} classes")
    spec = evaluation_spec(cfg, num_classes)
    if cfg.bootstrap and len(pairs) == 1 and not spec.breakdown:
        raise PipelineError("--bootstrap: needs several images, --regions or --per-slice (the units to resample)")
    files = ReportFiles(
        json=_path(args.json), csv=_path(args.csv), heatmap=_path(args.heatmap), preview=_path(args.preview),
        instances_csv=_path(args.instances_csv), instances_plot=_path(args.instances_plot),
    )  # fmt: skip
    _check_report_paths(files, pairs, args)
    image = ImageSpec(args.image, args.image_channel_axis, "--image") if args.image else None
    doc, scores = evaluate_and_report(pairs, spec, files, cfg.bootstrap, cfg.confidence, image=image, instances=objects)
    if len(pairs) > 1:
        print(f"{len(pairs)} image pairs; pooled (dataset-level) statistics:")
    print(format_table(scores, spec.names))
    if "instances" in doc:
        print(format_instances(doc["instances"]))
    for path in files.written():
        print(f"report: {path}")
    return 0


def _objects(args: argparse.Namespace, pairs: list[LabelPair]) -> InstanceEvaluationSpec:
    """How each side's objects are found (``--instances``): stored ids, or connected components."""
    ndim = _spatial_ndim(pairs[0].prediction)
    neighbours = args.connectivity or (4 if ndim == 2 else 6)
    check_connectivity(ndim, neighbours, "--connectivity")
    components = InstanceSpec(tuple(args.instance_classes), neighbours) if args.instance_classes else None
    pred_ids = args.prediction_ids or all(_is_instance_volume(p.prediction.path) for p in pairs)
    sides = {"prediction": None if pred_ids else components, "truth": None if args.truth_ids else components}
    for side, found in sides.items():
        if found is None and not (pred_ids if side == "prediction" else args.truth_ids):
            raise PipelineError(
                f"--instance-classes: the {side} holds classes; name the classes whose connected pixels are "
                f"objects (e.g. --instance-classes 1), or pass --{side}-ids if it holds instance ids"
            )
    return InstanceEvaluationSpec(sides["prediction"], sides["truth"])


def _instances_only(
    args: argparse.Namespace, cfg: EvaluationConfig, pairs: list[LabelPair], objects: InstanceEvaluationSpec
) -> int:
    """Objects only, when a side holds instance ids: their classes are not there to compare."""
    for flag in ("csv", "heatmap", "preview"):
        if getattr(args, flag):
            raise PipelineError(
                f"--{flag}: class statistics need class labels on both sides; with instance ids only the "
                f"objects are compared (--json, --instances-csv, --instances-plot)"
            )
    num_classes = args.num_classes or (2 if cfg.encoding == "binary" else len(cfg.classes or []) or 2)
    spec = evaluation_spec(cfg, num_classes)
    files = ReportFiles(json=_path(args.json), instances_csv=_path(args.instances_csv), instances_plot=_path(args.instances_plot))
    _check_report_paths(files, pairs, args)
    section = evaluate_and_report_instances(pairs, objects, spec, files)
    if files.json:
        write_json(files.json, {"images": len(pairs), "instances": section})
    if len(pairs) > 1:
        print(f"{len(pairs)} image pairs; pooled statistics:")
    print(format_instances(section))
    for path in files.written():
        print(f"report: {path}")
    return 0


def _spatial_ndim(spec: ImageSpec) -> int:
    if is_label_volume(spec.path):
        return int(open_label_volume(spec.path).ndim)
    return len(open_image(replace(spec, volume=True)).shape)


def _is_instance_volume(path: str) -> bool:
    return is_label_volume(path) and "instances" in (recorded_run(path) or {})


def _config(args: argparse.Namespace) -> EvaluationConfig:
    from pydantic import ValidationError

    raw: dict = {
        "ground_truth": args.ground_truth,
        "ignore_index": args.ignore_index,
        "ignore_mask": args.ignore_mask,
        "encoding": args.encoding,
        "ignore_colours": list(args.ignore_colour),
        "absent_classes": args.absent,
        "regions": args.regions,
        "per_slice": args.per_slice,
        "bootstrap": args.bootstrap,
        "confidence": args.confidence,
    }
    if args.classes:
        try:
            raw["classes"] = yaml.safe_load(fs.read_bytes(args.classes).decode("utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PipelineError(f"--classes: cannot read {args.classes}: {exc}") from None
    try:
        return EvaluationConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [format_error("pipeline evaluate", e).replace("pipeline evaluate: ", "--", 1) for e in exc.errors()]
        raise PipelineError("\n".join(lines)) from None


def _num_classes(cfg: EvaluationConfig, pairs: list[LabelPair]) -> int:
    """From the encoding (binary 2, palette: its classes), else the largest id seen + 1."""
    if cfg.encoding == "binary":
        return 2
    if cfg.encoding == "palette":
        return len(cfg.classes or [])
    maxima = []
    for pair in pairs:
        for spec in (pair.prediction, pair.truth):
            if is_label_volume(spec.path):
                maxima.append(dask.array.from_zarr(open_label_volume(spec.path)).max())
            else:
                array = as_dask_array(spec)
                if cfg.ignore_index is not None and spec is pair.truth:
                    array = dask.array.where(array == cfg.ignore_index, 0, array)
                maxima.append(array.max())
    try:
        highest = max(int(v) for v in dask.compute(*maxima))
    except ValueError as exc:
        raise EvaluationError(f"cannot read the class ids: {exc}") from None
    return max(2, highest + 1)


def _check_report_paths(files: ReportFiles, pairs: list[LabelPair], args: argparse.Namespace) -> None:
    """Reports never land on an input, nor on an existing file unless --overwrite says so."""
    inputs: dict[str, str | None] = {"--image": args.image}
    for pair in pairs:
        inputs[f"prediction {pair.name}"] = pair.prediction.path
        inputs[f"ground truth {pair.name}"] = pair.truth.path
        if pair.ignore_mask is not None:
            inputs[f"ignore mask {pair.name}"] = pair.ignore_mask.path
    flags = {
        files.json: "--json", files.csv: "--csv", files.heatmap: "--heatmap", files.preview: "--preview",
        files.instances_csv: "--instances-csv", files.instances_plot: "--instances-plot",
    }  # fmt: skip
    for path, flag in flags.items():
        if path is None:
            continue
        check_not_an_input(str(path), flag, inputs)
        with fs.storage_errors(flag, path):
            if fs.exists(path) and not args.overwrite:
                raise OutputExistsError(f"{flag}: {fs.redact(path)} already exists; pass --overwrite to replace it")
            if fs.is_dir(path):
                raise OutputExistsError(f"{flag}: {fs.redact(path)} is a folder; expected a file name")
        check_writable(path, flag)


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise PipelineError(f"--storage-options: not JSON ({exc}); expected an object such as '{{\"anon\": true}}'") from None
    if not isinstance(options, dict):
        raise PipelineError(f"--storage-options: expected a JSON object, got {type(options).__name__}")
    return options


def _path(value: str | None) -> str | None:
    return value or None


__all__ = ["evaluate_command"]
