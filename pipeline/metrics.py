"""Segmentation statistics from confusion matrices (pure NumPy).

Dataset-level statistics are exact when computed from the confusion matrix summed over
chunks: counts add, ratios do not. Conventions (scikit-learn's): rows are ground truth,
columns prediction; counts are int64 (no overflow before 9.2e18 pixels).

Definitions, per class c with TP, FP, FN from the matrix:

    IoU = TP / (TP + FP + FN)        Dice = 2 TP / (2 TP + FP + FN)
    precision = TP / (TP + FP)       recall = TP / (TP + FN)
    pixel accuracy = trace / total   mean class accuracy = mean of recall
    frequency-weighted IoU = sum_c (truth pixels of c / total) * IoU_c

Absent classes: a ratio whose denominator is 0 is undefined and is NaN (``null`` in JSON),
never 0 or 1. A class absent from both truth and prediction has undefined IoU/Dice; the
``absent`` policy decides the means: ``exclude`` (default) leaves undefined classes out,
``nan`` makes any mean over an undefined class NaN so that it cannot pass unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

AbsentPolicy = Literal["exclude", "nan"]
STRIP = 1 << 22  # pixels per pass: a few MiB of temporaries


class ClassIdError(ValueError):
    """Label values outside ``0 .. num_classes - 1`` (and not the ignore index)."""

    def __init__(self, which: str, values: np.ndarray, num_classes: int) -> None:
        self.which, self.values, self.num_classes = which, values, num_classes
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        super().__init__(f"{which} holds class ids {shown}; expected ids 0..{num_classes - 1}")


def confusion_matrix(
    truth: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    ignore_index: int | None = None,
    ignore_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``(K, K)`` int64 counts: ``cm[t, p]`` pixels of true class t predicted as p.

    Pixels whose truth is ``ignore_index``, or where ``ignore_mask`` is true, are not counted.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth shape {truth.shape} != prediction shape {pred.shape}")
    t_all = np.asarray(truth).ravel()
    p_all = np.asarray(pred).ravel()
    m_all = None if ignore_mask is None else np.asarray(ignore_mask, bool).ravel()
    k2 = num_classes * num_classes
    # The smallest type that holds t * K + p keeps the strips in cache: ~7x faster than int64.
    combined: type[np.integer[Any]] = np.uint8 if k2 <= 256 else (np.uint16 if k2 <= 65536 else np.int64)
    counts = np.zeros(k2, np.int64)
    for start in range(0, t_all.size, STRIP):
        t = t_all[start : start + STRIP]
        p = p_all[start : start + STRIP]
        keep = None
        if ignore_index is not None:
            keep = t != ignore_index
        if m_all is not None:
            masked = ~m_all[start : start + STRIP]
            keep = masked if keep is None else keep & masked
        if keep is not None and not keep.all():
            t, p = t[keep], p[keep]
        for which, values in (("ground truth", t), ("prediction", p)):
            if values.size and (values.min() < 0 or values.max() >= num_classes):
                bad = np.unique(values[(values < 0) | (values >= num_classes)])
                raise ClassIdError(which, bad, num_classes)
        flat = t.astype(combined) * combined(num_classes) + p.astype(combined)
        counts += np.bincount(flat, minlength=k2)
    return counts.reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Scores:
    """Per-class and summary statistics of one confusion matrix."""

    confusion: np.ndarray
    absent: AbsentPolicy = "exclude"

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def true_positives(self) -> np.ndarray:
        return np.diag(self.confusion).astype(np.int64)

    @property
    def truth_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def predicted_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=0)

    @property
    def iou(self) -> np.ndarray:
        tp = self.true_positives
        return _ratio(tp, self.truth_pixels + self.predicted_pixels - tp)

    @property
    def dice(self) -> np.ndarray:
        return _ratio(2 * self.true_positives, self.truth_pixels + self.predicted_pixels)

    @property
    def precision(self) -> np.ndarray:
        return _ratio(self.true_positives, self.predicted_pixels)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(self.true_positives, self.truth_pixels)

    @property
    def pixel_accuracy(self) -> float:
        total = self.pixels
        return float(np.trace(self.confusion) / total) if total else float("nan")

    @property
    def mean_iou(self) -> float:
        return self._mean(self.iou)

    @property
    def mean_dice(self) -> float:
        return self._mean(self.dice)

    @property
    def mean_class_accuracy(self) -> float:
        """Mean recall over the classes present in the truth."""
        return self._mean(self.recall)

    @property
    def frequency_weighted_iou(self) -> float:
        total = self.pixels
        if not total:
            return float("nan")
        freq = self.truth_pixels / total
        present = freq > 0  # IoU is defined wherever the class is in the truth
        return float(np.sum(freq[present] * self.iou[present]))

    def _mean(self, values: np.ndarray) -> float:
        undefined = np.isnan(values)
        if undefined.all() or (self.absent == "nan" and undefined.any()):
            return float("nan")
        return float(values[~undefined].mean())


def scores_from_confusion(cm: np.ndarray, absent: AbsentPolicy = "exclude") -> Scores:
    return Scores(np.asarray(cm, dtype=np.int64), absent)


def mean_of_per_image_iou(matrices: list[np.ndarray], absent: AbsentPolicy = "exclude") -> float:
    """The mean over images of each image's mIoU (not the pooled, dataset-level mIoU)."""
    values = np.array([scores_from_confusion(cm, absent).mean_iou for cm in matrices])
    if values.size == 0 or (absent == "nan" and np.isnan(values).any()):
        return float("nan")
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def bootstrap_mean_iou(
    matrices: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    absent: AbsentPolicy = "exclude",
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled mIoU, resampling units (images, regions).

    Each resample draws as many units as there are, with replacement, sums their
    confusion matrices and takes the pooled mIoU.
    """
    matrices = np.asarray(matrices, dtype=np.int64)
    n = matrices.shape[0]
    if n < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    counts = np.stack([np.bincount(d, minlength=n) for d in draws])  # (resamples, n)
    pooled = np.einsum("rn,nij->rij", counts, matrices)
    values = np.array([scores_from_confusion(cm, absent).mean_iou for cm in pooled])
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return (float(low), float(high))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out
