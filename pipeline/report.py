"""Evaluation reports: a JSON document with every number, and a console table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .metrics import Scores

ABSENT_CLASS_POLICY = (
    "a class absent from both ground truth and prediction has undefined IoU/Dice: "
    "reported as null and excluded from the means"
)
UNTRAINED_NOTE = (
    "the model has untrained (fixed-seed random) weights: these IoU values are those of an "
    "untrained model and say nothing about segmentation quality"
)


def class_names(num_classes: int) -> list[str]:
    return [f"class {k}" for k in range(num_classes)]


def scores_to_dict(scores: Scores, names: list[str]) -> dict[str, Any]:
    return {
        "pixels_evaluated": scores.pixels,
        "pixel_accuracy": _num(scores.pixel_accuracy),
        "mean_iou": _num(scores.mean_iou),
        "mean_dice": _num(scores.mean_dice),
        "per_class": [
            {
                "class": k,
                "name": names[k],
                "iou": _num(scores.iou[k]),
                "dice": _num(scores.dice[k]),
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
        "absent_class_policy": ABSENT_CLASS_POLICY,
    }


def format_table(scores: Scores, names: list[str]) -> str:
    width = max(len("class"), *(len(n) for n in names))
    lines = [
        f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'truth px':>14}  {'predicted px':>14}",
    ]
    for k, name in enumerate(names):
        lines.append(
            f"{name:<{width}}  {_pct(scores.iou[k]):>7}  {_pct(scores.dice[k]):>7}  "
            f"{int(scores.truth_pixels[k]):>14,}  {int(scores.predicted_pixels[k]):>14,}"
        )
    lines.append(
        f"mIoU {_pct(scores.mean_iou)}   mean Dice {_pct(scores.mean_dice)}   "
        f"pixel accuracy {_pct(scores.pixel_accuracy)}   ({scores.pixels:,} pixels)"
    )
    return "\n".join(lines)


def write_json(path: str | Path, document: dict[str, Any]) -> None:
    """Write atomically: a reader never sees half a report."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}%"
