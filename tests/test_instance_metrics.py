"""Instance metrics against whole-array references (object masks, no table) and scikit-image."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import adapted_rand_error as sk_adapted_rand_error
from skimage.metrics import variation_of_information as sk_variation_of_information

from pipeline.instance_metrics import (
    THRESHOLDS,
    Contingency,
    count_overlaps,
    disjoint_union,
    match,
    mean_average_precision,
    merge,
    panoptic_quality,
    variation_of_information,
)
from pipeline.instance_metrics import adapted_rand_error as rand_error

U64_MAX = 2**64 - 1
# Small ids, ids beyond 2**32 and 2**40, ids next to 2**64 - 1 (no uint64 key fits them).
ID_POOLS = [
    np.arange(1, 40),
    np.array([5_000_000_000 + k for k in range(20)] + [2**40 + k for k in range(20)]),
    np.array([U64_MAX - k for k in range(30)] + [1, 2, 3], dtype=np.uint64),
]
SEEDS = range(24)


def random_pair(seed: int, shape: tuple[int, int] = (40, 50)) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, truth)``: truth of random discs; pred the truth shifted, with objects merged,
    split, missed and some false discs. Some images are empty."""
    rng = np.random.default_rng(seed)
    pool = ID_POOLS[seed % len(ID_POOLS)].astype(np.uint64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]

    def paint(image: np.ndarray, count: int) -> None:
        for i in rng.choice(pool, count):
            cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(1, 7) ** 2] = i

    truth = np.zeros(shape, np.uint64)
    if seed % 8 != 0:
        paint(truth, int(rng.integers(1, 15)))
    shifted = np.roll(truth, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    ids = np.unique(shifted)
    new_ids = rng.choice(pool, ids.size)  # repeats merge objects
    new_ids[rng.random(ids.size) < 0.15] = 0  # missed objects
    new_ids[ids == 0] = 0
    pred = new_ids[np.searchsorted(ids, shifted)]
    if seed % 3 == 0 and ids.size > 1:  # split one object into left and right halves
        split = (shifted == ids[-1]) & (xx > xx[shifted == ids[-1]].mean())
        pred[split] = rng.choice(pool)
    if seed % 8 == 1:
        pred[:] = 0
    elif seed % 16 != 8:  # 8, 24, ...: both images empty
        paint(pred, int(rng.integers(0, 4)))
    return pred, truth


def objects(image: np.ndarray) -> list[int]:
    return [int(i) for i in np.unique(image) if i != 0]


def reference_iou(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every (pred object, truth object), from boolean masks of the whole images."""
    p_masks = [pred == p for p in objects(pred)]
    t_masks = [truth == t for t in objects(truth)]
    iou = np.zeros((len(p_masks), len(t_masks)))
    for i, p in enumerate(p_masks):
        for j, t in enumerate(t_masks):
            iou[i, j] = np.count_nonzero(p & t) / np.count_nonzero(p | t)
    return iou


def reference_match(iou: np.ndarray, threshold: float) -> tuple[int, int, int, float]:
    """TP, FP, FN and the sum of matched IoU, without assuming that matches are one to one."""
    matched = iou > threshold
    tp = int(matched.sum())
    fp = iou.shape[0] - int(matched.any(axis=1).sum())
    fn = iou.shape[1] - int(matched.any(axis=0).sum())
    return tp, fp, fn, float(iou[matched].sum())


def ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def assert_close(actual: float, expected: float, tol: float = 1e-12) -> None:
    assert (np.isnan(actual) and np.isnan(expected)) or abs(actual - expected) <= tol, (
        actual,
        expected,
    )


def assert_tables_equal(a: Contingency, b: Contingency) -> None:
    for name in ("pred", "truth", "count"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=name)


def brute_table(pred: np.ndarray, truth: np.ndarray) -> Contingency:
    pairs = sorted(Counter(zip(pred.ravel().tolist(), truth.ravel().tolist())).items())
    return Contingency(
        np.array([p for (p, _), _ in pairs], np.uint64),
        np.array([t for (_, t), _ in pairs], np.uint64),
        np.array([n for _, n in pairs], np.int64),
    )


def sequential(image: np.ndarray) -> np.ndarray:
    """Ids renumbered 1, 2, ... (0 stays 0): skimage's tables are sized by the largest id."""
    return np.searchsorted(np.union1d(np.zeros(1, image.dtype), image), image).astype(np.int64)


def side_by_side(images: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The images in a row, each image's non-zero ids renumbered after the previous ones'."""
    preds, truths, p_next, t_next = [], [], 0, 0
    for pred, truth in images:
        p, t = sequential(pred), sequential(truth)
        preds.append(np.where(p > 0, p + p_next, 0))
        truths.append(np.where(t > 0, t + t_next, 0))
        p_next, t_next = p_next + int(p.max()), t_next + int(t.max())
    return np.concatenate(preds, axis=1), np.concatenate(truths, axis=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_count_overlaps_equals_pixel_counter(seed: int) -> None:
    pred, truth = random_pair(seed)
    assert_tables_equal(count_overlaps(pred, truth), brute_table(pred, truth))
    # Signed and narrow dtypes give the same table.
    small_p, small_t = sequential(pred).astype(np.int16), sequential(truth).astype(np.uint8)
    assert_tables_equal(count_overlaps(small_p, small_t), brute_table(small_p, small_t))


@pytest.mark.parametrize(
    "pred_ids, truth_ids",
    [(0, 0), (2**50, 0), (0, 2**50), (2**40, 2**40), (U64_MAX - 100, 0)],
)
def test_count_overlaps_every_sort_path(pred_ids: int, truth_ids: int) -> None:
    """One uint64 key, packed with the counts or not, and two sorted columns."""
    sparse_p, sparse_t = random_pair(7, shape=(60, 70))
    pred = np.where(sparse_p > 0, sequential(sparse_p).astype(np.uint64) + np.uint64(pred_ids), 0)
    truth = np.where(sparse_t > 0, sequential(sparse_t).astype(np.uint64) + np.uint64(truth_ids), 0)
    pred, truth = pred.astype(np.uint64), truth.astype(np.uint64)
    assert_tables_equal(count_overlaps(pred, truth), brute_table(pred, truth))
    table = count_overlaps(pred, truth)
    ids, areas = table.truth_areas()
    expected = Counter(truth.ravel().tolist())
    assert dict(zip(ids.tolist(), areas.tolist(), strict=True)) == expected


def test_count_overlaps_ignore_mask(rng: np.random.Generator) -> None:
    pred, truth = random_pair(5)
    mask = rng.random(pred.shape) < 0.3
    table = count_overlaps(pred, truth, ignore_mask=mask)
    assert_tables_equal(table, brute_table(pred[~mask], truth[~mask]))
    assert table.pixels == np.count_nonzero(~mask)
    assert count_overlaps(pred, truth, np.ones(pred.shape, bool)).count.size == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_match_equals_mask_reference(seed: int) -> None:
    pred, truth = random_pair(seed)
    iou = reference_iou(pred, truth)
    counts = match(count_overlaps(pred, truth))
    assert [c.threshold for c in counts] == list(THRESHOLDS)
    aps = []
    for c in counts:
        tp, fp, fn, iou_sum = reference_match(iou, c.threshold)
        assert (c.tp, c.fp, c.fn) == (tp, fp, fn)
        assert_close(c.iou_sum, iou_sum)
        assert_close(c.precision, ratio(tp, tp + fp))
        assert_close(c.recall, ratio(tp, tp + fn))
        assert_close(c.f1, ratio(2 * tp, 2 * tp + fp + fn))
        assert_close(c.mean_matched_iou, ratio(iou_sum, tp))
        aps.append(ratio(tp, tp + fp + fn))
        assert_close(c.ap, aps[-1])
    assert_close(mean_average_precision(counts), float(np.mean(aps)))


def test_random_images_exercise_matches() -> None:
    """The generator must give matches, misses and both-empty images, or the tests say little."""
    counts = [match(count_overlaps(*random_pair(seed)), [0.5])[0] for seed in SEEDS]
    assert sum(c.tp for c in counts) > 50 and sum(c.fp for c in counts) > 10
    assert sum(c.fn for c in counts) > 10 and any(np.isnan(c.ap) for c in counts)


@pytest.mark.parametrize("seed", SEEDS)
def test_panoptic_quality_equals_mask_reference(seed: int) -> None:
    pred, truth = random_pair(seed)
    rng = np.random.default_rng(seed)
    p_ids, t_ids = objects(pred), objects(truth)
    # Classes 1..3; a class 9 named by the truth map only, on an id absent from this image.
    pred_classes = {p: int(rng.integers(1, 4)) for p in p_ids}
    truth_classes = {t: int(rng.integers(1, 4)) for t in t_ids} | {123456789: 9}
    table = count_overlaps(pred, truth)
    arrays = (np.array(list(pred_classes), np.uint64), np.array(list(pred_classes.values())))
    for pq in (
        panoptic_quality(table, pred_classes, truth_classes),
        panoptic_quality(table, arrays, truth_classes),
    ):
        iou = reference_iou(pred, truth)
        assert set(pq) == set(pred_classes.values()) | set(truth_classes.values())
        for c, got in pq.items():
            rows = [i for i, p in enumerate(p_ids) if pred_classes[p] == c]
            cols = [j for j, t in enumerate(t_ids) if truth_classes[t] == c]
            tp, fp, fn, iou_sum = reference_match(
                iou[np.ix_(np.array(rows, int), np.array(cols, int))], 0.5
            )
            assert (got.tp, got.fp, got.fn) == (tp, fp, fn)
            sq, rq = ratio(iou_sum, tp), ratio(tp, tp + fp / 2 + fn / 2)
            assert_close(got.sq, sq)
            assert_close(got.rq, rq)
            assert_close(got.pq, sq * rq if tp else (0.0 if fp + fn else float("nan")))
        assert np.isnan(pq[9].pq) and np.isnan(pq[9].sq)


def test_panoptic_quality_names_ids_without_class() -> None:
    pred = np.array([[1, 1, 0, 2**40]])
    truth = np.array([[7, 7, 0, 8]])
    table = count_overlaps(pred, truth)
    with pytest.raises(ValueError, match=str(2**40)):
        panoptic_quality(table, {1: 0}, {7: 0, 8: 0})
    with pytest.raises(ValueError, match="truth ids 8 "):
        panoptic_quality(table, {1: 0, 2**40: 0}, {7: 0})
    with pytest.raises(ValueError, match="twice"):
        panoptic_quality(table, (np.array([1, 1, 2**40]), np.array([0, 1, 0])), {7: 0, 8: 0})


@settings(max_examples=25, deadline=None)
@given(
    chunk=st.tuples(st.integers(2, 60), st.integers(2, 60)),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
def test_merged_chunks_equal_whole_array(chunk: tuple[int, int], seed: int, masked: bool) -> None:
    pred, truth = random_pair(seed, shape=(100, 110))
    mask = np.random.default_rng(seed).random(pred.shape) < 0.2 if masked else None
    tables = [
        count_overlaps(
            pred[y : y + chunk[0], x : x + chunk[1]],
            truth[y : y + chunk[0], x : x + chunk[1]],
            None if mask is None else mask[y : y + chunk[0], x : x + chunk[1]],
        )
        for y in range(0, 100, chunk[0])
        for x in range(0, 110, chunk[1])
    ]
    assert_tables_equal(merge(tables), count_overlaps(pred, truth, mask))


def test_merge_of_37x41_chunks_cutting_objects() -> None:
    for seed in (2, 4, 5):  # small, > 2**32 and near 2**64 ids
        pred, truth = random_pair(seed, shape=(100, 110))
        tables = [
            count_overlaps(pred[y : y + 37, x : x + 41], truth[y : y + 37, x : x + 41])
            for y in range(0, 100, 37)
            for x in range(0, 110, 41)
        ]
        whole = count_overlaps(pred, truth)
        assert_tables_equal(merge(tables), whole)
        assert_tables_equal(merge(reversed(tables)), whole)


def test_disjoint_union_equals_images_side_by_side() -> None:
    images = [random_pair(seed) for seed in (3, 4, 8, 5)]  # seed 8: empty images
    pooled = disjoint_union([count_overlaps(p, t) for p, t in images])
    assert_tables_equal(pooled, count_overlaps(*side_by_side(images)))
    assert disjoint_union([]).count.size == 0


def skimage_scores(pred: np.ndarray, truth: np.ndarray, ignore: bool) -> tuple[float, ...]:
    """skimage's (error, precision, recall) swapped to (error, recall, precision), and VI."""
    p, t = sequential(pred), sequential(truth)
    error, sk_precision, sk_recall = sk_adapted_rand_error(t, p)  # truth 0 ignored
    split, merge_ = sk_variation_of_information(t, p, ignore_labels=(0,) if ignore else ())
    # skimage 0.26 swaps precision and recall (scikit-image issue #6485): its "precision"
    # divides by the pairs of the truth.
    return error, sk_recall, sk_precision, split, merge_


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # skimage divides 0 by 0 on empty truths
@pytest.mark.parametrize("ignore", [False, True])
def test_rand_and_vi_equal_skimage(ignore: bool) -> None:
    for seed in SEEDS:
        pred, truth = random_pair(seed)
        table = count_overlaps(pred, truth)
        ours = (*rand_error(table), *variation_of_information(table, ignore))
        for got, expected in zip(ours, skimage_scores(pred, truth, ignore), strict=True):
            assert_close(got, expected)


@pytest.mark.parametrize("ignore", [False, True])
def test_pooled_rand_and_vi_equal_skimage_side_by_side(ignore: bool) -> None:
    images = [random_pair(seed) for seed in (1, 3, 4, 8, 10)]
    pooled = disjoint_union([count_overlaps(p, t) for p, t in images])
    ours = (*rand_error(pooled), *variation_of_information(pooled, ignore))
    for got, expected in zip(ours, skimage_scores(*side_by_side(images), ignore), strict=True):
        assert_close(got, expected)


def test_rand_and_vi_directions_on_a_merge() -> None:
    """A prediction that merges three true objects: recall 1, low precision, VI only merge."""
    truth = np.array([[1, 1, 2, 2, 3, 3]])
    pred = np.ones_like(truth)
    scores = rand_error(count_overlaps(pred, truth))
    # Pairs together: in both 3 (one per true object), in truth 3, in pred 15.
    assert scores.precision == pytest.approx(3 / 15) and scores.recall == 1.0
    assert scores.error == pytest.approx(1 - 2 * 3 / (3 + 15))
    vi = variation_of_information(count_overlaps(pred, truth))
    assert vi.split == 0.0 and vi.merge == pytest.approx(np.log2(3))
    assert vi.total == vi.merge


def test_hand_computed_average_precision() -> None:
    # truth: A = 1 (4 px), B = 2 (4 px), C = 3 (2 px)
    # pred:  5 = A exactly (IoU 1); 6 = 3 px of B (IoU 3 / 4 = 0.75);
    #        7 on background (a false positive); C is missed.
    truth = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 3, 3, 0, 0, 0]])
    pred = np.array([[5, 5, 5, 5, 0, 6, 6, 6, 0, 0, 0, 0, 0, 7, 7]])
    counts = match(count_overlaps(pred, truth))
    # th 0.5 .. 0.7: 5-A, 6-B match: TP 2, FP 1 (7), FN 1 (C): AP = 2 / 4 = 0.5
    # th 0.75 .. 0.95: 0.75 is not > 0.75, only 5-A: TP 1, FP 2, FN 2: AP = 1 / 5 = 0.2
    expected = [(2, 1, 1)] * 5 + [(1, 2, 2)] * 5
    assert [(c.tp, c.fp, c.fn) for c in counts] == expected
    assert [c.ap for c in counts] == [0.5] * 5 + [0.2] * 5
    assert mean_average_precision(counts) == pytest.approx(0.35, abs=1e-15)
    assert counts[0].precision == 2 / 3 and counts[0].recall == 2 / 3 and counts[0].f1 == 2 / 3
    assert counts[0].iou_sum == 1.75 and counts[-1].mean_matched_iou == 1.0


def test_matching_is_strict_and_one_to_one() -> None:
    # pred 1 covers 2 of the 4 px of truth 1: IoU exactly 0.5, which does not match at 0.5.
    # pred 2 covers 3 of the 5 px of truth 2: IoU 3 / 5, which does not match at 0.6 either.
    truth = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2, 2]])
    pred = np.array([[1, 1, 0, 0, 0, 2, 2, 2, 0, 0]])
    at = {c.threshold: (c.tp, c.fp, c.fn) for c in match(count_overlaps(pred, truth))}
    assert at[0.5] == at[0.55] == (1, 1, 1)
    assert at[0.6] == (0, 2, 2)
    # Two halves of one object: IoU 0.5 each, neither matches, the object is missed.
    truth = np.array([[4, 4, 4, 4, 4, 4]])
    pred = np.array([[8, 8, 8, 9, 9, 9]])
    assert [(c.tp, c.fp, c.fn) for c in match(count_overlaps(pred, truth), [0.5])] == [(0, 2, 1)]


def test_empty_images_give_nan_not_zero() -> None:
    empty = count_overlaps(np.zeros((3, 4), int), np.zeros((3, 4), int))
    counts = match(empty)
    assert all((c.tp, c.fp, c.fn) == (0, 0, 0) and np.isnan(c.ap) for c in counts)
    assert np.isnan(mean_average_precision(counts))
    assert np.isnan(match(count_overlaps(np.zeros((2, 2), int), np.ones((2, 2), int)))[0].precision)


def test_invalid_input_raises() -> None:
    a = np.zeros((4, 5), np.uint32)
    with pytest.raises(ValueError, match="shape"):
        count_overlaps(a, np.zeros((5, 4), np.uint32))
    with pytest.raises(ValueError, match="shape"):
        count_overlaps(a, a, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="negative"):
        count_overlaps(a, np.full((4, 5), -3))
    with pytest.raises(ValueError, match="integer"):
        count_overlaps(a.astype(float), a)
    table = count_overlaps(a + 1, a + 1)
    for bad in ([0.45], [0.5, 0.3], [float("nan")]):
        with pytest.raises(ValueError, match="below 0.5"):
            match(table, bad)
    with pytest.raises(ValueError, match="at least one"):
        mean_average_precision([])


def test_thresholds_are_exact_decimals() -> None:
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
