"""NaN and infinite values: found, counted, located, and filled on request (pure NumPy).

A float image may hold NaN or infinite pixels (no-data areas of a mosaic, a failed
stitch). A network turns them into NaN logits whose argmax is silently class 0, so they
are never passed on quietly: by default they are an error naming how many there are and
where; ``input.non_finite: fill`` replaces them by ``input.fill_value`` and the run reports
how many it replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputImageError
from .geometry import Box

FILL_HINT = "set input.non_finite: fill (with input.fill_value) to replace them"


@dataclass(frozen=True)
class NonFinite:
    """Pixels (any channel non-finite) of a region: how many, where, and the first one."""

    count: int
    first: tuple[int, ...]  # image coordinates
    region: Box

    def describe(self) -> str:
        where = ", ".join(f"{a}:{b}" for a, b in zip(self.region.offset, self.region.stop))
        first = ", ".join(map(str, self.first))
        return f"{self.count} NaN/infinite pixel{'s' * (self.count != 1)} in pixels {where} (first at {first})"


def non_finite_mask(x: np.ndarray) -> np.ndarray | None:
    """Spatial mask of pixels with a non-finite value in any channel of ``(C, *spatial)``.

    None for integer data (which cannot hold NaN) and for data without any.
    """
    if not np.issubdtype(x.dtype, np.inexact):
        return None
    bad = ~np.isfinite(x).all(axis=0)
    return bad if bad.any() else None


def find_non_finite(x: np.ndarray, box: Box, region: Box) -> NonFinite | None:
    """Non-finite pixels of ``x`` (covering ``box``) inside ``region`` (image coordinates)."""
    inside = region.intersect(box)
    if inside.empty:
        return None
    part = x[(slice(None),) + inside.relative_to(box.offset).slices()]
    mask = non_finite_mask(part)
    if mask is None:
        return None
    first = tuple(int(i) + o for i, o in zip(np.argwhere(mask)[0], inside.offset))
    return NonFinite(int(mask.sum()), first, inside)


def fill_non_finite(x: np.ndarray, value: float) -> np.ndarray:
    """``x`` with every NaN and infinity replaced by ``value`` (a copy only when needed)."""
    if not np.issubdtype(x.dtype, np.inexact) or np.isfinite(x).all():
        return x
    return np.where(np.isfinite(x), x, np.asarray(value, dtype=x.dtype))


def apply_policy(
    x: np.ndarray,
    box: Box,
    image_shape: tuple[int, ...],
    fill_value: float | None,
    path: str,
    counted: Box | None = None,
    context: str = "",
) -> tuple[np.ndarray, int]:
    """The run's policy on ``x`` (covering ``box``, which may reach past the image).

    ``fill_value`` None: InputImageError naming how many non-finite pixels the in-image part
    holds and where. Otherwise ``x`` filled, and how many there were inside ``counted`` (a
    write box: each pixel of the image is counted once over all blocks).
    """
    in_image = Box((0,) * len(image_shape), image_shape)
    if fill_value is None:
        found = find_non_finite(x, box, in_image)
        if found is not None:
            raise InputImageError(f"input.path: {path} holds {found.describe()}{context}; {FILL_HINT}")
        return x, 0
    found = find_non_finite(x, box, counted or in_image)
    return fill_non_finite(x, fill_value), (found.count if found else 0)
