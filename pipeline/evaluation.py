"""Dataset-level statistics of a label volume against ground truth, chunk by chunk on Dask.

Each chunk pair gives a ``(K, K)`` confusion matrix (:func:`metrics.confusion_matrix`);
Dask sums them in a tree. Memory is one chunk pair per task whatever the image size, and
the result is exact: the same counts as one whole-image computation.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .errors import EvaluationError
from .io.images import ImageSpec, as_dask_labels
from .io.labels import is_label_volume, open_label_volume
from .metrics import ClassIdError, Scores, confusion_matrix, scores_from_confusion


def confusion_matrix_dask(
    truth: da.Array,
    pred: da.Array,
    num_classes: int,
    ignore_index: int | None = None,
    names: tuple[str, str] = ("ground truth", "prediction"),
) -> np.ndarray:
    """Exact ``(K, K)`` int64 confusion matrix of two equally shaped Dask arrays."""
    if truth.shape != pred.shape:
        raise EvaluationError(
            f"{names[0]} has shape {truth.shape}, but {names[1]} has shape {pred.shape}; "
            f"expected the same shape"
        )
    if truth.chunks != pred.chunks:
        truth = truth.rechunk(pred.chunks)
    ndim = pred.ndim
    per_block = da.map_blocks(
        _block_confusion,
        truth,
        pred,
        num_classes=num_classes,
        ignore_index=ignore_index,
        names=names,
        new_axis=[ndim, ndim + 1],
        chunks=(1,) * ndim + (num_classes, num_classes),
        dtype=np.int64,
        meta=np.empty((0,) * (ndim + 2), dtype=np.int64),
    )
    return per_block.sum(axis=tuple(range(ndim)), dtype=np.int64).compute()


def _block_confusion(
    truth: np.ndarray,
    pred: np.ndarray,
    num_classes: int,
    ignore_index: int | None,
    names: tuple[str, str],
    block_info: dict | None = None,
) -> np.ndarray:
    try:
        cm = confusion_matrix(truth, pred, num_classes, ignore_index)
    except ClassIdError as exc:
        where = ""
        if block_info and 0 in block_info:
            loc = block_info[0]["array-location"]
            where = " in the region " + ", ".join(f"{a}:{b}" for a, b in loc)
        name = names[0] if exc.which == "ground truth" else names[1]
        allowed = f"0..{num_classes - 1}" + (
            f" or the ignore index {ignore_index}" if ignore_index is not None else ""
        )
        shown = ", ".join(str(v) for v in exc.values[:10])
        raise EvaluationError(
            f"{name} holds class ids {shown}{where}; expected {allowed} "
            f"(num_classes: {num_classes})"
        ) from None
    return cm.reshape((1,) * truth.ndim + cm.shape)


def evaluate_paths(
    prediction: ImageSpec,
    truth: ImageSpec,
    num_classes: int,
    ignore_index: int | None = None,
) -> Scores:
    """Scores of a prediction against ground truth, chunk by chunk.

    The prediction is a label volume written by ``pipeline run`` (refused while its run is
    unfinished) or any single-channel label image; ground truth is read in the
    prediction's chunks.
    """
    pred = _as_dask(prediction)
    # Read the truth in the prediction's chunks, straight from the file: no rechunking.
    gt = as_dask_labels(truth, chunks=pred.chunksize)
    for spec, array in ((truth, gt), (prediction, pred)):
        if not np.issubdtype(array.dtype, np.integer):
            raise EvaluationError(
                f"{spec.field}: {spec.path}: expected integer class ids, got dtype {array.dtype}"
            )
    cm = confusion_matrix_dask(
        gt,
        pred,
        num_classes,
        ignore_index,
        names=(f"{truth.field}: {truth.path}", f"{prediction.field}: {prediction.path}"),
    )
    return scores_from_confusion(cm)


def _as_dask(spec: ImageSpec) -> da.Array:
    if is_label_volume(spec.path):
        return da.from_zarr(open_label_volume(spec.path))
    return as_dask_labels(spec)
