"""Skip blocks that need no model: mask-to-image mapping and per-block rules (pure).

Whole-slide images are mostly background (``tiling.skip``). A block is *skipped*, written
as one class without running the model, when

* the mask (any resolution, e.g. a tissue mask from a pyramid level) has no nonzero pixel
  over the block's write box: decided once, in the driver, at plan time; or
* its raw read box (all channels, before normalisation) holds one single value
  (``uniform``), lies entirely below ``below`` or entirely above ``above``: decided in the
  block's task, after the read and before the model.

Skipping works on whole blocks: write boxes still partition the image, every chunk has one
writer, and a skipped block's chunk is a constant, the same bytes on every rerun.

The mask maps to the image with one scale per axis, ``H / h`` image pixels per mask pixel
(integer or not): mask pixel ``j`` covers the image coordinates ``[j H / h, (j + 1) H / h)``,
and a box counts every mask pixel whose footprint it intersects (conservative: a mask pixel
the box only partly covers counts)::

    image  0       8       16      24      32      H = 32, h = 4: 8 image px per mask px
    mask   |   0   |   1   |   2   |   3   |
    box        [6 ............ 19)                 -> mask pixels 0, 1 and 2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from .geometry import Box
from .tiling import Block


@dataclass(frozen=True)
class SkipRule:
    """What a block task checks on its raw read box, and the class a skipped block gets."""

    label: int = 0
    uniform: bool = False
    below: float | None = None
    above: float | None = None

    @property
    def checks_blocks(self) -> bool:
        """Whether any rule is checked per block at run time."""
        return self.uniform or self.below is not None or self.above is not None

    def skips(self, raw: np.ndarray) -> bool:
        """Whether a block whose raw read box ``(C, *read_shape)`` is ``raw`` needs no model.

        NaN never satisfies a rule (comparisons with NaN are false): such a block is computed.
        """
        if not self.checks_blocks or raw.size == 0:
            return False
        low, high = raw.min(), raw.max()
        return bool(
            (self.uniform and low == high)
            or (self.below is not None and high < self.below)
            or (self.above is not None and low > self.above)
        )

    def describe(self) -> str:
        """``uniform, above 230``: the rules as the plan names them."""
        parts = ["uniform"] if self.uniform else []
        parts += [
            f"{name} {value:g}"
            for name, value in (("below", self.below), ("above", self.above))
            if value is not None
        ]
        return ", ".join(parts)


@dataclass(frozen=True)
class SkipPlan:
    """The skipping of a run: rules checked per block, and the blocks the mask skips."""

    rule: SkipRule
    masked: frozenset[tuple[int, ...]] = field(default_factory=frozenset)
    mask_name: str | None = None  # the mask as messages show it (credentials redacted)
    mask_shape: tuple[int, ...] | None = None

    def describe(self, n_blocks: int) -> str:
        """One line for the plan: what the mask skips, which rules the tasks check."""
        written = f"written as class {self.rule.label}"
        parts = []
        if self.mask_name is not None:
            shape = " x ".join(map(str, self.mask_shape or ()))
            parts.append(
                f"mask {self.mask_name} ({shape} px): {len(self.masked)} of {n_blocks} blocks "
                f"skipped ({written})"
            )
        if self.rule.checks_blocks:
            rules = self.rule.describe()
            plural = "s" if "," in rules else ""
            tail = "" if self.mask_name is not None else f"; skipped blocks {written}"
            parts.append(f"rule{plural} {rules} checked per block (raw read box) at run time{tail}")
        return "; ".join(parts)


def mask_box(box: Box, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> Box:
    """The mask pixels whose footprint in image coordinates intersects ``box``.

    Mask pixel ``j`` covers ``[j n / m, (j + 1) n / m)`` along an axis of ``n`` image and
    ``m`` mask pixels; it meets ``[a, b)`` iff ``j n < b m`` and ``(j + 1) n > a m``, that is
    ``floor(a m / n) <= j < ceil(b m / n)``: exact integer arithmetic, any scale.
    """
    start = tuple((a * m) // n for a, m, n in zip(box.offset, mask_shape, image_shape))
    stop = tuple(-(-(b * m) // n) for b, m, n in zip(box.stop, mask_shape, image_shape))
    return Box.from_bounds(start, stop)


def mask_shape_problem(mask_shape: tuple[int, ...], image_shape: tuple[int, ...]) -> str | None:
    """Why a mask of ``mask_shape`` cannot describe an image of ``image_shape``; None if it can.

    Each axis must be no larger than the image's, and the mask must be the image scaled by
    one factor ``f`` to within a pixel per axis (``|n / f - m| <= 1``: a pyramid level rounds
    each axis by less than a pixel, however it rounds); else its aspect ratio differs.
    """
    if len(mask_shape) != len(image_shape):
        return f"expected a {len(image_shape)}D mask, like the image"
    larger = [i for i, (m, n) in enumerate(zip(mask_shape, image_shape)) if m > n]
    if larger:
        return f"expected no axis larger than the image's (axis {larger[0]} is)"
    # 1 / f must lie in [(m - 1) / n, (m + 1) / n] for every axis.
    low = max(Fraction(m - 1, n) for m, n in zip(mask_shape, image_shape))
    high = min(Fraction(m + 1, n) for m, n in zip(mask_shape, image_shape))
    if low > high:
        return (
            "its aspect ratio differs from the image's: expected the image scaled down by one "
            "factor (to within a pixel per axis), e.g. a level of its pyramid"
        )
    return None


def masked_blocks(
    blocks: Iterable[Block],
    image_shape: tuple[int, ...],
    mask_shape: tuple[int, ...],
    any_nonzero: Callable[[Box], bool],
) -> frozenset[tuple[int, ...]]:
    """Indices of the blocks over whose write box the mask has no nonzero pixel.

    ``any_nonzero(box)`` answers for a box of mask pixels (inside the mask).
    """
    return frozenset(
        block.index
        for block in blocks
        if not block.write.empty and not any_nonzero(mask_box(block.write, image_shape, mask_shape))
    )


def constant_labels(shape: tuple[int, ...], label: int, dtype: np.dtype | str) -> np.ndarray:
    """The labels of a skipped block: one class everywhere (the same bytes on every rerun)."""
    return np.full(shape, label, dtype=np.dtype(dtype))
