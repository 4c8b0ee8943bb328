"""Label pyramids (pure): the levels' shapes, and one level from the one before it.

Each level halves the last two axes (y, x) of the one before; a leading z axis keeps its
size (EM and light-sheet stacks are usually anisotropic already). Levels are added until one
fits a single chunk. A level is computed from the level before it, never from the labels
at full resolution, so one task reads ``2c x 2c`` pixels to write a ``c x c`` chunk::

    level k      +---+---+          level k+1   +---+
                 | a | b |   mode               | m |   m = the most frequent of a b c d
                 +---+---+  ------>             +---+       (ties: the smallest id);
                 | c | d |   nearest                      nearest: m = a
                 +---+---+

A window cut by the end of an axis (odd sizes) holds fewer pixels; its mode is over those.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Downsampling = Literal["mode", "nearest"]
DOWNSAMPLINGS: tuple[str, ...] = get_args(Downsampling)
FACTOR = 2  # per level, along y and x


def level_shapes(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of every level, full resolution first, until one fits one chunk in y and x."""
    levels = [tuple(shape)]
    while any(n > c for n, c in zip(levels[-1][-2:], chunks[-2:])):
        levels.append(next_shape(levels[-1]))
    return levels


def next_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the level after one of ``shape``: y and x halved, rounded up."""
    return (*shape[:-2], *(-(-n // FACTOR) for n in shape[-2:]))


def level_scale(level: int) -> int:
    """How many full-resolution pixels one pixel of ``level`` spans along y and x."""
    return FACTOR**level


def level_offset(level: int, method: Downsampling) -> float:
    """Where pixel 0 of ``level`` sits, in full-resolution pixels: mode summarises a window
    whose centre is ``(2^level - 1) / 2``; nearest keeps the window's first pixel."""
    return (level_scale(level) - 1) / 2 if method == "mode" else 0.0


def downsample(labels: np.ndarray, method: Downsampling) -> np.ndarray:
    """``labels`` (any integer dtype; 2 or more axes) halved along its last two axes."""
    if method == "nearest":
        return labels[..., ::FACTOR, ::FACTOR].copy()
    if method != "mode":
        raise ValueError(f"downsampling {method!r}; expected one of {', '.join(DOWNSAMPLINGS)}")
    # Pad odd ends by repeating the last row/column: every pixel of a cut window then counts
    # twice (or four times), so the window's mode is the mode of the pixels it really holds.
    pad = [(0, 0)] * (labels.ndim - 2) + [(0, n % FACTOR) for n in labels.shape[-2:]]
    padded = np.pad(labels, pad, mode="edge") if any(p[1] for p in pad) else labels
    windows = [padded[..., i::FACTOR, j::FACTOR] for i in range(FACTOR) for j in range(FACTOR)]
    best = windows[0].copy()
    best_count = np.zeros(best.shape, dtype=np.uint8)
    for candidate in windows:
        count = sum((w == candidate).view(np.uint8) for w in windows)
        better = (count > best_count) | ((count == best_count) & (candidate < best))
        best = np.where(better, candidate, best)
        best_count = np.where(better, count, best_count)
    return best
