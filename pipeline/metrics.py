"""Segmentation statistics from confusion matrices (pure NumPy).

Dataset-level statistics are exact when computed from the confusion matrix summed over
chunks: counts add, ratios do not. Conventions (scikit-learn's): rows are ground truth,
columns prediction; counts are int64 (no overflow before 9.2e18 pixels).

Absent-class policy: a class with no pixel in the truth and none in the prediction has
undefined IoU and Dice (0/0). It is reported as NaN (``null`` in JSON) and excluded from
the means, never counted as 0 or 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ClassIdError(ValueError):
    """Label values outside ``0 .. num_classes - 1`` (and not the ignore index)."""

    def __init__(self, which: str, values: np.ndarray, num_classes: int) -> None:
        self.which, self.values, self.num_classes = which, values, num_classes
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        super().__init__(
            f"{which} holds class ids {shown}; expected ids 0..{num_classes - 1}"
        )


def confusion_matrix(
    truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """``(K, K)`` int64 counts: ``cm[t, p]`` pixels of true class t predicted as p."""
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    t = np.asarray(truth).ravel()
    p = np.asarray(pred).ravel()
    if ignore_index is not None:
        keep = t != ignore_index
        t, p = t[keep], p[keep]
    for which, values in (("ground truth", t), ("prediction", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            bad = np.unique(values[(values < 0) | (values >= num_classes)])
            raise ClassIdError(which, bad, num_classes)
    flat = t.astype(np.int64) * num_classes + p.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Scores:
    """Per-class and summary statistics of one confusion matrix."""

    confusion: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    truth_pixels: np.ndarray
    predicted_pixels: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def pixel_accuracy(self) -> float:
        total = self.pixels
        return float(np.trace(self.confusion) / total) if total else float("nan")

    @property
    def mean_iou(self) -> float:
        return _nanmean(self.iou)

    @property
    def mean_dice(self) -> float:
        return _nanmean(self.dice)


def scores_from_confusion(cm: np.ndarray) -> Scores:
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    truth = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = truth + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        dice = np.where(union > 0, 2 * tp / np.maximum(truth + predicted, 1), np.nan)
    return Scores(cm, iou.astype(float), dice.astype(float), truth, predicted)


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")
