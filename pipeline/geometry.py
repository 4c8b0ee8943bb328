"""Axis-aligned boxes in pixel coordinates (n-dimensional, pure Python).

A box is a half-open range per axis: ``offset <= p < offset + shape``. Offsets may be
negative and boxes may reach past an image: that is how read boxes describe the
mirrored context outside it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Box:
    offset: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offset) != len(self.shape):
            raise ValueError(f"offset {self.offset} and shape {self.shape} differ in rank")
        if any(s < 0 for s in self.shape):
            raise ValueError(f"negative box shape {self.shape}")

    @classmethod
    def from_bounds(cls, start: tuple[int, ...], stop: tuple[int, ...]) -> Box:
        return cls(tuple(start), tuple(max(0, b - a) for a, b in zip(start, stop)))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stop(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offset, self.shape))

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def empty(self) -> bool:
        return self.size == 0

    def grow(self, lo: tuple[int, ...] | int, hi: tuple[int, ...] | int | None = None) -> Box:
        """Extend by ``lo`` before and ``hi`` (default: ``lo``) after, per axis."""
        lo_t = _per_axis(lo, self.ndim)
        hi_t = lo_t if hi is None else _per_axis(hi, self.ndim)
        return Box(
            tuple(o - a for o, a in zip(self.offset, lo_t)),
            tuple(s + a + b for s, a, b in zip(self.shape, lo_t, hi_t)),
        )

    def shift(self, delta: tuple[int, ...]) -> Box:
        return Box(tuple(o + d for o, d in zip(self.offset, delta)), self.shape)

    def relative_to(self, origin: tuple[int, ...]) -> Box:
        """The same box in coordinates whose zero is ``origin``."""
        return Box(tuple(o - r for o, r in zip(self.offset, origin)), self.shape)

    def intersect(self, other: Box) -> Box:
        start = tuple(max(a, b) for a, b in zip(self.offset, other.offset))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        return Box.from_bounds(start, stop)

    def clip(self, shape: tuple[int, ...]) -> Box:
        """Intersection with the image ``[0, shape)``."""
        return self.intersect(Box((0,) * len(shape), tuple(shape)))

    def contains(self, other: Box) -> bool:
        return all(a <= b for a, b in zip(self.offset, other.offset)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def slices(self) -> tuple[slice, ...]:
        """NumPy slices of this box; only meaningful for boxes with non-negative offsets."""
        if any(o < 0 for o in self.offset):
            raise ValueError(f"box {self} has a negative offset and cannot index an array")
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.shape))


def _per_axis(value: tuple[int, ...] | int, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    if len(value) != ndim:
        raise ValueError(f"expected {ndim} values, got {value}")
    return tuple(value)
