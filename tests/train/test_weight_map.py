"""The U-Net weight map against the paper's formula, computed by brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.train.weight_map import class_balance, separation_weights, weight_map


def brute_distance(point: tuple[int, int], mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    return float(np.sqrt((ys - point[0]) ** 2 + (xs - point[1]) ** 2).min())


def test_two_touching_objects_follow_the_papers_formula() -> None:
    """Two cells separated by a 2-px gap, and a third far away: w0 exp(-(d1 + d2)^2 / 2 sigma^2)."""
    ids = np.zeros((30, 40), np.int32)
    ids[5:15, 5:15] = 1
    ids[5:15, 17:27] = 2
    ids[22:28, 33:38] = 3
    w = separation_weights(ids, w0=10.0, sigma=5.0)
    for point in [(10, 15), (10, 16), (3, 16), (20, 20), (0, 0), (29, 39)]:
        d = sorted(brute_distance(point, ids == i) for i in (1, 2, 3))
        expected = 10.0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * 5.0**2))
        assert w[point] == pytest.approx(expected, rel=1e-12)
    assert w[10, 15] == pytest.approx(10 * np.exp(-9 / 50))  # in the 2-px gap: d1 = 1, d2 = 2
    assert np.all(w[ids > 0] == 0)
    assert w[10, 15] > 5 > w[0, 0]


def test_no_separation_term_without_two_objects() -> None:
    ids = np.zeros((10, 10), np.int32)
    assert not separation_weights(ids).any()
    ids[2:4, 2:4] = 7
    assert not separation_weights(ids).any()


def test_class_balance_and_the_whole_map() -> None:
    labels = np.array([[0, 0, 0, 1], [0, 0, 255, 1]])
    weights = class_balance(labels, 3, ignore_index=255)
    assert weights.tolist() == pytest.approx([7 / (2 * 5), 7 / (2 * 2), 0.0])  # N / (K n_k), K = 2 present
    full = weight_map(labels, None, weights, ignore_index=255)
    assert full[1, 2] == 0 and full[0, 3] == pytest.approx(7 / 4) and full[0, 0] == pytest.approx(7 / 10)
