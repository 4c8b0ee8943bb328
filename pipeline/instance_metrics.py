"""Instance-segmentation statistics from a sparse contingency table (pure NumPy).

The contingency table of two label images, ``pred`` (predicted instance ids) and ``truth``
(true instance ids), holds the pixel count of every overlapping pair of ids. It is counted
per chunk and summed exactly (counts add, ratios do not), and every statistic here is a
function of it alone. Its size is the number of distinct pairs, never the size of the ids:
ids are any integers ``0 .. 2**64 - 1``, not necessarily sequential; 0 is background, not
an object, on both sides. Pixels under an ``ignore_mask`` count nowhere, areas included.

Definitions; objects are the non-zero ids, the area of an object counts all its pixels
(also those over the other image's background):

    IoU(p, t) = n_pt / (area_p + area_t - n_pt)
    at threshold th >= 0.5, p and t match when IoU > th (strictly). IoU > 0.5 means the
        pair holds more than half of each object, so matches are one to one: no assignment
    TP = matched pairs, FP = predicted objects without a match, FN = true objects without
    precision = TP / (TP + FP)   recall = TP / (TP + FN)   F1 = 2 TP / (2 TP + FP + FN)
    AP = TP / (TP + FP + FN)     the Data Science Bowl 2018 "average precision" at th; its
                                 score of an image is the mean AP over THRESHOLDS
    panoptic quality of class c (Kirillov et al. 2019): segments of class c matched with
        those of class c at IoU > 0.5;  SQ = sum of matched IoU / TP,
        RQ = TP / (TP + FP/2 + FN/2),   PQ = SQ * RQ = sum of matched IoU / (TP + FP/2 + FN/2)
    adapted Rand (SNEMI3D, Arganda-Carreras et al. 2015), from pair counts n_pt, true areas
        a_t, predicted areas b_p and N pixels:  X = sum n_pt^2 - N,
        precision = X / (sum b_p^2 - N)   recall = X / (sum a_t^2 - N)
        error = 1 - X / ((sum a_t^2 + sum b_p^2) / 2 - N)   (1 - their harmonic mean)
    variation of information (Meila 2007), bits, ISBI 2012 / CREMI names:
        split = H(pred | truth) (over-segmentation), merge = H(truth | pred) (under-)

A ratio whose denominator is 0 is NaN, never 0 or 1 (e.g. AP of an image without objects),
except PQ = 0 for a class with segments but no match. Pooling: `merge` sums the tables of
the chunks of one image; `disjoint_union` pools images, so that pooled statistics are those
of the images laid side by side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
_U64_MAX = (1 << 64) - 1

#: Classes of objects: ``{id: class}``, or ``(ids, classes)`` arrays for millions of ids.
ClassMap = Mapping[int, int] | tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class Contingency:
    """Pixels of each overlapping (pred, truth) id pair; sorted by (pred, truth), unique.

    ``pred`` and ``truth`` are uint64 ids (0 = background), ``count`` int64, > 0.
    """

    pred: np.ndarray
    truth: np.ndarray
    count: np.ndarray

    def __post_init__(self) -> None:
        dtypes = (self.pred.dtype, self.truth.dtype, self.count.dtype)
        if dtypes != (np.dtype(np.uint64), np.dtype(np.uint64), np.dtype(np.int64)):
            raise ValueError(f"Contingency needs uint64, uint64, int64 arrays, not {dtypes}")
        if not self.count.ndim == 1 or not self.pred.shape == self.truth.shape == self.count.shape:
            raise ValueError("Contingency arrays must be 1-D and of one length")

    @property
    def pixels(self) -> int:
        return int(self.count.sum())

    def pred_areas(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, areas)`` of the predicted segments, ascending, id 0 included if present."""
        starts = _starts(self.pred)
        return self.pred[starts], np.add.reduceat(self.count, starts)

    def truth_areas(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, areas)`` of the true segments, ascending, id 0 included if present."""
        ids, count = _sort_with(self.truth, self.count)
        starts = _starts(ids)
        return ids[starts], np.add.reduceat(count, starts)


def count_overlaps(
    pred: np.ndarray, truth: np.ndarray, ignore_mask: np.ndarray | None = None
) -> Contingency:
    """The contingency table of one chunk; pixels where ``ignore_mask`` is true are skipped."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} != truth shape {truth.shape}")
    for which, labels in (("pred", pred), ("truth", truth)):
        if labels.dtype.kind not in "uib":
            raise ValueError(f"{which} must hold integer ids, not {labels.dtype}")
    p, t = pred.ravel(), truth.ravel()
    if ignore_mask is not None:
        mask = np.asarray(ignore_mask, dtype=bool)
        if mask.shape != pred.shape:
            raise ValueError(f"ignore_mask shape {mask.shape} != label shape {pred.shape}")
        keep = ~mask.ravel()
        p, t = p[keep], t[keep]
    # Neighbouring pixels mostly share their pair: sorting runs, not pixels, is much faster.
    starts = _starts(p, t)
    lengths = np.diff(np.append(starts, p.size))
    p_runs, t_runs = p[starts], t[starts]
    for which, runs in (("pred", p_runs), ("truth", t_runs)):
        if runs.dtype.kind == "i" and runs.size and runs.min() < 0:
            raise ValueError(f"{which} holds negative ids, e.g. {runs.min()}")
    return _reduce(_as_uint64(p_runs), _as_uint64(t_runs), lengths.astype(np.int64, copy=False))


def merge(tables: Iterable[Contingency]) -> Contingency:
    """The exact sum of tables of the same image (e.g. of its chunks)."""
    tables = list(tables)
    if not tables:
        return _empty()
    return _reduce(
        *(np.concatenate([getattr(t, f) for t in tables]) for f in ("pred", "truth", "count"))
    )


def disjoint_union(tables: Sequence[Contingency]) -> Contingency:
    """Pools images: the table of the images laid side by side, ids made distinct.

    The non-zero ids of image k become a sequential range after those of images < k,
    ascending as the original ids; 0 stays background in every image.
    """
    renumbered = []
    p_offset = t_offset = 0
    for table in tables:
        pred, p_offset = _renumber(table.pred, p_offset)
        truth, t_offset = _renumber(table.truth, t_offset)
        renumbered.append(Contingency(pred, truth, table.count))  # sorted again by merge
    return merge(renumbered)


@dataclass(frozen=True)
class MatchCounts:
    """Object matching at one IoU threshold; ``iou_sum`` sums the IoU of the matches."""

    threshold: float
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def precision(self) -> float:
        return _div(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _div(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _div(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def ap(self) -> float:
        """TP / (TP + FP + FN): the Data Science Bowl 2018 "average precision" at threshold."""
        return _div(self.tp, self.tp + self.fp + self.fn)

    @property
    def mean_matched_iou(self) -> float:
        return _div(self.iou_sum, self.tp)


def match(table: Contingency, thresholds: Sequence[float] = THRESHOLDS) -> list[MatchCounts]:
    """Matches objects at each threshold (IoU > threshold, one to one since threshold >= 0.5)."""
    for th in thresholds:
        if not th >= 0.5:  # NaN too
            raise ValueError(f"IoU thresholds below 0.5 allow many-to-one matches: got {th}")
    pairs = _object_pairs(table)
    n_pred, n_true, iou = pairs.pred_objects.size, pairs.true_objects.size, pairs.iou
    counts = []
    for th in thresholds:
        matched = iou[iou > th]
        tp = int(matched.size)
        counts.append(MatchCounts(float(th), tp, n_pred - tp, n_true - tp, float(matched.sum())))
    return counts


def mean_average_precision(counts: Sequence[MatchCounts]) -> float:
    """Mean AP over the thresholds: the Data Science Bowl 2018 score of one image."""
    if not counts:
        raise ValueError("mean_average_precision needs the counts of at least one threshold")
    return float(np.mean([c.ap for c in counts]))


@dataclass(frozen=True)
class PanopticQuality:
    """Matching of one class at IoU > 0.5; ``iou_sum`` sums the IoU of the matches."""

    tp: int
    fp: int
    fn: int
    iou_sum: float

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of the matches (NaN without matches)."""
        return _div(self.iou_sum, self.tp)

    @property
    def rq(self) -> float:
        """Recognition quality: the F1 score of the matching."""
        return _div(self.tp, self.tp + self.fp / 2 + self.fn / 2)

    @property
    def pq(self) -> float:
        """SQ * RQ; 0 for a class with segments but no match, NaN for one without segments."""
        return _div(self.iou_sum, self.tp + self.fp / 2 + self.fn / 2)


def panoptic_quality(
    table: Contingency, pred_classes: ClassMap, truth_classes: ClassMap
) -> dict[int, PanopticQuality]:
    """Per-class panoptic quality, for every class named in either class map.

    Every object of the table needs a class (ValueError otherwise); ids of the maps that
    are absent from the table are not counted (they may belong to other images).
    """
    p_ids, p_cls = _parse_class_map("pred_classes", pred_classes)
    t_ids, t_cls = _parse_class_map("truth_classes", truth_classes)
    pairs = _object_pairs(table)
    pred_objects = _classes_of("pred", pairs.pred_objects, p_ids, p_cls)
    true_objects = _classes_of("truth", pairs.true_objects, t_ids, t_cls)
    p_class = _classes_of("pred", pairs.pred, p_ids, p_cls)
    matched = (pairs.iou > 0.5) & (p_class == _classes_of("truth", pairs.truth, t_ids, t_cls))
    classes = np.unique(np.concatenate([p_cls, t_cls]))

    def per_class(cls: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(np.searchsorted(classes, cls), weights, minlength=classes.size)

    tp, n_pred, n_true = (
        per_class(p_class[matched]),
        per_class(pred_objects),
        per_class(true_objects),
    )
    iou_sum = per_class(p_class[matched], pairs.iou[matched])
    return {
        c: PanopticQuality(
            int(tp[i]), int(n_pred[i] - tp[i]), int(n_true[i] - tp[i]), float(iou_sum[i])
        )
        for i, c in enumerate(classes.tolist())
    }


class RandScores(NamedTuple):
    """Adapted Rand error and its precision (merge score) and recall (split score)."""

    error: float
    precision: float
    recall: float


def adapted_rand_error(table: Contingency, ignore_truth_background: bool = True) -> RandScores:
    """SNEMI3D adapted Rand error; by default pixels of true background are not counted.

    The error equals ``skimage.metrics.adapted_rand_error(truth, pred)`` (which ignores true
    label 0 by default); skimage 0.26 returns precision and recall swapped against its own
    docstring (its issue #6485). Here a prediction that merges all has recall 1.
    """
    if ignore_truth_background:
        table = _drop_truth_background(table)
    n = table.count.astype(np.float64)
    total = n.sum()
    true_areas = table.truth_areas()[1].astype(np.float64)
    pred_areas = table.pred_areas()[1].astype(np.float64)
    both = n @ n - total
    in_truth = true_areas @ true_areas - total
    in_pred = pred_areas @ pred_areas - total
    fscore = _div(both, 0.5 * in_truth + 0.5 * in_pred)  # skimage's order of operations
    return RandScores(1.0 - fscore, _div(both, in_pred), _div(both, in_truth))


class VariationOfInformation(NamedTuple):
    """Conditional entropies in bits: split = H(pred | truth), merge = H(truth | pred)."""

    split: float
    merge: float

    @property
    def total(self) -> float:
        return self.split + self.merge


def variation_of_information(
    table: Contingency, ignore_truth_background: bool = False
) -> VariationOfInformation:
    """Split and merge parts of the variation of information; all pixels count by default.

    Equals ``skimage.metrics.variation_of_information(truth, pred)``, which returns
    ``(H(pred | truth), H(truth | pred))`` in this order and ignores nothing by default;
    ``ignore_truth_background`` is its ``ignore_labels=(0,)``.
    """
    if ignore_truth_background:
        table = _drop_truth_background(table)
    total = table.pixels
    if total == 0:
        return VariationOfInformation(float("nan"), float("nan"))
    n = table.count.astype(np.float64)
    true_area = _per_pair(table.truth, *table.truth_areas())
    pred_area = _per_pair(table.pred, *table.pred_areas())
    split = -float(np.sum(n * np.log2(n / true_area))) / total
    merge_ = -float(np.sum(n * np.log2(n / pred_area))) / total
    return VariationOfInformation(split, merge_)


def _starts(*columns: np.ndarray) -> np.ndarray:
    """Index of the first row of each run of equal rows."""
    if columns[0].size == 0:
        return np.empty(0, np.intp)
    change = np.zeros(columns[0].size, bool)
    change[0] = True
    for column in columns:
        change[1:] |= column[1:] != column[:-1]
    return np.flatnonzero(change)


def _as_uint64(ids: np.ndarray) -> np.ndarray:
    """Non-negative ids as uint64, without a copy where they are 64-bit already."""
    return ids.view(np.uint64) if ids.dtype.itemsize == 8 else ids.astype(np.uint64)


def _empty() -> Contingency:
    return Contingency(np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.int64))


def _reduce(pred: np.ndarray, truth: np.ndarray, count: np.ndarray) -> Contingency:
    """Sorts pairs by (pred, truth) and sums the counts of equal pairs."""
    p_max, t_max = (int(pred.max()), int(truth.max())) if pred.size else (0, 0)
    if t_max < _U64_MAX and p_max * (t_max + 1) + t_max <= _U64_MAX:
        # One uint64 key that cannot overflow sorts 2-4x faster than lexsort on two columns.
        base = np.uint64(t_max + 1)
        key = pred * base
        key += truth
        key, count = _sort_with(key, count)
        starts = _starts(key)
        key = key[starts]
        return Contingency(key // base, key % base, np.add.reduceat(count, starts))
    order = np.lexsort((truth, pred))
    pred, truth = pred[order], truth[order]
    starts = _starts(pred, truth)
    return Contingency(pred[starts], truth[starts], np.add.reduceat(count[order], starts))


def _sort_with(key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``key`` (uint64) ascending, ``value`` (int64 >= 0) alongside, equal keys in any order.

    Both are packed in one uint64 where they fit: np.sort is about twice as fast as argsort.
    """
    if key.size == 0:
        return key, value
    shift = int(value.max()).bit_length()
    if int(key.max()).bit_length() + shift > 64:
        order = np.argsort(key)
        return key[order], value[order]
    packed = key << np.uint64(shift)
    packed |= value.view(np.uint64)
    packed.sort()
    return packed >> np.uint64(shift), (packed & np.uint64((1 << shift) - 1)).view(np.int64)


def _renumber(ids: np.ndarray, offset: int) -> tuple[np.ndarray, int]:
    """Non-zero ids to ``offset + 1, offset + 2, ...`` in ascending order; 0 stays 0."""
    unique, inverse = np.unique(ids, return_inverse=True)
    has_zero = int(unique.size > 0 and unique[0] == 0)
    new = np.arange(unique.size, dtype=np.uint64) + np.uint64(offset + 1 - has_zero)
    if has_zero:
        new[0] = 0
    return new[inverse], offset + unique.size - has_zero


def _per_pair(ids: np.ndarray, unique: np.ndarray, areas: np.ndarray) -> np.ndarray:
    return areas[np.searchsorted(unique, ids)]


class _Pairs(NamedTuple):
    pred_objects: np.ndarray  # the non-zero ids of each side
    true_objects: np.ndarray
    pred: np.ndarray  # pairs of two objects
    truth: np.ndarray
    iou: np.ndarray


def _object_pairs(table: Contingency) -> _Pairs:
    p_ids, p_areas = table.pred_areas()
    t_ids, t_areas = table.truth_areas()
    both = (table.pred != 0) & (table.truth != 0)
    pred, truth, n = table.pred[both], table.truth[both], table.count[both]
    iou = n / (_per_pair(pred, p_ids, p_areas) + _per_pair(truth, t_ids, t_areas) - n)
    return _Pairs(p_ids[p_ids != 0], t_ids[t_ids != 0], pred, truth, iou)


def _drop_truth_background(table: Contingency) -> Contingency:
    keep = table.truth != 0
    return Contingency(table.pred[keep], table.truth[keep], table.count[keep])


def _parse_class_map(which: str, classes: ClassMap) -> tuple[np.ndarray, np.ndarray]:
    """Sorted uint64 ids and their int64 classes; background (id 0) entries are dropped."""
    if isinstance(classes, Mapping):  # np.array of Python ints >= 2**63 would be float64
        if any(k < 0 for k in classes):
            raise ValueError(f"{which} holds negative ids, e.g. {min(classes)}")
        ids = np.array(list(classes), dtype=np.uint64)
        values = np.array(list(classes.values()), dtype=np.int64)
    else:
        ids, values = np.asarray(classes[0]), np.asarray(classes[1])
    if ids.shape != values.shape or ids.ndim != 1:
        raise ValueError(f"{which}: ids and classes must be 1-D arrays of one length")
    if ids.size and (ids.dtype.kind not in "ui" or values.dtype.kind not in "ui"):
        raise ValueError(f"{which} must map integer ids to integer classes")
    if ids.size and ids.dtype.kind == "i" and ids.min() < 0:
        raise ValueError(f"{which} holds negative ids, e.g. {ids.min()}")
    ids, values = ids.astype(np.uint64), values.astype(np.int64)
    order = np.argsort(ids, kind="stable")
    ids, values = ids[order], values[order]
    if np.any(twice := ids[1:] == ids[:-1]):
        raise ValueError(f"{which} names id {ids[1:][twice][0]} twice")
    return ids[ids != 0], values[ids != 0]


def _classes_of(which: str, query: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The classes of ``query`` ids; ValueError naming the ids that have none."""
    pos = np.minimum(np.searchsorted(ids, query), max(ids.size - 1, 0))
    found = ids[pos] == query if ids.size else np.zeros(query.shape, bool)
    if not found.all():
        missing = np.unique(query[~found])
        shown = ", ".join(str(v) for v in missing[:10]) + (" ..." if missing.size > 10 else "")
        raise ValueError(f"{which} ids {shown} have no class in {which}_classes")
    return classes[pos]


def _div(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")
