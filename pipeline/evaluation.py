"""Dataset-level statistics of predictions against ground truth, chunk by chunk on Dask.

Each chunk pair is decoded (class ids, palette colours, binary masks) and gives a ``(K, K)``
confusion matrix (:func:`metrics.confusion_matrix`); Dask sums them in a tree. Memory is
one chunk pair per task whatever the image size, and the counts are exact: the same as
one whole-image computation. With ``region`` set, chunks are the grid cells of a
per-region breakdown and their matrices are kept; with ``per_slice``, a label volume
``(z, y, x)`` is chunked one z-slice at a time for a per-slice breakdown.

Several images (folders or globs) are paired by name (:mod:`pipeline.io.listing`): the
path below a folder, or the parts a glob's wildcards match, without the suffix:
``pred/a/x.tif`` pairs with ``truth/a/x.png``, ``out/*.zarr`` with ``tiles/*/masks/*.png``
when the names agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import dask
import dask.array as da
import numpy as np

from .encodings import EncodingError, LabelEncoding, decode
from .errors import EvaluationError
from .io import fs
from .io.images import ImageSpec, as_dask_array
from .io.labels import is_label_volume, open_label_volume
from .io.listing import list_images
from .metrics import AbsentPolicy, ClassIdError, confusion_matrix


@dataclass(frozen=True)
class EvaluationSpec:
    """How to compare: classes, encoding of the labels, what to ignore, what to report."""

    num_classes: int
    ignore_index: int | None = None
    encoding: LabelEncoding = LabelEncoding()
    absent: AbsentPolicy = "exclude"
    region: int | None = None
    per_slice: bool = False
    class_names: tuple[str, ...] | None = None

    @property
    def breakdown(self) -> bool:
        return self.region is not None or self.per_slice

    @property
    def names(self) -> list[str]:
        return list(self.class_names or [f"class {k}" for k in range(self.num_classes)])


@dataclass(frozen=True)
class LabelPair:
    name: str
    prediction: ImageSpec
    truth: ImageSpec
    ignore_mask: ImageSpec | None = None


@dataclass
class PairResult:
    pair: LabelPair
    confusion: np.ndarray
    shape: tuple[int, ...]
    regions: np.ndarray | None = field(default=None, repr=False)  # (*grid, K, K)
    cell: tuple[int, ...] | None = None  # spatial shape of one region


def evaluate_pairs(pairs: list[LabelPair], spec: EvaluationSpec) -> list[PairResult]:
    """Confusion matrices of every pair, computed together in one Dask graph."""
    lazy, shapes, cells = [], [], []
    for pair in pairs:
        blocks, shape, cell = _block_confusions(pair, spec)
        shapes.append(shape)
        cells.append(cell)
        grid_axes = tuple(range(blocks.ndim - 2))
        lazy.append(blocks if spec.breakdown else blocks.sum(axis=grid_axes, dtype=np.int64))
    try:
        computed = dask.compute(*lazy)
    except (ClassIdError, EncodingError) as exc:  # raised where no block location is known
        raise EvaluationError(str(exc)) from None
    results = []
    for pair, shape, cell, value in zip(pairs, shapes, cells, computed):
        value = np.asarray(value, dtype=np.int64)
        if spec.breakdown:
            total = value.sum(axis=tuple(range(value.ndim - 2)))
            results.append(PairResult(pair, total, shape, value, cell))
        else:
            results.append(PairResult(pair, value, shape))
    return results


def confusion_matrix_dask(
    truth: da.Array,
    pred: da.Array,
    num_classes: int,
    ignore_index: int | None = None,
    names: tuple[str, str] = ("ground truth", "prediction"),
) -> np.ndarray:
    """Exact ``(K, K)`` int64 confusion matrix of two equally shaped Dask arrays of class ids."""
    _check_shapes(truth.shape, pred.shape, names)
    spec = EvaluationSpec(num_classes, ignore_index)
    blocks = _confusion_blocks(truth[None], pred.rechunk(truth.chunks)[None], None, spec, spec.encoding, names)
    return blocks.sum(axis=tuple(range(truth.ndim)), dtype=np.int64).compute()


def _block_confusions(
    pair: LabelPair, spec: EvaluationSpec
) -> tuple[da.Array, tuple[int, ...], tuple[int, ...]]:
    """Per-block matrices of one pair, its spatial shape and the spatial shape of a block."""
    if is_label_volume(pair.prediction.path):
        pred = da.from_zarr(open_label_volume(pair.prediction.path))[None]
        pred_encoding = LabelEncoding()  # volumes written by the pipeline hold class ids
    else:
        pred = as_dask_array(_as_volume(pair.prediction))
        pred_encoding = spec.encoding
    chunks = _chunks(pred.shape[1:], pred.chunksize[1:], spec)
    pred = pred.rechunk((pred.shape[0],) + chunks)
    truth = as_dask_array(_as_volume(pair.truth), chunks=chunks)
    names = (f"{pair.truth.field}: {pair.truth.path}", f"{pair.prediction.field}: {pair.prediction.path}")
    _check_shapes(truth.shape[1:], pred.shape[1:], names)
    for array, encoding, name in ((truth, spec.encoding, names[0]), (pred, pred_encoding, names[1])):
        if array.shape[0] != encoding.channels:
            raise EvaluationError(
                f"{name} has {array.shape[0]} channel{'s' * (array.shape[0] > 1)}; encoding "
                f"{encoding.kind} expects {encoding.channels}"
            )
        if encoding.kind != "palette" and not np.issubdtype(array.dtype, np.integer):
            raise EvaluationError(f"{name}: expected integer class ids, got dtype {array.dtype}")
    mask = None
    if pair.ignore_mask is not None:
        mask = as_dask_array(_as_volume(pair.ignore_mask), chunks=chunks)
        _check_shapes(mask.shape[1:], pred.shape[1:], (f"ignore mask {pair.ignore_mask.path}", names[1]))
    blocks = _confusion_blocks(truth, pred, mask, spec, pred_encoding, names)
    return blocks, tuple(pred.shape[1:]), chunks


def _chunks(shape: tuple[int, ...], stored: tuple[int, ...], spec: EvaluationSpec) -> tuple[int, ...]:
    """Block shape: region cells in y/x, single slices in z (a breakdown), else as stored."""
    chunks = list(stored)
    if spec.region:
        chunks[-2:] = [spec.region, spec.region]
    if len(shape) == 3:
        chunks[0] = 1 if spec.per_slice else chunks[0]
        if spec.per_slice and not spec.region:
            chunks[1:] = list(shape[1:])
    return tuple(int(min(c, n)) for c, n in zip(chunks, shape))


def _as_volume(spec: ImageSpec) -> ImageSpec:
    return replace(spec, volume=True)


def _confusion_blocks(
    truth: da.Array,
    pred: da.Array,
    mask: da.Array | None,
    spec: EvaluationSpec,
    pred_encoding: LabelEncoding,
    names: tuple[str, str],
) -> da.Array:
    """Per-block confusion matrices ``(rows, cols, K, K)`` of channel-first label arrays."""
    k = spec.num_classes
    nd = truth.ndim - 1  # spatial axes
    args = [truth, pred] + ([mask] if mask is not None else [])
    return da.map_blocks(
        _block_confusion,
        *args,
        spec=spec,
        pred_encoding=pred_encoding,
        names=names,
        drop_axis=0,
        new_axis=[nd, nd + 1],
        chunks=(1,) * nd + (k, k),
        dtype=np.int64,
        meta=np.empty((0,) * (nd + 2), dtype=np.int64),
    )


def _block_confusion(
    truth: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    spec: EvaluationSpec,
    pred_encoding: LabelEncoding,
    names: tuple[str, str],
    block_info: dict | None = None,
) -> np.ndarray:
    where = ""
    if block_info and 0 in block_info:
        loc = block_info[0]["array-location"][1:]
        where = " in the region " + ", ".join(f"{a}:{b}" for a, b in loc)
    try:
        t_ids, t_ignored = decode(truth if spec.encoding.kind == "palette" else truth[0], spec.encoding)
    except EncodingError as exc:
        raise EvaluationError(f"{names[0]}{where}: {exc}") from None
    try:
        p_ids, _ = decode(pred if pred_encoding.kind == "palette" else pred[0], pred_encoding)
    except EncodingError as exc:
        raise EvaluationError(f"{names[1]}{where}: {exc}") from None
    ignored = t_ignored
    if mask is not None:
        ignored = (mask[0] != 0) if ignored is None else (ignored | (mask[0] != 0))
    try:
        cm = confusion_matrix(t_ids, p_ids, spec.num_classes, spec.ignore_index, ignored)
    except ClassIdError as exc:
        name = names[0] if exc.which == "ground truth" else names[1]
        allowed = f"0..{spec.num_classes - 1}" + (
            f" or the ignore index {spec.ignore_index}" if spec.ignore_index is not None else ""
        )
        shown = ", ".join(str(v) for v in exc.values[:10])
        raise EvaluationError(
            f"{name} holds class ids {shown}{where}; expected {allowed} "
            f"(num_classes: {spec.num_classes})"
        ) from None
    return cm.reshape((1,) * (truth.ndim - 1) + cm.shape)


def _check_shapes(a: tuple[int, ...], b: tuple[int, ...], names: tuple[str, str]) -> None:
    if tuple(a) != tuple(b):
        raise EvaluationError(
            f"{names[0]} has shape {tuple(a)}, but {names[1]} has shape {tuple(b)}; "
            f"expected the same shape"
        )


def pair_paths(
    prediction: str, truth: str, ignore_mask: str | None = None, channel_axis_of: dict | None = None
) -> list[LabelPair]:
    """Pair single files, folders or globs of label images by name (:mod:`pipeline.io.listing`)."""
    channel_axis_of = channel_axis_of or {}
    sides = {
        "prediction": list_images(prediction, "prediction", EvaluationError),
        "ground truth": list_images(truth, "ground truth", EvaluationError),
    }
    if ignore_mask is not None:
        sides["ignore mask"] = list_images(ignore_mask, "ignore mask", EvaluationError)
    if all(len(files) == 1 for files in sides.values()):
        keys = {side: next(iter(files)) for side, files in sides.items()}
        sides = {side: {"": files[keys[side]]} for side, files in sides.items()}
    names = set(sides["ground truth"])
    for side, files in sides.items():
        if set(files) != names:
            missing = sorted(names - set(files))[:5]
            extra = sorted(set(files) - names)[:5]
            raise EvaluationError(
                f"{side}: cannot pair the images with the ground truth: missing {missing}, "
                f"unmatched {extra} (pairs match by name: the path parts a glob's wildcards match, or "
                f"the path below a folder, without suffix)"
            )
    def spec(side: str, name: str) -> ImageSpec:
        return ImageSpec(sides[side][name], channel_axis_of.get(side), side)

    return [
        LabelPair(
            name or fs.name(sides["ground truth"][name]),
            spec("prediction", name),
            spec("ground truth", name),
            spec("ignore mask", name) if ignore_mask is not None else None,
        )
        for name in sorted(names)
    ]


