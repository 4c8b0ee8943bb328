"""The losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train.losses import loss, soft_dice, weighted_cross_entropy


def test_weighted_cross_entropy_by_hand() -> None:
    # two pixels, two classes; logits (0, 0) and (ln 3, 0): p_truth = 1/2 and 3/4
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (N=1, K=2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    weights = torch.tensor([[[2.0, 4.0]]])
    expected = (2 * -math.log(1 / 2) + 4 * -math.log(3 / 4)) / 2
    assert weighted_cross_entropy(logits, target, weights).item() == pytest.approx(expected, rel=1e-6)
    # the second pixel ignored: only the first counts, divided by one counted pixel
    ignored = torch.tensor([[[1, 9]]])
    assert weighted_cross_entropy(logits, ignored, weights, ignore_index=9).item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_soft_dice_by_hand() -> None:
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # softmax: (1/2, 1/2), (3/4, 1/4)
    target = torch.tensor([[[1, 0]]])
    # class 0: p = (1/2, 3/4), g = (0, 1): overlap 3/4, total 5/4 + 1; class 1: p = (1/2, 1/4), g = (1, 0)
    d0 = (2 * 0.75 + 1) / (1.25 + 1 + 1)
    d1 = (2 * 0.5 + 1) / (0.75 + 1 + 1)
    assert soft_dice(logits, target).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    total = loss("cross_entropy+dice", logits, target)
    assert total.item() == pytest.approx(weighted_cross_entropy(logits, target).item() + 1 - (d0 + d1) / 2, rel=1e-6)


def test_an_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="expected cross_entropy, dice or cross_entropy\\+dice"):
        loss("focal", torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))  # type: ignore[arg-type]
