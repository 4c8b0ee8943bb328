"""Per-class probabilities of a block, as stored beside the labels (pure).

The softmax of the stitched logits (computed in float64, so that every block gives the same
bytes for the same logits), stored as ``float16`` or as ``uint8`` scaled to 0..255
(``round(255 p)``: 1/255 resolution, half the bytes of float16). The labels stay the argmax
of the logits themselves: a probability rounding can never change a label.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ProbabilityDtype = Literal["uint8", "float16"]
UINT8_SCALE = 255


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (classes) of ``(K, ...)`` logits, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=0, keepdims=True)


def encode(probabilities: np.ndarray, dtype: ProbabilityDtype) -> np.ndarray:
    """``(K, ...)`` probabilities in [0, 1] as stored."""
    if dtype == "uint8":
        return np.rint(probabilities * UINT8_SCALE).astype(np.uint8)
    return probabilities.astype(np.float16)


def one_hot(label: int, classes: int, shape: tuple[int, ...], dtype: ProbabilityDtype) -> np.ndarray:
    """The probabilities of a block written as one class without the model (tiling.skip)."""
    found = np.zeros((classes,) + shape, np.float64)
    found[label] = 1.0
    return encode(found, dtype)
