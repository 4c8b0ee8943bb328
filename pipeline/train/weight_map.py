"""The U-Net paper's weight map (Ronneberger et al. 2015, eq. 2), pure NumPy/SciPy.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies (class k weighs N / (K n_k), scikit-learn's
"balanced"); ``d1`` and ``d2`` are the distances to the nearest and the second nearest
object (cell). The separation term is what makes a network learn the thin background
between touching cells: it is added on background pixels (those of no object), where it
is large only in narrow gaps, with the paper's ``w0 = 10`` and ``sigma = 5`` pixels by
default. Objects are given as an instance-label image (0: none); pixels the loss ignores
get weight 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def class_balance(labels: np.ndarray, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """Per-class weights ``N / (K n_k)`` over the counted pixels; 0 for absent classes
    (``K``: the classes present)."""
    values = labels.ravel()
    if ignore_index is not None:
        values = values[values != ignore_index]
    counts = np.bincount(values.astype(np.int64), minlength=num_classes)[:num_classes].astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, np.float64)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def separation_weights(instances: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """``w0 exp(-(d1 + d2)^2 / (2 sigma^2))`` on pixels of no object; 0 on objects, and
    everywhere when there are fewer than two objects."""
    ids = np.unique(instances[instances > 0])
    out = np.zeros(instances.shape, np.float64)
    if len(ids) < 2:
        return out
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for i in ids:
        distance = ndimage.distance_transform_edt(instances != i)
        second = np.minimum(second, np.maximum(nearest, distance))
        nearest = np.minimum(nearest, distance)
    background = instances == 0
    out[background] = w0 * np.exp(-((nearest[background] + second[background]) ** 2) / (2 * sigma**2))
    return out


def weight_map(
    labels: np.ndarray,
    instances: np.ndarray | None,
    class_weights: np.ndarray,
    ignore_index: int | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
) -> np.ndarray:
    """``w_c(x)`` plus, with ``instances``, the separation term; 0 where ignored."""
    counted = labels if ignore_index is None else np.where(labels == ignore_index, 0, labels)
    weights = class_weights[counted.astype(np.int64)]
    if instances is not None:
        weights = weights + separation_weights(instances, w0, sigma)
    if ignore_index is not None:
        weights = np.where(labels == ignore_index, 0.0, weights)
    return weights
