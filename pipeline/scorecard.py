"""Evaluate and write every report: JSON, CSV, table, heatmap PNG, overlay preview PNG.

The same code serves ``pipeline evaluate`` and the ``evaluation:`` section of a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import dask.array as da
import numpy as np

from .encodings import LabelEncoding, decode
from .evaluation import EvaluationSpec, LabelPair, evaluate_pairs
from .figures import class_colours, confusion_heatmap, overlay_preview, threshold_curves
from .instance_evaluation import InstanceEvaluationSpec, evaluate_instance_pairs
from .instance_report import csv_text, curves, instance_section
from .io import fs
from .io.images import ImageSpec, as_dask_array
from .io.labels import is_label_volume, open_label_volume
from .metrics import Scores
from .report import pooled_scores, summarize, write_csv, write_json

PREVIEW_EDGE = 1000


@dataclass(frozen=True)
class ReportFiles:
    """Where each report goes (paths or URLs); None: not written."""

    json: str | None = None
    csv: str | None = None
    heatmap: str | None = None
    preview: str | None = None
    instances_csv: str | None = None  # matching per image and IoU threshold
    instances_plot: str | None = None  # pooled precision, recall, F1 over IoU thresholds

    @classmethod
    def beside(cls, output_path: str, instances: bool = False) -> ReportFiles:
        """``out/slide.zarr`` -> ``out/slide.evaluation.json``, ``.csv``, ``.confusion.png``,
        ``.preview.png`` (and with ``instances``, ``.instances.csv``, ``.instances.png``)."""
        stem = fs.stem(output_path)
        return cls(
            json=fs.sibling(output_path, f"{stem}.evaluation.json"),
            csv=fs.sibling(output_path, f"{stem}.evaluation.csv"),
            heatmap=fs.sibling(output_path, f"{stem}.confusion.png"),
            preview=fs.sibling(output_path, f"{stem}.preview.png"),
            instances_csv=fs.sibling(output_path, f"{stem}.instances.csv") if instances else None,
            instances_plot=fs.sibling(output_path, f"{stem}.instances.png") if instances else None,
        )

    def written(self) -> list[str]:
        every = (self.json, self.csv, self.heatmap, self.preview, self.instances_csv, self.instances_plot)
        return [p for p in every if p is not None]


def evaluate_and_report(
    pairs: list[LabelPair],
    spec: EvaluationSpec,
    files: ReportFiles,
    bootstrap: int = 0,
    confidence: float = 0.95,
    image: ImageSpec | None = None,
    extra: dict[str, Any] | None = None,
    instances: InstanceEvaluationSpec | None = None,
    instance_pairs: list[LabelPair] | None = None,
) -> tuple[dict[str, Any], Scores]:
    """Compute, summarise and write; returns the JSON document and the pooled scores.

    With ``instances``, the objects are matched too: the document's ``instances`` section
    (:mod:`.instance_report`), its CSV and its plot; ``instance_pairs`` (default ``pairs``):
    where the objects are, when not in the class labels (an instance volume, say)."""
    results = evaluate_pairs(pairs, spec)
    doc = summarize(results, spec, bootstrap, confidence)
    doc.update(extra or {})
    pooled = pooled_scores(results, spec)
    if instances is not None:
        doc["instances"] = evaluate_and_report_instances(instance_pairs or pairs, instances, spec, files)
    if files.json:
        write_json(files.json, doc)
    if files.csv:
        write_csv(files.csv, pooled, spec.names)
    if files.heatmap:
        fs.put_bytes(files.heatmap, confusion_heatmap(pooled.confusion, spec.names))
    if files.preview:
        write_preview(pairs[0], spec, files.preview, image)
    return doc, pooled


def evaluate_and_report_instances(
    pairs: list[LabelPair], objects: InstanceEvaluationSpec, spec: EvaluationSpec, files: ReportFiles
) -> dict[str, Any]:
    """Match the objects of every pair; write the instance CSV and plot; the report's section."""
    found = evaluate_instance_pairs(pairs, objects, spec)
    section, each, pooled = instance_section(found, objects, spec.names)
    if files.instances_csv:
        fs.put_bytes(files.instances_csv, csv_text(found, each, pooled).encode())
    if files.instances_plot:
        title = "objects matched: pooled precision, recall and F1 by IoU threshold"
        fs.put_bytes(files.instances_plot, threshold_curves(list(section["thresholds"]), curves(section), title))
    return section


def write_preview(pair: LabelPair, spec: EvaluationSpec, path: str, image: ImageSpec | None) -> None:
    """Downsampled image, truth and prediction of one pair, in class colours."""
    pred = _labels(pair.prediction)
    step = max(1, math.ceil(max(pred.shape[-2:]) / PREVIEW_EDGE))
    middle = (pred.shape[1] // 2,) if pred.ndim == 4 else ()  # a volume: its middle z-slice
    sample = (slice(None), *middle, slice(None, None, step), slice(None, None, step))
    pred_ids, _ = _decode(pred[sample].compute(), _encoding_of(pair.prediction, spec))
    truth_ids, ignored = _decode(as_dask_array(replace(pair.truth, volume=True))[sample].compute(), spec.encoding)
    if spec.ignore_index is not None:
        extra = truth_ids == spec.ignore_index
        ignored = extra if ignored is None else ignored | extra
    if pair.ignore_mask is not None:
        extra = as_dask_array(replace(pair.ignore_mask, volume=True))[sample].compute()[0] != 0
        ignored = extra if ignored is None else ignored | extra
    if image is not None:
        full = as_dask_array(replace(image, volume=True))
        base = full[(slice(None), *middle[: full.ndim - 3], slice(None, None, step), slice(None, None, step))].compute()
    else:
        base = np.full((1,) + pred_ids.shape, 128, np.uint8)
    colours = class_colours(spec.num_classes, spec.encoding.palette)
    fs.put_bytes(path, overlay_preview(base, truth_ids, pred_ids, colours, ignored))


def _labels(spec: ImageSpec) -> da.Array:
    if is_label_volume(spec.path):
        return da.from_zarr(open_label_volume(spec.path))[None]
    return as_dask_array(replace(spec, volume=True))


def _encoding_of(spec: ImageSpec, evaluation: EvaluationSpec) -> LabelEncoding:
    return LabelEncoding() if is_label_volume(spec.path) else evaluation.encoding


def _decode(labels: np.ndarray, encoding: LabelEncoding) -> tuple[np.ndarray, np.ndarray | None]:
    return decode(labels if encoding.kind == "palette" else labels[0], encoding)
