import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from pipeline.metrics import (
    ClassIdError,
    bootstrap_mean_iou,
    confusion_matrix,
    mean_of_per_image_iou,
    scores_from_confusion,
)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true:UserWarning")
@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 6),
    n=st.integers(1, 400),
    seed=st.integers(0, 2**16),
    ignore=st.booleans(),
)
def test_confusion_and_scores_equal_scikit_learn(k, n, seed, ignore) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    pred = rng.integers(0, k, n)
    ignore_index = None
    if ignore:
        ignore_index = 255
        truth[rng.random(n) < 0.2] = 255
    cm = confusion_matrix(truth, pred, k, ignore_index)
    keep = truth != 255
    if keep.sum() == 0:
        assert cm.sum() == 0
        return
    expected = sk_confusion_matrix(truth[keep], pred[keep], labels=list(range(k)))
    np.testing.assert_array_equal(cm, expected)
    scores = scores_from_confusion(cm)
    present = np.isin(np.arange(k), np.concatenate([truth[keep], pred[keep]]))
    labels = list(range(k))
    sk_iou = jaccard_score(truth[keep], pred[keep], labels=labels, average=None, zero_division=0)
    sk_dice = f1_score(truth[keep], pred[keep], labels=labels, average=None, zero_division=0)
    np.testing.assert_array_equal(np.isnan(scores.iou), ~present)
    np.testing.assert_allclose(scores.iou[present], sk_iou[present], rtol=0, atol=1e-15)
    np.testing.assert_allclose(scores.dice[present], sk_dice[present], rtol=0, atol=1e-15)
    assert scores.mean_iou == pytest.approx(np.mean(sk_iou[present]), abs=1e-15)
    assert scores.pixel_accuracy == pytest.approx((truth[keep] == pred[keep]).mean(), abs=1e-15)
    predicted = np.isin(np.arange(k), pred[keep])
    in_truth = np.isin(np.arange(k), truth[keep])
    sk_precision = precision_score(truth[keep], pred[keep], labels=labels, average=None, zero_division=0)
    sk_recall = recall_score(truth[keep], pred[keep], labels=labels, average=None, zero_division=0)
    np.testing.assert_allclose(scores.precision[predicted], sk_precision[predicted], atol=1e-15)
    np.testing.assert_array_equal(np.isnan(scores.precision), ~predicted)
    np.testing.assert_allclose(scores.recall[in_truth], sk_recall[in_truth], atol=1e-15)
    assert scores.mean_class_accuracy == pytest.approx(balanced_accuracy_score(truth[keep], pred[keep]), abs=1e-12)
    freq = np.bincount(truth[keep], minlength=k) / keep.sum()
    assert scores.frequency_weighted_iou == pytest.approx(np.sum(freq[in_truth] * sk_iou[in_truth]), abs=1e-12)


def test_absent_class_is_nan_and_excluded_from_the_mean() -> None:
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    scores = scores_from_confusion(confusion_matrix(truth, pred, 3))
    assert np.isnan(scores.iou[2]) and np.isnan(scores.dice[2])
    assert scores.mean_iou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_class_ids_out_of_range_are_named() -> None:
    with pytest.raises(ClassIdError, match=r"ground truth holds class ids 3, 7; expected ids 0..2"):
        confusion_matrix(np.array([0, 3, 7, 3]), np.zeros(4, int), 3)
    with pytest.raises(ClassIdError, match="prediction holds class ids -1"):
        confusion_matrix(np.zeros(2, int), np.array([0, -1]), 3)


def test_counts_are_int64() -> None:
    cm = confusion_matrix(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8), 2)
    assert cm.dtype == np.int64 and cm[0, 0] == 9


def test_absent_policy_nan_makes_the_means_nan() -> None:
    cm = confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    assert not np.isnan(scores_from_confusion(cm, "exclude").mean_iou)
    assert np.isnan(scores_from_confusion(cm, "nan").mean_iou)
    assert np.isnan(scores_from_confusion(cm, "nan").mean_dice)


def test_pooled_and_mean_of_per_image_iou_differ_on_purpose() -> None:
    big = confusion_matrix(np.zeros(1000, int), np.zeros(1000, int), 2)  # all right
    small = confusion_matrix(np.array([1, 1]), np.array([0, 0]), 2)  # all wrong
    pooled = scores_from_confusion(big + small).mean_iou
    per_image = mean_of_per_image_iou([big, small])
    assert pooled == pytest.approx((1000 / 1002 + 0) / 2)
    assert per_image == pytest.approx((1.0 + 0.0) / 2)


def test_bootstrap_interval_contains_the_pooled_value() -> None:
    rng = np.random.default_rng(0)
    units = np.stack([confusion_matrix(rng.integers(0, 3, 500), rng.integers(0, 3, 500), 3) for _ in range(40)])
    low, high = bootstrap_mean_iou(units, resamples=500, confidence=0.9)
    pooled = scores_from_confusion(units.sum(axis=0)).mean_iou
    assert low < pooled < high
    assert bootstrap_mean_iou(units[:1]) != bootstrap_mean_iou(units[:1])  # NaN: one unit has no spread
