"""``pipeline evaluate``: flags -> the same evaluation a run's ``evaluation:`` section does."""

from __future__ import annotations

import argparse
import json

import dask
import yaml

from .config import EvaluationConfig, format_error
from .errors import EvaluationError, OutputExistsError, PipelineError
from .evaluation import LabelPair, pair_paths
from .io import fs
from .io.images import ImageSpec, as_dask_array
from .io.labels import is_label_volume, open_label_volume
from .io.locations import check_not_an_input, check_writable
from .planning import evaluation_spec
from .report import format_table
from .scorecard import ReportFiles, evaluate_and_report


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
    num_classes = args.num_classes or _num_classes(cfg, pairs)
    if num_classes < 2:
        raise PipelineError(f"--num-classes: expected an integer >= 2, got {num_classes}")
    if cfg.classes is not None and len(cfg.classes) != num_classes:
        raise PipelineError(f"--classes: {len(cfg.classes)} classes listed for {num_classes} classes")
    spec = evaluation_spec(cfg, num_classes)
    if cfg.bootstrap and len(pairs) == 1 and not spec.breakdown:
        raise PipelineError("--bootstrap: needs several images, --regions or --per-slice (the units to resample)")
    files = ReportFiles(
        json=_path(args.json), csv=_path(args.csv), heatmap=_path(args.heatmap), preview=_path(args.preview)
    )
    _check_report_paths(files, pairs, args)
    image = ImageSpec(args.image, args.image_channel_axis, "--image") if args.image else None
    _, scores = evaluate_and_report(pairs, spec, files, cfg.bootstrap, cfg.confidence, image=image)
    if len(pairs) > 1:
        print(f"{len(pairs)} image pairs; pooled (dataset-level) statistics:")
    print(format_table(scores, spec.names))
    for path in files.written():
        print(f"report: {path}")
    return 0


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
    flags = {files.json: "--json", files.csv: "--csv", files.heatmap: "--heatmap", files.preview: "--preview"}
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
