"""Evaluation reports people read: JSON with every number, CSV per class, a Markdown table.

The JSON document::

    pooled           dataset-level statistics of the summed confusion matrix (the exact
                     "IoU of the dataset"): mean_iou, frequency_weighted_iou, pixel_accuracy,
                     mean_class_accuracy, mean_dice, per_class [...], confusion_matrix
    mean_of_per_image_iou   the mean over images of each image's own mIoU (not the same
                     number as pooled.mean_iou; only with several images)
    per_image        each image's statistics
    regions          per grid cell (cell size, offsets, mIoU, pixels), when asked for
    bootstrap        percentile interval of the pooled mIoU over resampled images or regions
    policy           absent classes, ignore index, encoding: how the numbers were made
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np

from .evaluation import EvaluationSpec, PairResult
from .io import fs
from .metrics import Scores, bootstrap_mean_iou, mean_of_per_image_iou, scores_from_confusion

ABSENT_POLICIES = {
    "exclude": "a class absent from both ground truth and prediction has undefined IoU/Dice: "
    "reported as null and excluded from the means",
    "nan": "a class absent from both ground truth and prediction has undefined IoU/Dice: "
    "reported as null, and any mean over it is null too",
}
UNTRAINED_NOTE = (
    "the model has untrained (fixed-seed random) weights: these IoU values are those of an "
    "untrained model and say nothing about segmentation quality"
)


def scores_to_dict(scores: Scores, names: list[str]) -> dict[str, Any]:
    return {
        "pixels_evaluated": scores.pixels,
        "mean_iou": _num(scores.mean_iou),
        "frequency_weighted_iou": _num(scores.frequency_weighted_iou),
        "pixel_accuracy": _num(scores.pixel_accuracy),
        "mean_class_accuracy": _num(scores.mean_class_accuracy),
        "mean_dice": _num(scores.mean_dice),
        "per_class": [
            {
                "class": k,
                "name": names[k],
                "iou": _num(scores.iou[k]),
                "dice": _num(scores.dice[k]),
                "precision": _num(scores.precision[k]),
                "recall": _num(scores.recall[k]),
                "truth_pixels": int(scores.truth_pixels[k]),
                "predicted_pixels": int(scores.predicted_pixels[k]),
            }
            for k in range(scores.num_classes)
        ],
        "confusion_matrix": {
            "rows": "ground truth",
            "columns": "prediction",
            "counts": scores.confusion.tolist(),
        },
    }


def summarize(
    results: list[PairResult],
    spec: EvaluationSpec,
    bootstrap: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The report document of one evaluation (see the module docstring)."""
    names = spec.names
    pooled = pooled_scores(results, spec)
    doc: dict[str, Any] = {
        "num_classes": spec.num_classes,
        "class_names": names,
        "images": len(results),
        "pooled": scores_to_dict(pooled, names),
        "policy": {
            "absent_classes": spec.absent,
            "absent_classes_rule": ABSENT_POLICIES[spec.absent],
            "ignore_index": spec.ignore_index,
            "ignore_mask": any(r.pair.ignore_mask is not None for r in results),
            "encoding": spec.encoding.kind,
        },
    }
    if len(results) > 1:
        doc["mean_of_per_image_iou"] = _num(
            mean_of_per_image_iou([r.confusion for r in results], spec.absent)
        )
    doc["per_image"] = [
        {
            "name": r.pair.name,
            "prediction": fs.redact(r.pair.prediction.path),
            "ground_truth": fs.redact(r.pair.truth.path),
            "shape": list(r.shape),
            **_brief(scores_from_confusion(r.confusion, spec.absent)),
        }
        for r in results
    ]
    units = None
    if spec.breakdown:
        cells = []
        stacks = []
        for r in results:
            assert r.regions is not None and r.cell is not None
            stacks.append(r.regions.reshape(-1, *r.regions.shape[-2:]))
            for index in np.ndindex(*r.regions.shape[:-2]):
                cells.append(
                    {
                        "image": r.pair.name,
                        "offset": [i * c for i, c in zip(index, r.cell)],
                        "shape": [min(c, n - i * c) for i, c, n in zip(index, r.cell, r.shape)],
                        **_brief(scores_from_confusion(r.regions[index], spec.absent)),
                    }
                )
        doc["regions"] = {
            "kind": "z-slices" if spec.per_slice and not spec.region else "grid cells",
            "cell": spec.region,
            "per_slice": spec.per_slice,
            "per_region": cells,
        }
        units = ("regions", np.concatenate(stacks))
    elif len(results) > 1:
        units = ("images", np.stack([r.confusion for r in results]))
    if bootstrap and units is not None:
        low, high = bootstrap_mean_iou(units[1], bootstrap, confidence, absent=spec.absent)
        doc["bootstrap"] = {
            "unit": units[0],
            "units": int(units[1].shape[0]),
            "resamples": bootstrap,
            "confidence": confidence,
            "mean_iou_interval": [_num(low), _num(high)],
        }
    return doc


def pooled_scores(results: list[PairResult], spec: EvaluationSpec) -> Scores:
    """Dataset-level statistics: of the confusion matrices summed over every image."""
    total = sum((r.confusion for r in results), np.zeros((), np.int64))
    return scores_from_confusion(total, spec.absent)


def format_table(scores: Scores, names: list[str]) -> str:
    """A Markdown table (reads fine on a terminal too) and a summary line."""
    width = max(len("class"), *(len(n) for n in names))
    head = f"| {'class':<{width}} | {'IoU':>7} | {'Dice':>7} | {'precision':>9} | {'recall':>7} | {'truth px':>14} | {'predicted px':>14} |"
    rule = f"|{'-' * (width + 2)}|{'-' * 8}:|{'-' * 8}:|{'-' * 10}:|{'-' * 8}:|{'-' * 15}:|{'-' * 15}:|"
    lines = [head, rule]
    for k, name in enumerate(names):
        lines.append(
            f"| {name:<{width}} | {_pct(scores.iou[k]):>7} | {_pct(scores.dice[k]):>7} | "
            f"{_pct(scores.precision[k]):>9} | {_pct(scores.recall[k]):>7} | "
            f"{int(scores.truth_pixels[k]):>14,} | {int(scores.predicted_pixels[k]):>14,} |"
        )
    lines.append("")
    lines.append(
        f"mIoU {_pct(scores.mean_iou)} | frequency-weighted IoU {_pct(scores.frequency_weighted_iou)} | "
        f"pixel accuracy {_pct(scores.pixel_accuracy)} | mean class accuracy "
        f"{_pct(scores.mean_class_accuracy)} | mean Dice {_pct(scores.mean_dice)} | "
        f"{scores.pixels:,} pixels"
    )
    return "\n".join(lines)


def write_csv(path: str, scores: Scores, names: list[str]) -> None:
    """Write atomically (a local file or an object): a reader never sees half a report."""
    rows = scores_to_dict(scores, names)["per_class"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    fs.put_bytes(path, text.getvalue().encode())


def write_json(path: str, document: dict[str, Any]) -> None:
    """Write atomically (a local file or an object): a reader never sees half a report."""
    fs.put_bytes(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())


def _brief(scores: Scores) -> dict[str, Any]:
    return {
        "pixels": scores.pixels,
        "mean_iou": _num(scores.mean_iou),
        "pixel_accuracy": _num(scores.pixel_accuracy),
        "iou": [_num(v) for v in scores.iou],
    }


def _num(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"
