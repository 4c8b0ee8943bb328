"""Training losses: pixel-weighted cross-entropy, soft Dice, and their sum (PyTorch).

    cross-entropy  = sum_x w(x) * -log p_{l(x)}(x)  /  (number of counted pixels)
    soft Dice      = 1 - mean_k (2 sum_x p_k g_k + eps) / (sum_x p_k + sum_x g_k + eps)

``w`` is the U-Net weight map (:mod:`.weight_map`) or 1; pixels whose label is the ignore
index count in neither loss. The cross-entropy is normalised by the counted pixels, not by
the weights, so the weight map shifts emphasis without rescaling the learning rate.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["cross_entropy", "dice", "cross_entropy+dice"]


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None, ignore_index: int | None = None
) -> torch.Tensor:
    """``logits`` (N, K, *), ``target`` (N, *) class ids, ``weights`` (N, *) or None."""
    counted = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target))
    per_pixel = F.cross_entropy(logits, safe.long(), reduction="none")
    if weights is not None:
        per_pixel = per_pixel * weights
    per_pixel = torch.where(counted, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / counted.sum().clamp(min=1)


def soft_dice(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None, eps: float = 1.0) -> torch.Tensor:
    """1 - the mean over classes of the soft Dice coefficient of the softmax and the one-hot truth."""
    k = logits.shape[1]
    counted = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    safe = torch.where(counted, target, torch.zeros_like(target)).long()
    probs = logits.softmax(dim=1) * counted.unsqueeze(1)
    truth = F.one_hot(safe, k).movedim(-1, 1).to(probs.dtype) * counted.unsqueeze(1)
    axes = [0] + list(range(2, logits.ndim))
    overlap = (probs * truth).sum(dim=axes)
    total = probs.sum(dim=axes) + truth.sum(dim=axes)
    return 1 - ((2 * overlap + eps) / (total + eps)).mean()


def loss(
    kind: LossKind,
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    if kind == "cross_entropy":
        return weighted_cross_entropy(logits, target, weights, ignore_index)
    if kind == "dice":
        return soft_dice(logits, target, ignore_index)
    if kind == "cross_entropy+dice":
        return weighted_cross_entropy(logits, target, weights, ignore_index) + soft_dice(logits, target, ignore_index)
    raise ValueError(f"loss {kind!r}; expected cross_entropy, dice or cross_entropy+dice")
